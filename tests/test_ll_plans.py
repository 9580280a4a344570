"""epkern.gpu.ll.plans: the plan cache and the replay launcher's argument order, on the CPU. The replayed calls
themselves run on a GPU (tests/test_ll_gpu.py) and over the fake CuPy (tests/test_gpu_host_paths_cpu.py)."""

from __future__ import annotations

import sys
import types

import numpy as np

from epkern.gpu.ll import plans as ll_plans


def _plan(tag, shapes=((4, 8),)):
    return ll_plans.Plan(shapes, launch=None, result=tag, refs=())


def test_hit_needs_the_same_key_and_shapes():
    plans = ll_plans.CallPlans()
    plans.put(("k", 1), _plan("a"))
    assert plans.get(("k", 1), ((4, 8),)).result == "a"
    assert plans.get(("k", 1), ((4, 9),)) is None  # an array reshaped in place since
    assert plans.get(("k", 2), ((4, 8),)) is None


def test_keeps_the_last_two_and_refreshes_on_hit():
    plans = ll_plans.CallPlans(size=2)
    plans.put("a", _plan("a"))
    plans.put("b", _plan("b"))
    assert plans.get("a", ((4, 8),)) is not None  # a is now the most recent
    plans.put("c", _plan("c"))
    assert len(plans) == 2 and plans.get("b", ((4, 8),)) is None
    assert plans.get("a", ((4, 8),)) is not None and plans.get("c", ((4, 8),)) is not None
    plans.clear()
    assert len(plans) == 0


def test_launcher_sets_phase_and_back_in_the_described_order(monkeypatch):
    """The replay launcher lays the validated call's packed arguments out once and changes only phase and back
    (at the places epkern.gpu.kernels.LL_DISPATCH names) on each launch, on the comm stream unless told."""
    from epkern.gpu import kernels as KS

    made = []

    class Recorder:
        def __init__(self, function_ptr, grid, block, args):
            self.ptr, self.grid, self.block, self.args, self.launched = function_ptr, grid, block, list(args), []
            made.append(self)

        def set(self, i, value):
            self.args[i] = np.int32(value)

        def launch(self, stream_ptr):
            self.launched.append((stream_ptr, tuple(int(a) for a in self.args)))

    monkeypatch.setattr(ll_plans, "DriverLaunch", Recorder)
    func = types.SimpleNamespace(kernel=types.SimpleNamespace(ptr=0xF00))
    rt = types.SimpleNamespace(
        device=0, comm_stream=types.SimpleNamespace(ptr=0xC0), kernel=lambda spec, defines: [func, True]
    )
    monkeypatch.setitem(sys.modules, "cupy", __import__("fake_cupy")._module()[0])
    args = KS.LL_DISPATCH.pack(**{n: i + 1 for i, (n, _) in enumerate(KS.LL_DISPATCH.args)})
    launch = ll_plans.launcher(rt, KS.LL_DISPATCH, {}, 16, 512, args)
    launch(1, 0)
    launch(2, 5, 0xCA11)
    (rec,) = made
    assert rec.ptr == 0xF00 and (rec.grid, rec.block) == (16, 512)
    want = [int(a) for a in args]
    i_phase, i_back = KS.LL_DISPATCH.index("phase"), KS.LL_DISPATCH.index("back")
    first, second = list(want), list(want)
    first[i_phase], first[i_back] = 1, 0
    second[i_phase], second[i_back] = 2, 5
    assert rec.launched == [(0xC0, tuple(first)), (0xCA11, tuple(second))]
