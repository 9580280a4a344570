"""Replayed cached HT dispatch (epkern.gpu.ht_replay, issue #22 item 2) over the fake CuPy: a repeated cached
dispatch launches what the full path launches for it (argument for argument, with the new x, call number and outputs),
only when the call could not have been validated differently, and never with a dropped handle's pointers."""

from __future__ import annotations

import gc

import ml_dtypes
import numpy as np
import pytest

import fake_cupy as F
from epkern.errors import ArgumentError, EpkernError
from epkern.gpu.kernels import HT_COMBINE, HT_DISPATCH
from epkern.gpu.tuning import HtTuning, Tuning

BF16 = np.dtype(ml_dtypes.bfloat16)
T, H, K, E = 64, 1024, 4, 8
I_X, I_SCALES, I_CALL = HT_DISPATCH.index("x"), HT_DISPATCH.index("x_scales"), HT_DISPATCH.index("call")
I_OUT_X, I_OUT_SCALES = HT_DISPATCH.index("out_x"), HT_DISPATCH.index("out_scales")


@pytest.fixture
def fake(monkeypatch):
    with F.installed(monkeypatch) as launches:
        yield launches


def _x(fp8, seed):
    import cupy

    rng = np.random.default_rng(seed)
    if fp8:
        return (cupy.asarray(rng.integers(0, 255, (T, H)).astype(np.uint8)),
                cupy.asarray(rng.random((T, H // 128)).astype(np.float32)))  # fmt: skip
    return cupy.asarray(rng.integers(-4, 5, (T, H)).astype(BF16))


def _cached(buf, fake, x, handle, **kw):
    before = len(fake)
    out = buf.dispatch(x, handle=handle, **kw)
    launches = F.real_launches(fake[before:])
    assert [launch[1] for launch in launches] == ["epk_ht_dispatch"]
    return out, launches[0]


def _plan_graphs(ht) -> int:
    """Launches made through plans' one-kernel graphs (HtTuning.replay_graph)."""
    return sum(p.__dict__["graph"].launches for p in ht.plans._plans.values() if "graph" in p.__dict__)


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
def test_a_repeated_cached_dispatch_launches_what_the_full_path_launches(fake, fp8, graph):
    buf = F.fake_buffer(_tuning=Tuning(ht=HtTuning(replay_graph=graph)))
    inputs = F.ht_inputs(T, H, K, E)
    *_, handle, _ = F.full_dispatch(buf, inputs, x=_x(fp8, 0), num_worst_tokens=T)
    ht = buf._backend.ht
    (first_x, *_), full = _cached(buf, fake, _x(fp8, 1), handle)  # validated: the full path, kept as a plan
    assert ht.replays == 0 and len(ht.plans) == 1
    for i in range(2, 5):
        x = _x(fp8, i)  # new arrays each time (a training step's fresh activations), same layout
        out, again = _cached(buf, fake, x, handle)
        assert ht.replays == i - 1
        recv = out[0][0] if fp8 else out[0]
        assert recv.shape == (T, H) and recv.dtype == (np.uint8 if fp8 else BF16)
        assert again[:5] == full[:5]  # kernel, defines, grid, block
        per_call = {I_X: (x[0] if fp8 else x).data.ptr, I_OUT_X: recv.data.ptr}
        if fp8:
            per_call.update({I_SCALES: x[1].data.ptr, I_OUT_SCALES: out[0][1].data.ptr})
            assert out[0][1].shape == (T, H // 128) and out[0][1].dtype == np.float32
        for j, (u, v) in enumerate(zip(again[5], full[5], strict=True)):
            if j == I_CALL:
                assert F.addr(u) > F.addr(v)  # a new call number per call
            elif j in per_call:
                assert F.addr(u) == per_call[j]
            else:
                assert F.addr(u) == F.addr(v), j
        assert out[1:4] == (None, None, None) and out[4] is handle
    assert _plan_graphs(ht) == (3 if graph else 0)  # every replay through the graph when asked, none otherwise
    assert first_x.shape == (T, H) if not fp8 else first_x[0].shape == (T, H)
    buf.destroy()


def test_only_the_same_handle_and_layout_replay(fake):
    import cupy

    buf = F.fake_buffer()
    inputs = F.ht_inputs(T, H, K, E)
    *_, handle, _ = F.full_dispatch(buf, inputs, num_worst_tokens=T)
    ht = buf._backend.ht
    x = _x(False, 1)
    buf.dispatch(x, handle=handle)
    buf.dispatch(x, handle=handle)
    assert ht.replays == 1
    # another layout (a strided view: the full path refuses it), a list pair, top-k given: not replayed
    with pytest.raises(ArgumentError, match="x"):
        buf.dispatch(cupy.asarray(np.zeros((T, 2 * H), BF16))[:, ::2], handle=handle)
    with pytest.raises(ArgumentError, match="topk_idx"):
        buf.dispatch(x, handle=handle, topk_idx=inputs[1])
    with pytest.raises(ArgumentError, match="num_worst_tokens"):
        buf.dispatch(x, handle=handle, num_worst_tokens=-1)
    assert ht.replays == 1
    # another handle: its own plan after its own validation
    *_, handle2, _ = F.full_dispatch(buf, inputs, num_worst_tokens=T)
    buf.dispatch(x, handle=handle2)
    assert ht.replays == 1
    buf.dispatch(x, handle=handle2)
    assert ht.replays == 2
    # set_num_sms changes the grid: plans are dropped
    buf.set_num_sms(max(1, buf._backend.ht.num_sms - 1))
    buf.dispatch(x, handle=handle2)
    assert ht.replays == 2
    buf.destroy()
    with pytest.raises(EpkernError):
        buf.dispatch(x, handle=handle2)


def test_a_dropped_handle_is_never_replayed_and_not_kept(fake):
    """A plan holds its handle weakly: once the caller drops the handle, its heap blocks return to the heap, and a
    new handle that happens to get the same id is validated, not replayed with the old one's pointers."""
    buf = F.fake_buffer()
    inputs = F.ht_inputs(T, H, K, E)
    heap = buf._backend.rt.heap
    x = _x(False, 1)
    *_, handle, _ = F.full_dispatch(buf, inputs, num_worst_tokens=T)
    buf.dispatch(x, handle=handle)
    plan = buf._backend.ht.plans.last
    held = heap.in_use
    assert held > 0 and plan.matches(handle)
    del handle
    gc.collect()
    assert heap.in_use < held and not plan.matches(None)
    assert plan.handle_ref() is None
    buf.destroy()


I_IN_X, I_IN_W = HT_COMBINE.index("in_x"), HT_COMBINE.index("in_weights")
I_C_CALL, I_C_OUT, I_C_OUT_W = HT_COMBINE.index("call"), HT_COMBINE.index("out_x"), HT_COMBINE.index("out_weights")
I_BIAS0 = HT_COMBINE.index("bias0")


def _combine(buf, fake, y, handle, **kw):
    before = len(fake)
    out = buf.combine(y, handle, **kw)
    launches = F.real_launches(fake[before:])
    assert [launch[1] for launch in launches] == ["epk_ht_combine"]
    return out, launches[0]


@pytest.mark.parametrize("graph", [False, True])
def test_a_repeated_combine_launches_what_the_full_path_launches(fake, graph):
    """Expert outputs are fresh arrays every step (staged into the region between processes, as the full path
    does): a combine like a validated one replays with the new staged input, weights, bias, call number and outputs."""
    import cupy

    buf = F.fake_buffer(_tuning=Tuning(ht=HtTuning(replay_graph=graph)))
    rt, ht = buf._backend.rt, buf._backend.ht
    inputs = F.ht_inputs(T, H, K, E)
    recv_x, _, recv_w, _, handle, _ = F.full_dispatch(buf, inputs, num_worst_tokens=T)

    def fresh(seed):
        rng = np.random.default_rng(seed)
        y = cupy.asarray(rng.integers(-4, 5, recv_x.shape).astype(BF16))
        w = cupy.asarray(rng.random(recv_w.shape).astype(np.float32))
        b = cupy.asarray(rng.integers(-4, 5, (T, H)).astype(BF16))
        return y, w, b

    y, w, b = fresh(0)
    _, full = _combine(buf, fake, y, handle, topk_weights=w, bias=b)
    assert ht.replays == 0
    region = (rt.region.ptr, rt.region.ptr + rt.region.nbytes)
    for i in range(1, 4):
        y, w, b = fresh(i)
        (out, out_w, _), again = _combine(buf, fake, y, handle, topk_weights=w, bias=b)
        assert ht.replays == i and again[:5] == full[:5]
        assert out.shape == (T, H) and out_w.shape == (T, K)
        for j, (u, v) in enumerate(zip(again[5], full[5], strict=True)):
            if j == I_C_CALL:
                assert F.addr(u) > F.addr(v)
            elif j in (I_IN_X, I_IN_W):  # staged copies inside the shared region (y, w live outside it)
                assert region[0] <= F.addr(u) < region[1] and F.addr(u) not in (y.data.ptr, w.data.ptr)
            elif j == I_BIAS0:
                assert F.addr(u) == b.data.ptr
            elif j == I_C_OUT:
                assert F.addr(u) == out.data.ptr
            elif j == I_C_OUT_W:
                assert F.addr(u) == out_w.data.ptr
            else:
                assert F.addr(u) == F.addr(v), j
    # no bias, or no weights: another call (validated first), not this plan
    _combine(buf, fake, y, handle, topk_weights=w)
    _combine(buf, fake, y, handle)
    assert ht.replays == 3
    (out, out_w, _), _ = _combine(buf, fake, y, handle)
    assert ht.replays == 4 and out_w is None
    assert _plan_graphs(ht) == (4 if graph else 0)
    buf.destroy()


@pytest.mark.parametrize("processes", [True, False])
def test_plain_replays_go_straight_onto_the_callers_stream(fake, processes):
    """A replay whose caller waits for it (no async_finish / previous_event / allocate_on_comm_stream) while the
    caller's stream already follows the Buffer's work launches onto that stream (gpu/direct.py) and returns no
    event; the others keep the comm-stream route, and the comm stream's next work waits for the direct launch."""
    import cupy

    buf = F.fake_buffer(processes=processes)
    rt, ht = buf._backend.rt, buf._backend.ht
    comm, caller = rt.comm_stream.ptr, cupy.cuda.get_current_stream()
    inputs = F.ht_inputs(T, H, K, E)
    recv_x, _, _, _, handle, _ = F.full_dispatch(buf, inputs, num_worst_tokens=T)
    _, validated = _cached(buf, fake, _x(False, 1), handle)
    assert validated[6] == comm and ht.replays == 0
    (recv, *_, event), direct = _cached(buf, fake, _x(False, 2), handle)
    assert direct[6] == caller.ptr and event.event is None and ht.replays == 1
    assert rt.direct_stream is caller and rt.joined_ptr == caller.ptr
    y = cupy.asarray(np.random.default_rng(3).integers(-4, 5, recv_x.shape).astype(BF16))
    (_, _, ev), c_validated = _combine(buf, fake, y, handle)
    assert c_validated[6] == comm and rt.direct_stream is None  # the comm stream waited for the direct launch
    (out, _, ev), c_direct = _combine(buf, fake, y, handle)
    assert c_direct[6] == caller.ptr and ev.event is None and out.shape == (T, H)
    (_, _, ev), launch = _combine(buf, fake, y, handle, async_finish=True)
    assert launch[6] == comm and ev.event is not None
    ev.current_stream_wait()
    (_, *_, ev), again = _cached(buf, fake, _x(False, 4), handle, previous_event=ev)
    assert again[6] == comm and ht.replays == 3  # the async combine was a call of its own (validated)
    buf.destroy()
