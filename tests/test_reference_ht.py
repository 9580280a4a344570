"""The reference high-throughput dispatch / cached dispatch / combine (all ranks at once)."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epkern import reference as ref
from epkern.errors import ArgumentError

BF16 = ml_dtypes.bfloat16
f32 = np.float32


def bits(a):
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def make_inputs(rng, R, t_max, H, E, K, distinct=True):
    """Integer-valued BF16 tokens, routing with masked (-1) entries (repeated experts unless distinct),
    arbitrary float32 weights."""
    xs, idxs, ws = [], [], []
    for _ in range(R):
        T = int(rng.integers(0, t_max + 1))
        xs.append(rng.integers(-8, 9, size=(T, H)).astype(BF16))
        if distinct:
            idx = np.argsort(rng.random((T, E)), axis=1)[:, :K]
        else:
            idx = rng.integers(0, E, size=(T, K))
        idx[rng.random((T, K)) < 0.2] = -1
        idxs.append(idx.astype(np.int64))
        ws.append(rng.standard_normal((T, K)).astype(np.float32))
    return xs, idxs, ws


def expected_rows(idxs, E, R, d):
    """(src rank, src token) received by rank d, brute force."""
    e_loc = E // R
    return [
        (s, t) for s in range(R) for t in range(len(idxs[s])) if any(e >= 0 and e // e_loc == d for e in idxs[s][t])
    ]


problem = st.tuples(
    st.integers(0, 2**32 - 1),  # seed
    st.integers(1, 6),  # ranks
    st.integers(0, 24),  # max tokens per rank
    st.integers(1, 4),  # experts per rank
    st.integers(1, 6),  # top-k
    st.booleans(),  # distinct experts per token
)


@settings(max_examples=150, deadline=None)
@given(problem, st.integers(1, 8), st.sampled_from([8, 128]))
def test_dispatch_combine_cached_properties(p, align, H):
    seed, R, t_max, e_per_rank, K, distinct = p
    E = R * e_per_rank
    K = min(K, E) if distinct else K
    rng = np.random.default_rng(seed)
    xs, idxs, ws = make_inputs(rng, R, t_max, H, E, K, distinct)
    res = ref.ht_dispatch(xs, idxs, E, topk_weights=ws, expert_alignment=align)
    e_loc = E // R

    counts = np.array(
        [[len([1 for s_, _ in expected_rows(idxs, E, R, d) if s_ == s]) for d in range(R)] for s in range(R)]
    )
    for d, out in enumerate(res):
        h = out.handle
        keys = expected_rows(idxs, E, R, d)
        n = len(keys)
        assert h.num_recv_tokens == n and h.num_tokens == len(xs[d]) and h.rank == d
        assert out.recv_x.dtype == BF16 and out.recv_x.shape == (n, H)
        assert out.recv_topk_idx.dtype == np.int64 and out.recv_topk_idx.shape == (n, K)
        assert out.recv_topk_weights.dtype == np.float32 and out.recv_topk_weights.shape == (n, K)
        assert h.src_rank.tolist() == [s for s, _ in keys] and h.src_idx.tolist() == [t for _, t in keys]
        assert h.src_idx.dtype == np.int32 and h.src_rank.dtype == np.int32
        # DeepEP's rank_prefix_matrix: [i, j] = rows j receives from ranks 0..i
        assert h.rank_prefix_matrix.dtype == np.int32
        assert np.array_equal(h.rank_prefix_matrix, np.cumsum(counts, axis=0))
        for row, (s, t) in enumerate(keys):
            assert np.array_equal(bits(out.recv_x[row]), bits(xs[s][t]))
            g = idxs[s][t]
            local = np.where((g >= 0) & (g // e_loc == d), g - d * e_loc, -1)
            assert out.recv_topk_idx[row].tolist() == local.tolist()
            assert np.array_equal(bits(out.recv_topk_weights[row]), bits(np.where(local >= 0, ws[s][t], f32(0))))
        sel = [int(v) for v in out.recv_topk_idx[out.recv_topk_idx >= 0]]
        want_counts = [sel.count(e) for e in range(e_loc)]
        assert out.num_recv_tokens_per_expert_list == [-(-c // align) * align for c in want_counts]
        # the sender view: send_slot[t, j] is the row of (d, t) in rank j's output
        for j in range(R):
            for t in range(len(xs[d])):
                slot = h.send_slot[t, j]
                assert (slot >= 0) == h.is_token_in_rank[t, j]
                if slot >= 0:
                    assert (res[j].handle.src_rank[slot], res[j].handle.src_idx[slot]) == (d, t)

    # combine(dispatch(x)) == x * ranks reached (integer data: exact); the weights come back
    comb = ref.ht_combine(
        [r.recv_x for r in res], [r.handle for r in res], topk_weights=[r.recv_topk_weights for r in res]
    )
    for s in range(R):
        reached = np.array([len({int(e) // e_loc for e in row if e >= 0}) for row in idxs[s]], np.float32)
        want = (f32(0) + xs[s].astype(np.float32) * reached[:, None]).astype(BF16)
        assert comb[s][0].dtype == BF16 and np.array_equal(bits(comb[s][0]), bits(want))
        # every (t, k) weight is nonzero on exactly one rank: the sum (from +0.0) reconstructs it
        want_w = (f32(0) + np.where(idxs[s] >= 0, ws[s], f32(0))).astype(np.float32)
        assert np.array_equal(bits(comb[s][1]), bits(want_w))

    # cached dispatch moves new data along the same layout
    xs2 = [rng.integers(-100, 100, size=x.shape).astype(BF16) for x in xs]
    cached = ref.ht_cached_dispatch(xs2, [r.handle for r in res])
    for d in range(R):
        h = res[d].handle
        assert cached[d].shape == res[d].recv_x.shape
        for row in range(h.num_recv_tokens):
            assert np.array_equal(bits(cached[d][row]), bits(xs2[h.src_rank[row]][h.src_idx[row]]))


def _biased_start(biases, s, t, H):
    """+0.0, then each given bias row of token t of rank s, one float32 step at a time."""
    acc = np.zeros(H, np.float32)
    for b in biases:
        if b is not None and b[s] is not None:
            acc = (acc + b[s][t].astype(np.float32)).astype(np.float32)
    return acc


def brute_combine(ys, handles, biases, s, T, H):
    """float32 scalar-order combine of rank s's tokens found by scanning every rank's src_rank/src_idx."""
    out = np.zeros((T, H), np.float32)
    for t in range(T):
        acc = _biased_start(biases, s, t, H)
        for j in range(len(ys)):
            h = handles[j]
            for row in range(h.num_recv_tokens):
                if h.src_rank[row] == s and h.src_idx[row] == t:
                    acc = (acc + ys[j][row].astype(np.float32)).astype(np.float32)
        out[t] = acc
    return out.astype(BF16)


@settings(max_examples=60, deadline=None)
@given(problem, st.booleans(), st.booleans())
def test_combine_of_arbitrary_rows_matches_brute_force(p, with_b0, with_b1):
    seed, R, t_max, e_per_rank, K, distinct = p
    E = R * e_per_rank
    K = min(K, E) if distinct else K
    rng = np.random.default_rng(seed)
    H = 16
    xs, idxs, _ = make_inputs(rng, R, t_max, H, E, K, distinct)
    res = ref.ht_dispatch(xs, idxs, E)
    # real-valued expert outputs: rounding happens, the order matters
    ys = [(rng.standard_normal((r.handle.num_recv_tokens, H)) * 2.0 ** rng.integers(-8, 8)).astype(BF16) for r in res]
    b0 = [rng.standard_normal(x.shape).astype(BF16) for x in xs] if with_b0 else None
    b1 = [rng.standard_normal(x.shape).astype(BF16) if rng.random() < 0.7 else None for x in xs] if with_b1 else None
    handles = [r.handle for r in res]
    comb = ref.ht_combine(ys, handles, bias_0=b0, bias_1=b1)
    for s in range(R):
        assert comb[s][1] is None
        want = brute_combine(ys, handles, [b0, b1], s, len(xs[s]), H)
        assert np.array_equal(bits(comb[s][0]), bits(want))


def _one_token_to_ranks(R, ranks, H=128):
    """Rank 0 holds one token sent to ``ranks`` (E = R, one expert per rank)."""
    xs = [np.ones((1, H), BF16)] + [np.zeros((0, H), BF16)] * (R - 1)
    k = np.array([ranks], np.int64)
    idxs = [k] + [np.zeros((0, len(ranks)), np.int64)] * (R - 1)
    return ref.ht_dispatch(xs, idxs, R)


def test_combine_order_bias_first_then_ranks_ascending():
    big = 2.0**24
    res = _one_token_to_ranks(3, [0, 1, 2])
    handles = [r.handle for r in res]

    def rows(*vals):
        return [np.full((r.handle.num_recv_tokens, 128), v, BF16) for r, v in zip(res, vals, strict=True)]

    # ascending: (0 + 1) + 2^24 = 2^24 (tie to even), - 2^24 = 0; descending would give 1
    assert (ref.ht_combine(rows(1, big, -big), handles)[0][0].astype(np.float32) == 0).all()
    assert (ref.ht_combine(rows(-big, big, 1), handles)[0][0].astype(np.float32) == 1).all()
    # biases first: (1 + 2^24) - 2^24 = 0 (biases last would give 1)
    b = [np.full((1, 128), 1, BF16), None, None]
    assert (ref.ht_combine(rows(big, -big, 0), handles, bias_0=b)[0][0].astype(np.float32) == 0).all()
    assert (ref.ht_combine(rows(big, -big, 0), handles, bias_1=b)[0][0].astype(np.float32) == 0).all()


def test_combine_final_cast_is_round_to_nearest_even():
    res = _one_token_to_ranks(2, [0, 1])
    handles = [r.handle for r in res]
    ys = [np.full((1, 128), 1, BF16), np.full((1, 128), 2.0**-8, BF16)]  # 1 + 2^-8: a BF16 tie -> 1
    assert (ref.ht_combine(ys, handles)[0][0].astype(np.float32) == 1).all()
    ys[1][:] = 3 * 2.0**-9  # 1 + 3·2^-9 -> 1 + 2^-7
    assert (ref.ht_combine(ys, handles)[0][0].astype(np.float32) == 1 + 2.0**-7).all()


def test_token_sent_nowhere_gets_biases_or_zero():
    xs = [np.full((2, 128), 5, BF16)]
    idxs = [np.array([[-1, -1], [0, -1]], np.int64)]
    res = ref.ht_dispatch(xs, idxs, 2)
    ys = [r.recv_x for r in res]
    out = ref.ht_combine(ys, [r.handle for r in res])[0][0].astype(np.float32)
    assert (out[0] == 0).all() and not np.signbit(out[0]).any() and (out[1] == 5).all()
    b = [np.full((2, 128), 3, BF16)]
    out = ref.ht_combine(ys, [r.handle for r in res], bias_0=b, bias_1=b)[0][0].astype(np.float32)
    assert (out[0] == 6).all() and (out[1] == 11).all()


def test_expert_alignment_rounds_each_count_up():
    # R=1, E=4: local counts 3, 1, 0, 2 (expert 3 listed twice by one token counts twice)
    idx = np.array([[0, 1], [0, 3], [0, -1], [3, 3]], np.int64)
    xs = [np.zeros((4, 8), BF16)]
    assert ref.ht_dispatch(xs, [idx], 4)[0].num_recv_tokens_per_expert_list == [3, 1, 0, 3]
    assert ref.ht_dispatch(xs, [idx], 4, expert_alignment=4)[0].num_recv_tokens_per_expert_list == [4, 4, 0, 4]
    assert ref.ht_dispatch(xs, [idx], 4, expert_alignment=3)[0].num_recv_tokens_per_expert_list == [3, 3, 0, 3]


@settings(max_examples=40, deadline=None)
@given(problem, st.integers(0, 20))
def test_worst_tokens_padding(p, extra):
    seed, R, t_max, e_per_rank, K, distinct = p
    E = R * e_per_rank
    K = min(K, E) if distinct else K
    rng = np.random.default_rng(seed)
    xs, idxs, ws = make_inputs(rng, R, t_max, 128, E, K, distinct)
    plain = ref.ht_dispatch(xs, idxs, E, topk_weights=ws)
    worst = max(r.handle.num_recv_tokens for r in plain) + extra
    if worst == 0:
        worst = 1
    res = ref.ht_dispatch(xs, idxs, E, topk_weights=ws, num_worst_tokens=worst)
    for a, b in zip(plain, res, strict=True):
        n = a.handle.num_recv_tokens
        assert b.handle.num_recv_tokens == n and b.num_recv_tokens_per_expert_list == []
        assert b.recv_x.shape[0] == worst and b.recv_topk_idx.shape[0] == worst and b.handle.src_idx.shape[0] == worst
        assert np.array_equal(bits(b.recv_x[:n]), bits(a.recv_x)) and (b.recv_x[n:].astype(np.float32) == 0).all()
        assert np.array_equal(b.recv_topk_idx[:n], a.recv_topk_idx) and (b.recv_topk_idx[n:] == -1).all()
        assert np.array_equal(bits(b.recv_topk_weights[:n]), bits(a.recv_topk_weights))
        assert (bits(b.recv_topk_weights[n:]) == 0).all()
        assert (b.handle.src_idx[n:] == -1).all() and (b.handle.src_rank[n:] == -1).all()
        assert np.array_equal(b.handle.send_slot, a.handle.send_slot)
    # combine ignores padding rows (garbage there); cached dispatch pads with zeros
    ys = [r.recv_x.copy() for r in res]
    for y, r in zip(ys, res, strict=True):
        y[r.handle.num_recv_tokens :] = 77
    got = ref.ht_combine(ys, [r.handle for r in res])
    want = ref.ht_combine([r.recv_x for r in plain], [r.handle for r in plain])
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(bits(g[0]), bits(w[0]))
    cached = ref.ht_cached_dispatch(xs, [r.handle for r in res])
    for c, r in zip(cached, res, strict=True):
        assert np.array_equal(bits(c), bits(r.recv_x))
    if max(r.handle.num_recv_tokens for r in plain) > 0:
        with pytest.raises(ArgumentError, match="num_worst_tokens"):
            ref.ht_dispatch(xs, idxs, E, num_worst_tokens=max(r.handle.num_recv_tokens for r in plain) - 1 or -1)


def test_worst_tokens_too_small():
    xs = [np.ones((3, 8), BF16)] * 2
    idxs = [np.array([[0], [1], [0]], np.int64)] * 2
    with pytest.raises(ArgumentError, match="num_worst_tokens"):
        ref.ht_dispatch(xs, idxs, 2, num_worst_tokens=3)  # rank 0 receives 4 rows
    assert ref.ht_dispatch(xs, idxs, 2, num_worst_tokens=4)[0].handle.num_recv_tokens == 4


@settings(max_examples=25, deadline=None)
@given(problem)
def test_fp8_pair_passes_through(p):
    seed, R, t_max, e_per_rank, K, distinct = p
    E = R * e_per_rank
    K = min(K, E) if distinct else K
    rng = np.random.default_rng(seed)
    xs, idxs, _ = make_inputs(rng, R, t_max, 256, E, K, distinct)
    xs = [(x.astype(np.float32) * rng.standard_normal(x.shape).astype(np.float32)).astype(BF16) for x in xs]
    pairs = [ref.per_token_cast_to_fp8(x) for x in xs]
    res = ref.ht_dispatch(pairs, idxs, E)
    bf = ref.ht_dispatch(xs, idxs, E)
    cached = ref.ht_cached_dispatch(pairs, [r.handle for r in res])
    for d in range(R):
        data, scales = res[d].recv_x
        h = res[d].handle
        assert data.dtype == ref.FP8 and scales.dtype == np.float32 and scales.shape == (h.num_recv_tokens, 2)
        for row in range(h.num_recv_tokens):
            s, t = h.src_rank[row], h.src_idx[row]
            assert np.array_equal(bits(data[row]), bits(pairs[s][0][t]))
            assert np.array_equal(bits(scales[row]), bits(pairs[s][1][t]))
        assert np.array_equal(res[d].recv_topk_idx, bf[d].recv_topk_idx)
        assert np.array_equal(bits(cached[d][0]), bits(data)) and np.array_equal(bits(cached[d][1]), bits(scales))


# ---------------------------------------------------------------- validation
def _good():
    xs = [np.ones((2, 128), BF16), np.ones((3, 128), BF16)]
    idxs = [np.array([[0, 1], [2, -1]]), np.array([[3, 0], [1, 2], [-1, -1]])]
    ws = [np.ones((2, 2), np.float32), np.ones((3, 2), np.float32)]
    return xs, idxs, ws


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(xs=[a["xs"][0]]), "topk_idx"),
        (lambda a: a.update(xs=[a["xs"][0].astype(np.float32), a["xs"][1]]), r"xs\[0\]"),
        (lambda a: a.update(xs=[a["xs"][0], np.ones((3, 256), BF16)]), r"xs\[1\]"),
        (lambda a: a.update(xs=[ref.per_token_cast_to_fp8(a["xs"][0]), a["xs"][1]]), r"xs\[1\]"),
        (lambda a: a.update(xs=[(ref.per_token_cast_to_fp8(a["xs"][0])[0], np.ones((2, 2), np.float32))] * 2), "xs"),
        (lambda a: a.update(xs=[]), "xs"),
        (lambda a: a.update(topk_idx=[a["topk_idx"][0], a["topk_idx"][1][:2]]), r"topk_idx\[1\]"),
        (lambda a: a.update(topk_idx=[a["topk_idx"][0], np.zeros((3, 3), np.int64)]), r"topk_idx\[1\]"),
        (lambda a: a.update(topk_idx=[a["topk_idx"][0], a["topk_idx"][1] + 2]), r"topk_idx\[1\]"),
        (lambda a: a.update(topk_idx=[a["topk_idx"][0], a["topk_idx"][1].astype(float)]), r"topk_idx\[1\]"),
        (lambda a: a.update(topk_weights=[a["topk_weights"][0], a["topk_weights"][1][:, :1]]), "topk_weights"),
        (lambda a: a.update(topk_weights=[w.astype(np.float64) for w in a["topk_weights"]]), "topk_weights"),
        (lambda a: a.update(num_experts=5), "num_experts"),
        (lambda a: a.update(expert_alignment=0), "expert_alignment"),
        (lambda a: a.update(num_worst_tokens=-1), "num_worst_tokens"),
    ],
)
def test_dispatch_validation(mutate, match):
    xs, idxs, ws = _good()
    args = dict(xs=xs, topk_idx=idxs, num_experts=4, topk_weights=ws)
    ref.ht_dispatch(**args)
    mutate(args)
    with pytest.raises(ArgumentError, match=match):
        ref.ht_dispatch(**args)


def test_combine_and_cached_validation():
    xs, idxs, ws = _good()
    res = ref.ht_dispatch(xs, idxs, 4, topk_weights=ws)
    ys = [r.recv_x for r in res]
    hs = [r.handle for r in res]
    with pytest.raises(ArgumentError, match="handles"):
        ref.ht_combine(ys, hs[::-1])
    with pytest.raises(ArgumentError, match="handles"):
        ref.ht_combine(ys, hs[:1])
    with pytest.raises(ArgumentError, match=r"ys\[0\]"):
        ref.ht_combine([ys[0][:1], ys[1]], hs)
    with pytest.raises(ArgumentError, match=r"ys\[1\]"):
        ref.ht_combine([ys[0], ys[1].astype(np.float32)], hs)
    with pytest.raises(ArgumentError, match="topk_weights"):
        ref.ht_combine(ys, hs, topk_weights=[r.recv_topk_weights[:, :1] for r in res][:1])
    with pytest.raises(ArgumentError, match="bias_0"):
        ref.ht_combine(ys, hs, bias_0=[np.ones((5, 128), BF16), None])
    with pytest.raises(ArgumentError, match=r"xs\[1\]"):
        ref.ht_cached_dispatch([xs[0], xs[1][:1]], hs)
    with pytest.raises(ArgumentError, match="handles"):
        ref.ht_cached_dispatch(xs, ["nope", hs[1]])


def brute_combine_by_node(ys, handles, biases, s, T, H, nodes):
    """The two-level order, one scalar step at a time: biases, then per node ascending a float32 partial of its
    ranks (ascending, from +0.0) rounded to BF16, added only for nodes the token went to."""
    out = np.zeros((T, H), np.float32)
    for t in range(T):
        acc = _biased_start(biases, s, t, H)
        for n in range(int(max(nodes)) + 1):
            part, went = np.zeros(H, np.float32), False
            for j in (j for j in range(len(ys)) if nodes[j] == n):
                h = handles[j]
                for row in range(h.num_recv_tokens):
                    if h.src_rank[row] == s and h.src_idx[row] == t:
                        part, went = (part + ys[j][row].astype(np.float32)).astype(np.float32), True
            if went:
                acc = (acc + part.astype(BF16).astype(np.float32)).astype(np.float32)
        out[t] = acc
    return out.astype(BF16)


@settings(max_examples=60, deadline=None)
@given(problem, st.integers(1, 3), st.booleans())
def test_combine_by_node_matches_the_two_level_brute_force(p, per_node, with_b0):
    """rank_to_node with two or more nodes: the internode order (issue #18), bit for bit on real-valued rows; one
    node (or None) keeps the flat order."""
    seed, R, t_max, e_per_rank, K, distinct = p
    R = per_node * max(1, R // per_node)
    E = R * e_per_rank
    K = min(K, E) if distinct else K
    rng = np.random.default_rng(seed)
    H = 16
    xs, idxs, ws = make_inputs(rng, R, t_max, H, E, K, distinct)
    res = ref.ht_dispatch(xs, idxs, E, topk_weights=ws)
    handles = [r.handle for r in res]
    ys = [(rng.standard_normal((h.num_recv_tokens, H)) * 2.0 ** rng.integers(-8, 8)).astype(BF16) for h in handles]
    b0 = [rng.standard_normal(x.shape).astype(BF16) for x in xs] if with_b0 else None
    nodes = [r // per_node for r in range(R)]
    comb = ref.ht_combine(ys, handles, topk_weights=[r.recv_topk_weights for r in res], bias_0=b0, rank_to_node=nodes)
    flat = ref.ht_combine(ys, handles, bias_0=b0)
    one = ref.ht_combine(ys, handles, bias_0=b0, rank_to_node=[0] * R)
    for s in range(R):
        want = brute_combine_by_node(ys, handles, [b0], s, len(xs[s]), H, nodes) if max(nodes) else flat[s][0]
        assert np.array_equal(bits(comb[s][0]), bits(want))
        assert np.array_equal(bits(one[s][0]), bits(flat[s][0]))
        got_w = np.where(idxs[s] >= 0, ws[s], 0).astype(np.float32)  # each weight comes back from one rank
        assert np.array_equal(comb[s][1], got_w)


def test_combine_by_node_rounds_each_node_partial_once():
    """Rows 1, 2^-8 (node 0) and 2^-8, 0 (node 1): flat, 1 + 2^-8 + 2^-8 = 1 + 2^-7 is a BF16; by node, node 0's
    partial 1 + 2^-8 rounds (tie, to even) to 1 before it travels, and 1 + 2^-8 rounds to 1 again at the end."""
    res = _one_token_to_ranks(4, [0, 1, 2, 3], H=128)
    handles = [r.handle for r in res]
    vals = [1.0, 2.0**-8, 2.0**-8, 0.0]
    ys = [np.full((r.handle.num_recv_tokens, 128), v, BF16) for r, v in zip(res, vals, strict=True)]
    flat = ref.ht_combine(ys, handles)[0][0]
    by_node = ref.ht_combine(ys, handles, rank_to_node=[0, 0, 1, 1])[0][0]
    assert float(flat[0, 0]) == 1.0 + 2.0**-7 and float(by_node[0, 0]) == 1.0
