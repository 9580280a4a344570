"""Replaying a validated LL call on new arrays of the same layout (DeepEP's calls: new outputs every call).

An identity plan (plans.py) serves a decode loop that passes the same preallocated arrays every step. DeepEP's API
— so ``epkern.deep_ep`` too, and any caller that makes new outputs for every call — passes new arrays every time:
their identities never repeat, so every such call was validated in full. A rebinding plan is keyed by the layout of
every array the call takes (shape, strides, dtype, device; ht_replay.array_layout), the call's flags and sizes, and
for a zero-copy combine the buffer set; it holds no array, and per call it sets the arrays' addresses into the
validated call's packed launch (before every launch, so a receive hook called later still gets its own call's
addresses); outputs the caller leaves to the library are made anew per call, as the validated call makes them.
Nothing it skips can differ: every check of the validated path depends only on those layouts, flags and sizes,
except two that depend on the call's objects, which it makes per call: the handle belongs to this Buffer, and a (not
zero-copy) combine's x lies outside the receive area it overwrites. A rebound call whose arrays were seen in a recent
call too (engine.seen_again) leaves an identity plan for its repeats.

Not rebound (validated as before): a dispatch with ``zero_copy_recv`` (its outputs are the Buffer's: identity plans
serve it), arrays that are not CuPy's, a combine whose x lies in the other buffer set's receive area, Buffers with
replays off.
"""

from __future__ import annotations

import numpy as np

from ... import api_checks
from ..ht_replay import array_layout
from . import plans as ll_plans
from .layout import THREADS

# The kernel arguments a rebound call sets per call (the rest is the validated call's)
DISPATCH_ARRAYS = ("x", "topk_idx", "out_x", "out_scales", "out_src", "out_layout", "out_count", "recv_stats",
                   "wait_stats")  # fmt: skip
COMBINE_ARRAYS = ("x", "src_info", "layout", "topk_idx", "topk_weights", "out", "wait_stats")


def layouts(arrays) -> tuple | None:
    """Each array's layout (None for an absent one), or None where one is not a CuPy array (not rebound)."""
    import cupy

    out = []
    for a in arrays:
        if a is None:
            out.append(None)
            continue
        lay = array_layout(a, cupy)
        if lay is None:
            return None
        out.append(lay)
    return tuple(out)


class Plan:
    """One validated call's launch, its per-call arrays set anew at each rebound call (holds no array)."""

    graphs = None  # engine.replay launches it directly (a graph would hold the first call's addresses)
    shapes = None  # CallPlans compares it; the layouts are in the key

    def __init__(self, eng, spec, defines, args, names, statics=(), missing=()):
        # every device array as its address: the Buffer's own (peers, state, the zero-copy set buffer) outlive the
        # plan (dropped with the engine's plans), the call's are set per call
        self.by_value = tuple(a if isinstance(a, np.generic) else np.uint64(a.data.ptr) for a in args)
        self.eng, self.spec, self.defines = eng, spec, defines
        self.base = ll_plans.launcher(eng.rt, spec, defines, eng.blocks(), THREADS, self.by_value)
        self.index = [spec.index(n) for n in names]
        self.missing = missing  # (index in the call's arrays, (shape, dtype, transposed)) of each output to make
        self.statics = statics  # sizes the result needs (num_max, hidden, num_experts, layout, fp8)

    def allocate(self, arrays: list, rt) -> bool:
        """The outputs the caller left to the library, new, into ``arrays`` (on the caller's current stream, as the
        validated call allocates them; poisoned as there when EPKERN_POISON_OUTPUTS is set). Whether the caller gave
        every output (then an identity plan may serve its repeats)."""
        import cupy

        for i, (shape, dtype, transposed) in self.missing:
            a = cupy.empty(shape, dtype)
            if rt.poison:
                rt.fill_bytes(a, 0xFF)
            arrays[i] = a.transpose(0, 2, 1) if transposed else a
        return not self.missing

    def identity(self, bound: Bound, shapes, result, refs):
        """An identity plan (plans.Plan) of the rebound call ``bound``: its launch with the call's addresses, holding
        the call's arrays ``refs`` (so the ids in its key stay theirs) and returning ``result``."""
        args = list(self.by_value)
        for i, p in zip(self.index, bound.ptrs, strict=True):
            args[i] = np.uint64(p)
        fast = ll_plans.launcher(self.eng.rt, self.spec, self.defines, self.eng.blocks(), THREADS, tuple(args))
        return ll_plans.Plan(shapes, fast, result, refs)

    def bound(self, arrays, refs) -> Bound:
        """This call's launch: ``arrays`` (in the plan's order, None for an absent one) set before every launch, so a
        receive hook launched later still gets its own call's addresses; ``refs``: the call's inputs, first."""
        ptrs = [0 if a is None else a.data.ptr for a in arrays]
        return Bound(self, ptrs, refs)


class Bound:
    """A rebound call as engine.replay takes a plan: ``launch(phase, back, stream_ptr=None)``, no graphs, ``refs``
    (the call's arrays, inputs first: a hook keeps them alive)."""

    __slots__ = ("plan", "ptrs", "refs")
    graphs = None

    def __init__(self, plan, ptrs, refs):
        self.plan, self.ptrs, self.refs = plan, ptrs, refs

    def launch(self, phase: int, back: int, stream_ptr: int | None = None) -> None:
        base = self.plan.base
        packed = base.packed
        for i, p in zip(self.plan.index, self.ptrs, strict=True):
            packed.set(i, p)
        base(phase, back, stream_ptr)


def dispatch_result(plan: Plan, eng, outs):
    """What a rebound dispatch returns besides event and hook: (x or (x, scales)), count, a new handle."""
    from .engine import GpuLLHandle

    num_max, hidden, num_experts, lay, fp8 = plan.statics
    recv_x, recv_scales, src_info, layout_range, recv_count = outs
    handle = api_checks.stamp(GpuLLHandle(src_info, layout_range, num_max, hidden, num_experts, lay), eng.rt)
    return ((recv_x, recv_scales) if fp8 else recv_x), recv_count, handle
