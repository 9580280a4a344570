"""The host's own reads and writes of mlx5 queue memory (the path :meth:`Mlx5QueuePair.ring_doorbell` and
:meth:`Mlx5CompletionQueue.poll` take): walking the WQEs a doorbell covers, the doorbell qword, BE32 store values,
CPU fences (``sfence``/``lfence`` as three-byte functions, x86-64 only), single aligned 4- and 8-byte stores, and
numpy views of raw addresses. Written after rdma-core's ``post_send`` (providers/mlx5/qp.c) and
``util/udma_barrier.h``."""

from __future__ import annotations

import ctypes
import mmap
import platform
import struct
import threading

import numpy as np

from . import wqe as W
from .observation import NicError


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


class CpuFences:
    """``sfence``/``lfence`` as callable three-byte functions in an executable page (x86-64)."""

    _lock = threading.Lock()
    _inst: CpuFences | None = None

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
    def get(cls) -> CpuFences:
        with cls._lock:
            if cls._inst is None:
                cls._inst = cls()
            return cls._inst


def store32(addr: int, value: int) -> None:
    ctypes.c_uint32.from_address(addr).value = value  # one aligned 4-byte store


def store64(addr: int, value: int) -> None:
    ctypes.c_uint64.from_address(addr).value = value  # one aligned 8-byte store


def u8_view(addr: int, nbytes: int) -> np.ndarray:
    return np.frombuffer((ctypes.c_uint8 * nbytes).from_address(addr), dtype=np.uint8)
