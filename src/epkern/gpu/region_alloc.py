"""CuPy allocations from the Buffer's HT area (issue #22 item 1: combine of a fresh expert output).

Between processes, combine reads its input where peers can read it: in the Buffer's shared region. An expert
output made anywhere else is staged there first, a full extra read and write of every row. Inside
``Buffer.allocating_in_buffer()`` the CuPy allocations of the calling thread come from the region's heap instead,
so an expert output made there (by any chain of CuPy operations) is read in place, as one written into
``get_combine_buffer`` is. A request the heap cannot serve (too large, or for another device) goes to the allocator
that was in force, so code inside the block never fails for lack of heap. Ranks in one process read each other's
memory anywhere (nothing is staged): there the block changes nothing. torch's allocator cannot be redirected from
Python: torch users write the expert output into ``get_combine_buffer`` (``out=``).

The heap reuses a freed block at once, whatever stream last used it (CuPy's pool keeps a freed block for its own
stream): inside the block, keep the expert's work on one stream (the one the Buffer's calls run on), as the
Buffer's own outputs assume.
"""

from __future__ import annotations

import contextlib

from ..memory.heap import HeapExhaustedError


class _HeapAllocator:
    """A CuPy allocator function over the runtime's heap, falling back to ``fallback``."""

    def __init__(self, rt, fallback):
        self.rt, self.fallback = rt, fallback

    def __call__(self, nbytes: int):
        import cupy

        rt = self.rt
        if rt.heap is None or cupy.cuda.runtime.getDevice() != rt.device:
            return self.fallback(nbytes)
        try:
            block = rt.heap.alloc(nbytes)
        except HeapExhaustedError:
            return self.fallback(nbytes)
        return block.pointer()  # back to the heap when the last array over it is dropped


def allocating_in_buffer(rt):
    """A context manager inside which the calling thread's CuPy allocations come from ``rt``'s heap (see the module
    docstring); the Buffer's usability is checked now, not at ``with``."""
    import cupy

    rt.check_usable()
    if rt.in_process:
        return contextlib.nullcontext()
    return cupy.cuda.using_allocator(_HeapAllocator(rt, cupy.cuda.get_allocator()))
