"""ll_plans (EPKERN_LL_FAST_HOST): the plan cache and the replay launcher's argument order, on the CPU. The
replayed calls themselves run only on a GPU (tests/test_ll_gpu.py with EPKERN_LL_FAST_HOST=1)."""

from __future__ import annotations

import sys
import types

import numpy as np

from epkern import ll_plans


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


def test_launcher_passes_the_kernels_argument_order(monkeypatch):
    import fake_cupy

    calls = []

    def fake_get_function(source, name, defines):
        calls.append(("lookup", source, name, dict(defines)))
        return lambda grid, block, args: calls.append(("launch", grid, block, args))

    from epkern import kernel_loader

    monkeypatch.setitem(sys.modules, "cupy", fake_cupy._module()[0])
    monkeypatch.setattr(kernel_loader, "get_function", fake_get_function)
    buf = types.SimpleNamespace(rank=3, device=0)  # no _launch_cache: the launcher looks the kernel up
    rest = (np.uintp(1234), np.int32(7))
    launch = ll_plans.launcher(buf, "ll_dispatch.cu", "epk_ll_dispatch", {"EPK_TOPK": 8}, 16, 512, rest)
    launch(1, 0)
    launch(2, 1)
    lookups = [c for c in calls if c[0] == "lookup"]
    assert len(lookups) == 1 and lookups[0][3]["EPK_TOPK"] == 8 and "EPK_CTRL_BYTES" in lookups[0][3]
    launches = [c for c in calls if c[0] == "launch"]
    assert [c[1:3] for c in launches] == [((16,), (512,))] * 2
    # (dry_run = 0, rank, phase, back, *rest): GpuBuffer._launch's order
    assert [tuple(int(v) for v in c[3]) for c in launches] == [(0, 3, 1, 0, 1234, 7), (0, 3, 2, 1, 1234, 7)]
    assert all(isinstance(c[3][i], np.int32) for c in launches for i in range(4))
