"""How an emulated NIC touches memory, by address: the :class:`MemoryAccess` protocol, its numpy backend
:class:`HostMemory`, and :func:`range_base`, the bounds lookup memory backends share (the GPU one is
:class:`epkern.nic.device_memory.DeviceMemory`)."""

from __future__ import annotations

import bisect
import threading
from typing import Protocol

import numpy as np

from .observation import NicError


class MemoryAccess(Protocol):
    """How the NIC touches memory, by address. Implementations: :class:`HostMemory` (numpy, CPU) and
    :class:`epkern.nic.device_memory.DeviceMemory` (GPU memory, IPC-opened peer memory, pinned host-mapped memory)."""

    def read(self, addr: int, n: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...

    def atomic_fetch_add64(self, addr: int, value: int) -> int: ...

    # Optional (the NIC falls back to ``read`` + ``write`` without them):
    # ``copy_from(dst, source, src, n) -> bool``: copy ``n`` bytes at ``src`` of the MemoryAccess ``source`` to
    # ``dst`` here without a trip through the host, possibly asynchronously; False if it cannot for this source
    # (nothing copied). Accesses made later through this object land after it; ``flush()`` waits for every copy
    # issued (the NIC flushes before a completion or its consumer index says a WQE is done).


def range_base(bases: list[int], size_of, addr: int, n: int) -> int | None:
    """The base of the added range holding ``[addr, addr + n)``: ``bases`` sorted, ``size_of(base)`` its
    length (memory backends' second line of defence behind the MR checks). None if no range holds it."""
    i = bisect.bisect_right(bases, addr) - 1
    if i >= 0 and addr + n <= bases[i] + size_of(bases[i]):
        return bases[i]
    return None


class HostMemory:
    """:class:`MemoryAccess` over numpy arrays added with :meth:`add`; addresses are their real host addresses.

    Every access must lie inside one added array (a second line of defence behind the MR checks).
    ``atomic_fetch_add64`` is atomic with respect to other calls on this object (a lock), which is what CPU
    tests need; a device backend uses a system-scope atomic instead."""

    def __init__(self):
        self._lock = threading.Lock()
        self._bases: list[int] = []
        self._arrays: dict[int, np.ndarray] = {}

    def add(self, array: np.ndarray) -> int:
        """Make a C-contiguous array addressable; returns its base address (``array.ctypes.data``)."""
        if not isinstance(array, np.ndarray) or not array.flags.c_contiguous:
            raise NicError("HostMemory.add needs a C-contiguous numpy array")
        flat = array.reshape(-1).view(np.uint8)
        base = flat.ctypes.data
        with self._lock:
            if base not in self._arrays:
                bisect.insort(self._bases, base)
            self._arrays[base] = flat
        return base

    def _view(self, addr: int, n: int) -> np.ndarray:
        base = range_base(self._bases, lambda b: self._arrays[b].shape[0], addr, n)
        if base is not None:
            return self._arrays[base][addr - base : addr - base + n]
        raise NicError(f"address range 0x{addr:x}+{n} is not inside memory known to this HostMemory")

    def read(self, addr: int, n: int) -> bytes:
        return self._view(addr, n).tobytes()

    def write(self, addr: int, data: bytes) -> None:
        self._view(addr, len(data))[:] = np.frombuffer(data, dtype=np.uint8)

    def copy_from(self, dst: int, source, src: int, n: int) -> bool:
        """Between two HostMemory objects (or within one): a direct array copy."""
        if not isinstance(source, HostMemory):
            return False
        self._view(dst, n)[:] = source._view(src, n)
        return True

    def flush(self) -> None:
        """Nothing to wait for (copies are synchronous)."""

    def atomic_fetch_add64(self, addr: int, value: int) -> int:
        with self._lock:
            v = self._view(addr, 8)
            old = int.from_bytes(v.tobytes(), "little")
            v[:] = np.frombuffer(((old + value) & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"), dtype=np.uint8)
            return old
