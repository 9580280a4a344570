"""The GPU backend's host paths on a CPU, over a fake CuPy (tests/fake_cupy.py): HT dispatch / cached dispatch /
combine and LL dispatch / combine build the launches they should (kernel, grid, the arguments the kernels
take, pointers of the arrays returned), checks fire before any launch, and the LL replay plans
(epkern.gpu.ll.plans) launch exactly what the full path launches. Kernels do not run: outputs are not checked
here (the GPU tests do that)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import fake_cupy as F
from epkern.errors import ArgumentError, EpkernError
from epkern.gpu.tuning import LLTuning, Tuning

BF16 = np.dtype(ml_dtypes.bfloat16)
T, H, K, E = 64, 1024, 4, 8


@pytest.fixture
def fake(monkeypatch):
    with F.installed(monkeypatch) as launches:
        yield launches


def _ptr(a):
    return a.data.ptr


def _ht_inputs():
    return F.ht_inputs(T, H, K, E)


def test_ht_dispatch_cached_and_combine_launch_what_they_return(fake):
    buf = F.fake_buffer()
    inputs = _ht_inputs()
    x = inputs[0]
    recv_x, recv_idx, recv_w, _, handle, _ = F.full_dispatch(buf, inputs, num_worst_tokens=T)
    names = [launch[1] for launch in F.real_launches(fake)]
    assert names == ["epk_ht_notify", "epk_ht_dispatch"]
    disp = F.real_launches(fake)[-1]
    assert disp[3] == (buf._backend.ht.grid(None),) and disp[4] == (buf._backend.ht.tuning.threads,)
    args = disp[5]
    assert F.addr(args[1]) == buf.rank and F.addr(args[3]) == T and F.addr(args[4]) == x.data.ptr
    assert F.addr(args[11]) == _ptr(recv_x) and F.addr(args[13]) == _ptr(recv_idx) and F.addr(args[14]) == _ptr(recv_w)
    assert recv_x.shape == (T, H) and recv_idx.shape == (T, K)

    before = len(fake)
    cached_x, *_ = buf.dispatch(x, handle=handle)
    cached = F.real_launches(fake[before:])
    assert [c[1] for c in cached] == ["epk_ht_dispatch"] and cached[0][2]["EPK_WITH_META"] == 0
    assert F.addr(cached[0][5][11]) == _ptr(cached_x) and F.addr(cached[0][5][2]) > F.addr(args[2])  # a new epoch

    before = len(fake)
    combined, combined_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w)
    comb = F.real_launches(fake[before:])
    assert [c[1] for c in comb] == ["epk_ht_combine"]
    assert comb[0][2]["EPK_LOADS_FIRST"] == buf._backend.ht.tuning.combine_loads_first
    assert combined.shape == (T, H) and combined_w.shape == (T, K)
    buf.destroy()


def test_ht_combine_buffer_is_read_in_place_and_a_fresh_array_is_staged(fake):
    """get_combine_buffer: an array in the Buffer's heap that the combine kernel reads where it is (its pointer is
    the kernel's input); an array from elsewhere is first copied into the heap (another pointer)."""
    import cupy

    buf = F.fake_buffer()
    rt = buf._backend.rt
    recv_x, _, recv_w, _, handle, _ = F.full_dispatch(buf, _ht_inputs(), num_worst_tokens=T)
    y = buf.get_combine_buffer(handle)
    assert y.shape == (handle.num_out_rows, H) and y.dtype == BF16
    assert rt.region.ptr <= y.data.ptr and y.data.ptr + y.nbytes <= rt.region.ptr + rt.region.nbytes
    before = len(fake)
    buf.combine(y, handle, topk_weights=recv_w)
    comb = F.real_launches(fake[before:])[-1]
    assert F.addr(comb[5][4]) == y.data.ptr  # in_x: read in place
    fresh = cupy.zeros((handle.num_out_rows, H), BF16)
    before = len(fake)
    buf.combine(fresh, handle, topk_weights=recv_w)
    assert F.addr(F.real_launches(fake[before:])[-1][5][4]) != fresh.data.ptr  # staged into the heap first
    other = F.fake_buffer()
    with pytest.raises(ArgumentError, match="handle"):
        other.get_combine_buffer(handle)
    other.destroy()
    del y
    buf.destroy()


@pytest.mark.parametrize("processes", [True, False])
def test_ht_expert_outputs_made_inside_allocating_in_buffer_are_read_in_place(fake, processes):
    """Between processes, CuPy allocations inside Buffer.allocating_in_buffer() come from the Buffer's heap (an
    expert output made there is the combine kernel's input as it is) and what the heap cannot hold from the
    allocator in force before; after the block, and with in-process ranks, allocations are as before."""
    import cupy

    buf = F.fake_buffer(processes=processes)
    rt = buf._backend.rt
    recv_x, _, recv_w, _, handle, _ = F.full_dispatch(buf, _ht_inputs(), num_worst_tokens=T)

    def in_region(a):
        return rt.region.ptr <= a.data.ptr and a.data.ptr + a.nbytes <= rt.region.ptr + rt.region.nbytes

    values = np.random.default_rng(1).integers(-4, 5, (handle.num_out_rows, H)).astype(BF16)
    held = rt.heap.in_use
    with buf.allocating_in_buffer():
        y = cupy.asarray(values)  # an expert's output, made inside the block
        too_big = cupy.zeros(rt.heap.nbytes + 256, np.uint8)
    assert in_region(y) == processes and not in_region(too_big)
    assert np.array_equal(cupy.asnumpy(y).view(np.uint16), values.view(np.uint16))
    assert not in_region(cupy.asarray(values))  # the block has ended
    before = len(fake)
    buf.combine(y, handle, topk_weights=recv_w)
    assert F.addr(F.real_launches(fake[before:])[-1][5][4]) == y.data.ptr  # in_x: read in place, not staged
    if processes:
        assert rt.heap.in_use > held
        del y
        assert rt.heap.in_use == held  # y's block went back to the heap with y
    buf.destroy()
    with pytest.raises(EpkernError):
        buf.allocating_in_buffer()


def test_ht_bad_input_raises_before_any_launch(fake):
    import cupy

    buf = F.fake_buffer()
    inputs = _ht_inputs()
    idx = inputs[1]
    _, _, recv_w, _, handle, _ = F.full_dispatch(buf, inputs, num_worst_tokens=T)
    before = len(fake)
    with pytest.raises(ArgumentError, match="x: expected 64 tokens"):
        buf.dispatch(cupy.asarray(np.zeros((T + 1, H), BF16)), handle=handle)
    with pytest.raises(ArgumentError, match="topk_weights"):
        buf.combine(cupy.asarray(np.zeros((handle.num_out_rows, H), BF16)), handle, topk_weights=idx)
    assert len(fake) == before
    buf.destroy()


def test_ht_dispatch_waits_for_the_counts_then_sizes_its_outputs(monkeypatch):
    """Non-cached dispatch: the host waits for ht_notify's counts in host-mapped memory (emulated here for one
    rank), sizes recv_x by them and rounds the per-expert counts up to expert_alignment."""
    with F.installed(monkeypatch, emulate={"epk_ht_notify": F.emulate_ht_notify_one_rank}) as launches:
        buf = F.fake_buffer()
        recv_x, recv_idx, recv_w, counts, handle, _ = F.full_dispatch(buf, _ht_inputs(), expert_alignment=24)
        assert recv_x.shape == (T, H) and handle.num_recv_tokens == T and handle.num_out_rows == T
        assert counts == [48] * E  # 32 selections per expert, rounded up to a multiple of 24
        assert [launch[1] for launch in F.real_launches(launches)] == ["epk_ht_notify", "epk_ht_dispatch"]
        buf.destroy()


def test_ht_dispatch_raises_when_the_counts_never_come(fake):
    """No kernel writes the counts: the host wait ends at the Buffer's deadline (+5 s) with an error naming
    the rank, the phase and that the call's kernel never started; the Buffer is then unusable."""
    import time

    from epkern.errors import EpkernError, TimeoutError

    buf = F.fake_buffer(timeout_s=0.2)
    inputs = _ht_inputs()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"rank 0: dispatch notify: no answer .* never started"):
        F.full_dispatch(buf, inputs)
    assert time.monotonic() - t0 < 10
    with pytest.raises(EpkernError, match="unusable"):
        F.full_dispatch(buf, inputs, topk_weights=None)
    buf.destroy()


def test_ht_outputs_return_to_the_heap_when_dropped(fake):
    """A dispatch's outputs live in the shared heap; dropping them returns their block at once (by reference
    count: no cycle may hold it until the cyclic garbage collector runs)."""
    import gc

    buf = F.fake_buffer()
    inputs = _ht_inputs()
    x = inputs[0]
    gc.disable()
    try:
        out = F.full_dispatch(buf, inputs, num_worst_tokens=T)
        handle = out[4]
        held = buf._backend.rt.heap.in_use
        cached = buf.dispatch(x, handle=handle)
        assert buf._backend.rt.heap.in_use > held
        del cached
        assert buf._backend.rt.heap.in_use == held
        del out, handle
        assert buf._backend.rt.heap.in_use == 0
    finally:
        gc.enable()
    buf.destroy()


NUM_MAX = 64


def _ll_setup(use_fp8=False):
    import cupy

    rng = np.random.default_rng(1)
    e_loc, rows = E, NUM_MAX
    x = cupy.asarray(rng.integers(-4, 5, (T, H)).astype(BF16))
    idx = cupy.asarray(np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int64))
    w = cupy.asarray(np.ones((T, K), np.float32))
    outs = dict(
        out_x=cupy.empty((e_loc, rows, H), np.uint8 if use_fp8 else BF16),
        out_src_info=cupy.empty((e_loc, rows), np.int32),
        out_layout_range=cupy.empty((e_loc, 1), np.int64),
        out_count=cupy.empty((e_loc,), np.int32),
    )
    if use_fp8:
        outs["out_scales"] = cupy.empty((e_loc, H // 128, rows), np.float32).transpose(0, 2, 1)
    y = cupy.empty((e_loc, rows, H), BF16)
    out = cupy.empty((T, H), BF16)
    return x, idx, w, outs, y, out


def _ll_buffer(_tuning=None):
    from epkern.gpu.ll.layout import min_num_rdma_bytes

    return F.fake_buffer(
        num_nvl_bytes=0, num_rdma_bytes=min_num_rdma_bytes(NUM_MAX, H, E), low_latency_mode=True, _tuning=_tuning
    )


def _ll_pairs(buf, launches, n, use_fp8=False, hook=False, zero_copy=False, arrays=None):
    """n dispatch + combine pairs, on the same arrays, or pair i on ``arrays[i]`` (each an _ll_setup); the launches
    of each call (dry runs left out)."""
    same = _ll_setup(use_fp8)
    per_call = []
    for i in range(n):
        x, idx, w, outs, y, out = same if arrays is None else arrays[i]
        before = len(launches)
        recv, count, handle, _, dhook = buf.low_latency_dispatch(
            x, idx, NUM_MAX, E, use_fp8=use_fp8, return_recv_hook=hook, **outs
        )
        if hook:
            dhook()
        per_call.append(F.real_launches(launches[before:]))
        assert handle.src_info is outs["out_src_info"] and count is outs["out_count"]
        assert (recv[0] if use_fp8 else recv) is outs["out_x"]
        if zero_copy:
            y = buf.get_next_low_latency_combine_buffer(handle)
        before = len(launches)
        combined, _, chook = buf.low_latency_combine(
            y, idx, w, handle, out=out, return_recv_hook=hook, zero_copy=zero_copy
        )
        if hook:
            chook()
        per_call.append(F.real_launches(launches[before:]))
        assert combined is out
    return per_call


def _arg_names(kernel: str) -> list:
    from epkern.gpu.kernels import LL_COMBINE, LL_DISPATCH

    return [n for n, _ in {"epk_ll_dispatch": LL_DISPATCH, "epk_ll_combine": LL_COMBINE}[kernel].args]


def _same(a, b, skip=()):
    """Two launch records equal: kernel, defines, grid, block, and every argument (arrays by address: a rebound
    call's launch carries addresses); ``skip``: argument names left out (another Buffer's own memory)."""
    assert a[:5] == b[:5]
    assert len(a[5]) == len(b[5])
    names = _arg_names(a[1])
    for n, u, v in zip(names, a[5], b[5], strict=True):
        assert n in skip or F.addr(u) == F.addr(v), (n, u, v)


@pytest.mark.parametrize("use_fp8,hook", [(False, False), (True, False), (False, True)])
def test_ll_replay_launches_what_the_full_path_launches(fake, monkeypatch, use_fp8, hook):
    """The first pair takes the full path and the next ones replay it: every
    replayed launch equals the full path's launch of the same call, argument for argument."""
    buf = _ll_buffer()
    calls = _ll_pairs(buf, fake, 4, use_fp8, hook)
    assert buf._backend.ll.replays == 2 * 3  # every call after the first pair
    first_dispatch, first_combine = calls[0], calls[1]
    for i, launches in enumerate(calls):
        want = first_dispatch if i % 2 == 0 else first_combine
        assert len(launches) == len(want) == (2 if hook else 1)  # send (and the hook's receive)
        for a, b in zip(launches, want, strict=True):
            _same(a, b)
    if hook:  # the hook's receive counts back to its own call
        assert [F.addr(launch[5][2]) for launch in first_dispatch] == [1, 2] and int(first_dispatch[1][5][3]) == 0
    slow = _ll_buffer(_tuning=Tuning(ll=LLTuning(replay=False)))
    _ll_pairs(slow, fake, 2, use_fp8, hook)
    assert slow._backend.ll.replays == 0 and len(slow._backend.ll.plans) == 0


@pytest.mark.parametrize("use_fp8,hook,zero_copy", [(False, False, False), (True, False, False), (False, True, False),
                                                    (False, False, True)])  # fmt: skip
def test_ll_calls_on_new_arrays_rebind_the_validated_launch(fake, monkeypatch, use_fp8, hook, zero_copy):
    """DeepEP's calls pass new arrays every time (rebind.py): after the first pair, each call launches exactly what
    a Buffer that validates every call launches for the same arrays (call for call, so in the same buffer set),
    argument for argument besides each Buffer's own memory, and no plan keeps a call's arrays alive."""
    import gc
    import weakref

    pairs = [_ll_setup(use_fp8) for _ in range(4)]
    buf = _ll_buffer()
    calls = _ll_pairs(buf, fake, 4, use_fp8, hook, zero_copy, arrays=pairs)
    eng = buf._backend.ll
    assert eng.replays == eng.rebound == 2 * 3 and len(eng.plans) == 0
    slow = _ll_buffer(_tuning=Tuning(ll=LLTuning(replay=False)))
    want = _ll_pairs(slow, fake, 4, use_fp8, hook, zero_copy, arrays=pairs)  # the same arrays, each call validated
    own = {"peers", "state", "err"} | ({"x"} if zero_copy else set())  # each Buffer's (zero-copy x: its set buffer)
    for i, (got, exp) in enumerate(zip(calls, want, strict=True)):
        assert len(got) == len(exp) == (2 if hook else 1), i
        for a, b in zip(got, exp, strict=True):
            _same(a, b, skip=own if a[1] == "epk_ll_combine" else {"peers", "state", "err"})
    probe = weakref.ref(pairs[0][3]["out_x"])
    del pairs, calls, want
    fake.clear()  # the fake's record of the launches holds the validated calls' arrays
    gc.collect()
    assert probe() is None, "a plan keeps a call's output alive"
    buf.destroy()
    slow.destroy()


def test_ll_rebound_calls_carry_their_own_stats_arrays(fake):
    """The optional statistics outputs (cumulative_local_expert_recv_stats, dispatch / combine wait costs) are the
    call's arrays too: a rebound call launches with its own, and one given where the plan's call had none (or the
    other way round) is another layout: validated."""
    import cupy

    buf = _ll_buffer()
    x, idx, w, outs, y, out = _ll_setup()
    names = _arg_names("epk_ll_dispatch")
    for i in range(3):
        recv_stats, wait_stats = cupy.zeros((E,), np.int32), cupy.zeros((1,), np.int64)
        before = len(fake)
        _, _, handle, _, _ = buf.low_latency_dispatch(
            x, idx, NUM_MAX, E, use_fp8=False, cumulative_local_expert_recv_stats=recv_stats,
            dispatch_wait_recv_cost_stats=wait_stats, **outs,
        )  # fmt: skip
        (launch,) = F.real_launches(fake[before:])
        assert F.addr(launch[5][names.index("recv_stats")]) == recv_stats.data.ptr, i
        assert F.addr(launch[5][names.index("wait_stats")]) == wait_stats.data.ptr, i
        combine_stats = cupy.zeros((1,), np.int64)
        before = len(fake)
        buf.low_latency_combine(y, idx, w, handle, out=out, combine_wait_recv_cost_stats=combine_stats)
        (launch,) = F.real_launches(fake[before:])
        assert F.addr(launch[5][_arg_names("epk_ll_combine").index("wait_stats")]) == combine_stats.data.ptr, i
    rebound = buf._backend.ll.rebound
    assert rebound == 2 * 2
    buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, **outs)  # no statistics: another layout
    assert buf._backend.ll.rebound == rebound
    buf.destroy()


def test_ll_random_call_sequences_launch_what_validated_calls_launch(fake):
    """Random sequences of LL calls — the same arrays again, another batch's, new ones, outputs left to the library;
    BF16 or FP8; hooks or not; zero-copy combines or not — on a Buffer that replays (identity, rebound, prepared
    plans as they come) and on one that validates every call: every launch the same, argument for argument
    (besides each Buffer's own memory, and outputs each Buffer makes itself)."""
    import random

    rng = random.Random()
    fast = _ll_buffer()
    slow = _ll_buffer(_tuning=Tuning(ll=LLTuning(replay=False)))
    batches = {fp8: [_ll_setup(fp8), _ll_setup(fp8)] for fp8 in (False, True)}
    own = {"peers", "state", "err"}
    made = {"out_x", "out_scales", "out_src", "out_layout", "out_count"}
    for step in range(40):
        fp8, hook, zero_copy = rng.random() < 0.4, rng.random() < 0.3, rng.random() < 0.3
        kind = rng.choice(("same", "other", "new", "library"))
        arrays = {"same": batches[fp8][0], "other": batches[fp8][1]}.get(kind) or _ll_setup(fp8)
        x, idx, w, outs, y, out = arrays
        outs = {} if kind == "library" else outs
        got = {}
        for name, buf in (("fast", fast), ("slow", slow)):
            before = len(fake)
            recv, count, handle, _, dhook = buf.low_latency_dispatch(
                x, idx, NUM_MAX, E, use_fp8=fp8, return_recv_hook=hook, **outs
            )
            if hook:
                dhook()
            src = buf.get_next_low_latency_combine_buffer(handle) if zero_copy else y
            _, _, chook = buf.low_latency_combine(
                src, idx, w, handle, out=None if kind == "library" else out, return_recv_hook=hook,
                zero_copy=zero_copy,
            )  # fmt: skip
            if hook:
                chook()
            got[name] = F.real_launches(fake[before:])
        assert len(got["fast"]) == len(got["slow"]), step
        for a, b in zip(got["fast"], got["slow"], strict=True):
            skip = own | (made if kind == "library" else set())
            if a[1] == "epk_ll_combine":  # its src_info / layout are the dispatch's outputs; zero-copy x the set's
                skip = own | ({"x"} if zero_copy else set()) | ({"out", "src_info", "layout"} if kind == "library"
                                                                 else set())  # fmt: skip
            _same(a, b, skip=skip)
    assert fast._backend.ll.replays > 0 and slow._backend.ll.replays == 0
    fast.destroy()
    slow.destroy()


def test_ll_rebound_hooks_of_interleaved_calls_receive_their_own_calls(fake):
    """Two-batch overlap, DeepEP's way (new arrays each call, receive hooks called later, interleaved): dispatch A,
    dispatch B, hook A, hook B, and the same with combines. Rebound calls share one plan, so each hook must launch
    with its own call's addresses and count back to its own call: every launch equals a validating Buffer's."""
    fast = _ll_buffer()
    slow = _ll_buffer(_tuning=Tuning(ll=LLTuning(replay=False)))
    own = {"peers", "state", "err"}

    def rounds(buf, arrays):
        launches = []
        for a, b in zip(arrays[::2], arrays[1::2], strict=True):
            before = len(fake)
            hooks, handles = [], []
            for x, idx, _, outs, _, _ in (a, b):
                _, _, handle, _, hook = buf.low_latency_dispatch(
                    x, idx, NUM_MAX, E, use_fp8=False, return_recv_hook=True, **outs
                )
                hooks.append(hook)
                handles.append(handle)
            for hook in hooks:
                hook()
            hooks = []
            for (_, idx, w, _, y, out), handle in zip((a, b), handles, strict=True):
                hooks.append(buf.low_latency_combine(y, idx, w, handle, out=out, return_recv_hook=True)[2])
            for hook in hooks:
                hook()
            launches += F.real_launches(fake[before:])
        return launches

    arrays = [_ll_setup() for _ in range(6)]
    got, want = rounds(fast, arrays), rounds(slow, arrays)
    assert fast._backend.ll.rebound == 3 * 4 - 2  # all but the first dispatch and the first combine
    assert len(got) == len(want) == 3 * 8
    for a, b in zip(got, want, strict=True):
        _same(a, b, skip=own)
    fast.destroy()
    slow.destroy()


@pytest.mark.parametrize("use_fp8", [False, True])
def test_ll_calls_without_outputs_are_rebound_with_new_outputs(fake, use_fp8):
    """DeepEP's calls through the native API leave the outputs to the library: after the first, each dispatch and
    combine is rebound with outputs made anew (as the validated call makes them: same shapes, dtypes and strides)
    and launches what a validating Buffer launches, argument for argument besides each Buffer's own memory and the
    new outputs, whose addresses the launch carries."""
    buf = _ll_buffer()
    slow = _ll_buffer(_tuning=Tuning(ll=LLTuning(replay=False)))
    x, idx, w, _, y, _ = _ll_setup(use_fp8)
    own = {"peers", "state", "err"}
    outs_d = ("out_x", "out_scales", "out_src", "out_layout", "out_count")

    def dispatch(b):
        before = len(fake)
        recv, count, handle, _, _ = b.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=use_fp8)
        (launch,) = F.real_launches(fake[before:])
        data, scales = recv if use_fp8 else (recv, None)
        return launch, (data, scales, handle.src_info, handle.layout_range, count), handle

    for i in range(3):
        launch, arrays, handle = dispatch(buf)
        want, want_arrays, slow_handle = dispatch(slow)
        _same(launch, want, skip=own | set(outs_d))
        names = _arg_names(launch[1])
        for name, a, b in zip(outs_d, arrays, want_arrays, strict=True):
            if b is None:
                assert a is None
                continue
            assert (a.shape, a.dtype, a.strides) == (b.shape, b.dtype, b.strides), (i, name)
            assert F.addr(launch[5][names.index(name)]) == a.data.ptr, (i, name)
        before = len(fake)
        out = buf.low_latency_combine(y, idx, w, handle)[0]
        (launch,) = F.real_launches(fake[before:])
        before = len(fake)
        slow_out = slow.low_latency_combine(y, idx, w, slow_handle)[0]
        (want,) = F.real_launches(fake[before:])
        _same(launch, want, skip=own | {"out", "src_info", "layout"})
        assert (out.shape, out.dtype, out.strides) == (slow_out.shape, slow_out.dtype, slow_out.strides)
        assert F.addr(launch[5][_arg_names(launch[1]).index("out")]) == out.data.ptr
    assert buf._backend.ll.rebound == 2 * 2 and slow._backend.ll.replays == 0
    buf.destroy()
    slow.destroy()


def test_ll_replay_needs_the_same_arrays_and_shapes(fake, monkeypatch):
    import cupy

    buf = _ll_buffer()
    x, idx, w, outs, y, out = _ll_setup()
    buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, **outs)
    buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, **outs)
    assert buf._backend.ll.replays == 1
    assert buf._backend.ll.rebound == 1  # the first repeat: the rebinding plan (then an identity plan: seen again)
    buf.low_latency_dispatch(cupy.asarray(x.get()), idx, NUM_MAX, E, use_fp8=False, **outs)  # another x
    assert buf._backend.ll.replays == 2 and buf._backend.ll.rebound == 2  # of the same layout: rebound (rebind.py)
    first = buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False)  # outputs left to the library: validated,
    again = buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False)  # then rebound, with new outputs each call
    assert buf._backend.ll.replays == 3 and buf._backend.ll.rebound == 3
    assert first[0] is not again[0] and first[0].data.ptr != again[0].data.ptr
    assert first[0].shape == again[0].shape and first[2].src_info.data.ptr != again[2].src_info.data.ptr
    idx._a = idx._a[: T // 2]  # the same object, now with another shape (as an in-place reshape would)
    with pytest.raises(ArgumentError, match="topk_idx: expected 64 rows"):
        buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, **outs)
    assert buf._backend.ll.replays == 3
    buf.clean_low_latency_buffer(NUM_MAX, H, E)
    assert len(buf._backend.ll.plans) == len(buf._backend.ll.rebinds) == 0
    buf.destroy()
    assert len(buf._backend.ll.plans) == 0


def test_ll_silent_peer_raises_once_masks_it_and_the_buffer_goes_on(fake):
    """A kernel that recorded an LL wait timeout (phase 7): the next call raises TimeoutError naming rank,
    phase and peer, masks the peer, clears the record; the call after that launches normally."""
    from epkern.errors import TimeoutError

    buf = _ll_buffer()
    x, idx, w, outs, y, out = _ll_setup()
    buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, **outs)
    F.record_kernel_error(buf, code=1, phase=7, peer=0, seen=3, expected=5)
    before = len(fake)
    with pytest.raises(TimeoutError, match=r"rank 0: low-latency dispatch .*peer 0 did not answer.*now masked"):
        buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, **outs)
    assert len(fake) == before  # raised before launching
    assert list(buf.low_latency_query_mask_buffer().get()) == [1]
    buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, **outs)
    assert len(F.real_launches(fake[before:])) == 1
    buf.low_latency_clean_mask_buffer()
    assert list(buf.low_latency_query_mask_buffer().get()) == [0]
    buf.destroy()


def test_ll_silent_peer_raises_once_even_while_the_kernel_still_runs(fake):
    """The record of a silent peer is cleared only after the recording kernel has ended. The device modelled: a
    kernel whose later wait on the same peer runs its own deadline and records again if the first record was
    cleared meanwhile (with it still claimed, that wait gives up). Cleared early, the next call raised a second time
    (kill_ll_dispatch on the H100)."""
    import threading
    import time

    from epkern.errors import TimeoutError

    buf = _ll_buffer()
    x, idx, w, outs, y, out = _ll_setup()
    rt = buf._backend.rt
    rt.comm_stream.hung = True  # the kernel that recorded the failure is still running
    F.record_kernel_error(buf, code=1, phase=7, peer=0, seen=3, expected=5)

    def kernel_goes_on():
        time.sleep(0.3)
        if rt.error_record[0] == 0:  # its next wait saw no claim: a full deadline, then a second record
            F.record_kernel_error(buf, code=1, phase=7, peer=0, seen=3, expected=5)
        rt.comm_stream.hung = False

    device = threading.Thread(target=kernel_goes_on)
    t0 = time.monotonic()  # before the thread starts its 0.3 s (after it, the wait measured may be shorter)
    device.start()
    with pytest.raises(TimeoutError, match=r"peer 0 did not answer.*now masked"):
        buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, **outs)
    device.join()
    assert time.monotonic() - t0 >= 0.3  # it waited for the kernel to end
    assert list(buf.low_latency_query_mask_buffer().get()) == [1]  # raised once: this call does not raise again
    buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, **outs)
    buf.destroy()


def test_ll_bad_index_report_is_an_argument_error_and_ht_errors_break_the_buffer(fake):
    from epkern.errors import EpkernError, TimeoutError

    buf = _ll_buffer()
    x, idx, w, outs, y, out = _ll_setup()
    F.record_kernel_error(buf, code=2, phase=10, peer=-1, seen=99, expected=E)
    with pytest.raises(ArgumentError, match=r"topk_idx: rank 0: entry 99 outside \[-1, 8\)"):
        buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, **outs)
    buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, **outs)  # usable
    F.record_kernel_error(buf, code=1, phase=3, peer=0, seen=4, expected=5)  # an HT wait: not recoverable
    with pytest.raises(TimeoutError, match="rank 0: dispatch .waiting for a peer to finish sending.: peer 0"):
        buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, **outs)
    before = len(fake)
    with pytest.raises(EpkernError, match="peer 0 did not answer"):  # unusable: every call says why
        buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, **outs)
    assert len(fake) == before and buf._backend.rt.broken
    buf.destroy()


def test_ht_fp8_dispatch_and_combine_with_biases(fake):
    import cupy

    buf = F.fake_buffer()
    x8 = cupy.asarray(np.zeros((T, H), np.uint8))
    scales = cupy.asarray(np.ones((T, H // 128), np.float32))
    (recv8, recv_scales), _, recv_w, _, handle, _ = F.full_dispatch(
        buf, _ht_inputs(), x=(x8, scales), num_worst_tokens=T
    )
    disp = F.real_launches(fake)[-1]
    assert disp[2]["EPK_ROW_BYTES"] == H and disp[2]["EPK_SCALE_COLS"] == H // 128
    assert F.addr(disp[5][5]) == scales.data.ptr and F.addr(disp[5][12]) == recv_scales.data.ptr
    assert recv8.shape == (T, H) and recv_scales.shape == (T, H // 128)
    y = cupy.asarray(np.zeros((T, H), BF16))  # outside the shared region: combine stages it first
    b0, b1 = cupy.asarray(np.zeros((T, H), BF16)), cupy.asarray(np.zeros((T, H), BF16))
    before = len(fake)
    buf.combine(y, handle, topk_weights=recv_w, bias=(b0, b1))
    comb = F.real_launches(fake[before:])[-1]
    assert comb[1] == "epk_ht_combine" and F.addr(comb[5][7]) == b0.data.ptr and F.addr(comb[5][8]) == b1.data.ptr
    staged = F.addr(comb[5][4])  # y is outside the shared region: the kernel reads a staged copy inside it
    assert (
        staged != y.data.ptr
        and buf._backend.rt.region.ptr <= staged < buf._backend.rt.region.ptr + buf._backend.rt.region.nbytes
    )
    with pytest.raises(ArgumentError, match=r"bias\[1\]"):
        buf.combine(y, handle, topk_weights=recv_w, bias=(b0, cupy.asarray(np.zeros((T, H + 8), BF16))))
    buf.destroy()


def test_ll_replays_go_onto_the_callers_stream_only_while_it_follows_all_buffer_work(fake, monkeypatch):
    """A replayed call with async_finish=False launches straight onto the caller's stream when that stream is
    ordered after everything the Buffer launched; any comm-stream work in between (a mask update, another
    stream current) sends the next call back through the comm stream, which first waits for the direct launch."""
    import cupy

    buf = _ll_buffer()
    x, idx, w, outs, y, out = _ll_setup()
    caller, comm = cupy.cuda.get_current_stream(), buf._backend.rt.comm_stream

    def dispatch_stream():
        before = len(fake)
        buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, **outs)
        (launch,) = F.real_launches(fake[before:])
        return launch[6]

    assert dispatch_stream() == comm.ptr  # validated: the full path
    assert dispatch_stream() == caller.ptr == buf._backend.rt.direct_stream.ptr  # replayed onto the caller's stream
    assert dispatch_stream() == caller.ptr
    waits = comm.waits
    buf.low_latency_update_mask_buffer(0, mask=False)  # comm-stream work: joins the direct launches first
    assert comm.waits == waits + 1 and buf._backend.rt.direct_stream is None and buf._backend.rt.joined_ptr is None
    assert dispatch_stream() == comm.ptr  # the caller's stream does not follow the mask update yet
    assert dispatch_stream() == caller.ptr  # ... and does after that call's wait
    other = cupy.cuda.Stream(non_blocking=True)
    other.use()
    assert dispatch_stream() == comm.ptr  # another stream: the comm stream waits for it and the last launch
    assert dispatch_stream() == other.ptr
    caller.use()
    buf.destroy()


@pytest.mark.parametrize("hook", [False, True])
def test_prepared_ll_calls_replay_what_the_validated_calls_launch(fake, monkeypatch, hook):
    """prepare_low_latency_dispatch / _combine: the first call is the validated call, later ones replay its
    launch (argument for argument); a reshaped input or a cleaned buffer sends the next call the validated way."""
    buf = _ll_buffer()
    x, idx, w, outs, y, out = _ll_setup()
    dispatch = buf.prepare_low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, return_recv_hook=hook, **outs)
    handle = None
    per_call = []
    for _ in range(4):
        before = len(fake)
        recv, count, h, _, dhook = dispatch()
        if hook:
            dhook()
        assert recv is outs["out_x"] and count is outs["out_count"] and h.src_info is outs["out_src_info"]
        if handle is None:
            handle = h
            combine = buf.prepare_low_latency_combine(y, idx, w, handle, out=out, return_recv_hook=hook)
        got, _, chook = combine()
        if hook:
            chook()
        assert got is out
        per_call.append(F.real_launches(fake[before:]))
    assert buf._backend.ll.replays == 2 * 3
    for launches in per_call[1:]:
        assert len(launches) == len(per_call[0]) == (4 if hook else 2)
        for a, b in zip(launches, per_call[0], strict=True):
            _same(a, b)
    replays = buf._backend.ll.replays
    buf.clean_low_latency_buffer(NUM_MAX, H, E)  # plans dropped: the next calls are validated (and re-planned)
    for _ in range(2):
        hook_of_call = dispatch()[4]
        if hook:
            hook_of_call()
    assert buf._backend.ll.replays == replays + 1
    idx._a = idx._a[: T // 2]  # reshaped in place: validated again, and refused
    with pytest.raises(ArgumentError, match="topk_idx: expected 64 rows"):
        dispatch()
    buf.destroy()


def test_a_call_prepared_after_it_was_made_replays_its_own_plan(fake, monkeypatch):
    """The same call made directly before it was prepared: the prepared call's first run finds the engine's plan
    (a replay, which makes no new plan) and keeps it, so later runs replay without going through the Buffer."""
    from epkern.gpu.ll import prepared as P

    buf = _ll_buffer()
    x, idx, w, outs, y, out = _ll_setup()
    handle = buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, **outs)[2]
    buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, **outs)  # a replay already
    buf.low_latency_combine(y, idx, w, handle, out=out)
    buf.low_latency_combine(y, idx, w, handle, out=out)
    through_buffer = []
    validated = P.Prepared._validated
    monkeypatch.setattr(P.Prepared, "_validated", lambda self, slot: through_buffer.append(1) or validated(self, slot))
    dispatch = buf.prepare_low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, **outs)
    combine = buf.prepare_low_latency_combine(y, idx, w, handle, out=out)
    replays = buf._backend.ll.replays
    for _ in range(3):
        assert dispatch()[0] is outs["out_x"] and combine()[0] is out
    assert len(through_buffer) == 2  # the first run of each only
    assert buf._backend.ll.replays == replays + 6
    buf.destroy()


def test_prepared_ll_calls_on_the_cpu_backend_are_the_calls():
    import epkern

    buf = epkern.Buffer(None, num_rdma_bytes=1 << 20, low_latency_mode=True, backend="cpu")
    call = buf.prepare_low_latency_dispatch(1, 2, k=3)
    assert call.func == buf.low_latency_dispatch and call.args == (1, 2) and call.keywords == {"k": 3}
    buf.destroy()


def test_ll_double_batch_alternation_keeps_replaying(fake, monkeypatch):
    """Two sets of arrays used in turn (a double-batch loop): the second batch's first pair is rebound to the first's
    validated launch (same layouts), each batch's second pair makes its identity plans (its arrays seen again) and
    the third replays them: four plans, every call after the first pair replayed."""
    buf = _ll_buffer()
    batches = [_ll_setup(), _ll_setup()]
    for _ in range(3):
        for x, idx, w, outs, y, out in batches:
            handle = buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, **outs)[2]
            buf.low_latency_combine(y, idx, w, handle, out=out)
    eng = buf._backend.ll
    assert len(eng.plans) == 4 and eng.replays == 12 - 2 and eng.rebound == 6
    buf.destroy()


def test_ll_zero_copy_combine_replays_per_set(fake, monkeypatch):
    """A zero-copy combine reads the buffer of the set it runs in: one plan per set, each replay launched with
    its own set's buffer (the one get_next_low_latency_combine_buffer returned just before). An extra dispatch
    now and then moves the combine to the other set."""
    buf = _ll_buffer()
    x, idx, w, outs, y, out = _ll_setup()
    seen = []
    for i in range(6):
        for _ in range(1 + i % 2):
            handle = buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, **outs)[2]
        zbuf = buf.get_next_low_latency_combine_buffer(handle)
        assert zbuf is buf.get_next_low_latency_combine_buffer(handle)  # one array per set: stable ids
        parity = (buf._backend.ll.sends + 1) & 1
        before = len(fake)
        assert buf.low_latency_combine(zbuf, idx, w, handle, out=out, zero_copy=True)[0] is out
        (launch,) = F.real_launches(fake[before:])
        assert F.addr(launch[5][4]) == zbuf.data.ptr, f"combine {i} read another buffer than get_next gave"
        seen.append((parity, zbuf.data.ptr))
    assert [p for p, _ in seen] == [0, 1, 1, 0, 0, 1]
    assert len({ptr for _, ptr in seen}) == 2 and len({(p, ptr) for p, ptr in seen}) == 2
    assert len(buf._backend.ll.plans) == 3  # the dispatch, and the combine once per set
    assert buf._backend.ll.replays == 8 + 4  # 9 dispatches, 6 combines: all but the first of each (per set)
    buf.destroy()


def test_prepared_zero_copy_combine_keeps_a_plan_per_set(fake, monkeypatch):
    buf = _ll_buffer()
    x, idx, w, outs, y, out = _ll_setup()
    handle = buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, **outs)[2]
    combine = buf.prepare_low_latency_combine(y, idx, w, handle, out=out, zero_copy=True)
    for i in range(6):
        if i:
            for _ in range(1 + i % 2):
                buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, **outs)
        want = buf.get_next_low_latency_combine_buffer(handle).data.ptr
        before = len(fake)
        assert combine()[0] is out
        (launch,) = F.real_launches(fake[before:])
        assert F.addr(launch[5][4]) == want, f"prepared combine {i} read another set's buffer"
    assert buf._backend.ll.replays == 8 + 4  # dispatches after the first, combines after the first of each set
    buf.destroy()


def test_a_kernel_that_never_ends_raises_instead_of_hanging(fake, monkeypatch):
    """Host waits on GPU work are bounded: work still running HOST_MARGIN_S after the device-side deadline is a
    kernel that never ends (a bug); the wait raises TimeoutError naming rank and phase and the Buffer is unusable."""
    import time

    import cupy

    from epkern.errors import EpkernError
    from epkern.errors import TimeoutError as EpTimeout
    from epkern.gpu import runtime

    monkeypatch.setattr(runtime, "HOST_MARGIN_S", 0.05)
    buf = F.fake_buffer(timeout_s=0.05)
    stream = cupy.cuda.Stream()
    buf._backend.rt.sync_bounded(stream, "a phase")  # done: returns at once
    stream.hung = True
    t0 = time.monotonic()
    with pytest.raises(EpTimeout, match=r"rank 0: a phase: the GPU work of this call did not finish within 0\.1 s"):
        buf._backend.rt.sync_bounded(stream, "a phase")
    assert time.monotonic() - t0 < 5
    with pytest.raises(EpkernError, match="unusable"):
        buf._backend.rt.check_usable()
    # destroy() waits for the comm stream with the same bound: a hung one leaves the memory allocated and raises.
    buf._backend.rt.comm_stream.hung = True
    t0 = time.monotonic()
    with pytest.raises(EpTimeout, match=r"rank 0: destroy: .* its memory is left allocated"):
        buf.destroy()
    assert time.monotonic() - t0 < 5 and buf._backend.rt.region.ptr != 0


def test_ll_zero_copy_recv_returns_the_sets_views_and_replays_per_set(fake, monkeypatch):
    """zero_copy_recv: the outputs are views into the receive region of the set each call runs in (what the
    direct kernel is launched with), one plan per set; out_* with it, and a combine whose x lies where that
    combine receives, are refused before any launch."""
    from epkern.errors import ArgumentError
    from epkern.gpu.ll.layout import direct_recv_layout

    buf = _ll_buffer()
    x, idx, w, outs, y, out = _ll_setup()
    before = len(fake)
    with pytest.raises(ArgumentError, match="out_count: not with zero_copy_recv"):
        buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, out_count=outs["out_count"], zero_copy_recv=True)
    assert not F.real_launches(fake[before:])
    st = buf._backend.ll.size_state(NUM_MAX, H, E)
    lay, stride = st.layout, st.stride
    d = direct_recv_layout(lay, 1)
    got = []
    for _ in range(5):
        parity = (buf._backend.ll.sends + 1) & 1
        base = buf._backend.rt.region.ptr + buf._backend.rt.ll_offset + parity * stride + lay.recv_off
        before = len(fake)
        recv, count, handle, _, _ = buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, zero_copy_recv=True)
        (launch,) = F.real_launches(fake[before:])
        assert dict(launch[2])["EPK_LL_DIRECT"] == 1
        assert recv.data.ptr == base + d.x_off and F.addr(launch[5][15]) == recv.data.ptr
        assert handle.src_info.data.ptr == base + d.src_off and handle.layout_range.data.ptr == base + d.layout_off
        assert count.data.ptr == base + d.count_off and recv.shape == (E, NUM_MAX, H)
        got.append((parity, recv))
    assert [p for p, _ in got] == [1, 0, 1, 0, 1]  # call seq 1, 2, ...: set = seq & 1
    assert got[0][1] is got[2][1] and got[1][1] is got[3][1]  # one set of views per set
    # an identity plan per set once its arrays are seen again (calls 3 and 4, validated), replayed from call 5
    assert buf._backend.ll.replays == 1 and len(buf._backend.ll.plans) == 2
    # The next call (seq 6) is a combine in set 0: got[3]'s output lies where it receives; got[4]'s (set 1) not.
    with pytest.raises(ArgumentError, match="x: lies in this Buffer's receive area"):
        buf.low_latency_combine(got[3][1], idx, w, handle, out=out)
    rebinds = len(buf._backend.ll.rebinds)
    assert buf.low_latency_combine(got[4][1], idx, w, handle, out=out)[0] is out
    assert len(buf._backend.ll.rebinds) == rebinds  # x lies in the other set's receive area: no plan replays it
    buf.low_latency_combine(y, idx, w, handle, out=out)  # a rebinding plan of these layouts (x outside the area)
    buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, zero_copy_recv=True)  # back to set 0 next
    for _ in range(3):  # each time: refused in set 1, a dispatch (set 1), accepted in set 0: every call checked
        with pytest.raises(ArgumentError, match="x: lies in this Buffer's receive area"):
            buf.low_latency_combine(got[4][1], idx, w, handle, out=out)
        buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, zero_copy_recv=True)
        assert buf.low_latency_combine(got[4][1], idx, w, handle, out=out)[0] is out
    buf.destroy()


def test_a_record_claimed_but_not_yet_written_is_read_again_later(fake):
    """A kernel claims the error record, then writes its fields and the code last: a host check that sees the claim
    with code 0 raises nothing yet (on the H100 one raised "error code 0 (peer 0, value 0, limit 0)"); once the
    code is there it raises the real failure."""
    import epkern
    from epkern.errors import EpkernError

    buf = epkern.Buffer(None, num_nvl_bytes=1 << 20, backend="gpu")
    rec = buf._backend.rt.error_record
    rec[0] = 1  # claimed; the fields not written yet
    buf.check()
    rec[2:7] = [0, 0x7777, 1, 5, 9]  # rank, phase, peer, seen, expected
    rec[1] = 2  # the code, last (EPK_ERR_CODE_BAD_INDEX)
    with pytest.raises(EpkernError, match=r"rank 0: phase 30583: error code 2 \(peer 1, value 5, limit 9\)"):
        buf.check()


def test_ht_layout_does_not_wait_for_the_device(fake, monkeypatch):
    """Buffer.get_dispatch_layout launches the layout kernel without the index check's host wait, which had made
    every layout call synchronous (and put the host's later work into the GPU's time; session R). The standalone
    epkern.dispatch_layout.get_dispatch_layout keeps its check."""
    from epkern import _cuda, dispatch_layout, memory

    monkeypatch.setattr(dispatch_layout, "_sm_count", lambda device: 132)
    monkeypatch.setattr(memory, "HostMapped", F.FakeHostMapped)
    monkeypatch.setattr(dispatch_layout, "_workspaces", {})
    waits = []
    monkeypatch.setattr(_cuda, "wait_stream", lambda *args, **kwargs: waits.append(args[-1]))
    buf = F.fake_buffer()
    idx = _ht_inputs()[1]
    for _ in range(2):
        buf.get_dispatch_layout(idx, E)
    assert waits == []
    assert sum(launch[1] == "epk_get_dispatch_layout" for launch in fake) == 2
    with pytest.raises(ArgumentError, match="did not report"):  # the fake kernel writes no invalid-index count
        dispatch_layout.get_dispatch_layout(idx, E, 1)
    assert len(waits) == 1  # the standalone call waited to check
    buf.destroy()
