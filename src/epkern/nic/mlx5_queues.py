"""The real mlx5 CQ and RC QP with the emulated NIC's queue interface: :class:`Mlx5CompletionQueue` polls the
real CQE ring from the host (owner bit, consumer index, error CQEs named by syndrome); :class:`Mlx5QueuePair`
holds the send ring and doorbell record, goes RESET -> RTS (:meth:`~Mlx5QueuePair.connect`) -> ERROR on an error
CQE -> CLOSED with its NIC, posts from the host (:meth:`~Mlx5QueuePair.ring_doorbell`) or maps itself for the GPU
(:meth:`~Mlx5QueuePair.map_for_gpu`). Each holds the :class:`~epkern.nic.mlx5.Mlx5Nic` that created it (``nic``,
typed ``Any``: that module imports this one, not the reverse)."""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

from .. import _verbs_cffi as V
from . import wqe as W
from .mlx5_cuda import HOST_REGISTER_IOMEMORY, HOST_REGISTER_MAPPED, HOST_REGISTER_PORTABLE, Mlx5GpuQp
from .mlx5_host_io import CpuFences, be32_store_value, doorbell_qword, last_wqe_index, store32, store64, u8_view
from .observation import NicError, NicFault, QpCounters
from .verbs_objects import RcConnection

MLX5_CQ_SET_CI = 0  # dbrec word of a CQ that holds the consumer index
CQE_SIZES = (64, 128)

SYNDROME_NAMES = {
    W.MLX5_CQE_SYNDROME_LOCAL_LENGTH_ERR: "LOCAL_LENGTH_ERR",
    W.MLX5_CQE_SYNDROME_LOCAL_QP_OP_ERR: "LOCAL_QP_OP_ERR",
    W.MLX5_CQE_SYNDROME_LOCAL_PROT_ERR: "LOCAL_PROT_ERR",
    W.MLX5_CQE_SYNDROME_WR_FLUSH_ERR: "WR_FLUSH_ERR",
    0x06: "MW_BIND_ERR",
    0x10: "BAD_RESP_ERR",
    W.MLX5_CQE_SYNDROME_LOCAL_ACCESS_ERR: "LOCAL_ACCESS_ERR",
    W.MLX5_CQE_SYNDROME_REMOTE_INVAL_REQ_ERR: "REMOTE_INVAL_REQ_ERR",
    W.MLX5_CQE_SYNDROME_REMOTE_ACCESS_ERR: "REMOTE_ACCESS_ERR",
    W.MLX5_CQE_SYNDROME_REMOTE_OP_ERR: "REMOTE_OP_ERR",
    0x15: "TRANSPORT_RETRY_EXC_ERR",
    0x16: "RNR_RETRY_EXC_ERR",
    0x22: "REMOTE_ABORTED_ERR",
}


class Mlx5CompletionQueue:
    """A real CQ polled from the host: ``ring`` (``cqe_cnt`` CQEs of ``cqe_size`` bytes), ``dbrec``, ``cqe_cnt``.

    CQE ``n`` is ready when its opcode is not INVALID and its owner bit equals ``(n // cqe_cnt) & 1`` (rdma-core's
    ``get_sw_cqe``); a 128-byte CQE holds the 64-byte one in its second half. After a poll the consumer index
    (24 bits, BE32) goes to ``dbrec[MLX5_CQ_SET_CI]``. Only requester CQEs are expected (send CQs, no CQE
    compression)."""

    def __init__(self, nic: Any, handle: Any, info: V.Mlx5CqInfo):
        if info.cqe_cnt <= 0 or info.cqe_cnt & (info.cqe_cnt - 1):
            raise NicError(f"CQ {info.cqn}: cqe_cnt {info.cqe_cnt} is not a power of two")
        if info.cqe_size not in CQE_SIZES:
            raise NicError(f"CQ {info.cqn}: unsupported CQE size {info.cqe_size}")
        self.nic = nic
        self.handle = handle
        self.info = info
        self.cqn = info.cqn
        self.cqe_cnt = info.cqe_cnt
        self.cqe_size = info.cqe_size
        self.ring = u8_view(info.buf, info.cqe_cnt * info.cqe_size)
        self.dbrec = u8_view(info.dbrec, 8)
        self.ci = 0
        self._qps: dict[int, Mlx5QueuePair] = {}
        self._lock = threading.Lock()

    def poll(self, max_entries: int | None = None) -> list[W.Cqe]:
        """Consume the ready CQEs, oldest first; error CQEs move their QP to ERROR with a readable fault."""
        out: list[W.Cqe] = []
        with self._lock:
            fences = None
            while max_entries is None or len(out) < max_entries:
                off = (self.ci & (self.cqe_cnt - 1)) * self.cqe_size + (self.cqe_size - W.CQE_SIZE)
                op_own = int(self.ring[off + 63])
                if (op_own >> 4) == W.MLX5_CQE_INVALID or (op_own & 1) != ((self.ci // self.cqe_cnt) & 1):
                    break
                if fences is None and self.nic._host_fences:
                    fences = CpuFences.get()
                if fences is not None:
                    fences.lfence()  # udma_from_device_barrier: the CQE body after its owner byte
                cqe = W.decode_cqe(self.ring, off)
                if cqe.opcode not in (W.MLX5_CQE_REQ, W.MLX5_CQE_REQ_ERR):
                    raise NicError(
                        f"CQ {self.cqn}: unexpected CQE opcode {cqe.opcode} at index {self.ci} (only requester "
                        "completions are expected on a send CQ)"
                    )
                self.ci += 1
                out.append(cqe)
                if cqe.is_error:
                    self._record_error(cqe)
            if out:
                store32(self.info.dbrec + 4 * MLX5_CQ_SET_CI, be32_store_value(self.ci & 0xFFFFFF))
        return out

    def _record_error(self, cqe: W.Cqe) -> None:
        qp = self._qps.get(cqe.qpn)
        name = SYNDROME_NAMES.get(cqe.syndrome, "unknown")
        msg = (
            f"error CQE: syndrome 0x{cqe.syndrome:02x} ({name}), vendor syndrome 0x{cqe.vendor_syndrome:02x}, "
            f"WQE opcode {W.OPCODE_NAMES.get(cqe.wqe_opcode, hex(cqe.wqe_opcode))}"
        )
        fault = NicFault(cqe.qpn, cqe.wqe_counter, cqe.syndrome, msg)
        self.nic.faults.append(fault)
        if qp is not None:
            qp.state, qp.error = Mlx5QueuePair.ERROR, fault
            qp.counters.errors += 1

    def wait(self, n: int, timeout: float = 5.0) -> list[W.Cqe]:
        """Poll until ``n`` CQEs arrived (or an error CQE); raises :class:`NicError` on timeout."""
        out: list[W.Cqe] = []
        deadline = time.monotonic() + timeout
        sleep = 10e-6
        while len(out) < n:
            got = self.poll(n - len(out))
            out += got
            if any(c.is_error for c in got):
                break
            if not got:
                if time.monotonic() > deadline:
                    raise NicError(f"CQ {self.cqn}: {len(out)} of {n} completions after {timeout} s")
                time.sleep(sleep)
                sleep = min(sleep * 2, 1e-3)
        return out

    def map_for_gpu(self) -> tuple[int, int]:
        """Device addresses of the CQE ring and the CQ doorbell record (for device-side polling)."""
        reg = self.nic._pages
        flags = HOST_REGISTER_PORTABLE | HOST_REGISTER_MAPPED
        buf = reg.acquire(self.info.buf, self.cqe_cnt * self.cqe_size, flags)
        self.nic._mapped.append((self.info.buf, self.cqe_cnt * self.cqe_size))
        db = reg.acquire(self.info.dbrec, 8, flags)
        self.nic._mapped.append((self.info.dbrec, 8))
        return buf, db


class Mlx5QueuePair(RcConnection):
    """A real RC QP with the emulated :class:`~epkern.nic.emulated.QueuePair`'s posting interface.

    ``sq`` is a numpy view of the send ring (``wqe_cnt`` WQEBBs of 64 bytes), ``dbrec`` of the 8-byte doorbell
    record (``[4:8]`` = send, BE32). The doorbell register is MMIO and is never read, so there is no ``db_reg``
    array; its address is ``info.bf_reg``. :meth:`connect` takes the peer's :class:`~epkern._verbs_cffi.PeerInfo`
    (from :meth:`local_info` on the other side, exchanged by the caller)."""

    RESET, RTS, ERROR, CLOSED = "RESET", "RTS", "ERROR", "CLOSED"

    def __init__(self, nic: Any, cq: Mlx5CompletionQueue, handle: Any, info: V.Mlx5QpInfo):
        cnt = info.sq_wqe_cnt
        if cnt <= 0 or cnt & (cnt - 1) or cnt > 0x8000:
            raise NicError(f"QP {info.qpn}: sq.wqe_cnt {cnt} is not a power of two <= 32768")
        if info.sq_stride != W.MLX5_SEND_WQE_BB:
            raise NicError(f"QP {info.qpn}: sq.stride {info.sq_stride}, expected {W.MLX5_SEND_WQE_BB}")
        if info.bf_reg % 8:
            raise NicError(f"QP {info.qpn}: doorbell register 0x{info.bf_reg:x} is not 8-byte aligned")
        self.nic = nic
        self.cq = cq
        self.handle = handle
        self.info = info
        self.qpn = info.qpn
        self.wqe_cnt = cnt
        self.sq = u8_view(info.sq_buf, cnt * W.MLX5_SEND_WQE_BB)
        self.dbrec = u8_view(info.dbrec, 8)
        self.state = self.RESET
        self.error: NicFault | None = None
        self.counters = QpCounters()
        self.psn = secrets.randbits(24)
        self.remote: V.PeerInfo | None = None
        self._rung = 0  # producer index of the last doorbell (WQEBBs, monotonic)
        self._gpu: Mlx5GpuQp | None = None
        cq._qps[self.qpn] = self

    # --- posting from the host ---
    def ring_doorbell(self, pi: int) -> None:
        """Make the WQEs up to producer index ``pi`` (WQEBBs, monotonic) executable: send doorbell record, then one
        8-byte store of the last WQE's first ctrl qword to the doorbell register, fenced as rdma-core does."""
        if self.state != self.RTS:
            raise NicError(f"QP {self.qpn} is {self.state}: cannot ring its doorbell")
        if self._gpu is not None:
            raise NicError(f"QP {self.qpn} is mapped for the GPU; the host must not post on it too")
        fences = CpuFences.get() if self.nic._host_fences else None
        last = last_wqe_index(self.sq, self._rung, pi)
        value = doorbell_qword(self.sq, last)
        with self.nic._bf_lock(self.info.bf_reg):
            # udma_to_device_barrier(): a compiler barrier on x86-64; nothing to do from Python.
            store32(self.info.dbrec + 4 * W.MLX5_SND_DBR, be32_store_value(pi & 0xFFFF))
            if fences is not None:
                fences.sfence()  # mmio_wc_start()
            store64(self.info.bf_reg, value)
            if fences is not None:
                fences.sfence()  # mmio_flush_writes()
        self.counters.doorbells += 1
        self.counters.wqes += pi - self._rung  # WQEBBs (one per WQE for everything the proxy posts)
        self._rung = pi

    # --- GPU mapping ---
    def map_for_gpu(self) -> Mlx5GpuQp:
        """Register the send ring, the doorbell record and the doorbell register's page with CUDA and return their
        device addresses. The host must not post on this QP afterwards; the pages stay registered until the NIC
        is closed."""
        if self._gpu is not None:
            return self._gpu
        self.nic._check_open()
        reg = self.nic._pages
        mapped = HOST_REGISTER_PORTABLE | HOST_REGISTER_MAPPED
        io = mapped | HOST_REGISTER_IOMEMORY
        ring = self.wqe_cnt * W.MLX5_SEND_WQE_BB
        sq = reg.acquire(self.info.sq_buf, ring, mapped)
        self.nic._mapped.append((self.info.sq_buf, ring))
        db = reg.acquire(self.info.dbrec, 8, mapped)
        self.nic._mapped.append((self.info.dbrec, 8))
        bf = reg.acquire(self.info.bf_reg, 8, io)
        self.nic._mapped.append((self.info.bf_reg, 8))
        self._gpu = Mlx5GpuQp(sq=sq, dbrec=db, db_reg=bf, qpn=self.qpn, wqe_cnt=self.wqe_cnt)
        return self._gpu
