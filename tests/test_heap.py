import gc
import random

import pytest

from epkern.memory.heap import ALIGN, Heap, HeapExhaustedError


def test_alloc_free_coalesces_back_to_one_range():
    heap = Heap(base_ptr=1 << 40, nbytes=1 << 20)
    rng = random.Random()
    live = []
    for _ in range(500):
        if live and rng.random() < 0.45:
            live.pop(rng.randrange(len(live)))
        else:
            try:
                live.append(heap.alloc(rng.randrange(1, 50_000)))
            except HeapExhaustedError:
                live.clear()
        blocks = sorted((b.offset, b.offset + b.nbytes) for b in live)
        for (_a0, a1), (b0, _) in zip(blocks, blocks[1:], strict=False):
            assert a1 <= b0, "overlapping blocks"
        assert all(b.offset % ALIGN == 0 and b.ptr == heap.base_ptr + b.offset for b in live)
        assert heap.in_use == sum(b.nbytes for b in live)
    live.clear()
    gc.collect()
    assert heap.in_use == 0 and heap.largest_free() == 1 << 20


def test_exhaustion_message_says_what_is_held():
    heap = Heap(base_ptr=0, nbytes=4096)
    keep = heap.alloc(3000)
    with pytest.raises(HeapExhaustedError, match="held by live"):
        heap.alloc(2000)
    del keep
    gc.collect()
    assert heap.alloc(4096).nbytes == 4096


def test_carve_keeps_the_pieces_and_frees_the_rest():
    heap = Heap(base_ptr=1 << 40, nbytes=1 << 20)
    before = heap.alloc(ALIGN)
    block = heap.alloc(64 * ALIGN)
    after = heap.alloc(ALIGN)
    pieces = heap.carve(block, [(0, 1), (4 * ALIGN, 3 * ALIGN + 5), (40 * ALIGN, 0)])
    assert [(p.offset - block.offset, p.nbytes) for p in pieces] == [
        (0, ALIGN),
        (4 * ALIGN, 4 * ALIGN),
        (40 * ALIGN, ALIGN),
    ]
    assert heap.in_use == 2 * ALIGN + 6 * ALIGN
    del block  # disarmed: frees nothing twice
    gc.collect()
    assert heap.in_use == 8 * ALIGN
    # the gaps are free: an allocation of 3 * ALIGN lands in the first one
    gap = heap.alloc(3 * ALIGN)
    assert gap.offset == pieces[0].offset + ALIGN
    del pieces, gap, before, after
    gc.collect()
    assert heap.in_use == 0 and heap.largest_free() == 1 << 20


@pytest.mark.parametrize("pieces", [[(8, 16)], [(2 * ALIGN, 16), (ALIGN, 16)], [(63 * ALIGN, 2 * ALIGN)]])
def test_carve_refuses_pieces_that_are_not_aligned_ranges_of_the_block(pieces):
    heap = Heap(base_ptr=0, nbytes=1 << 20)
    block = heap.alloc(64 * ALIGN)
    with pytest.raises(ValueError, match="aligned range"):
        heap.carve(block, pieces)
    assert block.nbytes == 64 * ALIGN  # untouched
