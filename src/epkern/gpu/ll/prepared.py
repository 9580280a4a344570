"""Prepared LL calls: ``Buffer.prepare_low_latency_dispatch(...)`` / ``prepare_low_latency_combine(...)`` return
a callable that repeats that one call with the same arguments — the shortest host path of a decode loop short
of a CUDA graph.

The first call goes the validated way and leaves a plan (plans.py); later calls replay that plan directly,
without building the plan key from a dozen arguments. Only the shapes of the inputs are rechecked (an array
reshaped in place). Whatever makes the engine drop its plans (``clean_low_latency_buffer``) sends the next call
the validated way again. Without a plan (replay off, an output left to the library) every call is the validated
call. A zero-copy combine reads the buffer of the set it runs in, and a zero_copy_recv dispatch writes its
outputs there, so they keep a plan per set.
"""

from __future__ import annotations

from .dispatch import dispatch_returns


def _shapes(arrays) -> tuple:
    return tuple(getattr(a, "shape", None) for a in arrays)


class Prepared:
    __slots__ = (
        "eng",
        "call",
        "args",
        "kwargs",
        "inputs",
        "plans",
        "generation",
        "async_finish",
        "hook",
        "refs",
        "per_set",
        "dispatch",
    )

    def __init__(self, eng, call, args, kwargs, inputs, hook_refs, per_set, dispatch):
        self.eng, self.call, self.args, self.kwargs = eng, call, args, kwargs
        self.inputs = inputs  # the arrays whose shapes a replay rechecks
        self.plans, self.generation = [None, None], -1  # by set (per_set), else only [0]
        self.async_finish = bool(kwargs.get("async_finish", False))
        self.hook = bool(kwargs.get("return_recv_hook", False))
        self.refs = hook_refs
        self.per_set = per_set  # the launch depends on the set the call runs in
        self.dispatch = dispatch

    def _validated(self, slot):
        """The call through the Buffer; its plan (made by it, or found: the same call made before it was prepared)
        is what later calls replay directly."""
        eng = self.eng
        plans = eng.plans
        plans.last = None
        eng.preparing = True
        try:
            result = self.call(*self.args, **self.kwargs)
        finally:
            eng.preparing = False
        if self.generation != plans.generation:
            self.plans = [None, None]
        self.plans[slot], self.generation = plans.last, plans.generation
        return result

    def __call__(self):
        eng = self.eng
        eng.rt.check_usable()
        slot = eng.next_parity() if self.per_set else 0
        plan = self.plans[slot]
        if plan is None or self.generation != eng.plans.generation or plan.shapes != _shapes(self.inputs):
            return self._validated(slot)
        event, hook = eng.replay(plan, self.async_finish, self.hook, self.refs)
        if self.dispatch:
            return dispatch_returns(plan, event, hook)
        return plan.result, event, hook


def _arg(args, kwargs, i, name):
    return args[i] if len(args) > i else kwargs.get(name)


def prepare_dispatch(eng, call, args, kwargs) -> Prepared:
    """``call``: the Buffer's bound low_latency_dispatch (so the prepared call goes through its argument binding)."""
    inputs = (_arg(args, kwargs, 0, "x"), _arg(args, kwargs, 1, "topk_idx"))
    per_set = bool(kwargs.get("zero_copy_recv", False))  # its outputs are the set's views
    return Prepared(eng, call, args, kwargs, inputs, 2, per_set, True)


def prepare_combine(eng, call, args, kwargs) -> Prepared:
    inputs = (_arg(args, kwargs, 0, "x"), _arg(args, kwargs, 1, "topk_idx"), _arg(args, kwargs, 2, "topk_weights"))
    per_set = bool(_arg(args, kwargs, 5, "zero_copy"))
    return Prepared(eng, call, args, kwargs, inputs, 3, per_set, False)
