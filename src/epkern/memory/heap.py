"""A first-fit allocator over a byte range of device memory that peers can address.

Dispatch outputs are allocated here so that senders can write each row straight into its final place in
the receiver's array (no staging copy). A block returns to the heap when its last user (CuPy arrays
viewing it, handles) is garbage collected, like CuPy's own pool; reuse is ordered by the stream the
next user runs on, as in CuPy.
"""

from __future__ import annotations

import bisect
import math
import sys
import threading

import numpy as np

from ..errors import EpkernError

ALIGN = 256


def packed_offsets(sizes) -> tuple[list, int]:
    """Byte offsets of arrays of ``sizes`` bytes laid one after another in a block, each starting on ALIGN, and the
    block's size (what several outputs allocated as one block take; Runtime.alloc_out)."""
    offsets, at = [], 0
    for n in sizes:
        offsets.append(at)
        at += -(-int(n) // ALIGN) * ALIGN
    return offsets, at


class HeapExhaustedError(EpkernError, MemoryError):
    """The heap has no free range large enough; the message says how much live outputs hold."""


class HeapBlock:
    """``nbytes`` at ``offset`` in the heap; ``ptr`` is the device address. Freed on garbage collection."""

    __slots__ = ("heap", "offset", "nbytes", "ptr", "__weakref__")

    def __init__(self, heap: Heap, offset: int, nbytes: int):
        self.heap = heap
        self.offset = offset
        self.nbytes = nbytes
        self.ptr = heap.base_ptr + offset

    def __del__(self):
        # __del__ rather than weakref.finalize: ~0.2 against ~3 µs per block, and HT calls allocate one per call
        # (issue #22's host time per call). At interpreter shutdown the memory goes with the process: nothing to do.
        # nbytes 0: carved (Heap.carve), its ranges now belong to the pieces.
        if self.nbytes and not sys.is_finalizing():
            self.heap._free(self.offset, self.nbytes)

    def pointer(self, byte_offset: int = 0):
        """A CuPy MemoryPointer into this block; its memory object keeps the block alive."""
        import cupy

        # A new UnownedMemory each time: caching one on the block would make a block <-> memory cycle, and the
        # block would then return to the heap only when the cyclic garbage collector runs.
        return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(self.ptr, self.nbytes, self), byte_offset)

    def array(self, shape, dtype, byte_offset: int = 0):
        """A CuPy array over this block (keeps the block alive)."""
        import cupy

        shape = tuple(int(s) for s in shape)
        need = math.prod(shape) * np.dtype(dtype).itemsize  # math.prod: a per-call hot spot as np.prod
        if byte_offset + need > self.nbytes:
            raise ValueError(f"view of {need} bytes at {byte_offset} exceeds block of {self.nbytes}")
        return cupy.ndarray(shape, dtype, self.pointer(byte_offset))


class Heap:
    """First-fit, coalescing allocator over [base_ptr, base_ptr + nbytes)."""

    def __init__(self, base_ptr: int, nbytes: int, keep=None):
        self.keep = keep  # what the memory under the heap lives as long as (every block keeps the heap alive)
        self.base_ptr = base_ptr
        self.nbytes = nbytes
        self._lock = threading.Lock()
        self._starts: list[int] = [0]  # free ranges, sorted by start
        self._sizes: dict[int, int] = {0: nbytes} if nbytes > 0 else {}
        if nbytes <= 0:
            self._starts = []
        self.in_use = 0

    def alloc(self, nbytes: int) -> HeapBlock:
        size = max(ALIGN, -(-int(nbytes) // ALIGN) * ALIGN)
        with self._lock:
            for start in self._starts:
                have = self._sizes[start]
                if have >= size:
                    self._starts.remove(start)
                    del self._sizes[start]
                    if have > size:
                        self._insert(start + size, have - size)
                    self.in_use += size
                    return HeapBlock(self, start, size)
        raise HeapExhaustedError(
            f"output heap exhausted: need {size} bytes, largest free range {self.largest_free()} of "
            f"{self.nbytes}; {self.in_use} bytes are held by live dispatch outputs/handles "
            f"(free them, or create the Buffer with a larger num_nvl_bytes)"
        )

    def carve(self, block: HeapBlock, pieces) -> list[HeapBlock]:
        """Keep ``pieces`` of ``block`` — (byte offset in the block, bytes), in order, not overlapping, offsets
        multiples of ALIGN — as blocks of their own (each rounded up to ALIGN, at least ALIGN) and return the rest of
        ``block`` to the heap now. ``block`` owns nothing afterwards: make no array over it before carving. (A
        non-cached dispatch reserves rows for the most it could receive and keeps what the counts say it got.)"""
        kept, end = [], 0
        for off, nbytes in pieces:
            size = max(ALIGN, -(-int(nbytes) // ALIGN) * ALIGN)
            if off % ALIGN or off < end or off + size > block.nbytes:
                raise ValueError(f"piece ({off}, {nbytes}) is not an aligned range of the block after {end}")
            kept.append((off, size))
            end = off + size
        gaps, at = [], 0
        for off, size in kept:
            if off > at:
                gaps.append((at, off - at))
            at = off + size
        if at < block.nbytes:
            gaps.append((at, block.nbytes - at))
        start, block.nbytes = block.offset, 0  # disarmed first: its __del__ frees nothing from here on
        out = [HeapBlock(self, start + off, size) for off, size in kept]  # still counted in use
        for off, size in gaps:
            self._free(start + off, size)
        return out

    def largest_free(self) -> int:
        return max(self._sizes.values(), default=0)

    def _insert(self, start: int, size: int) -> None:
        bisect.insort(self._starts, start)
        self._sizes[start] = size

    def _free(self, start: int, size: int) -> None:
        with self._lock:
            self.in_use -= size
            i = bisect.bisect_left(self._starts, start)
            # merge with the following range
            if i < len(self._starts) and self._starts[i] == start + size:
                size += self._sizes.pop(self._starts.pop(i))
            # merge with the preceding range
            if i > 0 and self._starts[i - 1] + self._sizes[self._starts[i - 1]] == start:
                self._sizes[self._starts[i - 1]] += size
                return
            self._insert(start, size)
