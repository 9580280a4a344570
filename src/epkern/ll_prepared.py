"""Prepared LL calls: ``Buffer.prepare_low_latency_dispatch(...)`` / ``prepare_low_latency_combine(...)``
return a callable that repeats that one call with the same arguments — the shortest host path of a decode
loop short of a CUDA graph.

The first call goes the validated way (``low_latency_dispatch`` / ``low_latency_combine``) and, with
``EPKERN_LL_FAST_HOST`` on (the default), leaves a plan (ll_plans.py); later calls replay that plan directly,
without building the plan key from a dozen arguments (ll_intranode._replay: straight onto the caller's stream
when it follows all of the Buffer's work). Only the shapes of the inputs are rechecked (an array reshaped in
place). Whatever makes the Buffer drop its plans (``clean_low_latency_buffer``) sends the next call the
validated way again. Without a plan (fast host off, an output left to the library, a zero-copy combine)
every call is the validated call.
"""

from __future__ import annotations


def _shapes(arrays) -> tuple:
    return tuple(getattr(a, "shape", None) for a in arrays)


class _Prepared:
    __slots__ = ("buf", "call", "args", "kwargs", "inputs", "plan", "generation", "async_finish", "hook", "refs")

    def __init__(self, buf, call, args, kwargs, inputs, hook_refs):
        self.buf, self.call, self.args, self.kwargs = buf, call, args, kwargs
        self.inputs = inputs  # the arrays whose shapes a replay rechecks
        self.plan, self.generation = None, -1
        self.async_finish = bool(kwargs.get("async_finish", False))
        self.hook = bool(kwargs.get("return_recv_hook", False))
        self.refs = hook_refs

    def _validated(self):
        buf = self.buf
        plans = buf._ll_plans
        plans.last_put = None
        result = self.call(buf, *self.args, **self.kwargs)
        self.plan, self.generation = plans.last_put, plans.generation
        return result

    def __call__(self):
        from .ll_intranode import _replay

        buf, plan = self.buf, self.plan
        buf._check_usable()
        if plan is None or self.generation != buf._ll_plans.generation or plan.shapes != _shapes(self.inputs):
            return self._validated()
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
    return PreparedDispatch(self, low_latency_dispatch, args, kwargs, inputs, 2)


def prepare_low_latency_combine(self, *args, **kwargs):
    """A callable repeating ``low_latency_combine(*args, **kwargs)`` (give ``out=``); the handle of any dispatch
    over the same preallocated outputs serves every repeat. Returns what low_latency_combine returns."""
    from .ll_intranode import low_latency_combine

    inputs = (_arg(args, kwargs, 0, "x"), _arg(args, kwargs, 1, "topk_idx"), _arg(args, kwargs, 2, "topk_weights"))
    return PreparedCombine(self, low_latency_combine, args, kwargs, inputs, 3)
