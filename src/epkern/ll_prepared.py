"""Prepared LL calls: ``Buffer.prepare_low_latency_dispatch(...)`` / ``prepare_low_latency_combine(...)``
return a callable that repeats that one call with the same arguments — the shortest host path of a decode
loop short of a CUDA graph.

The first call goes the validated way (``low_latency_dispatch`` / ``low_latency_combine``) and, with
``EPKERN_LL_FAST_HOST`` on (the default), leaves a plan (ll_plans.py); later calls replay that plan directly,
without building the plan key from a dozen arguments (ll_intranode._replay: straight onto the caller's stream
when it follows all of the Buffer's work). Only the shapes of the inputs are rechecked (an array reshaped in
place). Whatever makes the Buffer drop its plans (``clean_low_latency_buffer``) sends the next call the
validated way again. Without a plan (fast host off, an output left to the library) every call is the
validated call. A zero-copy combine reads the buffer of the set it runs in, and a zero_copy_recv dispatch
writes its outputs there, so they keep a plan per set.
"""

from __future__ import annotations


def _shapes(arrays) -> tuple:
    return tuple(getattr(a, "shape", None) for a in arrays)


class _Prepared:
    __slots__ = (
        "buf",
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
    )

    def __init__(self, buf, call, args, kwargs, inputs, hook_refs, per_set=False):
        self.buf, self.call, self.args, self.kwargs = buf, call, args, kwargs
        self.inputs = inputs  # the arrays whose shapes a replay rechecks
        self.plans, self.generation = [None, None], -1  # by set (per_set), else only [0]
        self.async_finish = bool(kwargs.get("async_finish", False))
        self.hook = bool(kwargs.get("return_recv_hook", False))
        self.refs = hook_refs
        self.per_set = per_set  # the launch depends on the set the call runs in (a zero-copy combine)

    def _validated(self, slot):
        buf = self.buf
        plans = buf._ll_plans
        plans.last_put = None
        result = self.call(buf, *self.args, **self.kwargs)
        if self.generation != plans.generation:
            self.plans = [None, None]
        self.plans[slot], self.generation = plans.last_put, plans.generation
        return result

    def __call__(self):
        from .ll_intranode import _replay

        buf = self.buf
        buf._check_usable()
        slot = (buf._ll_sends + 1) & 1 if self.per_set else 0
        plan = self.plans[slot]
        if plan is None or self.generation != buf._ll_plans.generation or plan.shapes != _shapes(self.inputs):
            return self._validated(slot)
        event, hook = _replay(buf, plan, self.async_finish, self.hook, self.refs)
        return self._result(plan, event, hook)


class PreparedDispatch(_Prepared):
    @staticmethod
    def _result(plan, event, hook):
        from .ll_intranode import dispatch_returns

        return dispatch_returns(plan, event, hook)


class PreparedCombine(_Prepared):
    @staticmethod
    def _result(plan, event, hook):
        return plan.result, event, hook


def _arg(args, kwargs, i, name):
    return args[i] if len(args) > i else kwargs.get(name)


def prepare_low_latency_dispatch(self, *args, **kwargs):
    """A callable repeating ``low_latency_dispatch(*args, **kwargs)`` with the least host work per call (give
    every ``out_*`` so repeats can skip validation). Returns what low_latency_dispatch returns."""
    from .ll_intranode import low_latency_dispatch

    inputs = (_arg(args, kwargs, 0, "x"), _arg(args, kwargs, 1, "topk_idx"))
    per_set = bool(kwargs.get("zero_copy_recv", False))  # its outputs are the set's views
    return PreparedDispatch(self, low_latency_dispatch, args, kwargs, inputs, 2, per_set)


def prepare_low_latency_combine(self, *args, **kwargs):
    """A callable repeating ``low_latency_combine(*args, **kwargs)`` (give ``out=``); the handle of any dispatch
    over the same preallocated outputs serves every repeat. Returns what low_latency_combine returns."""
    from .ll_intranode import low_latency_combine

    inputs = (_arg(args, kwargs, 0, "x"), _arg(args, kwargs, 1, "topk_idx"), _arg(args, kwargs, 2, "topk_weights"))
    per_set = bool(_arg(args, kwargs, 5, "zero_copy"))
    return PreparedCombine(self, low_latency_combine, args, kwargs, inputs, 3, per_set)
