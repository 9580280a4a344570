"""Reference low-latency dispatch / combine across all ranks at once (semantics.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ArgumentError
from .fp8 import BF16, per_token_cast_to_fp8
from .layout import check_topk_idx


@dataclass
class LLDispatchResult:
    recv_x: object  # BF16 [E_loc, R*num_max, H] or (e4m3, scales)
    recv_count: np.ndarray  # int32 [E_loc]
    src_info: np.ndarray  # int32 [E_loc, R*num_max]: source token index of each row
    layout_range: np.ndarray  # int64 [E_loc, R]: (begin << 32) | count
    num_max: int
    num_experts: int
    hidden: int


def ll_dispatch(
    xs, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8=False, round_scale=False, use_ue8m0=False
):
    """Canonical order: per local expert, blocks by source rank ascending, rows by source token ascending.
    No deduplication: each (t, k) selection is one row (a token picking the same expert twice is sent
    twice). Rows past the count are zero. FP8 is the sender's per-token cast."""
    R = len(xs)
    num_max = int(num_max_dispatch_tokens_per_rank)
    if num_experts % R:
        raise ArgumentError(f"num_experts: expected a multiple of {R} ranks, got {num_experts}")
    e_loc = num_experts // R
    H = np.asarray(xs[0]).shape[1]
    cast = [per_token_cast_to_fp8(np.asarray(x), round_scale, use_ue8m0) if use_fp8 else None for x in xs]
    idxs = []
    for r, (x, i) in enumerate(zip(xs, topk_idx, strict=True)):
        if np.asarray(x).shape[0] > num_max:
            raise ArgumentError(
                f"x: rank {r} has {np.asarray(x).shape[0]} tokens, more than num_max_dispatch_tokens_per_rank={num_max}"
            )
        idxs.append(check_topk_idx(i, num_experts, f"topk_idx[{r}]"))
    rows = R * num_max
    results = []
    for d in range(R):
        data = np.zeros((e_loc, rows, H), np.dtype(cast[0][0].dtype) if use_fp8 else BF16)
        scales = None
        if use_fp8:
            sc_cols = cast[0][1].shape[1]
            scales = np.zeros((e_loc, rows, sc_cols), cast[0][1].dtype)
        count = np.zeros(e_loc, np.int32)
        src_info = np.zeros((e_loc, rows), np.int32)
        layout = np.zeros((e_loc, R), np.int64)
        for e in range(e_loc):
            g = d * e_loc + e
            pos = 0
            for s in range(R):
                hit_t, _ = np.nonzero(idxs[s] == g)  # one row per selection, tokens ascending
                hit_t = np.sort(hit_t, kind="stable")
                n = len(hit_t)
                layout[e, s] = (pos << 32) | n
                src_info[e, pos : pos + n] = hit_t
                if use_fp8:
                    data[e, pos : pos + n] = cast[s][0][hit_t]
                    scales[e, pos : pos + n] = cast[s][1][hit_t]
                else:
                    data[e, pos : pos + n] = np.asarray(xs[s])[hit_t]
                pos += n
            count[e] = pos
        recv_x = (data, scales) if use_fp8 else data
        results.append(LLDispatchResult(recv_x, count, src_info, layout, num_max, num_experts, H))
    return results


def canonicalize_ll_recv(recv_x, recv_count, src_info, layout_range, num_ranks):
    """Validate a kernel's LL receive layout and return, per local expert, its valid rows in canonical
    order (blocks by source rank, rows by source token) with canonical src_info and layout_range.

    Returns (rows, src_info, layout_range): lists per expert of row arrays (or (data, scales) tuples) and
    int32 arrays, plus the canonical int64 [E_loc, R] layout. Raises AssertionError on any inconsistency."""
    recv_count = np.asarray(recv_count)
    src_info = np.asarray(src_info)
    layout_range = np.asarray(layout_range).astype(np.int64)
    data, scales = recv_x if isinstance(recv_x, tuple) else (recv_x, None)
    e_loc = recv_count.shape[0]
    out_rows, out_src = [], []
    canon = np.zeros((e_loc, num_ranks), np.int64)
    for e in range(e_loc):
        n = int(recv_count[e])
        begins = layout_range[e] >> 32
        counts = layout_range[e] & 0xFFFFFFFF
        assert counts.sum() == n, f"expert {e}: block counts {counts.tolist()} do not sum to recv_count {n}"
        covered = np.zeros(n, bool)
        order, pos = [], 0
        for s in range(num_ranks):
            b, c = int(begins[s]), int(counts[s])
            if c == 0:
                canon[e, s] = pos << 32
                continue
            assert 0 <= b and b + c <= n, f"expert {e} source {s}: block [{b}, {b + c}) outside [0, {n})"
            assert not covered[b : b + c].any(), f"expert {e} source {s}: block overlaps another"
            covered[b : b + c] = True
            srcs = src_info[e, b : b + c]  # repeats allowed: a token may pick one expert twice
            perm = b + np.argsort(srcs, kind="stable")
            order.append(perm)
            canon[e, s] = (pos << 32) | c
            pos += c
        assert covered.all(), f"expert {e}: rows not covered by any block"
        idx = np.concatenate(order) if order else np.zeros(0, np.int64)
        out_src.append(src_info[e, idx])
        out_rows.append((data[e, idx], scales[e, idx]) if scales is not None else data[e, idx])
    return out_rows, out_src, canon


def ll_combine(ys, dispatch_results, topk_idx, topk_weights):
    """combined_x[t] = Σ_k w[t, k] · y(expert topk_idx[t, k], token t) over k ascending with index ≥ 0:
    float32, the product rounded, then the sum rounded, each step (no FMA); RNE to BF16.
    ``ys[d]`` is indexed like rank d's recv_x (any valid arrangement described by its src_info/layout)."""
    R = len(ys)
    res0 = dispatch_results[0]
    e_loc = res0.num_experts // R
    out = []
    # lookup[d][e]: source rank -> {token: [rows]} for rank d's local expert e
    lookup = []
    for d in range(R):
        res = dispatch_results[d]
        per_e = []
        for e in range(e_loc):
            m = {}
            for s in range(R):
                b, c = int(res.layout_range[e, s] >> 32), int(res.layout_range[e, s] & 0xFFFFFFFF)
                rows = {}
                for row in range(b, b + c):
                    rows.setdefault(int(res.src_info[e, row]), []).append(row)
                m[s] = rows
            per_e.append(m)
        lookup.append(per_e)
    for s in range(R):
        idx = np.asarray(topk_idx[s], np.int64)
        w = np.asarray(topk_weights[s], np.float32)
        T, K = idx.shape
        H = res0.hidden
        acc = np.zeros((T, H), np.float32)
        used = {}
        for t in range(T):
            for k in range(K):
                g = int(idx[t, k])
                if g < 0:
                    continue
                d, e = divmod(g, e_loc)
                key = (d, e, t)
                n_used = used.get(key, 0)
                row = lookup[d][e][s][t][n_used]  # the n-th selection of this expert by t
                used[key] = n_used + 1
                y = np.asarray(ys[d])[e, row].astype(np.float32)
                acc[t] = (acc[t] + (w[t, k] * y).astype(np.float32)).astype(np.float32)
        out.append(acc.astype(BF16))
    return out


def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts) -> int:
    """Bytes per rank: two alternating sets of (send, receive, signal) regions. msg_d = 16 + max(2H,
    H + 4·H/128) bytes per dispatched message; msg_c = 2H + 4·H/128; send = max(num_max·msg_d,
    E·num_max·msg_c); receive = E·num_max·max(msg_d, msg_c); signal = 8 bytes per expert. Total ×2, rounded
    up to a multiple of 128 bytes."""
    num_max, H, E = int(num_max_dispatch_tokens_per_rank), int(hidden), int(num_experts)
    msg_d = 16 + max(2 * H, H + 4 * (H // 128))
    msg_c = 2 * H + 4 * (H // 128)
    send = max(num_max * msg_d, E * num_max * msg_c)
    recv = E * num_max * max(msg_d, msg_c)
    signal = 8 * E
    total = 2 * (send + recv + signal)
    return -(-total // 128) * 128
