"""The real mlx5 NIC backend: the :mod:`epkern.nic.emulated` interface over ``epkern._verbs_cffi``.

:class:`Mlx5Nic` opens an mlx5 device, allocates a PD, registers host memory (``ibv_reg_mr``) and GPU memory
(dma-buf from ``cuMemGetHandleForAddressRange`` → ``ibv_reg_dmabuf_mr``), and creates CQs and RC QPs.
:class:`Mlx5QueuePair` offers what :class:`~epkern.nic.proxy.ProxyService` uses of a queue pair — ``sq`` (a numpy
view of the real send ring), ``wqe_cnt``, ``qpn``, ``cq``, ``nic``, ``error``, ``ring_doorbell(pi)`` — and
:class:`Mlx5CompletionQueue` offers ``poll()``/``wait()``/``cqe_cnt`` over the real CQE ring, decoded by
:mod:`epkern.nic.wqe`. So the proxy posts to real hardware with the same code it uses for the emulated NIC.

Posting from the host follows rdma-core's ``post_send`` (providers/mlx5/qp.c) and ``util/udma_barrier.h``: WQEs
written; ``udma_to_device_barrier`` (a compiler barrier on x86-64); the send doorbell record ``dbrec[1]`` =
BE32(pi & 0xffff) as one 4-byte store; ``mmio_wc_start`` (sfence); ONE 8-byte store of the first qword of the last
WQE's ctrl segment to the BlueFlame register; ``mmio_flush_writes`` (sfence). Python has no fence instructions, so
each fence is a ``membarrier(2)`` system call, whose full barrier on the calling CPU orders the stores and drains the
write-combining buffers as ``sfence`` does (``mlx5_host_io.CpuFences``; x86-64 only: other architectures raise
:class:`NicError` on the host posting path — the GPU path needs none).

:meth:`Mlx5QueuePair.map_for_gpu` makes the send ring and doorbell record (``cudaHostRegister`` with
``cudaHostRegisterMapped``) and the doorbell register's UAR page (``cudaHostRegisterIoMemory | Mapped``) visible to
kernels written with ``kernels/mlx5_wqe.cuh``; device addresses come from ``cuMemHostGetDevicePointer``.

NOTHING in this module has run against a real NIC (see docs/rdma.md, "Real mlx5 backend"): it was written against
rdma-core 44 and the CUDA 13 headers and is tested on the CPU through a fake ``_verbs_cffi`` layer.

Here: :class:`Mlx5Nic` (opening the device: context, port, PD; MRs; creating CQs and QPs; connecting them;
closing) and :class:`Mlx5MemoryRegion`. The rest lives in :mod:`.mlx5_queues` (the CQ and the QP state machine),
:mod:`.mlx5_host_io` (host posting: WQE walk, doorbell values, fences, stores), :mod:`.mlx5_cuda` (GPU mapping of
the rings and doorbells, dma-buf ranges) and :mod:`.qp_exchange` (the QP-info exchange); the names listed in
``__all__`` are importable from here.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _verbs_cffi as V
from .mlx5_cuda import CudaCalls, HostPageRegistry, Mlx5GpuQp, dmabuf_range, page_range, page_size
from .mlx5_host_io import be32_store_value as be32_store_value
from .mlx5_host_io import doorbell_qword, last_wqe_index
from .mlx5_queues import Mlx5CompletionQueue, Mlx5QueuePair
from .observation import NicError
from .observation import QpCounters as QpCounters
from .qp_exchange import decode_peer_table, encode_peer_table, exchange_peer_info
from .verbs_objects import RegisteredRegion, VerbsBackedNic

__all__ = [
    "HostPageRegistry",
    "Mlx5CompletionQueue",
    "Mlx5GpuQp",
    "Mlx5MemoryRegion",
    "Mlx5Nic",
    "Mlx5QueuePair",
    "RdmaUnavailableError",
    "decode_peer_table",
    "dmabuf_range",
    "doorbell_qword",
    "encode_peer_table",
    "exchange_peer_info",
    "last_wqe_index",
    "page_range",
]

RdmaUnavailableError = V.RdmaUnavailableError

IBV_LINK_LAYER_ETHERNET = 2


def _require_mlx5(ctx) -> None:
    if not ctx.is_mlx5:
        raise RdmaUnavailableError(f"RDMA device {ctx.name} is not an mlx5 device (mlx5dv unsupported)")


@dataclass
class Mlx5MemoryRegion(RegisteredRegion):
    """A registered region (host memory, or GPU memory through dma-buf: ``gpu``); ``addr`` is the iova remote WQEs
    name."""

    gpu: bool = False


class Mlx5Nic(VerbsBackedNic):
    """One opened mlx5 device: PD, MRs, CQs, RC QPs. Close with :meth:`close` (idempotent) or a ``with`` block.

    ``gid_index``: the GID used for RoCE (the peer's GID enables the GRH); default 0. ``verbs`` is the
    ``_verbs_cffi``-like module used (tests pass a fake)."""

    kind = "mlx5 NIC"

    def __init__(
        self,
        device_name: str | None = None,
        port: int = 1,
        gid_index: int = 0,
        *,
        name: str | None = None,
        verbs: Any = None,
        host_fences: bool = True,
        page_registry: HostPageRegistry | None = None,
    ):
        self._verbs = V if verbs is None else verbs
        self.port = int(port)
        self.gid_index = int(gid_index)
        self._host_fences = host_fences
        self._pages = page_registry or HostPageRegistry()
        self._mapped: list[tuple[int, int]] = []
        self._bf_locks: dict[int, threading.Lock] = {}
        self._open(device_name, name, _require_mlx5)

    def _bf_lock(self, addr: int) -> threading.Lock:
        with self._lock:
            return self._bf_locks.setdefault(addr & ~(page_size() - 1), threading.Lock())

    # --- memory ---
    def reg_mr(self, target: np.ndarray | int, length: int | None = None, access: int = V.MR_ACCESS):
        """Register host memory: a C-contiguous numpy array (kept alive by the MR) or ``(addr, length)``."""
        self._check_open()
        keep = None
        if isinstance(target, np.ndarray):
            if not target.flags.c_contiguous:
                raise NicError("reg_mr needs a C-contiguous numpy array")
            addr = int(target.ctypes.data)
            length = target.nbytes if length is None else int(length)
            if length > target.nbytes:
                raise NicError(f"MR length {length} exceeds the array's {target.nbytes} bytes")
            keep = target
        else:
            addr = int(target)
            if length is None:
                raise NicError("reg_mr(addr) needs a length")
        h = self._verbs.reg_mr(self._pd, addr, int(length), int(access))
        mr = Mlx5MemoryRegion(self, h.addr, h.length, h.lkey, h.rkey, int(access), h, keep)
        return self._track(self._mrs, mr)

    def reg_gpu_mr(self, target: Any, length: int | None = None, access: int = V.MR_ACCESS):
        """Register GPU memory through dma-buf: a CuPy array (or anything with ``data.ptr``/``nbytes``) or a device
        address with ``length``. The MR's ``addr`` is the device address."""
        self._check_open()
        if isinstance(target, int):
            ptr, keep = target, None
            if length is None:
                raise NicError("reg_gpu_mr(ptr) needs a length")
        else:
            ptr, keep = int(target.data.ptr), target
            length = int(target.nbytes) if length is None else int(length)
        cuda = CudaCalls.get()
        base, size = cuda.address_range(ptr)
        start, span, offset = dmabuf_range(ptr, int(length), base, size)
        fd = cuda.dmabuf_fd(start, span)
        try:
            h = self._verbs.reg_dmabuf_mr(self._pd, fd, offset, int(length), ptr, int(access))
        finally:
            os.close(fd)  # the MR keeps its own reference to the dma-buf
        mr = Mlx5MemoryRegion(self, h.addr, h.length, h.lkey, h.rkey, int(access), h, keep, gpu=True)
        return self._track(self._mrs, mr)

    def dereg_mr(self, mr: Mlx5MemoryRegion) -> None:
        self._forget_mr(mr)

    # --- queues ---
    def create_cq(self, cqe_cnt: int = 256) -> Mlx5CompletionQueue:
        self._check_open()
        h = self._verbs.create_cq(self._ctx, int(cqe_cnt))
        try:
            cq = Mlx5CompletionQueue(self, h, self._verbs.mlx5_cq_info(h))
        except BaseException:
            h.close()
            raise
        return self._track(self._cqs, cq)

    def create_qp(self, cq: Mlx5CompletionQueue, wqe_cnt: int = 64, *, max_inline_data: int = 16) -> Mlx5QueuePair:
        """An RC QP whose send ring holds at least ``wqe_cnt`` WQEBBs (``qp.wqe_cnt`` is the real size). Its CQ
        serves as send and receive CQ; give every QP its own CQ (the proxy requires it)."""
        self._check_open()
        if cq.nic is not self:
            raise NicError("create_qp: the CQ belongs to another NIC")
        h = self._verbs.create_rc_qp(
            self._pd, cq.handle, max_send_wr=int(wqe_cnt), max_send_sge=1, max_inline_data=int(max_inline_data)
        )
        try:
            qp = Mlx5QueuePair(self, cq, h, self._verbs.mlx5_qp_info(h))
        except BaseException:
            h.close()
            raise
        return self._track(self._qps, qp)

    def connect_mesh(self, allgather_bytes: Callable[[bytes], list[bytes]], rank: int, qps: Sequence[Sequence]):
        """Connect ``qps[peer][i]`` of every rank to ``peer``'s ``qps[rank][i]``; ``allgather_bytes`` is the group's
        (``group.allgather_bytes``). Every rank calls it collectively."""
        table = [[q.local_info() for q in row] for row in qps]
        remote = exchange_peer_info(allgather_bytes, rank, table)
        for p, row in enumerate(qps):
            for i, q in enumerate(row):
                q.connect(remote[p][i])

    # --- observation (counters, check: NicObservation) ---
    def wait_idle(self, timeout: float = 5.0) -> bool:  # noqa: ARG002 - interface parity with EmulatedNic
        return True

    # --- lifecycle ---
    def _first_to_close(self) -> list:
        unmaps = [("cudaHostUnregister", self._pages.release, pages) for pages in reversed(self._mapped)]
        self._mapped.clear()
        return unmaps
