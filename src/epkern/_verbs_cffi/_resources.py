"""Creating the verbs objects of an opened device: the protection domain, memory regions (host memory and
dma-buf), completion queues and RC queue pairs."""

from __future__ import annotations

from ._cdef import CONSTANTS as _C
from ._handles import CompletionQueue, Context, MemoryRegion, ProtectionDomain, QueuePair
from ._library import check_ptr, flag_mask, get_ffi, verbs_lib


def alloc_pd(ctx: Context) -> ProtectionDomain:
    return ProtectionDomain(check_ptr("ibv_alloc_pd", verbs_lib().ibv_alloc_pd(ctx._require())), ctx)


# No IBV_ACCESS_RELAXED_ORDERING: RDMA writes on one RC QP must land in posting order.
DEFAULT_ACCESS = flag_mask(
    "IBV_ACCESS_LOCAL_WRITE", "IBV_ACCESS_REMOTE_WRITE", "IBV_ACCESS_REMOTE_READ", "IBV_ACCESS_REMOTE_ATOMIC"
)
"""The operations a queue pair accepts from its peer (qp_access_flags); each memory region still allows only its
own rights (:data:`MR_ACCESS` by default)."""


MR_ACCESS = flag_mask("IBV_ACCESS_LOCAL_WRITE")
"""The default rights of a memory region: local writes only. A region that peers write, read or update remotely
is registered with exactly those rights (``IBV_ACCESS_REMOTE_WRITE`` ...), never all of them by default."""


def reg_mr(pd: ProtectionDomain, addr: int, length: int, access: int = MR_ACCESS) -> MemoryRegion:
    """Register host memory ``[addr, addr + length)`` (iova = addr) through ``ibv_reg_mr_iova2``.

    The default access has no ``IBV_ACCESS_RELAXED_ORDERING``: in-order delivery on one RC QP is what the
    trailing count/flag write of the LL protocol relies on.
    """
    ffi = get_ffi()
    mr = verbs_lib().ibv_reg_mr_iova2(pd._require(), ffi.cast("void *", addr), length, addr, access)
    check_ptr("ibv_reg_mr_iova2", mr, f"addr=0x{addr:x} length={length} access=0x{access:x}")
    return MemoryRegion(mr, pd, addr)


def reg_dmabuf_mr(
    pd: ProtectionDomain, fd: int, offset: int, length: int, iova: int, access: int = MR_ACCESS
) -> MemoryRegion:
    """Register memory exported as a dma-buf (GPU memory) through ``ibv_reg_dmabuf_mr``.

    Obtaining ``fd`` is the caller's job: for a CUDA allocation, ``cuMemGetHandleForAddressRange(&fd, base,
    size, CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD, 0)`` over a page-aligned range (base/size multiples of the host
    page size), then ``offset`` is the region's start minus ``base`` and ``iova`` normally the region's device
    address (what remote WQEs name). The fd may be closed after registration.
    """
    mr = verbs_lib().ibv_reg_dmabuf_mr(pd._require(), offset, length, iova, fd, access)
    check_ptr("ibv_reg_dmabuf_mr", mr, f"fd={fd} offset={offset} length={length} iova=0x{iova:x} access=0x{access:x}")
    return MemoryRegion(mr, pd, iova)


def create_cq(ctx: Context, cqe: int, comp_vector: int = 0) -> CompletionQueue:
    ffi = get_ffi()
    cq = verbs_lib().ibv_create_cq(ctx._require(), cqe, ffi.NULL, ffi.NULL, comp_vector)
    check_ptr("ibv_create_cq", cq, f"cqe={cqe}")
    return CompletionQueue(cq, ctx, int(cq.cqe))


def create_rc_qp(
    pd: ProtectionDomain,
    send_cq: CompletionQueue,
    recv_cq: CompletionQueue | None = None,
    *,
    max_send_wr: int = 1024,
    max_recv_wr: int = 1,
    max_send_sge: int = 1,
    max_recv_sge: int = 1,
    max_inline_data: int = 0,
    sq_sig_all: bool = False,
) -> QueuePair:
    """An RC QP in RESET state (``ibv_create_qp``); move it on with :func:`connect_rc_qp`."""
    ffi = get_ffi()
    recv_cq = recv_cq or send_cq
    init = ffi.new("struct ibv_qp_init_attr *")
    init.send_cq = send_cq._require()
    init.recv_cq = recv_cq._require()
    init.qp_type = ffi.cast("enum ibv_qp_type", _C["IBV_QPT_RC"])
    init.sq_sig_all = int(sq_sig_all)
    init.cap.max_send_wr = max_send_wr
    init.cap.max_recv_wr = max_recv_wr
    init.cap.max_send_sge = max_send_sge
    init.cap.max_recv_sge = max_recv_sge
    init.cap.max_inline_data = max_inline_data
    qp = verbs_lib().ibv_create_qp(pd._require(), init)
    check_ptr("ibv_create_qp", qp, f"RC max_send_wr={max_send_wr} max_inline_data={max_inline_data}")
    cap = init.cap  # ibv_create_qp wrote back what the provider granted
    return QueuePair(
        qp, pd, send_cq, recv_cq, max_send_wr=int(cap.max_send_wr), max_inline_data=int(cap.max_inline_data)
    )
