"""HT dispatch/combine scenarios checked exactly against the reference, run by every rank of a group.

Used by tests/test_ht_gpu.py (in-process ranks) and tests/ht_mpi_worker.py (MPS processes under mpiexec).
Every rank draws the inputs of *all* ranks from one shared seed, so it can evaluate the reference for the
whole group locally and compare its own outputs, with no extra communication.
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np

from epkern import reference

BF16 = ml_dtypes.bfloat16
FP8 = ml_dtypes.float8_e4m3fn


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint8)


def assert_same(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if got.dtype in (np.dtype(BF16), np.dtype(FP8)) or want.dtype in (np.dtype(BF16), np.dtype(FP8)):
        eq = np.array_equal(bits(got), bits(want))
    else:
        eq = np.array_equal(got, want)
    if not eq:
        bad = (
            np.argwhere(bits(got).reshape(got.shape[0], -1) != bits(want).reshape(want.shape[0], -1))
            if got.ndim >= 1 and got.size
            else []
        )
        detail = ""
        if got.dtype.kind in "iub" and got.size:
            rows = np.nonzero((got != want).reshape(got.shape[0], -1).any(1))[0]
            first = rows[:6]
            detail = f"; {len(rows)} rows differ, first {first.tolist()}: got {got[first].tolist()}"
            detail += f" want {want[first].tolist()}"
        raise AssertionError(f"{what}: mismatch, first differing positions {bad[:5]}{detail}")


def settle(buf):
    """Wait for the Buffer's kernels and raise what they recorded (a timeout, an overflow), so a device-side
    failure is reported as itself rather than as the wrong rows it leaves behind."""
    if getattr(buf, "backend", "") == "gpu":
        import cupy

        # The caller's stream, as a user would; bounded (a kernel that never ends fails the test, not CI's clock).
        buf._backend.rt.sync_bounded(cupy.cuda.get_current_stream(), "the test waiting for the caller's stream")
        buf.check()


def make_inputs(seed, num_ranks, num_tokens, hidden, num_experts, topk, routing="random", absent=()):
    """Per rank: x BF16 [T, H] small integers, topk_idx int64 [T, K] (distinct experts per token, ~10% -1 for
    "random"), weights float32 powers of two. ``absent`` ranks get no tokens."""
    rng = np.random.default_rng(seed)
    xs, idxs, ws = [], [], []
    for r in range(num_ranks):
        t = num_tokens[r] if isinstance(num_tokens, list | tuple) else num_tokens
        if r in absent:
            t = 0
        x = rng.integers(-16, 17, size=(t, hidden)).astype(BF16)
        if routing == "random":
            idx = np.argsort(rng.random((t, num_experts)), axis=1)[:, :topk].astype(np.int64)
            idx[rng.random((t, topk)) < 0.1] = -1
        elif routing == "skewed":  # every token to expert 0 (rank 0 gets everything)
            idx = np.full((t, topk), -1, np.int64)
            idx[:, 0] = 0
        elif routing == "empty_rank":  # nobody sends to the last rank
            allowed = num_experts - num_experts // num_ranks
            idx = np.argsort(rng.random((t, allowed)), axis=1)[:, :topk].astype(np.int64)
        elif routing == "none":
            idx = np.full((t, topk), -1, np.int64)
        else:
            raise ValueError(routing)
        w = rng.choice(np.array([0.25, 0.5, 1.0, 2.0], np.float32), size=(t, topk)).astype(np.float32)
        xs.append(x), idxs.append(idx), ws.append(w)
    return xs, idxs, ws


def shared_seed(group):
    return group.broadcast_object(int.from_bytes(os.urandom(8), "little"))


def run_ht_case(
    buf,
    group,
    num_tokens,
    hidden,
    num_experts,
    topk,
    routing="random",
    fp8=False,
    num_worst_tokens=0,
    expert_alignment=1,
    iterations=1,
    seed=None,
):
    """Dispatch (non-cached, or worst-tokens), cached dispatch and combine; all exact."""
    import cupy

    r, R = group.rank, group.size
    seed = shared_seed(group) if seed is None else seed
    xs, idxs, ws = make_inputs(seed, R, num_tokens, hidden, num_experts, topk, routing)
    if fp8:
        pairs = [reference.per_token_cast_to_fp8(x) for x in xs]
        inputs = pairs
    else:
        inputs = xs
    ref = reference.ht_dispatch(
        inputs, idxs, num_experts, topk_weights=ws, expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens
    )
    mine = ref[r]
    n_real = len(mine.handle.src_idx) if not num_worst_tokens else int((mine.handle.src_idx >= 0).sum())

    def dev(a):
        if isinstance(a, tuple):
            return tuple(dev(v) for v in a)
        return cupy.asarray(a.view(np.uint8) if a.dtype == np.dtype(FP8) else a)  # CuPy has no float8

    x_dev = dev(inputs[r])
    idx_dev, w_dev = cupy.asarray(idxs[r]), cupy.asarray(ws[r])
    for it in range(iterations):
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx_dev, num_experts)
        want_layout = reference.get_dispatch_layout(idxs[r], num_experts, R)
        assert_same(cupy.asnumpy(per_rank), want_layout.num_tokens_per_rank, f"rank {r} it {it} per-rank counts")
        assert_same(cupy.asnumpy(in_rank), want_layout.is_token_in_rank, f"rank {r} it {it} is_token_in_rank")
        recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
            x_dev,
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=idx_dev,
            topk_weights=w_dev,
            expert_alignment=expert_alignment,
            num_worst_tokens=num_worst_tokens,
        )
        settle(buf)
        n = n_real
        # metadata first: it tells a layout/notify fault from a copy fault
        assert_same(
            cupy.asnumpy(handle.rank_prefix_matrix), mine.handle.rank_prefix_matrix, f"rank {r} rank_prefix_matrix"
        )
        assert_same(cupy.asnumpy(handle.recv_src_idx), mine.handle.src_idx, f"rank {r} it {it} src_idx")
        if fp8:
            assert_same(cupy.asnumpy(recv_x[0])[:n], mine.recv_x[0][:n], f"rank {r} recv_x fp8")
            assert_same(cupy.asnumpy(recv_x[1])[:n], mine.recv_x[1][:n], f"rank {r} recv scales")
        else:
            got_np = cupy.asnumpy(recv_x)[:n]
            if not np.array_equal(bits(got_np), bits(mine.recv_x[:n])):
                bad_rows = np.nonzero((bits(got_np).reshape(n, -1) != bits(mine.recv_x[:n]).reshape(n, -1)).any(1))[0]
                want_rows = bits(mine.recv_x[:n]).reshape(n, -1)
                where = [
                    int(np.nonzero((want_rows == bits(got_np[b]).reshape(-1)).all(1))[0][:1].tolist()[0])
                    if (want_rows == bits(got_np[b]).reshape(-1)).all(1).any()
                    else -1
                    for b in bad_rows[:8]
                ]
                poisoned = int((bits(got_np[bad_rows]).reshape(len(bad_rows), -1) == 0xFF).all(1).sum())
                try:
                    buf._backend.rt.comm_stream.synchronize()
                    buf._backend.rt.raise_recorded()
                    recorded = "no device error recorded"
                except Exception as exc:  # noqa: BLE001 - reported in the assertion below
                    recorded = f"device error: {exc}"
                raise AssertionError(
                    f"rank {r} iteration {it} recv_x ({recorded}): {len(bad_rows)} bad rows ({poisoned} poison) "
                    f"{bad_rows[:8].tolist()}, "
                    f"which hold expected rows {where}; src ranks "
                    f"{mine.handle.src_rank[bad_rows[:8]].tolist()}"
                )
        assert_same(cupy.asnumpy(recv_idx), mine.recv_topk_idx, f"rank {r} recv_topk_idx")
        assert_same(cupy.asnumpy(recv_w), mine.recv_topk_weights, f"rank {r} recv_topk_weights")
        assert list(counts) == list(mine.num_recv_tokens_per_expert_list), f"rank {r} per-expert counts"
        assert_same(cupy.asnumpy(handle.recv_src_idx), mine.handle.src_idx, f"rank {r} src_idx")
        assert_same(
            cupy.asnumpy(handle.rank_prefix_matrix), mine.handle.rank_prefix_matrix, f"rank {r} rank_prefix_matrix"
        )

        if not fp8:
            # combine(dispatch(x)) with the received rows sent back as they are
            ys = [res.recv_x for res in ref]
            want = reference.ht_combine(
                ys, [res.handle for res in ref], topk_weights=[res.recv_topk_weights for res in ref]
            )[r]
            out, out_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w)
            settle(buf)
            assert_same(cupy.asnumpy(out), want[0], f"rank {r} combined_x")
            assert_same(cupy.asnumpy(out_w), want[1], f"rank {r} combined_topk_weights")
            # fresh expert outputs (the received rows times k, exact in BF16) combined with the same handle: the
            # repeats replay the validated combine (gpu/ht_replay.py), each exact; made on the host (no CuPy kernel)
            replays = buf._backend.ht.replays
            for k in (2, 3, 5):
                ys_k = [(y.astype(np.float32) * k).astype(y.dtype) for y in ys]
                want_k = reference.ht_combine(
                    ys_k, [res.handle for res in ref], topk_weights=[res.recv_topk_weights for res in ref]
                )[r]
                out_k = buf.combine(cupy.asarray(ys_k[r]), handle, topk_weights=recv_w)[0]
                settle(buf)
                assert_same(cupy.asnumpy(out_k), want_k[0], f"rank {r} combined_x of fresh outputs x{k}")
            assert buf._backend.ht.replays >= replays + 2, "repeated combines did not replay"

            # cached dispatch of fresh data follows the same layout
            xs2, _, _ = make_inputs(seed + 1, R, num_tokens, hidden, num_experts, topk, routing)
            want2 = reference.ht_cached_dispatch(xs2, [res.handle for res in ref])[r]
            got2, none_idx, _, _, _, _ = buf.dispatch(cupy.asarray(xs2[r]), handle=handle)
            settle(buf)
            assert none_idx is None
            assert_same(cupy.asnumpy(got2)[:n], want2[:n], f"rank {r} cached recv_x")
            # repeated cached dispatches of fresh data replay the validated launch (gpu/ht_replay.py): exact too
            replays = buf._backend.ht.replays
            for k in range(2, 5):
                xs3, _, _ = make_inputs(seed + k, R, num_tokens, hidden, num_experts, topk, routing)
                want3 = reference.ht_cached_dispatch(xs3, [res.handle for res in ref])[r]
                got3 = buf.dispatch(cupy.asarray(xs3[r]), handle=handle)[0]
                settle(buf)
                assert_same(cupy.asnumpy(got3)[:n], want3[:n], f"rank {r} replayed cached recv_x {k}")
            assert buf._backend.ht.replays == replays + 3, "repeated cached dispatches did not replay"
    return n_real


def run_fresh_iterations(buf, group, iterations, num_tokens=96, hidden=2048, num_experts=64, topk=8):
    """``iterations`` rounds of layout -> dispatch -> combine -> cached dispatch, each round with fresh inputs
    and a routing of its own, all exact, and no host-side collective between the calls (the seeds follow
    from one shared seed)."""
    base = shared_seed(group)
    routings = ("random", "random", "skewed", "empty_rank", "none")
    import time

    t0 = time.monotonic()
    for it in range(iterations):
        run_ht_case(
            buf, group, num_tokens, hidden, num_experts, topk, routing=routings[it % len(routings)], seed=base + it
        )
        if group.rank == 0 and (it + 1) % 25 == 0:
            print(f"fresh iterations: {it + 1} done in {time.monotonic() - t0:.1f} s", flush=True)


def check_graph_replay(r, E, W, xs, idxs, ws, outs, what, rank_to_node=None):
    """One replay of the HT graph scenario (run_ht_graph; deep_ep_scenarios.ht_graph_case) against the reference:
    ``outs`` = numpy (src_idx, recv_x, recv_topk_idx, recv_topk_weights, cached recv_x, combined_x, combined
    weights) of a dispatch with num_worst_tokens ``W``, its cached dispatch, and the combine of the received rows
    (across nodes: ``rank_to_node``, the reference's two-level order)."""
    src_idx, recv_x, recv_idx, recv_w, again, out, out_w = outs
    ref = reference.ht_dispatch(xs, idxs, E, topk_weights=ws, num_worst_tokens=W)
    mine = ref[r]
    n = int((mine.handle.src_idx >= 0).sum())
    assert_same(src_idx, mine.handle.src_idx, f"{what} src_idx")
    assert_same(recv_x[:n], mine.recv_x[:n], f"{what} recv_x")
    assert_same(recv_idx, mine.recv_topk_idx, f"{what} recv_topk_idx")
    assert_same(recv_w, mine.recv_topk_weights, f"{what} recv_topk_weights")
    assert_same(again[:n], mine.recv_x[:n], f"{what} cached recv_x")
    handles, weights = [res.handle for res in ref], [res.recv_topk_weights for res in ref]
    want = reference.ht_combine([res.recv_x for res in ref], handles, topk_weights=weights, rank_to_node=rank_to_node)[
        r
    ]
    assert_same(out, want[0], f"{what} combined_x")
    assert_same(out_w, want[1], f"{what} combined_topk_weights")


def run_ht_graph(buf, group, replays=4, num_tokens=96, hidden=2048, topk=4):
    """Issue #19: HT in a CUDA graph where DeepEP allows it. A dispatch with num_worst_tokens, a cached dispatch
    with its handle, the expert (its output = the received rows, a captured copy into an array outside the Buffer)
    and the combine of that fresh output are captured once, then replayed on fresh inputs (and their layout) copied
    into the captured arrays. Every replay exact: the kernels count epochs on the device, so a replay is a new call.
    The Buffer needs num_nvl_bytes for what a captured call allocates (its heap). A group across nodes also passes
    the tokens per node (and needs num_rdma_bytes). Returns the replays checked."""
    import cupy

    r, R = group.rank, group.size
    E, W = 8 * R, R * num_tokens  # W: every token of every rank
    base = shared_seed(group)
    nodes = node_map(group)
    per_node = cupy.empty((group.num_nodes,), np.int32) if nodes is not None else None
    x_dev, y_dev = cupy.empty((num_tokens, hidden), BF16), cupy.empty((W, hidden), BF16)
    idx_dev, w_dev = cupy.empty((num_tokens, topk), np.int64), cupy.empty((num_tokens, topk), np.float32)
    per_rank, per_expert = cupy.empty((R,), np.int32), cupy.empty((E,), np.int32)
    in_rank = cupy.empty((num_tokens, R), np.bool_)

    def load(it):
        xs, idxs, ws, host = graph_step_inputs(base + it, r, R, num_tokens, hidden, E, topk, nodes)
        for dev, h in zip((x_dev, idx_dev, w_dev, per_rank, per_expert, in_rank, per_node), host, strict=True):
            if dev is not None:
                dev.set(np.ascontiguousarray(np.asarray(h).astype(dev.dtype)))
        return xs, idxs, ws

    def calls():
        recv_x, recv_idx, recv_w, _, handle, _ = buf.dispatch(
            x_dev, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=idx_dev, topk_weights=w_dev, num_worst_tokens=W,
        )  # fmt: skip
        again = buf.dispatch(x_dev, handle=handle)[0]
        y_dev.view(np.uint16)[...] = again.view(np.uint16)  # the expert
        out, out_w, _ = buf.combine(y_dev, handle, topk_weights=recv_w)
        return recv_x, recv_idx, recv_w, handle, again, out, out_w

    def check(it, xs, idxs, ws, got):
        recv_x, recv_idx, recv_w, handle, again, out, out_w = got
        outs = [cupy.asnumpy(a) for a in (handle.recv_src_idx, recv_x, recv_idx, recv_w, again, out, out_w)]
        check_graph_replay(r, E, W, xs, idxs, ws, outs, f"rank {r} graph replay {it}", rank_to_node=nodes)

    with cupy.cuda.Stream(non_blocking=True) as stream:  # never the legacy stream (no capture there)
        data = load(-1)
        got = calls()  # eager: warms every specialisation the graph launches
        settle(buf)
        check(-1, *data, got)
        group.barrier()
        held = len(buf._backend.rt.graph_held)
        capture_and_replay(buf, group, stream, calls, load, check, replays)
        assert len(buf._backend.rt.graph_held) > held, "nothing a graph replays into was held"
    return replays


def node_map(group):
    """The group's rank -> node map when it spans (virtual) nodes, else None (what the reference and the layout take
    as ``rank_to_node``)."""
    return np.asarray(group.node_of_rank) if group.num_nodes > 1 else None


def graph_step_inputs(seed, r, R, num_tokens, hidden, E, topk, nodes):
    """Fresh inputs of every rank for one step of a graph scenario, and rank ``r``'s host arrays to copy into the
    captured ones, in the order (x, topk_idx, topk_weights, tokens per rank, per expert, is_token_in_rank, tokens
    per node: None on one node)."""
    xs, idxs, ws = make_inputs(seed, R, num_tokens, hidden, E, topk)
    lay = reference.get_dispatch_layout(idxs[r], E, R, rank_to_node=nodes)
    host = (xs[r], idxs[r], ws[r], lay.num_tokens_per_rank, lay.num_tokens_per_expert, lay.is_token_in_rank,
            lay.num_tokens_per_rdma_rank if nodes is not None else None)  # fmt: skip
    return xs, idxs, ws, host


def capture_and_replay(buf, group, stream, calls, load, check, replays):
    """The calls captured once on ``stream``, then replayed ``replays`` times, each on fresh inputs (``load(it)``
    copies them into the captured arrays and returns what ``check(it, *that, captured calls' result)`` compares)."""
    stream.begin_capture()
    got = calls()
    graph = stream.end_capture()
    for it in range(replays):
        data = load(it)
        graph.launch(stream)
        settle(buf)
        check(it, *data, got)
    group.barrier()


def expect_argument_errors(cases):
    """Each (call, name): the call raises ArgumentError whose message names ``name``."""
    from epkern.errors import ArgumentError

    for call, name in cases:
        try:
            call()
        except ArgumentError as exc:
            assert name in str(exc), f"error does not name {name}: {exc}"
        else:
            raise AssertionError(f"bad {name} accepted")


def run_bad_inputs(buf, group):
    """Every bad argument raises ArgumentError naming it, before anything is launched; the Buffer stays
    usable (a correct dispatch/combine follows). Across nodes also the tokens per node (missing, dtype, shape)."""
    import cupy

    T, H, E, K = 64, 2048, 8 * group.size, 4
    x = cupy.asarray(np.ones((T, H), BF16))
    idx = cupy.asarray(np.argsort(np.random.default_rng(group.rank).random((T, E)), axis=1)[:, :K].astype(np.int64))
    per_rank, per_node, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    good = dict(num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node, is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert, topk_idx=idx)  # fmt: skip
    across = [
        (lambda: buf.dispatch(x, **{**good, "num_tokens_per_rdma_rank": None}), "num_tokens_per_rdma_rank"),
        (lambda: buf.dispatch(x, **{**good, "num_tokens_per_rdma_rank": per_node.astype(cupy.int64)}),
         "num_tokens_per_rdma_rank"),
        (lambda: buf.dispatch(x, **{**good, "num_tokens_per_rdma_rank": per_node[:1]}), "num_tokens_per_rdma_rank"),
    ] if per_node is not None else []  # fmt: skip
    cases = across + [
        (lambda: buf.dispatch(x.astype(cupy.float32), **good), "x"),
        (lambda: buf.dispatch(x[:, :100], **good), "x"),
        (lambda: buf.dispatch(x[: T // 2], **good), "topk_idx"),
        (lambda: buf.dispatch(x, **{**good, "topk_idx": idx.astype(cupy.int32)}), "topk_idx"),
        (lambda: buf.dispatch(x, **{**good, "topk_weights": cupy.ones((T, K + 1), cupy.float32)}), "topk_weights"),
        (lambda: buf.dispatch(x, **{**good, "is_token_in_rank": in_rank[:, :1]}), "is_token_in_rank"),
        (lambda: buf.dispatch(x, **{**good, "num_worst_tokens": -1}), "num_worst_tokens"),
        (lambda: buf.dispatch(np.ones((T, H), BF16), **good), "x"),
        (lambda: buf.dispatch(x, handle="nope"), "handle"),
        (lambda: buf.get_dispatch_layout(idx, E + 1), "num_experts"),
        (lambda: buf.dispatch(x, **good, allocate_on_comm_stream=True), "allocate_on_comm_stream"),
    ]
    expect_argument_errors(cases)
    recv_x, _, _, _, handle, _ = buf.dispatch(x, **good)
    expect_argument_errors(
        (
            (lambda: buf.combine(recv_x[:1], handle), "x"),
            (lambda: buf.combine(recv_x, handle, topk_weights=cupy.ones((1, K), cupy.float32)), "topk_weights"),
            (lambda: buf.combine(recv_x, handle, bias=cupy.ones((1, H), BF16)), "bias"),
            (lambda: buf.dispatch(x[:1], handle=handle), "x"),
        )
    )
    out, _, _ = buf.combine(recv_x, handle)
    reached = cupy.asnumpy(in_rank).sum(1, dtype=np.float32)[:, None]
    assert np.array_equal(cupy.asnumpy(out).astype(np.float32), np.ones((T, H), np.float32) * reached)


def refusals(buf, group, calls) -> list:
    """``buf.dispatch(x, **args)`` of each (x, args) in ``calls`` (made one by one) raises ArgumentError: the
    messages, in order."""
    from epkern.errors import ArgumentError

    messages = []
    for i, (x, args) in enumerate(calls):
        try:
            buf.dispatch(x, **args)
        except ArgumentError as exc:
            messages.append(str(exc))
        else:
            raise AssertionError(f"rank {group.rank}: refused call {i} was accepted")
    return messages


def run_mismatched_calls(buf, group):
    """Ranks whose dispatch calls differ (rank 1: twice the hidden size; then rank 1: another top-k; then only
    rank 0 has a topk_idx entry out of range): every rank refuses the same call with ArgumentError naming the
    argument, nothing is written past a peer's outputs, and a matching call afterwards is exact. Then with
    num_worst_tokens (no host wait): the dispatch kernel sends nothing to a peer whose call differs and the failure
    raises at the event's synchronize()."""
    import cupy

    from epkern.errors import EpkernError

    T, E = 64, 8 * group.size
    rng = np.random.default_rng(group.rank)

    def inputs(hidden, topk, bad_index=False, num_experts=E):
        x = cupy.asarray(np.ones((T, hidden), BF16))
        idx_np = np.argsort(rng.random((T, num_experts)), axis=1)[:, :topk].astype(np.int64)
        idx = cupy.asarray(idx_np)
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, num_experts)
        if bad_index:
            # Made on the host and copied: a CuPy setitem here would be this thread's first use of that CuPy
            # kernel, whose module load (in-process ranks share one context) waits for the peer's kernel that
            # already spins for this rank (measured on the H100: a 20 s stall, then epochs out of step).
            idx_np[3, 1] = E + 5
            idx = cupy.asarray(idx_np)
        return x, dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                       topk_idx=idx)  # fmt: skip

    # First uses are collective (a rank alone in a kernel's first use waits for the others): both ranks use the
    # layout kernel of top-k 4 and 5 before their calls differ (measured on the H100: without this, rank 1's first
    # top-5 layout waited in its warm-up barrier while rank 0's notify waited for its counts).
    for topk in (4, 5):
        inputs(1024, topk)
    inputs(1024, 4, num_experts=2 * E)
    calls = (
        (1024 * (1 + group.rank), 4, False, E),
        (1024, 4 + group.rank, False, E),
        (1024, 4, group.rank == 0, E),
        (1024, 4, False, E * (1 + group.rank)),
    )
    messages = refusals(buf, group, (inputs(*call) for call in calls))
    assert messages[0].startswith("x: ") and "row bytes" in messages[0], messages
    assert messages[1].startswith("topk_idx: ") and "top-k" in messages[1], messages
    if group.rank == 0:
        assert messages[2].startswith("topk_idx: entry [3, 1] = ") and f"{E + 5} is outside" in messages[2], messages
    else:
        assert messages[2].startswith("topk_idx: ") and "rank 0" in messages[2], messages
    # another number of experts: one notify specialisation for any (experts per rank is an argument of the kernel)
    assert messages[3].startswith("num_tokens_per_expert: ") and "experts per rank" in messages[3], messages
    x, args = inputs(1024, 4)
    recv_x, _, _, _, handle, _ = buf.dispatch(x, **args)
    out, _, _ = buf.combine(recv_x, handle)
    reached = cupy.asnumpy(args["is_token_in_rank"]).sum(1, dtype=np.float32)[:, None]
    assert np.array_equal(cupy.asnumpy(out).astype(np.float32), np.ones((T, 1024), np.float32) * reached)
    # num_worst_tokens: the host does not wait for the counts, the dispatch kernel itself refuses the peer. Both
    # specialisations are used by both ranks first (a first use is collective: a rank alone in it would wait).
    for hidden in (1024, 2048):
        x, args = inputs(hidden, 4)
        buf.dispatch(x, **args, num_worst_tokens=T * group.size)
    cupy.cuda.get_current_stream().synchronize()
    x, args = inputs(1024 * (1 + group.rank), 4)
    _, _, _, _, _, event = buf.dispatch(x, **args, num_worst_tokens=T * group.size, async_finish=True)
    try:
        event.synchronize()
    except EpkernError as exc:
        assert "another row size" in str(exc), exc
        return str(exc)
    raise AssertionError("a mismatched num_worst_tokens dispatch did not raise at its event")


def run_refused_after_early_copy(buf, group):
    """Between processes a non-cached dispatch of a warm shape launches its copy before the host reads the counts
    (gpu/ht_outputs.py). Calls the counts refuse — rank 1 with twice the hidden size, then rank 0 with a topk_idx
    entry out of range — raise ArgumentError on every rank after the copies ran (each rank's copy sends nothing to a
    peer of another shape), the heap holds what it held before, and a matching call afterwards is exact. In-process
    ranks (outputs from CuPy's pool) refuse before the copy: the same outcome."""
    import gc

    import cupy

    T, E = 64, 8 * group.size
    rng = np.random.default_rng(100 + group.rank)

    def inputs(hidden, bad_index=False):
        x = cupy.asarray(np.full((T, hidden), 1 + group.rank, BF16))
        idx_np = np.argsort(rng.random((T, E)), axis=1)[:, :4].astype(np.int64)
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(cupy.asarray(idx_np), E)
        if bad_index:  # made on the host and copied (see run_mismatched_calls)
            idx_np[3, 1] = E + 5
        return x, dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                       topk_idx=cupy.asarray(idx_np))  # fmt: skip

    for hidden in (1024, 2048):  # first uses, agreed by every rank: both shapes warm from here on
        x, args = inputs(hidden)
        buf.dispatch(x, **args)
    cupy.cuda.get_current_stream().synchronize()
    gc.collect()
    heap = buf._backend.rt.heap
    held = heap.in_use if heap is not None else 0
    calls = ((1024 * (2 if group.rank == 1 else 1), False), (1024, group.rank == 0))
    messages = refusals(buf, group, (inputs(*call) for call in calls))
    assert messages[0].startswith("x: ") and "row bytes" in messages[0], messages
    want = "topk_idx: entry [3, 1] = " if group.rank == 0 else "topk_idx: "
    assert messages[1].startswith(want) and (group.rank == 0 or "rank 0" in messages[1]), messages
    gc.collect()
    assert heap is None or heap.in_use == held, f"rank {group.rank}: heap {heap.in_use} bytes in use, {held} before"
    x, args = inputs(1024)
    recv_x, _, _, _, handle, _ = buf.dispatch(x, **args)
    out, _, _ = buf.combine(recv_x, handle)
    # every rank's rows are 1 + its rank: the combine of the rows sent back sums them once per rank they reached
    reached = cupy.asnumpy(args["is_token_in_rank"]).sum(1, dtype=np.float32)[:, None]
    want_out = np.full((T, 1024), 1 + group.rank, np.float32) * reached
    assert np.array_equal(cupy.asnumpy(out).astype(np.float32), want_out), f"rank {group.rank}: combine not exact"
    return messages


def run_absent_peer(buf, group, absent_rank):
    """The absent rank never dispatches; every other rank must raise TimeoutError naming rank, phase and
    the peer within the Buffer's deadline (no hang). Returns the seconds it took (or None when absent)."""
    import time

    import cupy

    from epkern.errors import TimeoutError as EpTimeout

    T, H, E, K = 32, 2048, 8 * group.size, 2
    x = cupy.asarray(np.ones((T, H), BF16))
    idx = cupy.asarray(np.tile(np.arange(K, dtype=np.int64) * (E // K), (T, 1)))
    in_rank = cupy.ones((T, group.size), dtype=cupy.bool_)
    per_rank = cupy.full(group.size, T, dtype=cupy.int32)
    per_expert = cupy.zeros(E, dtype=cupy.int32)
    args = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=idx)
    buf.dispatch(x, **args)  # everyone once, so the kernels are loaded (first use is collective)
    cupy.cuda.get_current_stream().synchronize()
    group.barrier()
    if group.rank == absent_rank:
        return None
    t0 = time.monotonic()
    try:
        buf.dispatch(x, **args)
        cupy.cuda.get_current_stream().synchronize()
        buf.check()
    except EpTimeout as exc:
        took = time.monotonic() - t0
        msg = str(exc)
        assert f"rank {group.rank}" in msg and "peer" in msg, msg
        return took
    raise AssertionError("dispatch with an absent peer did not raise")
