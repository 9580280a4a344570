"""Thin Python wrappers over libibverbs / libmlx5 through cffi ABI mode (no compiler, no headers needed).

Nothing is loaded at import: the cdef is parsed and the shared libraries are opened on first use. Every
failing call raises :class:`VerbsError` carrying errno and its text; a missing library or device raises
:class:`RdmaUnavailableError` saying why.
"""

from __future__ import annotations

import errno as _errno
import os
import struct
import threading
from dataclasses import dataclass
from typing import Any

from ..errors import DeviceUnavailableError, EpkernError
from ._cdef import CDEF, CONSTANTS, MLX5_FUNCTIONS, VERBS_FUNCTIONS

LIBIBVERBS = "libibverbs.so.1"
LIBMLX5 = "libmlx5.so.1"

_C = CONSTANTS


def _mask(*names: str) -> int:
    m = 0
    for name in names:
        m |= _C[name]
    return m


class RdmaUnavailableError(DeviceUnavailableError):
    """libibverbs/libmlx5 cannot be loaded, or no (matching) RDMA device exists; the message says which."""


class VerbsError(EpkernError, OSError):
    """A verbs call failed; ``errno`` holds the error number and the message names the call."""

    def __init__(self, call: str, err: int, detail: str = ""):
        text = os.strerror(err) if err else "unknown error (errno not set)"
        name = _errno.errorcode.get(err, str(err))
        msg = f"{call} failed: {name} ({text})" + (f"; {detail}" if detail else "")
        super().__init__(err, msg)
        self.call = call

    def __str__(self) -> str:
        return self.args[1]


# --------------------------------------------------------------------------------------------- loading

_lock = threading.Lock()
_ffi: Any = None
_libs: dict[str, Any] = {}


def get_ffi() -> Any:
    """The ABI-mode ``cffi.FFI`` holding the cdef (parsed on first call; opens no library)."""
    global _ffi
    with _lock:
        if _ffi is None:
            try:
                import cffi
            except ImportError as e:  # pragma: no cover - cffi is a dependency
                raise RdmaUnavailableError(f"the cffi package is not installed ({e})") from None
            ffi = cffi.FFI()
            ffi.cdef(CDEF + VERBS_FUNCTIONS + MLX5_FUNCTIONS)
            _ffi = ffi
        return _ffi


def _load(soname: str, package_hint: str) -> Any:
    ffi = get_ffi()
    with _lock:
        lib = _libs.get(soname)
        if lib is None:
            try:
                lib = ffi.dlopen(soname)
            except OSError as e:
                raise RdmaUnavailableError(
                    f"{soname} could not be loaded ({e}); install rdma-core ({package_hint})"
                ) from None
            _libs[soname] = lib
        return lib


def verbs_lib() -> Any:
    """The dlopen'ed libibverbs (loaded on first call)."""
    return _load(LIBIBVERBS, "Debian/Ubuntu: libibverbs1")


def mlx5_lib() -> Any:
    """The dlopen'ed libmlx5 (loaded on first call)."""
    verbs_lib()
    return _load(LIBMLX5, "Debian/Ubuntu: ibverbs-providers")


def _check_ptr(call: str, ptr: Any, detail: str = "") -> Any:
    ffi = get_ffi()
    if ptr == ffi.NULL:
        raise VerbsError(call, ffi.errno, detail)
    return ptr


def _check_rc(call: str, rc: int, detail: str = "") -> None:
    # verbs calls return 0, or an errno value (some return -1 and set errno).
    if rc != 0:
        err = rc if rc > 0 else (-rc if rc < -1 else get_ffi().errno)
        raise VerbsError(call, err, detail)


# --------------------------------------------------------------------------------------------- devices


def _device_list_raw() -> tuple[list[str], str]:
    """(names, reason when empty)."""
    ffi, lib = get_ffi(), verbs_lib()
    num = ffi.new("int *")
    lst = lib.ibv_get_device_list(num)
    if lst == ffi.NULL:
        err = ffi.errno
        if err == _errno.ENOSYS:
            return [], (
                "ibv_get_device_list failed with ENOSYS: the kernel exposes no RDMA verbs devices "
                "(no /sys/class/infiniband_verbs; no NIC driver and no soft-RoCE loaded)"
            )
        raise VerbsError("ibv_get_device_list", err)
    try:
        names = [ffi.string(lib.ibv_get_device_name(lst[i])).decode() for i in range(num[0])]
    finally:
        lib.ibv_free_device_list(lst)
    return names, ("" if names else "ibv_get_device_list returned an empty list")


def device_list() -> list[str]:
    """Names of the RDMA devices libibverbs sees (e.g. ``["mlx5_0", "mlx5_1"]``); ``[]`` when there are none.

    Raises :class:`RdmaUnavailableError` when libibverbs itself cannot be loaded.
    """
    return _device_list_raw()[0]


def rdma_available() -> tuple[bool, str]:
    """(True, "N RDMA devices: ...") or (False, why not). Never raises."""
    try:
        names, reason = _device_list_raw()
    except EpkernError as e:
        return False, f"RDMA unavailable: {e}"
    if not names:
        return False, f"no RDMA devices: {reason}"
    return True, f"{len(names)} RDMA device(s): {', '.join(names)}"


# --------------------------------------------------------------------------------------------- handles


class _Handle:
    """An owned verbs object; ``close()`` is idempotent; parents are kept alive by reference."""

    _destroy: str = ""

    def __init__(self, ptr: Any):
        self.ptr = ptr

    @property
    def closed(self) -> bool:
        return self.ptr is None

    def _require(self) -> Any:
        if self.ptr is None:
            raise EpkernError(f"{type(self).__name__} is closed")
        return self.ptr

    def close(self) -> None:
        if self.ptr is not None:
            ptr, self.ptr = self.ptr, None
            _check_rc(self._destroy, getattr(verbs_lib(), self._destroy)(ptr))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Context(_Handle):
    """An opened RDMA device (``struct ibv_context *``)."""

    _destroy = "ibv_close_device"

    def __init__(self, ptr: Any, name: str, is_mlx5: bool):
        super().__init__(ptr)
        self.name = name
        self.is_mlx5 = is_mlx5


class ProtectionDomain(_Handle):
    _destroy = "ibv_dealloc_pd"

    def __init__(self, ptr: Any, context: Context):
        super().__init__(ptr)
        self.context = context


class MemoryRegion(_Handle):
    """A registered region: ``addr`` (iova the peer uses in RDMA WQEs), ``length``, ``lkey``, ``rkey``."""

    _destroy = "ibv_dereg_mr"

    def __init__(self, ptr: Any, pd: ProtectionDomain, addr: int):
        super().__init__(ptr)
        self.pd = pd
        self.addr = addr
        self.length = int(ptr.length)
        self.lkey = int(ptr.lkey)
        self.rkey = int(ptr.rkey)


class CompletionQueue(_Handle):
    _destroy = "ibv_destroy_cq"

    def __init__(self, ptr: Any, context: Context, cqe: int):
        super().__init__(ptr)
        self.context = context
        self.cqe = cqe


class QueuePair(_Handle):
    """An RC queue pair; ``qp_num`` is what the peer needs (with lid/gid/psn, see :class:`PeerInfo`)."""

    _destroy = "ibv_destroy_qp"

    def __init__(self, ptr: Any, pd: ProtectionDomain, send_cq: CompletionQueue, recv_cq: CompletionQueue):
        super().__init__(ptr)
        self.pd = pd
        self.send_cq = send_cq
        self.recv_cq = recv_cq
        self.qp_num = int(ptr.qp_num)


def open_device(name: str | None = None) -> Context:
    """Open the RDMA device called ``name`` (the first one when None)."""
    ffi, lib = get_ffi(), verbs_lib()
    num = ffi.new("int *")
    lst = lib.ibv_get_device_list(num)
    if lst == ffi.NULL:
        err = ffi.errno
        if err == _errno.ENOSYS:
            raise RdmaUnavailableError(f"cannot open RDMA device {name or '(first)'}: {_device_list_raw()[1]}")
        raise VerbsError("ibv_get_device_list", err)
    try:
        names = [ffi.string(lib.ibv_get_device_name(lst[i])).decode() for i in range(num[0])]
        if not names:
            raise RdmaUnavailableError("no RDMA devices: ibv_get_device_list returned an empty list")
        if name is None:
            index = 0
        elif name in names:
            index = names.index(name)
        else:
            raise RdmaUnavailableError(f"no RDMA device named {name!r}; devices: {', '.join(names)}")
        dev = lst[index]
        ctx = _check_ptr("ibv_open_device", lib.ibv_open_device(dev), f"device {names[index]}")
        try:
            is_mlx5 = bool(mlx5_lib().mlx5dv_is_supported(dev))
        except RdmaUnavailableError:
            is_mlx5 = False
        return Context(ctx, names[index], is_mlx5)
    finally:
        lib.ibv_free_device_list(lst)


@dataclass(frozen=True)
class PortAttr:
    state: int  # IBV_PORT_* (4 = ACTIVE)
    max_mtu: int  # IBV_MTU_* enum (1..5 = 256..4096)
    active_mtu: int
    lid: int
    link_layer: int  # IBV_LINK_LAYER_* (1 = InfiniBand, 2 = Ethernet / RoCE)
    gid_tbl_len: int
    port_cap_flags: int
    max_msg_sz: int
    active_width: int
    active_speed: int
    phys_state: int


def query_port(ctx: Context, port_num: int = 1) -> PortAttr:
    ffi = get_ffi()
    attr = ffi.new("struct ibv_port_attr *")  # zeroed, as the header's inline fallback does
    _check_rc("ibv_query_port", verbs_lib().ibv_query_port(ctx._require(), port_num, attr), f"port {port_num}")
    return PortAttr(
        state=int(attr.state),
        max_mtu=int(attr.max_mtu),
        active_mtu=int(attr.active_mtu),
        lid=int(attr.lid),
        link_layer=int(attr.link_layer),
        gid_tbl_len=int(attr.gid_tbl_len),
        port_cap_flags=int(attr.port_cap_flags),
        max_msg_sz=int(attr.max_msg_sz),
        active_width=int(attr.active_width),
        active_speed=int(attr.active_speed),
        phys_state=int(attr.phys_state),
    )


def query_gid(ctx: Context, port_num: int = 1, index: int = 0) -> bytes:
    """The 16 raw bytes of GID ``index`` of the port (network order)."""
    ffi = get_ffi()
    gid = ffi.new("union ibv_gid *")
    rc = verbs_lib().ibv_query_gid(ctx._require(), port_num, index, gid)
    _check_rc("ibv_query_gid", rc, f"port {port_num} index {index}")
    return bytes(ffi.buffer(gid.raw, 16))


def alloc_pd(ctx: Context) -> ProtectionDomain:
    return ProtectionDomain(_check_ptr("ibv_alloc_pd", verbs_lib().ibv_alloc_pd(ctx._require())), ctx)


# No IBV_ACCESS_RELAXED_ORDERING: RDMA writes on one RC QP must land in posting order.
DEFAULT_ACCESS = _mask(
    "IBV_ACCESS_LOCAL_WRITE", "IBV_ACCESS_REMOTE_WRITE", "IBV_ACCESS_REMOTE_READ", "IBV_ACCESS_REMOTE_ATOMIC"
)


def reg_mr(pd: ProtectionDomain, addr: int, length: int, access: int = DEFAULT_ACCESS) -> MemoryRegion:
    """Register host memory ``[addr, addr + length)`` (iova = addr) through ``ibv_reg_mr_iova2``.

    The default access has no ``IBV_ACCESS_RELAXED_ORDERING``: in-order delivery on one RC QP is what the
    trailing count/flag write of the LL protocol relies on.
    """
    ffi = get_ffi()
    mr = verbs_lib().ibv_reg_mr_iova2(pd._require(), ffi.cast("void *", addr), length, addr, access)
    _check_ptr("ibv_reg_mr_iova2", mr, f"addr=0x{addr:x} length={length} access=0x{access:x}")
    return MemoryRegion(mr, pd, addr)


def reg_dmabuf_mr(
    pd: ProtectionDomain, fd: int, offset: int, length: int, iova: int, access: int = DEFAULT_ACCESS
) -> MemoryRegion:
    """Register memory exported as a dma-buf (GPU memory) through ``ibv_reg_dmabuf_mr``.

    Obtaining ``fd`` is the caller's job: for a CUDA allocation, ``cuMemGetHandleForAddressRange(&fd, base,
    size, CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD, 0)`` over a page-aligned range (base/size multiples of the host
    page size), then ``offset`` is the region's start minus ``base`` and ``iova`` normally the region's device
    address (what remote WQEs name). The fd may be closed after registration.
    """
    mr = verbs_lib().ibv_reg_dmabuf_mr(pd._require(), offset, length, iova, fd, access)
    _check_ptr("ibv_reg_dmabuf_mr", mr, f"fd={fd} offset={offset} length={length} iova=0x{iova:x} access=0x{access:x}")
    return MemoryRegion(mr, pd, iova)


def create_cq(ctx: Context, cqe: int, comp_vector: int = 0) -> CompletionQueue:
    ffi = get_ffi()
    cq = verbs_lib().ibv_create_cq(ctx._require(), cqe, ffi.NULL, ffi.NULL, comp_vector)
    return CompletionQueue(_check_ptr("ibv_create_cq", cq, f"cqe={cqe}"), ctx, cqe)


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
    _check_ptr("ibv_create_qp", qp, f"RC max_send_wr={max_send_wr} max_inline_data={max_inline_data}")
    return QueuePair(qp, pd, send_cq, recv_cq)


# --------------------------------------------------------------------------------------------- connection

_MTU_BYTES = {1: 256, 2: 512, 3: 1024, 4: 2048, 5: 4096}


@dataclass(frozen=True)
class PeerInfo:
    """What one side of an RC connection tells the other (exchanged e.g. through the group's allgather).

    ``mtu`` is the IBV_MTU_* enum value (1..5 = 256..4096 bytes); ``gid`` is 16 raw bytes (all zero on
    InfiniBand without GRH; required on RoCE).
    """

    lid: int
    gid: bytes
    qpn: int
    psn: int
    mtu: int

    _FMT = "<HIII16s"  # lid, qpn, psn, mtu, gid

    def __post_init__(self) -> None:
        if len(self.gid) != 16:
            raise EpkernError(f"PeerInfo.gid: expected 16 bytes, got {len(self.gid)}")
        if self.mtu not in _MTU_BYTES:
            raise EpkernError(f"PeerInfo.mtu: expected an IBV_MTU_* value in 1..5, got {self.mtu}")
        if not 0 <= self.psn < 1 << 24:
            raise EpkernError(f"PeerInfo.psn: expected a 24-bit value, got {self.psn}")

    def to_bytes(self) -> bytes:
        return struct.pack(self._FMT, self.lid, self.qpn, self.psn, self.mtu, self.gid)

    @classmethod
    def from_bytes(cls, data: bytes) -> PeerInfo:
        lid, qpn, psn, mtu, gid = struct.unpack(cls._FMT, bytes(data))
        return cls(lid=lid, gid=gid, qpn=qpn, psn=psn, mtu=mtu)

    @classmethod
    def size(cls) -> int:
        return struct.calcsize(cls._FMT)


def local_peer_info(qp: QueuePair, port_num: int = 1, gid_index: int = 0, psn: int = 0) -> PeerInfo:
    """This QP's :class:`PeerInfo` (queries the port and the GID)."""
    ctx = qp.pd.context
    port = query_port(ctx, port_num)
    gid = query_gid(ctx, port_num, gid_index)
    return PeerInfo(lid=port.lid, gid=gid, qpn=qp.qp_num, psn=psn, mtu=port.active_mtu)


def init_attr(port_num: int = 1, access: int = DEFAULT_ACCESS, pkey_index: int = 0) -> tuple[Any, int]:
    """(``struct ibv_qp_attr *``, mask) for RESET -> INIT."""
    ffi = get_ffi()
    a = ffi.new("struct ibv_qp_attr *")
    a.qp_state = ffi.cast("enum ibv_qp_state", _C["IBV_QPS_INIT"])
    a.pkey_index = pkey_index
    a.port_num = port_num
    a.qp_access_flags = access
    return a, _mask("IBV_QP_STATE", "IBV_QP_PKEY_INDEX", "IBV_QP_PORT", "IBV_QP_ACCESS_FLAGS")


def rtr_attr(
    peer: PeerInfo,
    port_num: int = 1,
    sgid_index: int = 0,
    *,
    use_grh: bool | None = None,
    hop_limit: int = 255,
    traffic_class: int = 0,
    sl: int = 0,
    max_dest_rd_atomic: int = 16,
    min_rnr_timer: int = 12,
) -> tuple[Any, int]:
    """(attr, mask) for INIT -> RTR towards ``peer``. GRH is used when ``use_grh`` or the peer's GID is set."""
    ffi = get_ffi()
    a = ffi.new("struct ibv_qp_attr *")
    a.qp_state = ffi.cast("enum ibv_qp_state", _C["IBV_QPS_RTR"])
    a.path_mtu = ffi.cast("enum ibv_mtu", peer.mtu)
    a.dest_qp_num = peer.qpn
    a.rq_psn = peer.psn
    a.max_dest_rd_atomic = max_dest_rd_atomic
    a.min_rnr_timer = min_rnr_timer
    a.ah_attr.dlid = peer.lid
    a.ah_attr.sl = sl
    a.ah_attr.port_num = port_num
    if use_grh if use_grh is not None else any(peer.gid):
        a.ah_attr.is_global = 1
        ffi.memmove(a.ah_attr.grh.dgid.raw, peer.gid, 16)
        a.ah_attr.grh.sgid_index = sgid_index
        a.ah_attr.grh.hop_limit = hop_limit
        a.ah_attr.grh.traffic_class = traffic_class
    return a, _mask(
        "IBV_QP_STATE",
        "IBV_QP_AV",
        "IBV_QP_PATH_MTU",
        "IBV_QP_DEST_QPN",
        "IBV_QP_RQ_PSN",
        "IBV_QP_MAX_DEST_RD_ATOMIC",
        "IBV_QP_MIN_RNR_TIMER",
    )


def rts_attr(
    psn: int, *, timeout: int = 14, retry_cnt: int = 7, rnr_retry: int = 7, max_rd_atomic: int = 16
) -> tuple[Any, int]:
    """(attr, mask) for RTR -> RTS with our send PSN ``psn``."""
    ffi = get_ffi()
    a = ffi.new("struct ibv_qp_attr *")
    a.qp_state = ffi.cast("enum ibv_qp_state", _C["IBV_QPS_RTS"])
    a.sq_psn = psn
    a.timeout = timeout
    a.retry_cnt = retry_cnt
    a.rnr_retry = rnr_retry
    a.max_rd_atomic = max_rd_atomic
    return a, _mask(
        "IBV_QP_STATE",
        "IBV_QP_TIMEOUT",
        "IBV_QP_RETRY_CNT",
        "IBV_QP_RNR_RETRY",
        "IBV_QP_SQ_PSN",
        "IBV_QP_MAX_QP_RD_ATOMIC",
    )


def modify_qp(qp: QueuePair, attr: Any, mask: int, what: str = "") -> None:
    _check_rc("ibv_modify_qp", verbs_lib().ibv_modify_qp(qp._require(), attr, mask), what)


def connect_rc_qp(
    qp: QueuePair,
    local: PeerInfo,
    peer: PeerInfo,
    port_num: int = 1,
    sgid_index: int = 0,
    access: int = DEFAULT_ACCESS,
    **rtr_kwargs: Any,
) -> None:
    """RESET -> INIT -> RTR -> RTS, using the exchanged ``peer`` info and our ``local.psn``."""
    modify_qp(qp, *init_attr(port_num, access), what="RESET->INIT")
    modify_qp(qp, *rtr_attr(peer, port_num, sgid_index, **rtr_kwargs), what=f"INIT->RTR (peer qpn {peer.qpn})")
    modify_qp(qp, *rts_attr(local.psn), what="RTR->RTS")


# --------------------------------------------------------------------------------------------- mlx5dv


@dataclass(frozen=True)
class Mlx5QpInfo:
    """Where a QP's send ring and doorbells live (from ``mlx5dv_init_obj(MLX5DV_OBJ_QP)``).

    ``dbrec`` points to two big-endian u32: [0] receive, [1] send doorbell record. ``bf_reg`` is the
    BlueFlame / doorbell register in the UAR page (MMIO; map to a GPU with CU_MEMHOSTREGISTER_IOMEMORY).
    """

    qpn: int
    sq_buf: int
    sq_wqe_cnt: int
    sq_stride: int
    dbrec: int
    bf_reg: int
    bf_size: int
    rq_buf: int
    rq_wqe_cnt: int
    rq_stride: int


@dataclass(frozen=True)
class Mlx5CqInfo:
    cqn: int
    buf: int
    cqe_cnt: int
    cqe_size: int
    dbrec: int


def _addr(ptr: Any) -> int:
    return int(get_ffi().cast("uintptr_t", ptr))


def _init_obj(kind: str, obj_type: int, handle: _Handle, ctx: Context) -> Any:
    if not ctx.is_mlx5:
        raise RdmaUnavailableError(f"mlx5dv_init_obj: device {ctx.name} is not an mlx5 device (or libmlx5 is missing)")
    ffi, lib = get_ffi(), mlx5_lib()
    obj = ffi.new("struct mlx5dv_obj *")
    out = ffi.new(f"struct mlx5dv_{kind} *")
    member = getattr(obj, kind)
    setattr(member, "in", handle._require())  # "in" is a Python keyword
    member.out = out
    _check_rc("mlx5dv_init_obj", lib.mlx5dv_init_obj(obj, obj_type), f"MLX5DV_OBJ_{kind.upper()}")
    return out


def mlx5_qp_info(qp: QueuePair) -> Mlx5QpInfo:
    """Send ring, doorbell record and BlueFlame register of an mlx5 QP."""
    out = _init_obj("qp", _C["MLX5DV_OBJ_QP"], qp, qp.pd.context)
    return Mlx5QpInfo(
        qpn=qp.qp_num,
        sq_buf=_addr(out.sq.buf),
        sq_wqe_cnt=int(out.sq.wqe_cnt),
        sq_stride=int(out.sq.stride),
        dbrec=_addr(out.dbrec),
        bf_reg=_addr(out.bf.reg),
        bf_size=int(out.bf.size),
        rq_buf=_addr(out.rq.buf),
        rq_wqe_cnt=int(out.rq.wqe_cnt),
        rq_stride=int(out.rq.stride),
    )


def mlx5_cq_info(cq: CompletionQueue) -> Mlx5CqInfo:
    """CQE ring and doorbell record of an mlx5 CQ."""
    out = _init_obj("cq", _C["MLX5DV_OBJ_CQ"], cq, cq.context)
    return Mlx5CqInfo(
        cqn=int(out.cqn),
        buf=_addr(out.buf),
        cqe_cnt=int(out.cqe_cnt),
        cqe_size=int(out.cqe_size),
        dbrec=_addr(out.dbrec),
    )
