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
the fences are three-byte functions (``sfence; ret`` / ``lfence; ret``) placed in an executable page at first use
(x86-64 only; other architectures raise :class:`NicError` on the host posting path — the GPU path needs none).

:meth:`Mlx5QueuePair.map_for_gpu` makes the send ring and doorbell record (``cudaHostRegister`` with
``cudaHostRegisterMapped``) and the doorbell register's UAR page (``cudaHostRegisterIoMemory | Mapped``) visible to
kernels written with ``kernels/mlx5_wqe.cuh``; device addresses come from ``cuMemHostGetDevicePointer``.

NOTHING in this module has run against a real NIC (see docs/rdma.md, "Real mlx5 backend"): it was written against
rdma-core 44 and the CUDA 13 headers and is tested on the CPU through a fake ``_verbs_cffi`` layer.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import secrets
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _cuda_driver as driver
from .. import _verbs_cffi as V
from ..errors import DeviceUnavailableError
from . import wqe as W
from .emulated import NicError, NicFault, NicObservation, QpCounters

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

IBV_PORT_ACTIVE = 4
IBV_LINK_LAYER_ETHERNET = 2
MLX5_CQ_SET_CI = 0  # dbrec word of a CQ that holds the consumer index
CQE_SIZES = (64, 128)

# cudaHostRegister flags (driver_types.h) = CU_MEMHOSTREGISTER_* (cuda.h)
HOST_REGISTER_PORTABLE = 0x01
HOST_REGISTER_MAPPED = 0x02
HOST_REGISTER_IOMEMORY = 0x04

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


# --- pure helpers (tested on the CPU) -----------------------------------------------------------------------------


def page_size() -> int:
    return mmap.PAGESIZE


def page_range(addr: int, length: int, page: int | None = None) -> tuple[int, int]:
    """``(start, size)`` of the smallest page-aligned range covering ``[addr, addr + length)``."""
    page = page_size() if page is None else int(page)
    if page <= 0 or page & (page - 1):
        raise NicError(f"page size must be a power of two, got {page}")
    if length <= 0 or addr < 0:
        raise NicError(f"page_range needs a non-empty range, got addr=0x{addr:x} length={length}")
    start = addr & ~(page - 1)
    end = (addr + length + page - 1) & ~(page - 1)
    return start, end - start


def dmabuf_range(
    addr: int, length: int, alloc_base: int, alloc_size: int, page: int | None = None
) -> tuple[int, int, int]:
    """What to export and register for GPU memory ``[addr, addr + length)`` inside the CUDA allocation
    ``[alloc_base, alloc_base + alloc_size)``: ``(start, size, offset)``.

    ``cuMemGetHandleForAddressRange`` wants a host-page-aligned start and size inside one allocation; the MR is then
    ``ibv_reg_dmabuf_mr(pd, offset=addr - start, length, iova=addr, fd)``, so remote WQEs name device addresses and
    iova and offset have the same page offset (what the kernel's dma-buf umem needs)."""
    start, size = page_range(addr, length, page)
    if not (alloc_base <= addr and addr + length <= alloc_base + alloc_size):
        raise NicError(f"GPU range 0x{addr:x}+{length} is not inside its allocation 0x{alloc_base:x}+{alloc_size}")
    if start < alloc_base or start + size > alloc_base + alloc_size:
        raise NicError(
            f"GPU range 0x{addr:x}+{length} rounds out to pages 0x{start:x}+{size}, outside its allocation "
            f"0x{alloc_base:x}+{alloc_size}; allocate page-aligned GPU memory (e.g. a large cupy allocation) to "
            "register it through dma-buf"
        )
    return start, size, addr - start


def last_wqe_index(sq: np.ndarray, start: int, end: int) -> int:
    """Producer index of the last WQE in ``[start, end)`` of ring ``sq``, walking the ds counts of the ctrl
    segments. Raises :class:`NicError` when the WQEs do not tile the range exactly or a ctrl segment's index is not
    its slot's (a stale or half-written slot)."""
    cnt = sq.shape[0] // W.MLX5_SEND_WQE_BB
    if not 0 < end - start <= cnt:
        raise NicError(f"doorbell for {end - start} WQEBBs (from {start} to {end}) on a ring of {cnt}")
    p, last = start, start
    while p < end:
        off = (p & (cnt - 1)) * W.MLX5_SEND_WQE_BB
        word0, word1 = struct.unpack(">II", sq[off : off + 8].tobytes())
        ds, pi16 = word1 & 0xFF, (word0 >> 8) & 0xFFFF
        if ds == 0:
            raise NicError(f"WQE at pi {p} has ds=0 (slot not written?)")
        if pi16 != p & 0xFFFF:
            raise NicError(f"WQE at pi {p} carries index {pi16} (stale slot?)")
        last = p
        p += (ds * W.MLX5_SEND_WQE_DS + W.MLX5_SEND_WQE_BB - 1) // W.MLX5_SEND_WQE_BB
    if p != end:
        raise NicError(f"WQEs from {start} end at {p}, not at the doorbell's producer index {end}")
    return last


def doorbell_qword(sq: np.ndarray, pi: int) -> int:
    """The first 8 bytes of the ctrl segment of the WQE at ``pi``, as the u64 whose little-endian store writes
    them (what rdma-core's ``mlx5_write64(ctrl, bf->reg)`` stores)."""
    cnt = sq.shape[0] // W.MLX5_SEND_WQE_BB
    off = (pi & (cnt - 1)) * W.MLX5_SEND_WQE_BB
    return int.from_bytes(sq[off : off + 8].tobytes(), "little")


def be32_store_value(value: int) -> int:
    """The native (little-endian) u32 whose store writes BE32(``value``)."""
    return int.from_bytes(struct.pack(">I", value & 0xFFFFFFFF), "little")


_PRESENT = struct.Struct("<B")
_REC = 1 + V.PeerInfo.size()


def encode_peer_table(table: Sequence[Sequence[V.PeerInfo | None]]) -> bytes:
    """``table[peer][i]``: this rank's QP ``i`` towards ``peer`` (None: no QP). One byte string to allgather."""
    k = max((len(row) for row in table), default=0)
    out = bytearray()
    for row in table:
        for i in range(k):
            info = row[i] if i < len(row) else None
            out += (
                (_PRESENT.pack(0) + bytes(V.PeerInfo.size())) if info is None else (_PRESENT.pack(1) + info.to_bytes())
            )
    return struct.pack("<II", len(table), k) + bytes(out)


def decode_peer_table(data: bytes) -> list[list[V.PeerInfo | None]]:
    data = bytes(data)
    n, k = struct.unpack_from("<II", data, 0)
    if len(data) != 8 + n * k * _REC:
        raise NicError(f"peer table of {len(data)} bytes does not hold {n} x {k} records")
    rows = []
    for p in range(n):
        row = []
        for i in range(k):
            off = 8 + (p * k + i) * _REC
            present = data[off]
            row.append(V.PeerInfo.from_bytes(data[off + 1 : off + _REC]) if present else None)
        rows.append(row)
    return rows


def exchange_peer_info(
    allgather_bytes: Callable[[bytes], list[bytes]], rank: int, table: Sequence[Sequence[V.PeerInfo | None]]
) -> list[list[V.PeerInfo | None]]:
    """Allgather every rank's table; returns ``remote[peer][i]``: the info of ``peer``'s QP ``i`` towards ``rank``
    (what this rank's QP ``i`` towards ``peer`` connects to). Checks that QPs come in matching pairs."""
    blobs = allgather_bytes(encode_peer_table(table))
    remote: list[list[V.PeerInfo | None]] = []
    for p, blob in enumerate(blobs):
        theirs = decode_peer_table(blob)
        if len(theirs) != len(blobs):
            raise NicError(f"rank {p} sent a peer table for {len(theirs)} ranks, the group has {len(blobs)}")
        row = theirs[rank]
        mine = table[p] if p < len(table) else []
        for i in range(max(len(row), len(mine))):
            a = mine[i] if i < len(mine) else None
            b = row[i] if i < len(row) else None
            if (a is None) != (b is None):
                raise NicError(f"rank {rank} qp {i} towards rank {p}: only one side has a QP")
        remote.append(row)
    return remote


# --- fences (host posting path) ------------------------------------------------------------------------------------


class _Fences:
    """``sfence``/``lfence`` as callable three-byte functions in an executable page (x86-64)."""

    _lock = threading.Lock()
    _inst: _Fences | None = None

    def __init__(self):
        if platform.machine() not in ("x86_64", "AMD64"):
            raise NicError(
                f"host-side mlx5 doorbells need CPU fences, implemented for x86-64 only (this is {platform.machine()})"
            )
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        size = mmap.PAGESIZE
        addr = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise NicError(f"mmap for the fence functions failed (errno {ctypes.get_errno()})")
        code = b"\x0f\xae\xf8\xc3" + b"\x0f\xae\xe8\xc3"  # sfence; ret | lfence; ret
        ctypes.memmove(addr, code, len(code))
        if libc.mprotect(addr, size, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
            raise NicError(f"mprotect(PROT_EXEC) for the fence functions failed (errno {ctypes.get_errno()})")
        fn = ctypes.CFUNCTYPE(None)
        self.sfence = fn(addr)
        self.lfence = fn(addr + 4)
        self._addr = addr  # never unmapped: the functions live as long as the process

    @classmethod
    def get(cls) -> _Fences:
        with cls._lock:
            if cls._inst is None:
                cls._inst = cls()
            return cls._inst


def _store32(addr: int, value: int) -> None:
    ctypes.c_uint32.from_address(addr).value = value  # one aligned 4-byte store


def _store64(addr: int, value: int) -> None:
    ctypes.c_uint64.from_address(addr).value = value  # one aligned 8-byte store


def _u8_view(addr: int, nbytes: int) -> np.ndarray:
    return np.frombuffer((ctypes.c_uint8 * nbytes).from_address(addr), dtype=np.uint8)


# --- CUDA glue (GPU machines only) ---------------------------------------------------------------------------------


class _Cuda:
    """The driver calls of this module (epkern._cuda_driver; their errors raised as :class:`NicError`) plus CuPy's
    cudaHostRegister."""

    _inst: _Cuda | None = None
    _lock = threading.Lock()

    def __init__(self):
        try:
            import cupy.cuda.runtime as rt
        except Exception as e:  # noqa: BLE001
            raise DeviceUnavailableError(f"mapping mlx5 queues into the GPU needs CuPy ({e})") from None
        driver.library()  # DeviceUnavailableError here, not at the first call, without a driver
        self.rt = rt

    @classmethod
    def get(cls) -> _Cuda:
        with cls._lock:
            if cls._inst is None:
                cls._inst = cls()
            return cls._inst

    @staticmethod
    def _call(fn, *args):
        try:
            return fn(*args)
        except driver.DriverError as e:
            raise NicError(str(e)) from None

    def address_range(self, ptr: int) -> tuple[int, int]:
        self.rt.pointerGetAttributes(ptr)  # a runtime call: makes the primary context current on this thread
        return self._call(driver.mem_get_address_range, ptr)

    def dmabuf_fd(self, start: int, size: int) -> int:
        return self._call(driver.mem_get_dmabuf_fd, start, size)

    def host_register(self, addr: int, size: int, flags: int) -> None:
        self.rt.hostRegister(addr, size, flags)

    def host_unregister(self, addr: int) -> None:
        self.rt.hostUnregister(addr)

    def device_pointer(self, addr: int) -> int:
        return self._call(driver.mem_host_get_device_pointer, addr)


class HostPageRegistry:
    """Reference-counted ``cudaHostRegister`` of host pages, one registration per page.

    Doorbell records of several QPs and CQs share pages, and QPs may share a UAR page, so pages are registered
    once and unregistered when their last user releases them. A page registered as I/O memory cannot be taken as
    normal memory or the reverse. ``register(addr, size, flags)``/``unregister(addr)``/``device_pointer(addr)``
    default to CUDA (tests pass fakes)."""

    def __init__(
        self,
        register: Callable[[int, int, int], None] | None = None,
        unregister: Callable[[int], None] | None = None,
        device_pointer: Callable[[int], int] | None = None,
        page: int | None = None,
    ):
        self.page = page_size() if page is None else int(page)
        self._register = register
        self._unregister = unregister
        self._device_pointer = device_pointer
        self._pages: dict[int, list[int]] = {}  # page address -> [refcount, flags]
        self._lock = threading.Lock()

    def _cuda(self):
        """(register, unregister, device_pointer): the injected ones, CUDA for the rest (loaded only if needed)."""
        fns = (self._register, self._unregister, self._device_pointer)
        if all(fns):
            return fns
        c = _Cuda.get()
        return tuple(f or g for f, g in zip(fns, (c.host_register, c.host_unregister, c.device_pointer), strict=True))

    def acquire(self, addr: int, length: int, flags: int) -> int:
        """Register the pages of ``[addr, addr + length)`` (those not yet registered) and return the device address
        of ``addr``."""
        start, size = page_range(addr, length, self.page)
        register, unregister, devptr = self._cuda()
        with self._lock:
            pages = range(start, start + size, self.page)
            for p in pages:
                if p in self._pages and self._pages[p][1] != flags:
                    raise NicError(
                        f"page 0x{p:x} is already registered with flags 0x{self._pages[p][1]:x}, not 0x{flags:x}"
                    )
            done = []
            try:
                for p in pages:
                    if p not in self._pages:
                        register(p, self.page, flags)
                        self._pages[p] = [0, flags]
                        done.append(p)
                    self._pages[p][0] += 1
            except Exception:
                for p in pages:
                    if p in self._pages and p not in done:
                        self._pages[p][0] -= 1
                for p in done:
                    self._pages.pop(p, None)
                    unregister(p)
                raise
            return devptr(addr)

    def release(self, addr: int, length: int) -> None:
        start, size = page_range(addr, length, self.page)
        _, unregister, _ = self._cuda()
        with self._lock:
            for p in range(start, start + size, self.page):
                entry = self._pages.get(p)
                if entry is None:
                    continue
                entry[0] -= 1
                if entry[0] <= 0:
                    del self._pages[p]
                    unregister(p)

    @property
    def registered_pages(self) -> dict[int, tuple[int, int]]:
        with self._lock:
            return {p: (c, f) for p, (c, f) in self._pages.items()}


# --- objects -------------------------------------------------------------------------------------------------------


@dataclass
class Mlx5MemoryRegion:
    """A registered region: ``addr`` (the iova remote WQEs name), ``length``, ``lkey``, ``rkey``, ``access``."""

    nic: Mlx5Nic
    addr: int
    length: int
    lkey: int
    rkey: int
    access: int
    handle: Any
    keepalive: Any = None  # the numpy array registered, kept alive with the MR
    gpu: bool = False

    def contains(self, addr: int, n: int) -> bool:
        return self.addr <= addr and addr + n <= self.addr + self.length


@dataclass(frozen=True)
class Mlx5GpuQp:
    """Device addresses of one QP for ``kernels/mlx5_wqe.cuh``: ``sq`` (ring of ``wqe_cnt`` WQEBBs), ``dbrec``
    (``uint32_t *``; ``[1]`` is the send record), ``db_reg`` (``unsigned long long *``, the doorbell register)."""

    sq: int
    dbrec: int
    db_reg: int
    qpn: int
    wqe_cnt: int


class Mlx5CompletionQueue:
    """A real CQ polled from the host: ``ring`` (``cqe_cnt`` CQEs of ``cqe_size`` bytes), ``dbrec``, ``cqe_cnt``.

    CQE ``n`` is ready when its opcode is not INVALID and its owner bit equals ``(n // cqe_cnt) & 1`` (rdma-core's
    ``get_sw_cqe``); a 128-byte CQE holds the 64-byte one in its second half. After a poll the consumer index
    (24 bits, BE32) goes to ``dbrec[MLX5_CQ_SET_CI]``. Only requester CQEs are expected (send CQs, no CQE
    compression)."""

    def __init__(self, nic: Mlx5Nic, handle: Any, info: V.Mlx5CqInfo):
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
        self.ring = _u8_view(info.buf, info.cqe_cnt * info.cqe_size)
        self.dbrec = _u8_view(info.dbrec, 8)
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
                    fences = _Fences.get()
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
                _store32(self.info.dbrec + 4 * MLX5_CQ_SET_CI, be32_store_value(self.ci & 0xFFFFFF))
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


class Mlx5QueuePair:
    """A real RC QP with the emulated :class:`~epkern.nic.emulated.QueuePair`'s posting interface.

    ``sq`` is a numpy view of the send ring (``wqe_cnt`` WQEBBs of 64 bytes), ``dbrec`` of the 8-byte doorbell
    record (``[4:8]`` = send, BE32). The doorbell register is MMIO and is never read, so there is no ``db_reg``
    array; its address is ``info.bf_reg``. :meth:`connect` takes the peer's :class:`~epkern._verbs_cffi.PeerInfo`
    (from :meth:`local_info` on the other side, exchanged by the caller)."""

    RESET, RTS, ERROR, CLOSED = "RESET", "RTS", "ERROR", "CLOSED"

    def __init__(self, nic: Mlx5Nic, cq: Mlx5CompletionQueue, handle: Any, info: V.Mlx5QpInfo):
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
        self.sq = _u8_view(info.sq_buf, cnt * W.MLX5_SEND_WQE_BB)
        self.dbrec = _u8_view(info.dbrec, 8)
        self.state = self.RESET
        self.error: NicFault | None = None
        self.counters = QpCounters()
        self.psn = secrets.randbits(24)
        self.remote: V.PeerInfo | None = None
        self._rung = 0  # producer index of the last doorbell (WQEBBs, monotonic)
        self._gpu: Mlx5GpuQp | None = None
        cq._qps[self.qpn] = self

    # --- connection ---
    def local_info(self) -> V.PeerInfo:
        """What the peer's QP needs to connect to this one."""
        return self.nic._verbs.local_peer_info(self.handle, self.nic.port, self.nic.gid_index, self.psn)

    def connect(self, peer: V.PeerInfo) -> None:
        """RESET → INIT → RTR → RTS towards ``peer``."""
        if self.state != self.RESET:
            raise NicError(f"QP {self.qpn} is {self.state}; connect() needs a fresh QP")
        self.nic._verbs.connect_rc_qp(
            self.handle, self.local_info(), peer, port_num=self.nic.port, sgid_index=self.nic.gid_index
        )
        self.remote = peer
        self.state = self.RTS

    # --- posting from the host ---
    def ring_doorbell(self, pi: int) -> None:
        """Make the WQEs up to producer index ``pi`` (WQEBBs, monotonic) executable: send doorbell record, then one
        8-byte store of the last WQE's first ctrl qword to the doorbell register, fenced as rdma-core does."""
        if self.state != self.RTS:
            raise NicError(f"QP {self.qpn} is {self.state}: cannot ring its doorbell")
        if self._gpu is not None:
            raise NicError(f"QP {self.qpn} is mapped for the GPU; the host must not post on it too")
        fences = _Fences.get() if self.nic._host_fences else None
        last = last_wqe_index(self.sq, self._rung, pi)
        value = doorbell_qword(self.sq, last)
        with self.nic._bf_lock(self.info.bf_reg):
            # udma_to_device_barrier(): a compiler barrier on x86-64; nothing to do from Python.
            _store32(self.info.dbrec + 4 * W.MLX5_SND_DBR, be32_store_value(pi & 0xFFFF))
            if fences is not None:
                fences.sfence()  # mmio_wc_start()
            _store64(self.info.bf_reg, value)
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


class Mlx5Nic(NicObservation):
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
        self.faults: list[NicFault] = []
        self._host_fences = host_fences
        self._pages = page_registry or HostPageRegistry()
        self._mapped: list[tuple[int, int]] = []
        self._qps: list[Mlx5QueuePair] = []
        self._cqs: list[Mlx5CompletionQueue] = []
        self._mrs: list[Mlx5MemoryRegion] = []
        self._bf_locks: dict[int, threading.Lock] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._pd = None
        self._ctx = self._verbs.open_device(device_name)  # RdmaUnavailableError (with the reason) when none
        try:
            self.name = name or self._ctx.name
            if not self._ctx.is_mlx5:
                raise RdmaUnavailableError(f"RDMA device {self._ctx.name} is not an mlx5 device (mlx5dv unsupported)")
            self.port_attr = self._verbs.query_port(self._ctx, self.port)
            if self.port_attr.state != IBV_PORT_ACTIVE:
                raise RdmaUnavailableError(
                    f"{self._ctx.name} port {self.port} is not ACTIVE (state {self.port_attr.state})"
                )
            self._pd = self._verbs.alloc_pd(self._ctx)
        except BaseException:
            self._close_quietly()
            raise

    @property
    def device_name(self) -> str:
        return self._ctx.name

    def _check_open(self) -> None:
        if self._closed:
            raise NicError(f"mlx5 NIC {self.name} is closed")

    def _bf_lock(self, addr: int) -> threading.Lock:
        with self._lock:
            return self._bf_locks.setdefault(addr & ~(page_size() - 1), threading.Lock())

    # --- memory ---
    def reg_mr(self, target: np.ndarray | int, length: int | None = None, access: int = V.DEFAULT_ACCESS):
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
        with self._lock:
            self._mrs.append(mr)
        return mr

    def reg_gpu_mr(self, target: Any, length: int | None = None, access: int = V.DEFAULT_ACCESS):
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
        cuda = _Cuda.get()
        base, size = cuda.address_range(ptr)
        start, span, offset = dmabuf_range(ptr, int(length), base, size)
        fd = cuda.dmabuf_fd(start, span)
        try:
            h = self._verbs.reg_dmabuf_mr(self._pd, fd, offset, int(length), ptr, int(access))
        finally:
            os.close(fd)  # the MR keeps its own reference to the dma-buf
        mr = Mlx5MemoryRegion(self, h.addr, h.length, h.lkey, h.rkey, int(access), h, keep, gpu=True)
        with self._lock:
            self._mrs.append(mr)
        return mr

    def dereg_mr(self, mr: Mlx5MemoryRegion) -> None:
        with self._lock:
            if mr in self._mrs:
                self._mrs.remove(mr)
        mr.handle.close()

    # --- queues ---
    def create_cq(self, cqe_cnt: int = 256) -> Mlx5CompletionQueue:
        self._check_open()
        h = self._verbs.create_cq(self._ctx, int(cqe_cnt))
        try:
            cq = Mlx5CompletionQueue(self, h, self._verbs.mlx5_cq_info(h))
        except BaseException:
            h.close()
            raise
        with self._lock:
            self._cqs.append(cq)
        return cq

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
        with self._lock:
            self._qps.append(qp)
        return qp

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
    def close(self) -> None:
        """Unregister GPU mappings, destroy QPs, CQs, MRs, the PD, close the device — in that order. Idempotent.
        Stop every user first (proxy service, kernels): nothing may touch the rings after this."""
        if self._closed:
            return
        self._closed = True
        errors = self._close_quietly()
        if errors:
            raise NicError(f"closing mlx5 NIC {self.name}: " + "; ".join(errors))

    def _close_quietly(self) -> list[str]:
        errors: list[str] = []

        def run(what, fn, *args):
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 - keep closing the rest
                errors.append(f"{what}: {e}")

        for addr, length in reversed(self._mapped):
            run("cudaHostUnregister", self._pages.release, addr, length)
        self._mapped.clear()
        for qp in reversed(self._qps):
            run(f"destroy QP {qp.qpn}", qp.handle.close)
            qp.state = Mlx5QueuePair.CLOSED
        self._qps.clear()
        for cq in reversed(self._cqs):
            run(f"destroy CQ {cq.cqn}", cq.handle.close)
        self._cqs.clear()
        for mr in reversed(self._mrs):
            run(f"deregister MR 0x{mr.addr:x}", mr.handle.close)
        self._mrs.clear()
        if self._pd is not None:
            run("dealloc PD", self._pd.close)
            self._pd = None
        if self._ctx is not None:
            run("close device", self._ctx.close)
        return errors

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
