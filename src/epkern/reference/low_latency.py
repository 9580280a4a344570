"""Reference low-latency (LL) dispatch / combine across all ranks at once (semantics.md), plus the checker
that brings a kernel's arrival-ordered LL receive buffers into the reference's canonical order.

Canonical order (what ``ll_dispatch`` produces; kernels may differ, ``canonicalize_ll_recv`` undoes it):
within local expert e of rank d, one contiguous block per source rank, blocks by source rank ascending and
packed from row 0, rows within a block by source token ascending. ``layout_range[e, s] = (begin << 32) |
count`` (begin = rows of blocks of ranks < s for an empty block too).

Repeated experts: LL does not deduplicate. A token listing expert g at two positions k1 < k2 is two
selections: two rows with the same ``src_info`` in g's block (canonically adjacent). In ``ll_combine`` the
n-th such position k (ascending) takes the n-th of those rows (by row position): so combine pairs rows
with selections even when expert outputs of the copies differ. DeepEP assumes distinct experts per token
(torch.topk), and its combine addresses rows by source token, so GPU comparisons should use distinct
experts or equal outputs for the copies.

Combine arithmetic (float32, RNE, no FMA): ``acc = +0.0; for k = 0..K-1 with topk_idx[t, k] >= 0:
p = float32(w[t, k] · float32(y)); acc = float32(acc + p)``; one RNE cast to BF16. Masked positions (-1)
contribute nothing (their weight is never read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..errors import ArgumentError
from ._checks import BF16, F32, check_array, check_int, check_num_experts, check_rank_list, check_topk_idx
from .fp8 import per_token_cast_to_fp8

__all__ = [
    "CanonicalLLRecv",
    "LLDispatchResult",
    "LLHandle",
    "canonicalize_ll_recv",
    "get_low_latency_rdma_size_hint",
    "ll_combine",
    "ll_dispatch",
]


@dataclass(eq=False)
class LLHandle:
    """What ``ll_combine`` needs of one rank's receive layout. ``src_info`` int32 [E_loc, R·num_max] and
    ``layout_range`` int64 [E_loc, R] may describe any valid arrangement (e.g. a kernel's)."""

    src_info: np.ndarray
    layout_range: np.ndarray
    num_max: int
    num_experts: int
    hidden: int


@dataclass(eq=False)
class LLDispatchResult:
    """One rank's LL receive buffers.

    ``recv_x``: BF16 [E_loc, R·num_max, H], or (e4m3 [E_loc, R·num_max, H], scales float32
    [E_loc, R·num_max, H/128] or, with UE8M0, int32 [E_loc, R·num_max, H/512]); rows past ``recv_count``
    are zero here (unspecified in a kernel's output). ``recv_count`` int32 [E_loc]. ``src_info`` int32
    [E_loc, R·num_max]: source token of each row (-1 past the count). ``layout_range`` int64 [E_loc, R]."""

    recv_x: object
    recv_count: np.ndarray
    src_info: np.ndarray
    layout_range: np.ndarray
    handle: LLHandle

    @property
    def num_max(self) -> int:
        return self.handle.num_max

    @property
    def num_experts(self) -> int:
        return self.handle.num_experts

    @property
    def hidden(self) -> int:
        return self.handle.hidden


class CanonicalLLRecv(NamedTuple):
    """``canonicalize_ll_recv``'s result: per local expert e, ``recv_x[e]`` the valid rows in canonical
    order (an array [recv_count[e], H], or a (data, scales) pair), ``src_info[e]`` int32 [recv_count[e]];
    ``layout_range`` int64 [E_loc, R], canonical."""

    recv_x: list
    src_info: list
    layout_range: np.ndarray


def _selections_by_expert(idx: np.ndarray, num_experts: int):
    """(tokens, starts): token index of every selection (t, k) with idx >= 0, sorted by (expert, t, k);
    selections of expert g are tokens[starts[g]:starts[g + 1]]."""
    t, k = np.nonzero(idx >= 0)  # row-major: t ascending, then k ascending
    g = idx[t, k]
    order = np.argsort(g, kind="stable")
    starts = np.searchsorted(g[order], np.arange(num_experts + 1), side="left")
    return t[order], k[order], starts


def ll_dispatch(
    xs, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8=False, round_scale=False, use_ue8m0=False
):
    """LL dispatch of all ranks in canonical order (module docstring). Returns ``LLDispatchResult`` per rank.

    ``xs[r]``: BF16 [T_r, H], T_r <= ``num_max_dispatch_tokens_per_rank``; ``topk_idx[r]``: integer [T_r, K]
    in [-1, num_experts). No deduplication: every (t, k) with an index >= 0 is one row, so a rank may select
    one expert at most num_max times in all (ArgumentError otherwise: the block would overflow; possible only
    with repeated experts in a row). With ``use_fp8`` each source token is cast on its sender by
    ``per_token_cast_to_fp8(x, round_scale, use_ue8m0)`` (H % 128 == 0; H % 512 == 0 for UE8M0).
    ``round_scale`` / ``use_ue8m0`` are ignored without ``use_fp8``; ``use_ue8m0`` needs ``round_scale``.
    Rows past ``recv_count`` are zero (data and scales); their ``src_info`` is -1.
    """
    xs = check_rank_list(xs, "xs")
    R = len(xs)
    num_max = check_int(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank", min_value=1)
    num_experts = check_num_experts(num_experts, R)
    e_loc = num_experts // R
    if use_ue8m0 and not round_scale:
        raise ArgumentError("use_ue8m0: requires round_scale=True")
    xs = [check_array(x, f"xs[{r}]", (BF16,), (None, None)) for r, x in enumerate(xs)]
    H = xs[0].shape[1]
    for r, x in enumerate(xs):
        if x.shape[1] != H:
            raise ArgumentError(f"xs[{r}]: expected hidden size {H} (as on rank 0), got {x.shape[1]}")
        if x.shape[0] > num_max:
            raise ArgumentError(
                f"xs[{r}]: expected at most num_max_dispatch_tokens_per_rank={num_max} tokens, got {x.shape[0]}"
            )
    if use_fp8 and H % (512 if use_ue8m0 else 128):
        raise ArgumentError(f"xs: expected H a multiple of {512 if use_ue8m0 else 128} for FP8, got {H}")
    idx_list = check_rank_list(topk_idx, "topk_idx", R)
    idxs = [check_topk_idx(i, num_experts, f"topk_idx[{r}]", xs[r].shape[0]) for r, i in enumerate(idx_list)]

    if use_fp8:
        payload = [per_token_cast_to_fp8(x, round_scale=round_scale, use_ue8m0=use_ue8m0) for x in xs]
    else:
        payload = [(x, None) for x in xs]
    raw_src = [p[0].view(np.uint8 if use_fp8 else np.uint16) for p in payload]
    sels = [_selections_by_expert(i, num_experts) for i in idxs]
    for s, (_, _, starts) in enumerate(sels):
        per_expert = np.diff(starts)
        if per_expert.size and per_expert.max() > num_max:
            g = int(per_expert.argmax())
            raise ArgumentError(
                f"topk_idx[{s}]: expert {g} is selected {int(per_expert[g])} times (repeated entries in a row "
                f"count), more than the num_max_dispatch_tokens_per_rank={num_max} rows its block can hold"
            )
    rows = R * num_max
    results = []
    for d in range(R):
        data = np.zeros((e_loc, rows, H), payload[0][0].dtype)
        scales = np.zeros((e_loc, rows, payload[0][1].shape[1]), payload[0][1].dtype) if use_fp8 else None
        raw_data = data.view(np.uint8 if use_fp8 else np.uint16)
        count = np.zeros(e_loc, np.int32)
        src_info = np.full((e_loc, rows), -1, np.int32)
        layout = np.zeros((e_loc, R), np.int64)
        for e in range(e_loc):
            g = d * e_loc + e
            pos = 0
            for s in range(R):
                tokens, _, starts = sels[s]
                hit = tokens[starts[g] : starts[g + 1]]  # ascending (t, then k)
                n = len(hit)
                layout[e, s] = (pos << 32) | n
                src_info[e, pos : pos + n] = hit
                np.take(raw_src[s], hit, axis=0, out=raw_data[e, pos : pos + n])  # bit-for-bit copy
                if use_fp8:
                    np.take(payload[s][1], hit, axis=0, out=scales[e, pos : pos + n])
                pos += n
            count[e] = pos
        handle = LLHandle(src_info, layout, num_max, num_experts, H)
        results.append(LLDispatchResult((data, scales) if use_fp8 else data, count, src_info, layout, handle))
    return results


def _unpack_range(layout_range: np.ndarray):
    """(begin, count) int64 arrays from ``(begin << 32) | count`` (both fields signed 32-bit)."""
    lr = layout_range.astype(np.int64)
    begin = lr >> 32
    count = (lr & 0xFFFFFFFF).astype(np.uint32).view(np.int32).astype(np.int64)
    return begin, count


def _check_ll_blocks(recv_count, src_info, layout_range, num_ranks: int, num_max: int, allow_repeats: bool):
    """Validate an LL receive layout; AssertionError on a violation (raised explicitly: ``python -O`` keeps
    the checks). Returns per expert a list over source ranks of (begin, count)."""
    e_loc = recv_count.shape[0]
    begin, count = _unpack_range(layout_range)
    blocks = []
    for e in range(e_loc):
        n = int(recv_count[e])
        if not 0 <= n <= src_info.shape[1]:
            raise AssertionError(f"expert {e}: recv_count {n} outside [0, {src_info.shape[1]}]")
        covered = np.zeros(n, np.int64)
        per_src = []
        for s in range(num_ranks):
            b, c = int(begin[e, s]), int(count[e, s])
            where = f"expert {e} source rank {s}"
            if c < 0:
                raise AssertionError(f"{where}: negative block count {c}")
            per_src.append((b, c))
            if c == 0:
                continue  # an empty block's begin is not meaningful
            if b < 0 or b + c > n:
                raise AssertionError(f"{where}: block [{b}, {b + c}) outside [0, {n}) (recv_count)")
            covered[b : b + c] += 1
            srcs = src_info[e, b : b + c].astype(np.int64)
            bad = (srcs < 0) | (srcs >= num_max)
            if bad.any():
                raise AssertionError(f"{where}: src_info {srcs[bad][:8].tolist()} outside [0, {num_max})")
            if not allow_repeats:
                uniq, reps = np.unique(srcs, return_counts=True)
                if (reps > 1).any():
                    raise AssertionError(f"{where}: repeated source tokens {uniq[reps > 1][:8].tolist()} in one block")
        if (covered > 1).any():
            raise AssertionError(f"expert {e}: blocks overlap at rows {np.nonzero(covered > 1)[0][:8].tolist()}")
        if (covered == 0).any():
            raise AssertionError(f"expert {e}: rows {np.nonzero(covered == 0)[0][:8].tolist()} of [0, {n}) in no block")
        blocks.append(per_src)
    return blocks


def canonicalize_ll_recv(recv_x, recv_count, src_info, layout_range, num_ranks, *, allow_repeats=False):
    """Validate a kernel's LL receive layout and return its valid rows in canonical order.

    ``recv_x``: [E_loc, R·num_max, H] array (any dtype, e.g. BF16 or FP8 bits as uint8), or a pair (data,
    scales [E_loc, R·num_max, S]) (any strides: DeepEP's scales are a transposed view); ``recv_count``
    [E_loc]; ``src_info`` [E_loc, R·num_max]; ``layout_range`` int64 [E_loc, R]; ``num_ranks`` = R.

    Checks (AssertionError with the expert, source rank and rows on a violation): shapes agree; 0 <=
    recv_count[e] <= R·num_max; every non-empty block lies in [0, recv_count[e]); blocks do not overlap
    and cover [0, recv_count[e]) exactly; src_info in a block within [0, num_max) and, unless
    ``allow_repeats`` (a token that listed one expert twice), unique. Empty blocks' begin is ignored.

    Returns ``CanonicalLLRecv``: per expert the rows block by source rank ascending, within a block by
    source token ascending (stable), the matching src_info, and the canonical layout_range; for
    ``ll_dispatch``'s own output this reproduces its valid rows, src_info and layout_range exactly.
    """
    data, scales = recv_x if isinstance(recv_x, tuple | list) else (recv_x, None)
    data = np.asarray(data)
    recv_count = np.asarray(recv_count)
    src_info = np.asarray(src_info)
    layout_range = np.asarray(layout_range)
    e_loc = recv_count.shape[0] if recv_count.ndim == 1 else -1
    rows = data.shape[1] if data.ndim == 3 else -1
    problems = [
        (recv_count.ndim == 1, f"recv_count: expected shape [E_loc], got {list(recv_count.shape)}"),
        (
            data.ndim == 3 and data.shape[0] == e_loc,
            f"recv_x: expected [{e_loc}, R*num_max, H], got {list(data.shape)}",
        ),
        (rows % num_ranks == 0, f"recv_x: {rows} rows per expert is not a multiple of {num_ranks} ranks"),
        (src_info.shape == (e_loc, rows), f"src_info: expected [{e_loc}, {rows}], got {list(src_info.shape)}"),
        (
            layout_range.shape == (e_loc, num_ranks),
            f"layout_range: expected [{e_loc}, {num_ranks}], got {list(layout_range.shape)}",
        ),
    ]
    if scales is not None:
        scales = np.asarray(scales)
        ok = scales.ndim == 3 and scales.shape[:2] == (e_loc, rows)
        problems.append((ok, f"scales: expected [{e_loc}, {rows}, S], got {list(scales.shape)}"))
    for ok, message in problems:
        if not ok:
            raise AssertionError(message)
    blocks = _check_ll_blocks(recv_count, src_info, layout_range, num_ranks, rows // num_ranks, allow_repeats)
    out_x, out_src = [], []
    canon = np.zeros((e_loc, num_ranks), np.int64)
    for e in range(e_loc):
        order, pos = [], 0
        for s, (b, c) in enumerate(blocks[e]):
            if c:
                order.append(b + np.argsort(src_info[e, b : b + c], kind="stable"))
            canon[e, s] = (pos << 32) | c
            pos += c
        idx = np.concatenate(order) if order else np.zeros(0, np.int64)
        out_src.append(src_info[e, idx].astype(np.int32))
        out_x.append((data[e, idx], scales[e, idx]) if scales is not None else data[e, idx])
    return CanonicalLLRecv(out_x, out_src, canon)


def ll_combine(ys, dispatch_results, topk_idx, topk_weights):
    """LL combine of all ranks: list indexed by rank of combined_x BF16 [T_r, H].

    ``ys[d]``: BF16 [E_loc, R·num_max, H], the expert outputs of rank d indexed like its receive buffer, as
    described by ``dispatch_results[d]`` (an ``LLDispatchResult`` or ``LLHandle``; any valid arrangement).
    ``topk_idx[s]`` / ``topk_weights[s]`` (float32 [T_s, K]): rank s's original routing, as dispatched.
    combined_x[t] = Σ_k w[t, k] · y(expert topk_idx[t, k], token t) in the module docstring's order.
    AssertionError if an arrangement is invalid (the checks of ``canonicalize_ll_recv``, repeats allowed);
    ArgumentError if ``topk_idx`` does not match the rows it describes.
    """
    ys = check_rank_list(ys, "ys")
    R = len(ys)
    handles = check_rank_list(dispatch_results, "dispatch_results", R)
    handles = [getattr(h, "handle", h) for h in handles]
    for d, h in enumerate(handles):
        if not isinstance(h, LLHandle):
            raise ArgumentError(f"dispatch_results[{d}]: expected an LLDispatchResult or LLHandle, got {type(h)}")
    num_max, num_experts, H = handles[0].num_max, handles[0].num_experts, handles[0].hidden
    num_experts = check_num_experts(num_experts, R, "dispatch_results[0].num_experts")
    e_loc = num_experts // R
    ys = [check_array(y, f"ys[{d}]", (BF16,), (e_loc, R * num_max, H)) for d, y in enumerate(ys)]
    idx_list = check_rank_list(topk_idx, "topk_idx", R)
    idxs = [check_topk_idx(i, num_experts, f"topk_idx[{s}]") for s, i in enumerate(idx_list)]
    w_list = check_rank_list(topk_weights, "topk_weights", R)
    ws = [check_array(w, f"topk_weights[{s}]", (F32,), idxs[s].shape) for s, w in enumerate(w_list)]
    for s, i in enumerate(idxs):
        if i.shape[0] > num_max:
            raise ArgumentError(f"topk_idx[{s}]: expected at most num_max={num_max} tokens, got {i.shape[0]}")

    # Validate every rank's arrangement; block (d, e, s) rows sorted by (src token, row).
    blocks = []
    for d, h in enumerate(handles):
        src_info = np.asarray(h.src_info)
        lr = np.asarray(h.layout_range)
        if src_info.shape != (e_loc, R * num_max) or lr.shape != (e_loc, R):
            raise ArgumentError(
                f"dispatch_results[{d}]: expected src_info [{e_loc}, {R * num_max}] and layout_range "
                f"[{e_loc}, {R}], got {list(src_info.shape)} and {list(lr.shape)}"
            )
        _, cnt = _unpack_range(lr)
        per_e = _check_ll_blocks(cnt.sum(axis=1), src_info, lr, R, num_max, allow_repeats=True)
        blocks.append((src_info, per_e))

    out = []
    for s in range(R):
        idx, w = idxs[s], ws[s]
        T, K = idx.shape
        tokens, ks, starts = _selections_by_expert(idx, num_experts)
        row_of = np.full((T, K), -1, np.int64)  # row in the destination's expert buffer
        for g in range(num_experts):
            sel_t, sel_k = tokens[starts[g] : starts[g + 1]], ks[starts[g] : starts[g + 1]]
            d, e = divmod(g, e_loc)
            src_info, per_e = blocks[d]
            b, c = per_e[e][s]
            block_src = src_info[e, b : b + c].astype(np.int64)
            order = np.argsort(block_src, kind="stable")
            if c != len(sel_t) or not np.array_equal(block_src[order], sel_t):
                raise ArgumentError(
                    f"topk_idx[{s}]: the selections of expert {g} (tokens {sel_t[:8].tolist()}) do not match "
                    f"rank {d}'s receive block (source tokens {np.sort(block_src)[:8].tolist()})"
                )
            row_of[sel_t, sel_k] = b + order  # n-th selection (k ascending) -> n-th row of that token
        acc = np.zeros((T, H), np.float32)
        for k in range(K):
            valid = idx[:, k] >= 0
            dst, e = np.divmod(idx[:, k], e_loc)
            y = np.zeros((T, H), np.float32)
            for d in range(R):
                m = valid & (dst == d)
                y[m] = ys[d][e[m], row_of[m, k]].astype(np.float32)
            prod = (w[:, k, None] * y).astype(np.float32)
            acc = np.where(valid[:, None], (acc + prod).astype(np.float32), acc)
        out.append(acc.astype(BF16))
    return out


def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts) -> int:
    """Bytes of LL RDMA buffer per rank (semantics.md "LL buffer size hint"; DeepEP's LowLatencyLayout).

    msg_d = 16 + max(2H, H + 4·H/128) (16-byte header, BF16 row or FP8 row + float32 scales);
    msg_c = 2H + 4·H/128; send = max(num_max·msg_d, E·num_max·msg_c); receive = E·num_max·max(msg_d, msg_c);
    signal = 4·E (one int32 count/flag per expert, shared by dispatch and combine);
    total = 2·(send + receive + signal) (two alternating sets), rounded up to a multiple of 128 bytes.
    Independent of ``num_ranks`` (checked only: num_experts must be a multiple of it). H % 128 == 0.
    """
    num_max = check_int(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank", min_value=1)
    H = check_int(hidden, "hidden", min_value=128)
    if H % 128:
        raise ArgumentError(f"hidden: expected a multiple of 128, got {H}")
    R = check_int(num_ranks, "num_ranks", min_value=1)
    E = check_num_experts(num_experts, R)
    msg_d = 16 + max(2 * H, H + 4 * (H // 128))
    msg_c = 2 * H + 4 * (H // 128)
    send = max(num_max * msg_d, E * num_max * msg_c)
    recv = E * num_max * max(msg_d, msg_c)
    signal = 4 * E
    total = 2 * (send + recv + signal)
    return -(-total // 128) * 128
