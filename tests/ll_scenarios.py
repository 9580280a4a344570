"""LL dispatch/combine scenarios checked exactly against the reference, run by every rank of a group.

Used by tests/test_ll_gpu.py (in-process ranks) and tests/ll_mpi_worker.py (MPS processes under mpiexec).
Every rank draws the inputs of *all* ranks from one shared seed and evaluates the reference for the whole
group locally. Receive blocks are compared after ``canonicalize_ll_recv`` (the kernels' row order within a
block is arrival order); combine inputs are a function of (expert, source rank, source token, channel) so
the expected result needs no exchange of expert outputs, and small integers with power-of-two weights make
combine exact (max diff 0).
"""

from __future__ import annotations

import threading

import ml_dtypes
import numpy as np

from epkern import reference
from ht_scenarios import BF16, assert_same, capture_and_replay, expect_argument_errors, make_inputs, settle, shared_seed

FP8 = ml_dtypes.float8_e4m3fn


def make_ll_inputs(seed, num_ranks, num_tokens, hidden, num_experts, topk, routing="random", absent=()):
    """ht_scenarios.make_inputs; ``absent`` ranks have no tokens (their experts may still be selected: see
    ``without_experts_of``)."""
    return make_inputs(seed, num_ranks, num_tokens, hidden, num_experts, topk, routing, absent)


def without_experts_of(idxs, ranks, num_experts, num_ranks):
    """``idxs`` with the selections of the experts of ``ranks`` replaced by -1: what the reference must see
    when those ranks are masked (the kernels get the selections and must skip them)."""
    e_loc = num_experts // num_ranks
    out = []
    for idx in idxs:
        idx = idx.copy()
        for a in ranks:
            idx[(idx >= a * e_loc) & (idx < (a + 1) * e_loc)] = -1
        out.append(idx)
    return out


def to_host(a):
    """Device array to numpy through a contiguous copy on the current stream. Measured on the H100:
    cupy.asnumpy of a non-contiguous array (the column-major FP8 scales) in an in-process rank's thread
    left the legacy default stream current (CuPy 14.2), and the next epkern call then refused it."""
    import cupy

    return cupy.asnumpy(cupy.ascontiguousarray(a))


def bf16_copy(dst, src):
    """dst[...] = src for BF16 device arrays, as raw 16-bit words (no BF16 arithmetic kernels needed)."""
    dst.view(np.uint16)[...] = src.view(np.uint16)


_PATTERNS: dict[int, np.ndarray] = {}


def expert_output(g, s, t, hidden):
    """Expert g's output for token t of source rank s (rows [n, H], BF16, small integers: exact):
    ((7t + 3g + 5s + h) mod 17) - 8, gathered from a table of the 17 row patterns (one per phase)."""
    table = _PATTERNS.get(hidden)
    if table is None:
        h = np.arange(hidden, dtype=np.int64)
        table = _PATTERNS[hidden] = (((np.arange(17)[:, None] + h[None, :]) % 17) - 8).astype(BF16)
    phase = (np.asarray(t, np.int64) * 7 + g * 3 + s * 5) % 17
    return table[phase]


_shared_lock = threading.Lock()
_shared: dict = {}


def shared_reference(key, compute):
    """``compute()`` once per key for all the threads of one process: in-process ranks evaluate the same
    whole-group reference, and eight threads each computing it under the GIL cost eight times the time
    (measured on the H200: the 100-iteration test ran past 75 s that way). Results are read-only."""
    with _shared_lock:
        entry = _shared.get(key)
        if entry is None:
            while len(_shared) >= 8:  # the oldest keys go; a key is used by one call of every rank
                _shared.pop(next(iter(_shared)))
            entry = _shared[key] = [threading.Lock(), None]
    with entry[0]:
        if entry[1] is None:
            entry[1] = compute()
    return entry[1]


def warm_harness_kernels():
    """Load every CuPy kernel this harness runs between LL calls before the first call. In-process ranks
    share one CUDA context, and loading a module there can wait for the kernels running in it: a rank
    loading one while a peer's kernel spins waiting for that rank stalls both until the deadline (seen on
    the H200 as a combine timeout in the first FP8 case, whose scales copy was the first of its kind)."""
    import cupy

    for dt in (np.float32, np.int32):
        to_host(cupy.zeros((2, 3, 4), dt).transpose(0, 2, 1))
    a = cupy.zeros((2, 3, 4), BF16)
    bf16_copy(a, cupy.asarray(np.ones((2, 3, 4), BF16)))
    a.copy()
    for dt, v in ((np.int64, -1), (np.int32, 0), (np.float32, 1), (np.uint8, 0xFF)):
        cupy.full(4, v, dt)
    cupy.arange(4, dtype=np.int32)
    cupy.cuda.get_current_stream().synchronize()


def barrier_if_in_process(buf, group):
    """In-process ranks meet before a combine: the host work between a dispatch and its combine (asnumpy,
    fresh allocations) must not run while a peer's combine kernel already spins in the shared context (see
    warm_harness_kernels). MPS processes (tests/ll_mpi_worker.py) run the same scenarios without it."""
    if getattr(buf, "in_process", False) and group.size > 1:
        group.barrier()


def expert_outputs_for(layout_range, src_info, rank, num_ranks, num_max, hidden, e_loc):
    """The combine input [E_loc, R·num_max, H] of `rank` for a receive layout (kernel's or reference's):
    each valid row gets expert_output(g, s, t); rows past the blocks are zero (never sent)."""
    y = np.zeros((e_loc, num_ranks * num_max, hidden), BF16)
    lr = np.asarray(layout_range).astype(np.int64)
    for e in range(e_loc):
        for s in range(num_ranks):
            b, c = int(lr[e, s] >> 32), int(lr[e, s] & 0xFFFFFFFF)
            if c:
                y[e, b : b + c] = expert_output(rank * e_loc + e, s, src_info[e, b : b + c], hidden)
    return y


def _raw(a):
    a = np.asarray(a)
    return a.view(np.uint8) if a.dtype == np.dtype(FP8) else a


def check_dispatch(r, R, got_x, got_count, got_src, got_layout, want, what, masked=()):
    """Kernel receive buffers of rank r against the reference result ``want`` (exact, after canonicalising
    both). ``got_x``: numpy array or (data, scales) pair."""
    assert_same(got_count, want.recv_count, f"{what}: recv_count")
    mine = reference.canonicalize_ll_recv(got_x, got_count, got_src, got_layout, R)
    ref_x = (_raw(want.recv_x[0]), want.recv_x[1]) if isinstance(want.recv_x, tuple) else want.recv_x
    ref = reference.canonicalize_ll_recv(ref_x, want.recv_count, want.src_info, want.layout_range, R)
    assert_same(mine.layout_range, ref.layout_range, f"{what}: canonical layout_range")
    for e in range(len(ref.src_info)):
        assert_same(mine.src_info[e], ref.src_info[e], f"{what}: expert {e} src_info")
        if isinstance(got_x, tuple):
            assert_same(mine.recv_x[e][0], ref.recv_x[e][0], f"{what}: expert {e} fp8 data")
            assert_same(mine.recv_x[e][1], ref.recv_x[e][1], f"{what}: expert {e} scales")
        else:
            assert_same(mine.recv_x[e], ref.recv_x[e], f"{what}: expert {e} recv_x")
    for s in masked:
        assert not (np.asarray(got_layout)[:, s] & 0xFFFFFFFF).any(), f"{what}: rows from masked rank {s}"


def ll_buffer_bytes(num_max, hidden, num_ranks, num_experts):
    return reference.get_low_latency_rdma_size_hint(num_max, hidden, num_ranks, num_experts)


def group_reference(
    seed,
    R,
    num_tokens,
    hidden,
    num_experts,
    topk,
    num_max,
    routing="random",
    use_fp8=False,
    round_scale=False,
    use_ue8m0=False,
    absent=(),
):
    """Every rank's inputs and the whole group's reference: (xs, idxs, ws, dispatch results, combined x of
    each rank for the expert outputs of ``expert_outputs_for``), computed once per process (shared_reference)."""

    def compute():
        e_loc = num_experts // R
        xs, idxs, ws = make_ll_inputs(seed, R, num_tokens, hidden, num_experts, topk, routing, absent)
        ref_idxs = without_experts_of(idxs, absent, num_experts, R)
        want = reference.ll_dispatch(xs, ref_idxs, num_max, num_experts, use_fp8, round_scale, use_ue8m0)
        ys_ref = [
            expert_outputs_for(want[d].layout_range, want[d].src_info, d, R, num_max, hidden, e_loc) for d in range(R)
        ]
        return xs, idxs, ws, want, reference.ll_combine(ys_ref, want, ref_idxs, ws)

    key = ("ll_case", seed, R, str(num_tokens), hidden, num_experts, topk, num_max, routing, use_fp8, round_scale)
    return shared_reference(key + (use_ue8m0, tuple(absent)), compute)


def run_ll_case(
    buf,
    group,
    num_tokens,
    hidden,
    num_experts,
    topk,
    num_max=128,
    routing="random",
    use_fp8=False,
    round_scale=False,
    use_ue8m0=False,
    hook=False,
    zero_copy=False,
    prealloc=False,
    async_finish=False,
    stats=False,
    seed=None,
    absent=(),
    zero_copy_recv=False,
):
    """One dispatch + combine with the given flags; everything exact. ``absent``: ranks that do not take part
    and that every participating rank has masked already (the caller makes sure). ``zero_copy_recv``: the
    dispatch outputs are the Buffer's views (poisoned first on every rank, then a barrier, unless ranks are
    absent)."""
    import cupy

    r, R = group.rank, group.size
    e_loc, rows = num_experts // R, R * num_max
    seed = shared_seed(group) if seed is None else seed

    xs, idxs, ws, want, expected = group_reference(
        seed, R, num_tokens, hidden, num_experts, topk, num_max, routing, use_fp8, round_scale, use_ue8m0, absent
    )
    x_dev, idx_dev, w_dev = cupy.asarray(xs[r]), cupy.asarray(idxs[r]), cupy.asarray(ws[r])
    what = (
        f"rank {r} (fp8={use_fp8}, round={round_scale}, ue8m0={use_ue8m0}, hook={hook}, zero_copy={zero_copy}, "
        f"zero_copy_recv={zero_copy_recv})"
    )

    outs = {}
    if prealloc:
        if use_fp8:
            S, sdt = (hidden // 512, np.int32) if use_ue8m0 else (hidden // 128, np.float32)
            outs["out_x"] = cupy.empty((e_loc, rows, hidden), np.uint8)
            outs["out_scales"] = cupy.empty((e_loc, S, rows), sdt).transpose(0, 2, 1)
        else:
            outs["out_x"] = cupy.empty((e_loc, rows, hidden), BF16)
        outs["out_src_info"] = cupy.empty((e_loc, rows), np.int32)
        outs["out_layout_range"] = cupy.empty((e_loc, R), np.int64)
        outs["out_count"] = cupy.empty((e_loc,), np.int32)
    if zero_copy_recv and not absent:
        poison_direct_outputs(buf, num_max, hidden, num_experts)
        group.barrier()  # no peer writes into our outputs before we poisoned them
    recv_stats = cupy.zeros(e_loc, np.int32) if stats else None
    wait_stats = cupy.zeros(R, np.int64) if stats else None
    recv_x, count, handle, event, recv_hook = buf.low_latency_dispatch(
        x_dev,
        idx_dev,
        num_max,
        num_experts,
        cumulative_local_expert_recv_stats=recv_stats,
        dispatch_wait_recv_cost_stats=wait_stats,
        use_fp8=use_fp8,
        round_scale=round_scale,
        use_ue8m0=use_ue8m0,
        async_finish=async_finish,
        return_recv_hook=hook,
        **outs,
        **({"zero_copy_recv": True} if zero_copy_recv else {}),
    )
    assert (recv_hook is not None) == hook
    if hook:
        recv_hook()
    if async_finish:
        event.current_stream_wait()
    settle(buf)
    for name, arr in outs.items():  # the preallocated arrays are the outputs
        got = {"out_x": recv_x[0] if use_fp8 else recv_x, "out_count": count, "out_src_info": handle.src_info}
        got.update(out_scales=recv_x[1] if use_fp8 else None, out_layout_range=handle.layout_range)
        assert got[name] is arr, f"{what}: {name} was not used as the output"
    src_np, lr_np = cupy.asnumpy(handle.src_info), cupy.asnumpy(handle.layout_range)
    got_x = (cupy.asnumpy(recv_x[0]), to_host(recv_x[1])) if use_fp8 else cupy.asnumpy(recv_x)
    check_dispatch(r, R, got_x, cupy.asnumpy(count), src_np, lr_np, want[r], what, masked=absent)
    if stats:
        assert_same(cupy.asnumpy(recv_stats), want[r].recv_count, f"{what}: cumulative recv stats")

    # Combine: expert outputs as a function of (g, s, t, h), laid out as this rank received.
    y = expert_outputs_for(lr_np, src_np, r, R, num_max, hidden, e_loc)
    expect = expected[r]
    y_dev = cupy.asarray(y)
    if zero_copy:
        zbuf = buf.get_next_low_latency_combine_buffer(handle)
        assert zbuf.shape == (e_loc, rows, hidden) and zbuf.dtype == np.dtype(BF16)
        bf16_copy(zbuf, y_dev)
        y_dev = zbuf
    out = cupy.empty((x_dev.shape[0], hidden), BF16) if prealloc else None
    wait_c = cupy.zeros(R, np.int64) if stats else None
    if not absent:  # with an absent rank there is no group to meet (the survivors meet on the device)
        barrier_if_in_process(buf, group)
    combined, event, chook = buf.low_latency_combine(
        y_dev,
        idx_dev,
        w_dev,
        handle,
        zero_copy=zero_copy,
        async_finish=async_finish,
        return_recv_hook=hook,
        out=out,
        combine_wait_recv_cost_stats=wait_c,
    )
    if prealloc:
        assert combined is out
    if hook:
        chook()
    if async_finish:
        event.current_stream_wait()
    settle(buf)
    assert_same(cupy.asnumpy(combined), expect, f"{what}: combined_x")
    return want[r]


def poison_direct_outputs(buf, num_max, hidden, num_experts):
    """0xFF over the zero_copy_recv outputs of the next LL call's set (rows never written stay visible)."""
    import cupy

    from epkern.gpu.ll.layout import direct_recv_layout

    eng = buf._backend.ll
    st = eng.size_state(num_max, hidden, num_experts)
    lay, stride = st.layout, st.stride
    d = direct_recv_layout(lay, buf.num_ranks)
    ptr = eng.next_set(stride)[1] + lay.recv_off
    stream = cupy.cuda.get_current_stream()
    cupy.cuda.runtime.memsetAsync(ptr, 0xFF, d.end, stream.ptr)
    stream.synchronize()  # done before the barrier that follows


def direct_dump(buf, num_max, hidden, num_experts, layout_range, want):
    """Diagnostics of a zero_copy_recv failure: counters, the fill counters of both sets, the kernel's and the
    reference's (begin, count) blocks per expert and source."""
    import cupy

    st = buf._backend.ll.size_state(num_max, hidden, num_experts)
    stride = st.stride
    fills = []
    for p in range(2):
        words = np.empty(num_experts // buf.num_ranks, np.int32)
        src = buf._backend.rt.region.ptr + buf._backend.rt.ll_offset + p * stride + 4 * num_experts
        cupy.cuda.runtime.memcpy(words.ctypes.data, src, words.nbytes, 2)
        fills.append(words.tolist())
    st = cupy.asnumpy(buf._backend.ll.state[:2]).tolist()
    blocks = [[(int(v) >> 32, int(v) & 0xFFFFFFFF) for v in row] for row in np.asarray(layout_range)]
    ref = [[(int(v) >> 32, int(v) & 0xFFFFFFFF) for v in row] for row in np.asarray(want.layout_range)]
    return f"counter,ticket={st} sends={buf._backend.ll.sends} fill={fills} blocks={blocks} reference={ref}"


def run_double_batch(buf, group, hidden=2048, num_experts=None, topk=4, num_max=64, zero_copy_recv=False):
    """Two dispatches in flight with hooks (DeepEP's two-batch overlap): send A, send B, recv A, recv B, then
    combine A and combine B, each exact."""
    import cupy

    r, R = group.rank, group.size
    E = num_experts or 8 * R
    e_loc = E // R
    seed = shared_seed(group)
    batches = []
    for b in range(2):
        xs, idxs, ws, want, expected = group_reference(seed + b, R, num_max - 3 * b, hidden, E, topk, num_max)
        dev = (cupy.asarray(xs[r]), cupy.asarray(idxs[r]), cupy.asarray(ws[r]))
        res = buf.low_latency_dispatch(
            dev[0], dev[1], num_max, E, use_fp8=False, return_recv_hook=True, zero_copy_recv=zero_copy_recv
        )
        batches.append((expected, want, dev, res))
    for *_, res in batches:
        res[4]()  # recv hooks in order
    settle(buf)
    # Combine A reuses dispatch A's buffer set: every rank must have received A before any rank combines
    # (DeepEP's rule of at most two LL results alive; see epkern/gpu/ll/engine.py).
    group.barrier()
    for b, (_, want, _, res) in enumerate(batches):
        recv_x, count, handle = res[0], res[1], res[2]
        src_np, lr_np = cupy.asnumpy(handle.src_info), cupy.asnumpy(handle.layout_range)
        check_dispatch(r, R, cupy.asnumpy(recv_x), cupy.asnumpy(count), src_np, lr_np, want[r], f"batch {b}")
    for b, (expected, _, dev, res) in enumerate(batches):
        handle = res[2]
        y = expert_outputs_for(
            cupy.asnumpy(handle.layout_range), cupy.asnumpy(handle.src_info), r, R, num_max, hidden, e_loc
        )
        out, _, _ = buf.low_latency_combine(cupy.asarray(y), dev[1], dev[2], handle)
        settle(buf)
        assert_same(cupy.asnumpy(out), expected[r], f"rank {r} batch {b} combined_x")


def run_graph_replays(
    buf,
    group,
    replays=100,
    num_tokens=96,
    hidden=2048,
    topk=4,
    num_max=128,
    use_fp8=False,
    graph=True,
    prepared=False,
    zero_copy=False,
    zero_copy_recv=False,
):
    """Capture one dispatch + combine (combine of the received rows as they are) into a CUDA graph, then
    replay it ``replays`` times on fresh inputs copied into the captured arrays; every replay exact. No
    host collective between replays: the set each call uses comes from the device counter. ``graph=False``:
    the same ``replays`` iterations as eager calls on the same arrays (what epkern.gpu.ll.plans replays);
    ``prepared``: those eager calls through prepare_low_latency_dispatch / _combine. ``zero_copy``: the expert
    outputs go into get_next_low_latency_combine_buffer (the set alternates between calls, not between replays
    of a captured pair) and the combine reads them there. ``zero_copy_recv``: the dispatch outputs are the
    Buffer's views (those of one set: a captured pair always runs its dispatch in the same set)."""
    import cupy

    if cupy.cuda.get_current_stream().ptr == 0:
        # CUDA cannot capture the legacy default stream, which MPI ranks run on unless they pick one
        # (seen on the H200: "cannot capture on the default (legacy) stream" in tests/ll_mpi_worker.py).
        with cupy.cuda.Stream(non_blocking=True):
            return run_graph_replays(
                buf,
                group,
                replays,
                num_tokens,
                hidden,
                topk,
                num_max,
                use_fp8,
                graph,
                prepared,
                zero_copy,
                zero_copy_recv,
            )
    r, R = group.rank, group.size
    E = 8 * R
    e_loc, rows = E // R, R * num_max
    base = shared_seed(group)
    key = ("graph", base, R, num_tokens, hidden, topk, num_max, use_fp8)
    x_dev = cupy.zeros((num_tokens, hidden), BF16)
    idx_dev = cupy.full((num_tokens, topk), -1, np.int64)
    w_dev = cupy.zeros((num_tokens, topk), np.float32)
    outs = dict(
        out_x=cupy.empty((e_loc, rows, hidden), np.uint8 if use_fp8 else BF16),
        out_src_info=cupy.empty((e_loc, rows), np.int32),
        out_layout_range=cupy.empty((e_loc, R), np.int64),
        out_count=cupy.empty((e_loc,), np.int32),
    )
    if use_fp8:
        outs["out_scales"] = cupy.empty((e_loc, hidden // 128, rows), np.float32).transpose(0, 2, 1)
    snap = {}
    if zero_copy_recv:
        # The outputs are the Buffer's views, which peers write again as soon as they pass this pair's combine
        # (the next replay starts with no host barrier): copied inside the pair, before its combine, as an expert
        # computation would read them, and checked there (memcpy nodes: no kernel is loaded mid-replay).
        snap = {k: cupy.empty(v.shape, v.dtype) for k, v in outs.items()}
        if use_fp8:
            snap["out_scales"] = cupy.empty((e_loc, hidden // 128, rows), np.float32)
        outs = {"zero_copy_recv": True}
    last = {}  # the outputs of the last dispatch (zero_copy_recv: the snapshots of the Buffer's views)
    y_dev = cupy.zeros((e_loc, rows, hidden), BF16)
    out = cupy.empty((num_tokens, hidden), BF16)

    def load(it):
        xs, idxs, ws = make_ll_inputs(base + it, R, num_tokens, hidden, E, topk)
        x_dev.set(xs[r])
        idx_dev.set(idxs[r])
        w_dev.set(ws[r])
        return xs, idxs, ws

    prepared_calls = []  # (dispatch, combine) once the first dispatch gave a handle

    def calls():
        if prepared and not prepared_calls:
            prepared_calls.append(buf.prepare_low_latency_dispatch(x_dev, idx_dev, num_max, E, use_fp8=use_fp8, **outs))
        if prepared:
            recv_x, count, handle, _, _ = prepared_calls[0]()
        else:
            recv_x, count, handle, _, _ = buf.low_latency_dispatch(x_dev, idx_dev, num_max, E, use_fp8=use_fp8, **outs)
        if zero_copy_recv:
            stream = cupy.cuda.get_current_stream()
            data, scales = (recv_x[0], recv_x[1].transpose(0, 2, 1)) if use_fp8 else (recv_x, None)
            views = dict(
                out_x=data,
                out_scales=scales,
                out_src_info=handle.src_info,
                out_layout_range=handle.layout_range,
                out_count=count,
            )
            for k, dst in snap.items():
                src = views[k]
                cupy.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, dst.nbytes, 3, stream.ptr)
            recv_x = (snap["out_x"], snap["out_scales"].transpose(0, 2, 1)) if use_fp8 else snap["out_x"]
            last.update(recv_x=recv_x, count=snap["out_count"], src=snap["out_src_info"])
            last.update(layout=snap["out_layout_range"])
        else:
            last.update(recv_x=recv_x, count=count, src=handle.src_info, layout=handle.layout_range)
        # Expert outputs: the BF16 rows as received (a captured copy); FP8 runs check the dispatch only.
        y = buf.get_next_low_latency_combine_buffer(handle) if zero_copy else y_dev
        if not use_fp8:
            bf16_copy(y, recv_x)
        if prepared and len(prepared_calls) == 1:
            prepared_calls.append(
                buf.prepare_low_latency_combine(y, idx_dev, w_dev, handle, out=out, zero_copy=zero_copy)
            )
        if prepared:
            combined, _, _ = prepared_calls[1]()
        else:
            combined, _, _ = buf.low_latency_combine(y, idx_dev, w_dev, handle, out=out, zero_copy=zero_copy)
        return handle, combined

    def check(it, xs, idxs, ws, handle):
        want, combined_ref = shared_reference(key + (it,), lambda: whole_group(xs, idxs, ws))
        src_np, lr_np = cupy.asnumpy(last["src"]), cupy.asnumpy(last["layout"])
        recv_x = last["recv_x"]
        got_x = (cupy.asnumpy(recv_x[0]), to_host(recv_x[1])) if use_fp8 else cupy.asnumpy(recv_x)
        try:
            check_dispatch(r, R, got_x, cupy.asnumpy(last["count"]), src_np, lr_np, want[r], f"rank {r} replay {it}")
        except AssertionError:
            if zero_copy_recv:  # diagnostics of the direct dispatch's block reservations
                print(f"DIAG rank {r} replay {it}: {direct_dump(buf, num_max, hidden, E, lr_np, want[r])}", flush=True)
            raise
        if not use_fp8:
            assert_same(cupy.asnumpy(out), combined_ref[r], f"rank {r} replay {it} combined_x")

    def whole_group(xs, idxs, ws):
        want = reference.ll_dispatch(xs, idxs, num_max, E, use_fp8=use_fp8)
        return want, None if use_fp8 else reference.ll_combine([w.recv_x for w in want], want, idxs, ws)

    stream = cupy.cuda.get_current_stream()
    data = load(-1)
    handle, _ = calls()  # eager: compiles, agrees on sizes, warms every specialisation
    settle(buf)
    check(-1, *data, handle)
    group.barrier()
    if not graph:
        for it in range(replays):
            data = load(it)
            handle, _ = calls()
            settle(buf)
            check(it, *data, handle)
        group.barrier()
        return
    capture_and_replay(buf, group, stream, lambda: calls()[0], load, check, replays)  # check takes the handle


def run_ll_bad_inputs(buf, group, num_max=64, hidden=2048):
    """Every bad argument raises ArgumentError naming it before anything is launched; bad topk_idx values
    (found by the kernel) raise ArgumentError at the next check; the Buffer stays usable throughout."""
    import cupy

    R = group.size
    E, K, T = 8 * R, 4, 32
    e_loc, rows = E // R, R * num_max
    x = cupy.asarray(np.ones((T, hidden), BF16))
    idx = cupy.asarray(np.tile(np.arange(K, dtype=np.int64), (T, 1)))
    d = buf.low_latency_dispatch
    ok = dict(use_fp8=False)
    cases = [
        (lambda: d(x.astype(cupy.float32), idx, num_max, E, **ok), "x"),
        (lambda: d(x[:, :100], idx, num_max, E, **ok), "x"),
        (lambda: d(cupy.asarray(np.ones((num_max + 1, hidden), BF16)), idx, num_max, E, **ok), "x"),
        (lambda: d(np.ones((T, hidden), BF16), idx, num_max, E, **ok), "x"),
        (lambda: d(x, idx.astype(cupy.int32), num_max, E, **ok), "topk_idx"),
        (lambda: d(x, idx[:-1], num_max, E, **ok), "topk_idx"),
        (lambda: d(x, cupy.zeros((T, 33), cupy.int64), num_max, E, **ok), "topk_idx"),
        (lambda: d(x, idx, 1025, E, **ok), "num_max_dispatch_tokens_per_rank"),
        (lambda: d(x, idx, num_max, E + 1, **ok), "num_experts"),
        (lambda: d(x, idx, 1024, 64 * R, **ok), "num_rdma_bytes"),
        (lambda: d(x, idx, num_max, E, use_fp8=True, use_ue8m0=True), "use_ue8m0"),
        (lambda: d(x, idx, num_max, E, out_x=cupy.empty((e_loc, rows, hidden + 128), BF16), **ok), "out_x"),
        (lambda: d(x, idx, num_max, E, out_count=cupy.empty((e_loc,), np.int64), **ok), "out_count"),
        (lambda: d(x, idx, num_max, E, out_src_info=cupy.empty((e_loc, rows + 1), np.int32), **ok), "out_src_info"),
        (lambda: d(x, idx, num_max, E, out_layout_range=cupy.empty((e_loc, R), np.int32), **ok), "out_layout_range"),
        (
            lambda: d(
                x, idx, num_max, E, use_fp8=True, out_scales=cupy.empty((e_loc, rows, hidden // 128), np.float32)
            ),
            "out_scales",
        ),
        (lambda: d(x, idx, num_max, E, out_scales=cupy.empty((1,), np.float32), **ok), "out_scales"),
        (
            lambda: d(x, idx, num_max, E, cumulative_local_expert_recv_stats=cupy.zeros(e_loc + 1, np.int32), **ok),
            "cumulative_local_expert_recv_stats",
        ),
    ]
    expect_argument_errors(cases)
    recv_x, _, handle, _, _ = d(x, idx, num_max, E, **ok)
    settle(buf)
    w = cupy.ones((T, K), np.float32)
    c = buf.low_latency_combine
    expect_argument_errors(
        (
            (lambda: c(recv_x[:, :1], idx, w, handle), "x"),
            (lambda: c(recv_x, idx, w, "nope"), "handle"),
            (lambda: c(recv_x, idx, w.astype(cupy.float64), handle), "topk_weights"),
            (lambda: c(recv_x, idx, w[:1], handle), "topk_weights"),
            (lambda: c(recv_x, idx, w, handle, out=cupy.empty((T + 1, hidden), BF16)), "out"),
            (lambda: c(recv_x, idx, w, handle, use_logfmt=True), "use_logfmt"),
            (lambda: c(recv_x, cupy.zeros((num_max + 1, K), cupy.int64), w, handle), "topk_idx"),
        )
    )
    # Bad values, found on the device: ArgumentError at the next check, then everything works again.
    bad = idx.copy()
    bad[0, 0] = E + 5
    from epkern.errors import ArgumentError

    try:
        d(x, bad, num_max, E, **ok)  # a call that waits on the host raises its own failure
        settle(buf)
    except ArgumentError as exc:
        assert "topk_idx" in str(exc), exc
    else:
        raise AssertionError("out-of-range topk_idx value accepted")
    group.barrier()
    run_ll_case(buf, group, T, hidden, E, K, num_max=num_max)


def run_absent_rank(buf, group, absent_rank, num_tokens=48, hidden=2048, topk=4, num_max=64):
    """The absent rank stops after a warm-up; every other rank's next call raises TimeoutError once (naming
    rank, phase and the peer) and masks it; later calls work exactly without it. Returns the seconds the
    failing call took (None on the absent rank)."""
    import time

    import cupy

    from epkern.errors import TimeoutError as EpTimeout

    r, R = group.rank, group.size
    E = 8 * R
    rng_seed = 1234
    # Every specialisation loaded, and every CuPy kernel the checks below use compiled, while all ranks are
    # here: on a cold kernel cache a compile in one in-process rank (seconds, GIL held) outlasted the short
    # deadline of a peer's spinning kernel, which then masked a rank that was present (seen on the H200).
    run_ll_case(buf, group, num_tokens, hidden, E, topk, num_max=num_max)
    run_ll_case(buf, group, num_tokens, hidden, E, topk, num_max=num_max, seed=rng_seed)
    group.barrier()
    if r == absent_rank:
        return None
    x = cupy.asarray(np.ones((num_tokens, hidden), BF16))
    idx = cupy.asarray(np.tile(np.arange(topk, dtype=np.int64), (num_tokens, 1)))
    t0 = time.monotonic()
    try:
        buf.low_latency_dispatch(x, idx, num_max, E, use_fp8=False)
        settle(buf)
    except EpTimeout as exc:
        took = time.monotonic() - t0
        msg = str(exc)
        assert f"rank {r}" in msg and f"peer {absent_rank}" in msg and "low-latency" in msg, msg
    else:
        raise AssertionError("dispatch with an absent peer did not raise")
    mask = cupy.asnumpy(buf.low_latency_query_mask_buffer())
    assert mask.tolist() == [int(s == absent_rank) for s in range(R)], mask
    # Host state at the start of the post-mask calls (pytest shows it only when the test fails; see
    # docs/architecture.md, Known problems). No device dump here: a device-wide sync in one in-process rank
    # would wait for the peers' kernels that already spin for this rank's next call.
    rec = [int(v) for v in buf._backend.rt.error_record[:7]]
    print(
        f"DIAG rank {r} after masking (took {took:.2f} s): sends={buf._backend.ll.sends} error_record={rec}", flush=True
    )
    # Raised once: the Buffer works on, exactly, without the absent rank (its experts contribute nothing).
    # The survivors meet through the device protocol only (no group collective: the absent rank is gone).
    for it in range(3):
        try:
            run_ll_case(
                buf, group, num_tokens, hidden, E, topk, num_max=num_max, seed=rng_seed + it, absent=(absent_rank,)
            )
        except Exception:
            print(f"DIAG rank {r} it {it}: {ll_signal_dump(buf, E)}", flush=True)
            raise
    return took


def ll_signal_dump(buf, num_experts):
    """Diagnostics: this rank's LL call counter, ticket, mask and the tags in both signal sets."""
    import cupy

    from epkern.gpu.ll.layout import STATE_DONE, STATE_MASK, STATE_ROUTE, STATE_SLOT, set_stride_of

    cupy.cuda.runtime.deviceSynchronize()
    st = cupy.asnumpy(buf._backend.ll.state[:2]).tolist()
    mask = cupy.asnumpy(buf._backend.ll.state[STATE_MASK : STATE_MASK + buf.num_ranks]).tolist()
    stride = set_stride_of(buf._backend.rt.ll_bytes)
    sets = []
    for p in range(2):
        words = np.empty(num_experts, np.int32)
        cupy.cuda.runtime.memcpy(
            words.ctypes.data, buf._backend.rt.region.ptr + buf._backend.rt.ll_offset + p * stride, 4 * num_experts, 2
        )
        sets.append(f"tags={(words >> 11).tolist()} counts={(words & 0x7FF).tolist()}")
    # The host's view too: sending calls issued, calls replayed, and the error record (claimed, code, rank,
    # phase, peer, seen, expected) - a record still claimed here was never raised.
    rec = [int(v) for v in buf._backend.rt.error_record[:7]]
    host = f"host sends={buf._backend.ll.sends} replays={buf._backend.ll.replays} error_record={rec}"

    # Per expert: the counters.
    def words(base):
        return cupy.asnumpy(buf._backend.ll.state[base : base + num_experts]).tolist()

    routes = cupy.asnumpy(buf._backend.ll.state[STATE_ROUTE : STATE_ROUTE + buf.num_ranks]).tolist()
    counters = f"slot={words(STATE_SLOT)} done={words(STATE_DONE)} routes={routes}"
    # Where this rank's kernels send to (peer table + ll_off) and where it reads its own area.
    peers = [hex(int(v)) for v in cupy.asnumpy(buf._backend.rt.peer_table).ravel()[: buf.num_ranks]]
    counters += f" peers={peers} ll_offset={buf._backend.rt.ll_offset} region={hex(buf._backend.rt.region.ptr)}"
    return f"counter,ticket={st} mask={mask} {host} {counters} set0 {sets[0]} set1 {sets[1]}"
