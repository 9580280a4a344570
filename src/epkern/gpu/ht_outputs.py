"""Where HT calls' outputs and work arrays come from (intranode and across nodes), and a non-cached dispatch's
outputs reserved before its counts are known.

A non-cached dispatch used to wait on the host for the notify kernel's counts before it could size its outputs and
launch the copy: the GPU idled for that round trip and the host's allocation and packing (177-185 µs on an H100 under
8 MPS processes, session R's trace). With outputs from the shared heap (ranks in separate processes), the dispatch now
reserves the rows that fit in the heap's largest free range, launches the copy at once (its ``out_rows`` is the
reservation: a peer never writes past it), and only then waits for the counts; it keeps the front of each output that
the counts say it received and returns the rest of the reservation to the heap while the copy runs (no peer writes
there: every row a peer sends lies before the count).

Whenever the outputs would have fitted before (the largest free range holds the exact outputs), they fit in the
reservation; when they do not, both ways fail: the host raises HeapExhaustedError (peers' kernels record the rows
they could not send, as for a too-small ``num_worst_tokens``).

Only a warm dispatch specialisation launches early (a first use is collective: a dry run, a sync and a barrier on
every rank, which only a call every rank accepts may reach), so a shape's first dispatch still waits for its counts.
Calls the ranks disagree on (another hidden size, top-k, ...) are refused by every rank with ArgumentError when every
rank has dispatched its shape before (all launch early: the copies pair up and send nothing to a peer of another
shape) or none has (all wait). Where only some have, those launched early wait for a peer that refused without
launching until the deadline: TimeoutError, the Buffer unusable (the limitation of mismatched first uses that other
kernels have, docs/journal.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import api_checks
from .. import kernel_constants as K
from ..memory.heap import ALIGN, HeapExhaustedError, packed_offsets

BF16 = api_checks.BF16
_SHAPE_PHASE = K.get("EPK_ERR_PHASE_HT_SHAPE")
_MAX_ROWS = (1 << 31) - 1  # out_rows is an int32 kernel argument


@dataclass
class DispatchOutputs:
    sizes: list
    forms: list
    keep: tuple
    x: object
    scales: object
    idx: object
    weights: object
    src: object


def typed_outputs(rt, forms, compute, on_comm: bool, *, shared: bool = True, captured: bool):
    """Arrays of the given (shape, dtype) forms from rt.alloc_out, and their byte sizes (a replay plan keeps both)."""
    sizes = [math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in forms]
    arrays, keep = rt.alloc_out(sizes, compute, on_comm, shared=shared, captured=captured, typed=forms)
    return arrays, keep, sizes


def combine_outputs(rt, T: int, K: int, hidden: int, with_weights: bool, compute, on_comm: bool, captured: bool):
    """A combine's outputs, BF16 [T, hidden] and float32 [T, K] weights (None without), from the rank's CuPy pool
    (the held heap inside a capture); and (sizes, forms) for a replay plan."""
    forms = [((T, hidden), BF16)] + ([((T, K), np.float32)] if with_weights else [])  # no empty array made
    arrays, _, sizes = typed_outputs(rt, forms, compute, on_comm, shared=False, captured=captured)
    return arrays[0], arrays[1] if with_weights else None, (sizes, forms)


def work_arrays(rt, shapes, dtype, compute, captured: bool, zeroed=()):
    """A call's own arrays on the comm stream (the indices in ``zeroed`` set to 0 first): from CuPy's pool eagerly,
    from the Buffer's heap inside a capture (held for its life: every replay writes them; rt.alloc_out)."""
    import cupy

    if not captured:
        return [(cupy.zeros if i in zeroed else cupy.empty)(s, dtype=dtype) for i, s in enumerate(shapes)]
    arrays, _, _ = typed_outputs(rt, [(s, dtype) for s in shapes], compute, True, shared=False, captured=True)
    for i in zeroed:
        rt.fill_bytes(arrays[i], 0)
    return arrays


def dispatch_forms(rows: int, data, scales, topk: int, cached: bool) -> list:
    """(shape, dtype) of a dispatch's outputs: x, FP8 scales ((0,) for BF16), and without a handle topk_idx,
    weights and source indices."""
    hidden, fp8 = data.shape[1], scales is not None
    # FP8 crosses the API as uint8 e4m3 bytes (a float8_e4m3fn input too: CuPy has no float8 dtype)
    forms = [
        ((rows, hidden), np.uint8 if fp8 else data.dtype),
        ((rows, hidden // 128) if fp8 else (0,), np.float32),
    ]
    if not cached:
        forms += [((rows, topk), np.int64), ((rows, topk), np.float32), ((rows,), np.int32)]
    return forms


def dispatch_outputs(rt, out_rows, data, scales, topk, cached, num_worst_tokens, compute, on_comm, *, captured: bool):
    """A dispatch's outputs, allocated where peers can write them (intranode and across nodes alike)."""
    forms = dispatch_forms(out_rows, data, scales, topk, cached)
    bufs, keep, sizes = typed_outputs(rt, forms, compute, on_comm, captured=captured)
    if not cached and num_worst_tokens:  # rows past the real count: no selection (-1 is all bytes 0xFF)
        rt.fill_bytes(bufs[2], 0xFF)
        rt.fill_bytes(bufs[3], 0)
        rt.fill_bytes(bufs[4], 0xFF)
    return _outputs(sizes, forms, keep, bufs, scales is not None, cached)


def _outputs(sizes, forms, keep, bufs, fp8: bool, cached: bool) -> DispatchOutputs:
    meta = (None, None, None) if cached else bufs[2:]
    return DispatchOutputs(sizes, forms, keep, bufs[0], bufs[1] if fp8 else None, *meta)


# Where each output lies in a reservation: the small ones first, x last (its unused tail then joins the free range
# after the reservation). Indices into dispatch_forms' list.
_RESERVE_ORDER = (4, 2, 3, 1, 0)


class Reservation:
    """A non-cached dispatch's outputs reserved in the shared heap before the counts are known (module docstring)."""

    def __init__(self, rt, data, scales, topk: int):
        self.rt, self.fp8, self.topk = rt, scales is not None, topk
        self.data, self.scales = data, scales
        one = dispatch_forms(1, data, scales, topk, False)
        self.row_bytes = [math.prod(s) * np.dtype(d).itemsize if i != 1 or self.fp8 else 0 for i, (s, d) in
                          enumerate(one)]  # fmt: skip
        self.rows = self._rows_fitting(rt.heap.largest_free())
        in_order, at = packed_offsets(self.rows * self.row_bytes[i] for i in _RESERVE_ORDER)
        self.offsets = [0] * 5
        for i, off in zip(_RESERVE_ORDER, in_order, strict=True):
            self.offsets[i] = off
        self.block = rt.heap.alloc(at)
        self.done = None  # poisoning: the event after the fills (the tails return to the heap only once it passed)
        if rt.poison:
            self._poison()

    def _rows_fitting(self, free: int) -> int:
        """The most rows whose outputs (each rounded up to ALIGN, as the reservation lays them out) fit in ``free``."""
        per = sum(self.row_bytes)
        rows = max(0, (free - len(_RESERVE_ORDER) * ALIGN) // per)
        while rows < _MAX_ROWS and self._bytes(rows + 1) <= free:
            rows += 1
        return min(rows, _MAX_ROWS)

    def _bytes(self, rows: int) -> int:
        return packed_offsets(rows * b for b in self.row_bytes)[1]

    def pointers(self) -> list:
        """Device addresses of x, scales (0 for BF16), topk_idx, weights and source indices: the kernel's outputs."""
        base = self.block.ptr
        return [base + off if b else 0 for off, b in zip(self.offsets, self.row_bytes, strict=True)]

    def _poison(self) -> None:
        """Every reserved byte 0xFF before the copy (EPKERN_POISON_OUTPUTS: rows a kernel leaves unwritten show)."""
        import cupy

        stream = cupy.cuda.get_current_stream()
        for ptr, b in zip(self.pointers(), self.row_bytes, strict=True):
            if ptr and b and self.rows:
                cupy.cuda.runtime.memsetAsync(ptr, 0xFF, self.rows * b, stream.ptr)
        self.done = stream.record()

    def keep(self, num_recv: int) -> DispatchOutputs:
        """The outputs of ``num_recv`` rows (the notify's count): the reservation's fronts as blocks of their own, the
        rest back to the heap. HeapExhaustedError if they did not fit (the kernel refused the rest)."""
        rt = self.rt
        if num_recv > self.rows:
            rt.sync_bounded(rt.comm_stream, "dispatch (outputs too large for the heap): waiting for its kernel")
            need = self._bytes(num_recv)
            raise HeapExhaustedError(
                f"output heap exhausted: this dispatch receives {num_recv} rows ({need} bytes of outputs), the largest "
                f"free range held {self.rows}; {rt.heap.in_use - self.block.nbytes} bytes are held by live dispatch "
                "outputs/handles (free them, or create the Buffer with a larger num_nvl_bytes); peers could not send "
                "the rows past it"
            )
        if self.done is not None:
            rt.sync_bounded(self.done, "dispatch: poisoning its outputs")
        order = [i for i in _RESERVE_ORDER if self.row_bytes[i]]
        blocks = rt.heap.carve(self.block, [(self.offsets[i], num_recv * self.row_bytes[i]) for i in order])
        forms = dispatch_forms(num_recv, self.data, self.scales, self.topk, False)
        bufs = [None] * 5
        for i, block in zip(order, blocks, strict=True):
            bufs[i] = block.array(*forms[i])
        if not self.fp8:  # BF16's empty scales array (forms[1] is (0,)), as dispatch_outputs makes it
            bufs[1] = blocks[0].array(*forms[1])
        sizes = [math.prod(s) * np.dtype(d).itemsize for s, d in forms]
        return _outputs(sizes, forms, tuple(blocks), bufs, self.fp8, False)

    def refused(self) -> None:
        """The counts refused the call (ArgumentError follows): the copy already runs on every rank and peers write
        into the reservation until it ends, so wait for it (bounded) before the reservation returns to the heap, and
        clear the shape-mismatch record the copy may have left (every rank refuses the call; the Buffer stays
        usable, as when the host refused before any copy)."""
        rt = self.rt
        rt.sync_bounded(rt.comm_stream, "dispatch (refused by the counts): waiting for its kernel")
        rec = rt.error_record
        if rec[0] and _shape_record(rec):
            rec[1:7] = 0
            rec[0] = 0  # released last: a later kernel may claim it again


def tolerate_shape_record(rt):
    """While waiting for the counts after an early launch: raise what a kernel recorded, except a shape mismatch,
    which the copy may already have recorded and the counts report as ArgumentError (Reservation.refused)."""

    def each():
        if not _shape_record(rt.error_record):
            rt.raise_recorded()

    return each


def _shape_record(rec) -> bool:
    """Whether the error record holds a (complete: its code is written last) shape-mismatch report."""
    return bool(int(rec[1]) and int(rec[3]) == _SHAPE_PHASE)


def reservation(rt, data, scales, topk: int, captured: bool) -> Reservation | None:
    """A reservation for a non-cached dispatch without ``num_worst_tokens``, or None where its outputs do not come
    from the shared heap (in-process ranks: CuPy's pool; a graph capture, which refuses such a dispatch anyway) or the
    heap cannot hold one row."""
    heap = rt.heap
    if captured or rt.in_process or heap is None or heap.nbytes == 0:
        return None
    res = None
    try:
        res = Reservation(rt, data, scales, topk)
    except HeapExhaustedError:
        return None
    return res if res.rows else None
