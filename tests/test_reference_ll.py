"""The reference low-latency dispatch / canonicalisation / combine and the LL buffer size hint."""

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


def make_inputs(rng, R, num_max, H, E, K, distinct=True):
    xs, idxs, ws = [], [], []
    for _ in range(R):
        T = int(rng.integers(0, num_max + 1))
        xs.append(rng.integers(-8, 9, size=(T, H)).astype(BF16))
        idx = np.argsort(rng.random((T, E)), axis=1)[:, :K] if distinct else rng.integers(0, E, size=(T, K))
        idx[rng.random((T, K)) < 0.2] = -1
        for g in range(E):  # repeated experts: keep each (rank, expert) block within num_max rows
            t, k = np.nonzero(idx == g)
            idx[t[num_max:], k[num_max:]] = -1
        idxs.append(idx.astype(np.int64))
        ws.append(rng.choice(np.array([0.5, 1, 2, -1], np.float32), size=(T, K)))
    return xs, idxs, ws


def unpack_range(lr):
    return int(lr >> 32), int(lr & 0xFFFFFFFF)


def shuffle_arrangement(rng, out, R, garbage=True):
    """A kernel-like arrangement of one rank's receive buffers: block order and rows within blocks permuted,
    rows past the count garbage. Returns (recv_x, src_info, layout_range, perm) with perm[e][new] = old."""
    data0, scales0 = out.recv_x if isinstance(out.recv_x, tuple) else (out.recv_x, None)
    data, src, lay = data0.copy(), out.src_info.copy(), out.layout_range.copy()
    scales = None if scales0 is None else scales0.copy()
    perms = []
    for e in range(data.shape[0]):
        n = int(out.recv_count[e])
        pos, order = 0, []
        for s in rng.permutation(R):
            b, c = unpack_range(out.layout_range[e, s])
            order.append(b + rng.permutation(c))
            lay[e, s] = (pos << 32) | c if c else (int(rng.integers(0, 1000)) << 32)  # empty: any begin
            pos += c
        order = np.concatenate(order).astype(np.int64)
        perms.append(order)
        data[e, :n], src[e, :n] = data0[e, order], out.src_info[e, order]
        if scales is not None:
            scales[e, :n] = scales0[e, order]
        if garbage:
            data.view(np.uint8)[e, n:] = rng.integers(0, 256, size=data.view(np.uint8)[e, n:].shape)
            src[e, n:] = rng.integers(-5, 5, size=src.shape[1] - n)
    recv_x = data if scales is None else (data, scales)
    return recv_x, src, lay, perms


problem = st.tuples(
    st.integers(0, 2**32 - 1),  # seed
    st.integers(1, 5),  # ranks
    st.integers(1, 12),  # num_max
    st.integers(1, 4),  # experts per rank
    st.integers(1, 5),  # top-k
    st.booleans(),  # distinct experts per token
)


def _dims(p):
    seed, R, num_max, e_per_rank, K, distinct = p
    E = R * e_per_rank
    return seed, R, num_max, E, (min(K, E) if distinct else K), distinct


@settings(max_examples=120, deadline=None)
@given(problem)
def test_dispatch_canonical_layout(p):
    seed, R, num_max, E, K, distinct = _dims(p)
    H = 8
    rng = np.random.default_rng(seed)
    xs, idxs, _ = make_inputs(rng, R, num_max, H, E, K, distinct)
    res = ref.ll_dispatch(xs, idxs, num_max, E)
    e_loc = E // R
    for d, out in enumerate(res):
        assert out.recv_x.dtype == BF16 and out.recv_x.shape == (e_loc, R * num_max, H)
        assert (
            out.recv_count.dtype == np.int32 and out.src_info.dtype == np.int32 and out.layout_range.dtype == np.int64
        )
        for e in range(e_loc):
            g = d * e_loc + e
            pos = 0
            for s in range(R):
                # one row per (t, k) selection, tokens ascending (a token listing g twice: two adjacent rows)
                want = [t for t in range(len(xs[s])) for k in range(K) if idxs[s][t, k] == g]
                b, c = unpack_range(out.layout_range[e, s])
                assert (b, c) == (pos, len(want))
                assert out.src_info[e, b : b + c].tolist() == want
                for row, t in zip(range(b, b + c), want, strict=True):
                    assert np.array_equal(bits(out.recv_x[e, row]), bits(xs[s][t]))
                pos += c
            assert out.recv_count[e] == pos
            assert (bits(out.recv_x[e, pos:]) == 0).all() and (out.src_info[e, pos:] == -1).all()


@settings(max_examples=100, deadline=None)
@given(problem, st.sampled_from(["bf16", "fp8", "ue8m0"]))
def test_canonicalize_undoes_any_arrangement(p, mode):
    seed, R, num_max, E, K, distinct = _dims(p)
    rng = np.random.default_rng(seed)
    H = 512 if mode != "bf16" else 16
    xs, idxs, _ = make_inputs(rng, R, num_max, H, E, K, distinct)
    fp8 = mode != "bf16"
    res = ref.ll_dispatch(xs, idxs, num_max, E, use_fp8=fp8, round_scale=mode == "ue8m0", use_ue8m0=mode == "ue8m0")
    for out in res:
        want = ref.canonicalize_ll_recv(
            out.recv_x, out.recv_count, out.src_info, out.layout_range, R, allow_repeats=True
        )
        assert np.array_equal(want.layout_range, out.layout_range)
        recv_x, src, lay, _ = shuffle_arrangement(rng, out, R)
        if fp8:  # DeepEP's scales are a transposed (column-major) view
            recv_x = (recv_x[0], np.ascontiguousarray(recv_x[1].transpose(0, 2, 1)).transpose(0, 2, 1))
        got = ref.canonicalize_ll_recv(recv_x, out.recv_count, src, lay, R, allow_repeats=not distinct)
        assert np.array_equal(got.layout_range, want.layout_range)
        for e in range(len(out.recv_count)):
            n = int(out.recv_count[e])
            assert np.array_equal(got.src_info[e], out.src_info[e, :n]) and np.array_equal(
                want.src_info[e], got.src_info[e]
            )
            if fp8:
                assert np.array_equal(bits(got.recv_x[e][0]), bits(out.recv_x[0][e, :n]))
                assert np.array_equal(bits(got.recv_x[e][1]), bits(out.recv_x[1][e, :n]))
            else:
                assert np.array_equal(bits(got.recv_x[e]), bits(out.recv_x[e, :n]))


def brute_ll_combine(ys_fn, xs, idxs, ws, s):
    """float64 weighted sum of y(g, token) over valid k (exact for the test's data), then BF16."""
    T, K = idxs[s].shape
    acc = np.zeros((T, xs[s].shape[1]), np.float64)
    for t in range(T):
        for k in range(K):
            g = int(idxs[s][t, k])
            if g >= 0:
                acc[t] += float(ws[s][t, k]) * ys_fn(g, xs[s][t].astype(np.float64))
    return acc.astype(np.float32).astype(BF16)


@settings(max_examples=120, deadline=None)
@given(problem, st.booleans())
def test_combine_weighted_sum_on_any_arrangement(p, shuffle):
    seed, R, num_max, E, K, distinct = _dims(p)
    rng = np.random.default_rng(seed)
    H = 16
    xs, idxs, ws = make_inputs(rng, R, num_max, H, E, K, distinct)
    res = ref.ll_dispatch(xs, idxs, num_max, E)
    e_loc = E // R
    # expert g's output: its input times (g % 3 + 1) - integers, so every float32 sum is exact
    ys, dispatched = [], []
    for d, out in enumerate(res):
        factor = (np.arange(e_loc) + d * e_loc) % 3 + 1
        if shuffle:
            recv_x, src, lay, _ = shuffle_arrangement(rng, out, R)
            handle = ref.LLHandle(src, lay, out.num_max, out.num_experts, out.hidden)
        else:
            recv_x, handle = out.recv_x, out
        with np.errstate(invalid="ignore", over="ignore"):  # garbage rows past the counts
            y = (recv_x.astype(np.float32) * factor[:, None, None]).astype(BF16)
        ys.append(y)
        dispatched.append(handle)
    # masked positions' weights must never be read
    ws = [np.where(i >= 0, w, f32(np.nan)).astype(np.float32) for i, w in zip(idxs, ws, strict=True)]
    comb = ref.ll_combine(ys, dispatched, idxs, ws)
    for s in range(R):
        want = brute_ll_combine(lambda g, x: x * (g % 3 + 1), xs, idxs, ws, s)
        assert comb[s].dtype == BF16 and comb[s].shape == xs[s].shape
        assert np.array_equal(bits(comb[s]), bits(want))


def _single_token(K_experts, H=128):
    """R=2, E=4 (2 per rank): rank 0 has one token selecting ``K_experts``; rank 1 has none."""
    xs = [np.ones((1, H), BF16), np.zeros((0, H), BF16)]
    idxs = [np.array([K_experts], np.int64), np.zeros((0, len(K_experts)), np.int64)]
    return xs, idxs, ref.ll_dispatch(xs, idxs, 2, 4)


def _ys_with(res, values):
    """ys where the row of (global expert g, source rank 0) holds values[g] (rows in canonical order)."""
    ys = [np.zeros_like(r.recv_x) for r in res]
    for g, v in values.items():
        d, e = divmod(g, 2)
        b, c = unpack_range(res[d].layout_range[e, 0])
        for i, row in enumerate(range(b, b + c)):
            ys[d][e, row] = v[i] if isinstance(v, list) else v
    return ys


def test_combine_order_is_k_ascending_without_fma():
    big = 2.0**24
    xs, idxs, res = _single_token([0, 2, 3])
    w = [np.ones((1, 3), np.float32), np.zeros((0, 3), np.float32)]
    # (0 + 1) + 2^24 = 2^24 (tie to even), then - 2^24 = 0; another order would give 1
    out = ref.ll_combine(_ys_with(res, {0: 1, 2: big, 3: -big}), res, idxs, w)[0]
    assert (out.astype(np.float32) == 0).all()
    # product rounded before the add: 1 + float32((1 + 2^-23)(1 + 2^-7)) = 2 + 2^-7 + 2^-23 -> 2 + 2^-7 (tie,
    # even), a BF16 tie -> 2. A fused multiply-add would keep the 2^-30 and round up to 2 + 2^-6.
    xs, idxs, res = _single_token([0, 2])
    w = [np.array([[1, 1 + 2.0**-23]], np.float32), np.zeros((0, 2), np.float32)]
    out = ref.ll_combine(_ys_with(res, {0: 1, 2: 1 + 2.0**-7}), res, idxs, w)[0]
    assert (out.astype(np.float32) == 2).all()


def test_repeated_expert_pairs_positions_with_rows_in_order():
    xs, idxs, res = _single_token([1, -1, 1])
    assert res[0].recv_count.tolist() == [0, 2] and res[0].src_info[1, :2].tolist() == [0, 0]
    w = [np.array([[1, 5, 2]], np.float32), np.zeros((0, 3), np.float32)]
    ys = _ys_with(res, {1: [1, 10]})
    assert (ref.ll_combine(ys, res, idxs, w)[0].astype(np.float32) == 21).all()  # 1·1 + 2·10
    ys[0][1, [0, 1]] = ys[0][1, [1, 0]]  # the rows in the other order: the first row pairs with k = 0
    assert (ref.ll_combine(ys, res, idxs, w)[0].astype(np.float32) == 12).all()
    with pytest.raises(AssertionError, match="repeated"):
        ref.canonicalize_ll_recv(res[0].recv_x, res[0].recv_count, res[0].src_info, res[0].layout_range, 2)


def test_combine_rejects_routing_that_does_not_match_the_layout():
    xs, idxs, res = _single_token([0, 2])
    w = [np.ones((1, 2), np.float32), np.zeros((0, 2), np.float32)]
    ys = [r.recv_x for r in res]
    with pytest.raises(ArgumentError, match=r"topk_idx\[0\]"):
        ref.ll_combine(ys, res, [np.array([[0, 3]]), idxs[1]], w)
    with pytest.raises(ArgumentError, match=r"ys\[1\]"):
        ref.ll_combine([ys[0], ys[1][:, :1]], res, idxs, w)
    with pytest.raises(ArgumentError, match="topk_weights"):
        ref.ll_combine(ys, res, idxs, [w[0].astype(np.float64), w[1]])


@settings(max_examples=25, deadline=None)
@given(problem, st.booleans(), st.booleans())
def test_fp8_dispatch_casts_each_source_token(p, round_scale, ue8m0):
    seed, R, num_max, E, K, distinct = _dims(p)
    ue8m0 = ue8m0 and round_scale
    rng = np.random.default_rng(seed)
    H = 512
    xs, idxs, _ = make_inputs(rng, R, num_max, H, E, K, distinct)
    xs = [(x.astype(np.float32) * rng.standard_normal(x.shape).astype(np.float32) * 100).astype(BF16) for x in xs]
    casts = [ref.per_token_cast_to_fp8(x, round_scale=round_scale, use_ue8m0=ue8m0) for x in xs]
    res = ref.ll_dispatch(xs, idxs, num_max, E, use_fp8=True, round_scale=round_scale, use_ue8m0=ue8m0)
    e_loc = E // R
    for out in res:
        data, scales = out.recv_x
        assert data.dtype == ref.FP8 and data.shape == (e_loc, R * num_max, H)
        assert scales.dtype == (np.int32 if ue8m0 else np.float32)
        assert scales.shape == (e_loc, R * num_max, H // 512 if ue8m0 else H // 128)
        for e in range(e_loc):
            for s in range(R):
                b, c = unpack_range(out.layout_range[e, s])
                for row in range(b, b + c):
                    t = out.src_info[e, row]
                    assert np.array_equal(bits(data[e, row]), bits(casts[s][0][t]))
                    assert np.array_equal(bits(scales[e, row]), bits(casts[s][1][t]))
            n = out.recv_count[e]
            assert (bits(data[e, n:]) == 0).all() and (bits(scales[e, n:]) == 0).all()


# ---------------------------------------------------------------- canonicalize rejects broken layouts
def _base():
    xs = [np.ones((3, 16), BF16), np.ones((2, 16), BF16)]
    idxs = [np.array([[0], [0], [1]]), np.array([[0], [0]])]
    out = ref.ll_dispatch(xs, idxs, 3, 2)[0]  # expert 0: 2 rows from rank 0, 2 from rank 1
    return out.recv_x.copy(), out.recv_count.copy(), out.src_info.copy(), out.layout_range.copy()


def _corrupt(kind):
    x, cnt, src, lay = _base()
    if kind == "count_too_big":
        lay[0, 0] += 1
    elif kind == "overlap":
        lay[0, 1] = (1 << 32) | 2
    elif kind == "gap":
        lay[0, 1] = (2 << 32) | 1
    elif kind == "outside":
        lay[0, 1] = (3 << 32) | 2
    elif kind == "negative_begin":
        lay[0, 1] = (-1 << 32) | 2
    elif kind == "negative_count":
        lay[0, 1] = (2 << 32) | 0xFFFFFFFF
    elif kind == "recv_count":
        cnt[0] = 7
    elif kind == "repeat":
        src[0, 3] = src[0, 2]
    elif kind == "src_range":
        src[0, 0] = 3  # num_max = 3
    elif kind == "src_negative":
        src[0, 1] = -1
    elif kind == "shape":
        src = src[:, :-1]
    return x, cnt, src, lay


@pytest.mark.parametrize(
    "kind",
    [
        "count_too_big",
        "overlap",
        "gap",
        "outside",
        "negative_begin",
        "negative_count",
        "recv_count",
        "repeat",
        "src_range",
        "src_negative",
        "shape",
    ],
)
def test_canonicalize_rejects(kind):
    ref.canonicalize_ll_recv(*_base(), 2)
    with pytest.raises(AssertionError):
        ref.canonicalize_ll_recv(*_corrupt(kind), 2)


# ---------------------------------------------------------------- validation and size hint
def test_dispatch_validation():
    xs = [np.ones((3, 128), BF16), np.ones((2, 128), BF16)]
    idxs = [np.array([[0, 1], [0, 3], [0, 2]]), np.array([[0, 1], [3, 2]])]
    ref.ll_dispatch(xs, idxs, 3, 4)
    with pytest.raises(ArgumentError, match=r"topk_idx\[1\].*expert 0"):  # 4 rows from rank 1 for expert 0
        ref.ll_dispatch(xs, [idxs[0], np.array([[0, 0], [0, 0]])], 3, 4)
    with pytest.raises(ArgumentError, match="num_max_dispatch_tokens_per_rank"):
        ref.ll_dispatch(xs, idxs, 2, 4)
    with pytest.raises(ArgumentError, match="num_max_dispatch_tokens_per_rank"):
        ref.ll_dispatch(xs, idxs, 0, 4)
    with pytest.raises(ArgumentError, match="use_ue8m0"):
        ref.ll_dispatch(xs, idxs, 3, 4, use_fp8=True, use_ue8m0=True)
    with pytest.raises(ArgumentError, match="xs"):
        ref.ll_dispatch(xs, idxs, 3, 4, use_fp8=True, round_scale=True, use_ue8m0=True)  # H = 128 < 512
    with pytest.raises(ArgumentError, match="num_experts"):
        ref.ll_dispatch(xs, idxs, 3, 5)
    with pytest.raises(ArgumentError, match=r"xs\[1\]"):
        ref.ll_dispatch([xs[0], xs[1].astype(np.float32)], idxs, 3, 4)
    with pytest.raises(ArgumentError, match=r"topk_idx\[1\]"):
        ref.ll_dispatch(xs, [idxs[0], idxs[0]], 3, 4)
    with pytest.raises(ArgumentError, match=r"topk_idx\[0\]"):
        ref.ll_dispatch(xs, [idxs[0] + 4, idxs[1]], 3, 4)


def test_size_hint():
    # E = 256, num_max = 128, H = 7168: msg_d = 16 + 14336, msg_c = 14336 + 224;
    # send = recv = 256·128·14560; signal = 4·256; total = 2·(2·477102080 + 1024)
    assert ref.get_low_latency_rdma_size_hint(128, 7168, 8, 256) == 1_908_410_368
    assert ref.get_low_latency_rdma_size_hint(128, 7168, 16, 256) == 1_908_410_368  # independent of R
    for num_max, H, R, E in [(1, 128, 1, 1), (7, 384, 3, 9), (64, 4096, 4, 32)]:
        got = ref.get_low_latency_rdma_size_hint(num_max, H, R, E)
        msg_d = 16 + max(2 * H, H + 4 * H // 128)
        msg_c = 2 * H + 4 * H // 128
        raw = 2 * (max(num_max * msg_d, E * num_max * msg_c) + E * num_max * max(msg_d, msg_c) + 4 * E)
        assert got % 128 == 0 and raw <= got < raw + 128
    a = ref.get_low_latency_rdma_size_hint(64, 4096, 4, 32)
    assert (
        ref.get_low_latency_rdma_size_hint(128, 4096, 4, 32) > a < ref.get_low_latency_rdma_size_hint(64, 4096, 4, 64)
    )
    for args, match in [((0, 128, 1, 1), "num_max"), ((1, 100, 1, 1), "hidden"), ((1, 128, 2, 3), "num_experts")]:
        with pytest.raises(ArgumentError, match=match):
            ref.get_low_latency_rdma_size_hint(*args)
