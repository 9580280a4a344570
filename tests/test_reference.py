"""Property tests of the numpy reference (the oracle every GPU test compares against)."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epkern import reference as ref
from epkern.errors import ArgumentError

BF16 = ml_dtypes.bfloat16
FP8 = ml_dtypes.float8_e4m3fn


def routing(rng, t, e, k, p_masked=0.15):
    idx = np.argsort(rng.random((t, e)), axis=1)[:, :k].astype(np.int64)
    idx[rng.random((t, k)) < p_masked] = -1
    return idx


def group_inputs(seed, ranks, tokens, hidden, experts, topk):
    rng = np.random.default_rng(seed)
    xs, idxs, ws = [], [], []
    for _ in range(ranks):
        t = int(rng.integers(0, tokens + 1))
        xs.append(rng.integers(-8, 9, size=(t, hidden)).astype(BF16))
        idxs.append(routing(rng, t, experts, topk))
        ws.append(rng.choice(np.array([0.5, 1, 2], np.float32), size=(t, topk)).astype(np.float32))
    return xs, idxs, ws


cfg = st.tuples(
    st.integers(0, 2**32),
    st.integers(1, 6),
    st.integers(0, 40),
    st.sampled_from([128, 256]),
    st.integers(1, 4),
    st.integers(1, 6),
)


def _experts(ranks, per_rank, topk):
    return max(ranks * per_rank, ranks * ((topk + ranks - 1) // ranks))


# ---------------------------------------------------------------- layout
@settings(max_examples=40, deadline=None)
@given(cfg)
def test_layout_counts_match_brute_force(c):
    seed, R, T, _, per_rank, K = c
    E = _experts(R, per_rank, K)
    K = min(K, E)
    rng = np.random.default_rng(seed)
    idx = routing(rng, T, E, K)
    nodes = [r * 2 // R for r in range(R)] if R > 1 else None
    lay = ref.get_dispatch_layout(idx, E, R, nodes)
    for t in range(T):
        for r in range(R):
            want = any(e >= 0 and e // (E // R) == r for e in idx[t])
            assert lay.is_token_in_rank[t, r] == want
    assert lay.num_tokens_per_rank.tolist() == lay.is_token_in_rank.sum(0).tolist()
    assert lay.num_tokens_per_expert.tolist() == [int((idx == e).sum()) for e in range(E)]
    if nodes is not None and max(nodes) > 0:
        for n in range(max(nodes) + 1):
            cols = [r for r in range(R) if nodes[r] == n]
            assert lay.num_tokens_per_rdma_rank[n] == lay.is_token_in_rank[:, cols].any(1).sum()
    else:
        assert lay.num_tokens_per_rdma_rank is None


@pytest.mark.parametrize(
    "args,match",
    [
        ((np.zeros((2, 2), np.float32), 8, 2), "topk_idx"),
        ((np.full((2, 2), 8), 8, 2), "topk_idx"),
        ((np.zeros((2, 2), np.int64), 7, 2), "num_experts"),
        ((np.zeros((2, 2), np.int64), 8, 0), "num_ranks"),
        ((np.zeros((2, 2), np.int64), 8, 2, [0]), "rank_to_node"),
    ],
)
def test_layout_validation(args, match):
    with pytest.raises(ArgumentError, match=match):
        ref.get_dispatch_layout(*args)


# ---------------------------------------------------------------- high throughput
@settings(max_examples=40, deadline=None)
@given(cfg, st.integers(1, 8))
def test_ht_dispatch_order_dedup_and_combine_identity(c, align):
    seed, R, T, H, per_rank, K = c
    E = _experts(R, per_rank, K)
    K = min(K, E)
    xs, idxs, ws = group_inputs(seed, R, T, H, E, K)
    res = ref.ht_dispatch(xs, idxs, E, topk_weights=ws, expert_alignment=align)
    e_loc = E // R
    for d, out in enumerate(res):
        h = out.handle
        # rows: by source rank, then source token, one per (token, rank)
        keys = list(zip(h.src_rank.tolist(), h.src_idx.tolist(), strict=True))
        assert keys == sorted(keys) and len(set(keys)) == len(keys)
        want = [
            (s, t) for s in range(R) for t in range(len(xs[s])) if any(e >= 0 and e // e_loc == d for e in idxs[s][t])
        ]
        assert keys == want
        for row, (s, t) in enumerate(keys):
            assert np.array_equal(out.recv_x[row].view(np.uint16), xs[s][t].view(np.uint16))
            g = idxs[s][t]
            local = np.where((g >= 0) & (g // e_loc == d), g - d * e_loc, -1)
            assert out.recv_topk_idx[row].tolist() == local.tolist()
            assert out.recv_topk_weights[row].tolist() == np.where(local >= 0, ws[s][t], 0).tolist()
        counts = np.bincount(out.recv_topk_idx[out.recv_topk_idx >= 0], minlength=e_loc)
        assert out.num_recv_tokens_per_expert_list == [-(-int(c) // align) * align for c in counts]
        assert h.rank_prefix_matrix[-1, d] == len(keys)
    # combine(dispatch(x)) == x * ranks reached; weights come back
    comb = ref.ht_combine(
        [r.recv_x for r in res], [r.handle for r in res], topk_weights=[r.recv_topk_weights for r in res]
    )
    for s in range(R):
        reached = res[s].handle.is_token_in_rank.sum(1).astype(np.float32)[:, None]
        want = (np.float32(0) + xs[s].astype(np.float32) * reached).astype(BF16)  # 0 + (-0) = +0
        assert np.array_equal(comb[s][0].view(np.uint16), want.view(np.uint16))
        assert np.array_equal(comb[s][1], np.where(idxs[s] >= 0, ws[s], 0).astype(np.float32))
    # cached dispatch moves new data along the same layout
    xs2 = [(x.astype(np.float32) + 1).astype(BF16) for x in xs]
    cached = ref.ht_cached_dispatch(xs2, [r.handle for r in res])
    for d in range(R):
        h = res[d].handle
        for row in range(len(h.src_idx)):
            assert np.array_equal(cached[d][row].view(np.uint16), xs2[h.src_rank[row]][h.src_idx[row]].view(np.uint16))


def test_ht_worst_tokens_bias_and_fp8_pair():
    rng = np.random.default_rng()
    xs, idxs, ws = group_inputs(int(rng.integers(2**32)), 3, 20, 256, 12, 3)
    res = ref.ht_dispatch(xs, idxs, 12, topk_weights=ws, num_worst_tokens=100)
    for r in res:
        n = r.handle.num_recv_tokens
        assert r.recv_x.shape[0] == 100 and (r.recv_topk_idx[n:] == -1).all() and (r.recv_topk_weights[n:] == 0).all()
        assert r.num_recv_tokens_per_expert_list == []
    b0 = [rng.integers(-4, 5, size=x.shape).astype(BF16) for x in xs]
    b1 = [rng.integers(-4, 5, size=x.shape).astype(BF16) for x in xs]
    comb = ref.ht_combine([r.recv_x for r in res], [r.handle for r in res], bias_0=b0, bias_1=b1)
    for s in range(3):
        reached = res[s].handle.is_token_in_rank.sum(1).astype(np.float32)[:, None]
        want = (
            np.float32(0) + xs[s].astype(np.float32) * reached + b0[s].astype(np.float32) + b1[s].astype(np.float32)
        ).astype(BF16)
        assert np.array_equal(comb[s][0].view(np.uint16), want.view(np.uint16))
    pairs = [ref.per_token_cast_to_fp8(x) for x in xs]
    res8 = ref.ht_dispatch(pairs, idxs, 12)
    for d in range(3):
        h = res8[d].handle
        for row in range(h.num_recv_tokens):
            s, t = h.src_rank[row], h.src_idx[row]
            assert np.array_equal(res8[d].recv_x[0][row].view(np.uint8), pairs[s][0][t].view(np.uint8))
            assert np.array_equal(res8[d].recv_x[1][row], pairs[s][1][t])
    with pytest.raises(ArgumentError, match="num_worst_tokens"):
        ref.ht_dispatch(xs, idxs, 12, num_worst_tokens=1) if max(r.handle.num_recv_tokens for r in res) > 1 else (
            _ for _ in ()
        ).throw(ArgumentError("num_worst_tokens"))


# ---------------------------------------------------------------- low latency
@settings(max_examples=30, deadline=None)
@given(cfg, st.booleans())
def test_ll_dispatch_layout_and_weighted_combine(c, shuffle):
    seed, R, T, H, per_rank, K = c
    E = _experts(R, per_rank, K)
    K = min(K, E)
    xs, idxs, ws = group_inputs(seed, R, T, H, E, K)
    num_max = max(1, max(len(x) for x in xs))
    res = ref.ll_dispatch(xs, idxs, num_max, E)
    e_loc = E // R
    rng = np.random.default_rng(seed)
    for d, out in enumerate(res):
        for e in range(e_loc):
            g = d * e_loc + e
            assert out.recv_count[e] == sum(int((i == g).sum()) for i in idxs)
            pos = 0
            for s in range(R):
                b, n = int(out.layout_range[e, s] >> 32), int(out.layout_range[e, s] & 0xFFFFFFFF)
                assert b == pos and n == int((idxs[s] == g).sum())
                for row in range(b, b + n):
                    t = out.src_info[e, row]
                    assert np.array_equal(out.recv_x[e, row].view(np.uint16), xs[s][t].view(np.uint16))
                pos += n
        if shuffle:  # a kernel may order blocks and rows arbitrarily: canonicalize must undo it
            data, src, lay = out.recv_x.copy(), out.src_info.copy(), out.layout_range.copy()
            for e in range(e_loc):
                n = int(out.recv_count[e])
                perm_blocks = rng.permutation(R)
                pos, new_rows = 0, []
                for s in perm_blocks:
                    b, c_ = int(lay[e, s] >> 32), int(lay[e, s] & 0xFFFFFFFF)
                    rows = b + rng.permutation(c_)
                    new_rows.append(rows)
                    lay[e, s] = (pos << 32) | c_
                    pos += c_
                order = np.concatenate(new_rows) if new_rows else np.zeros(0, int)
                data[e, :n], src[e, :n] = out.recv_x[e, order], out.src_info[e, order]
            rows, csrc, clay = ref.canonicalize_ll_recv(data, out.recv_count, src, lay, R)
            rows0, csrc0, clay0 = ref.canonicalize_ll_recv(
                out.recv_x, out.recv_count, out.src_info, out.layout_range, R
            )
            assert np.array_equal(clay, clay0) and np.array_equal(clay0, out.layout_range)
            for e in range(e_loc):
                assert np.array_equal(csrc[e], csrc0[e])
                assert np.array_equal(rows[e].view(np.uint16), rows0[e].view(np.uint16))
    comb = ref.ll_combine([r.recv_x for r in res], res, idxs, ws)
    for s in range(R):
        acc = np.zeros((len(xs[s]), H), np.float32)
        for k in range(K):
            sel = idxs[s][:, k] >= 0
            acc[sel] += ws[s][sel, k, None] * xs[s][sel].astype(np.float32)
        assert np.array_equal(comb[s].view(np.uint16), acc.astype(BF16).view(np.uint16))


def test_canonicalize_rejects_bad_layouts():
    xs, idxs, _ = group_inputs(3, 2, 10, 128, 4, 2)
    out = ref.ll_dispatch(xs, idxs, 10, 4)[0]
    bad = out.layout_range.copy()
    bad[0, 0] += 1  # count one too many
    with pytest.raises(AssertionError):
        ref.canonicalize_ll_recv(out.recv_x, out.recv_count, out.src_info, bad, 2)
    if out.recv_count[0] >= 2 and all(out.layout_range[0] & 0xFFFFFFFF):
        overl = out.layout_range.copy()
        overl[0, 1] = (0 << 32) | (overl[0, 1] & 0xFFFFFFFF)
        with pytest.raises(AssertionError):
            ref.canonicalize_ll_recv(out.recv_x, out.recv_count, out.src_info, overl, 2)


# ---------------------------------------------------------------- FP8
@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32), st.booleans(), st.floats(1e-3, 1e3))
def test_fp8_round_trip_bounds(seed, round_scale, scale):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((4, 512)) * scale).astype(np.float32).astype(BF16)
    q, s = ref.per_token_cast_to_fp8(x, round_scale=round_scale)
    back = ref.per_token_cast_back(q, s)
    xf = x.astype(np.float32).reshape(4, 4, 128)
    amax = np.maximum(np.abs(xf).max(-1), 1e-4)
    assert (s >= amax / 448 * (1 - 1e-6)).all()
    if round_scale:
        assert (np.frexp(s)[0] == 0.5).all(), "scales must be powers of two"
        assert (s < amax / 448 * 2).all()
    # e4m3: 3 mantissa bits -> relative error <= 2^-4 for normals; subnormal step 2^-9 (times the scale)
    err = np.abs(back.reshape(4, 4, 128) - xf)
    bound = np.maximum(np.abs(xf) * 2.0**-4, 2.0**-10 * s[..., None]) * (1 + 1e-6)
    assert (err <= bound).all()


def test_fp8_goldens_and_ue8m0():
    x = np.full((1, 512), 448, np.float32)
    q, s = ref.per_token_cast_to_fp8(x)
    assert (s == 1).all() and (q.astype(np.float32) == 448).all()
    x = np.zeros((1, 512), np.float32)
    q, s = ref.per_token_cast_to_fp8(x)
    assert np.allclose(s, np.float32(1e-4) / np.float32(448)) and (q.astype(np.float32) == 0).all()
    rng = np.random.default_rng()
    x = (rng.standard_normal((3, 1024)) * 10).astype(BF16)
    q1, s1 = ref.per_token_cast_to_fp8(x, round_scale=True)
    q2, s2 = ref.per_token_cast_to_fp8(x, round_scale=True, use_ue8m0=True)
    assert s2.dtype == np.int32 and s2.shape == (3, 2)
    assert np.array_equal(ref.unpack_ue8m0(s2), s1) and np.array_equal(q1.view(np.uint8), q2.view(np.uint8))
    with pytest.raises(ArgumentError, match="round_scale"):
        ref.per_token_cast_to_fp8(x, use_ue8m0=True)


def test_size_hint_formula():
    got = ref.get_low_latency_rdma_size_hint(128, 7168, 8, 256)
    assert 1.8e9 < got < 2.0e9 and got % 128 == 0
