"""The host's own reads and writes of mlx5 queue memory (the path :meth:`Mlx5QueuePair.ring_doorbell` and
:meth:`Mlx5CompletionQueue.poll` take): walking the WQEs a doorbell covers, the doorbell qword, BE32 store values,
CPU fences (``membarrier(2)``, x86-64 only), single aligned 4- and 8-byte stores, and
numpy views of raw addresses. Written after rdma-core's ``post_send`` (providers/mlx5/qp.c) and
``util/udma_barrier.h``."""

from __future__ import annotations

import ctypes
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
    """Full memory barriers for host-side doorbells and CQ polls, through Linux's ``membarrier(2)`` (private
    expedited): the kernel runs a full barrier (``smp_mb``, a locked instruction on x86-64) on the calling CPU, which
    orders the stores before it and drains the write-combining buffers as ``sfence`` does, and orders loads as
    ``lfence`` does. A supported system call instead of machine code placed in an executable page; about 1 us each on
    the development VM. ``sfence`` and ``lfence`` are the same barrier."""

    _lock = threading.Lock()
    _inst: CpuFences | None = None
    SYS_MEMBARRIER = 324  # x86-64
    CMD_PRIVATE_EXPEDITED = 1 << 3
    CMD_REGISTER_PRIVATE_EXPEDITED = 1 << 4

    def __init__(self):
        if platform.machine() not in ("x86_64", "AMD64"):
            raise NicError(
                f"host-side mlx5 doorbells need CPU fences, implemented for x86-64 only (this is {platform.machine()})"
            )
        libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        if self._call(self.CMD_REGISTER_PRIVATE_EXPEDITED) != 0:
            raise NicError(
                f"membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) failed (errno {ctypes.get_errno()}): host-side "
                "mlx5 doorbells need Linux 4.14 or later"
            )

    def _call(self, cmd: int) -> int:
        return self._syscall(ctypes.c_long(self.SYS_MEMBARRIER), ctypes.c_int(cmd), ctypes.c_uint(0), ctypes.c_int(0))

    def sfence(self) -> None:
        if self._call(self.CMD_PRIVATE_EXPEDITED) != 0:
            raise NicError(f"membarrier failed (errno {ctypes.get_errno()})")

    lfence = sfence

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
