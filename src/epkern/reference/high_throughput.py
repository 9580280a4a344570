"""Reference high-throughput (HT) dispatch, cached dispatch and combine (semantics.md).

Every function simulates all R ranks at once: arguments and results are lists indexed by rank.

Dispatch is pure data movement (exact). Rank d receives one row per (source rank s, source token t) with
``is_token_in_rank[s][t, d]`` (deduplicated: a token with several experts on d arrives once), ordered by
source rank ascending, then source token ascending.

Combine accumulates in float32 with round-to-nearest-even after every addition, in this order:
``acc = +0.0; acc += bias_0; acc += bias_1; for j = 0..R-1 with is_token_in_rank[t, j]:
acc += float32(ys[j][send_slot[t, j]])``; then one RNE cast to BF16. The weights sum in the same rank order
starting from +0.0. Across nodes (``rank_to_node`` with two or more nodes: the internode path of issue #18) the
sum has two levels: per node n ascending that the token went to, ``part = +0.0; part += float32(ys[j][...])`` over
n's ranks j ascending, then ``acc += float32(bf16(part))`` (the partial crosses the network as BF16); the weights'
partials stay float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ArgumentError
from ._checks import (
    BF16,
    F32,
    FP8,
    check_array,
    check_int,
    check_num_experts,
    check_rank_list,
    check_rank_to_node,
    check_topk_idx,
)
from .layout import token_rank_map

__all__ = ["HTDispatchResult", "HTHandle", "ht_cached_dispatch", "ht_combine", "ht_dispatch"]


@dataclass(eq=False)
class HTHandle:
    """One rank's HT handle.

    As a receiver (rank ``rank``):
      ``rank_prefix_matrix`` int32 [R, R]: entry [i, j] = rows rank j receives from ranks 0..i inclusive
      (column-wise inclusive prefix over source ranks; DeepEP's convention; the same matrix on every rank);
      ``src_idx`` / ``src_rank`` int32 [N]: source token index / source rank of each received row, -1 on
      padding rows (N = ``num_worst_tokens`` when that was given, else ``num_recv_tokens``);
      ``num_recv_tokens``: real received rows.
    As a sender:
      ``is_token_in_rank`` bool [T, R] of this rank's own tokens; ``send_slot`` int32 [T, R]: row of
      rank j's ``recv_x`` that token t landed in, -1 where not sent; ``num_tokens`` = T.
    ``hidden``, ``num_experts``: of the dispatch, for argument checks.
    (DeepEP's per-channel prefix matrices depend on the kernel's channel split and are not modelled.)
    """

    rank_prefix_matrix: np.ndarray
    src_idx: np.ndarray
    src_rank: np.ndarray
    is_token_in_rank: np.ndarray
    send_slot: np.ndarray
    num_recv_tokens: int
    num_tokens: int
    rank: int
    num_ranks: int
    hidden: int
    num_experts: int

    @property
    def num_rows(self) -> int:
        """Rows of this rank's recv_x (padding included)."""
        return len(self.src_idx)


@dataclass(eq=False)
class HTDispatchResult:
    recv_x: object  # BF16 [N, H], or (e4m3 [N, H], float32 [N, H/128]) for FP8 input
    recv_topk_idx: np.ndarray | None  # int64 [N, K]: local expert id or -1
    recv_topk_weights: np.ndarray | None  # float32 [N, K]: weight where recv_topk_idx >= 0, else 0
    num_recv_tokens_per_expert_list: list  # per local expert, rounded up to expert_alignment; [] with worst tokens
    handle: HTHandle


def _split_x(x, name: str):
    """BF16 [T, H] -> (x, None); (e4m3 [T, H], float32 [T, H/128]) -> (data, scales)."""
    if isinstance(x, tuple | list):
        if len(x) != 2:
            raise ArgumentError(f"{name}: expected a BF16 array or an FP8 pair (x_fp8, scales), got {len(x)} items")
        data = check_array(x[0], f"{name}[0]", (FP8,), (None, None))
        if data.shape[1] % 128:
            raise ArgumentError(f"{name}[0]: expected a hidden size that is a multiple of 128, got {data.shape[1]}")
        scales = check_array(x[1], f"{name}[1]", (F32,), (data.shape[0], data.shape[1] // 128))
        return data, scales
    return check_array(x, name, (BF16,), (None, None)), None


def _split_xs(xs, name: str = "xs", num_ranks: int | None = None):
    xs = check_rank_list(xs, name, num_ranks)
    parts = [_split_x(x, f"{name}[{r}]") for r, x in enumerate(xs)]
    fp8 = parts[0][1] is not None
    hidden = parts[0][0].shape[1]
    for r, (data, scales) in enumerate(parts):
        if (scales is not None) != fp8:
            raise ArgumentError(f"{name}[{r}]: expected the same kind (BF16 or FP8 pair) on every rank")
        if data.shape[1] != hidden:
            raise ArgumentError(f"{name}[{r}]: expected hidden size {hidden} (as on rank 0), got {data.shape[1]}")
    return parts, fp8, hidden


def _raw(a: np.ndarray) -> np.ndarray:
    """Unsigned-integer view of the same bytes: rows are moved bit for bit (no float conversion)."""
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def _gather_rows(out: np.ndarray, sources: list, tokens: list) -> None:
    """out[pos:pos + len(tokens[s])] = sources[s][tokens[s]] for s ascending, packed from row 0."""
    raw, pos = _raw(out), 0
    for src, tok in zip(sources, tokens, strict=True):
        np.take(_raw(np.ascontiguousarray(src)), tok, axis=0, out=raw[pos : pos + len(tok)])
        pos += len(tok)


def ht_dispatch(xs, topk_idx, num_experts, topk_weights=None, expert_alignment=1, num_worst_tokens=0):
    """HT dispatch of all ranks. Returns a list of ``HTDispatchResult`` indexed by rank.

    ``xs[r]``: BF16 [T_r, H] or the FP8 pair (e4m3 [T_r, H], float32 [T_r, H/128]) (the same kind on all
    ranks); ``topk_idx[r]``: integer [T_r, K] in [-1, num_experts); ``topk_weights``: None or float32
    [T_r, K] per rank. ``recv_topk_idx`` holds local expert ids (global − d·E_loc) for selections on the
    receiving rank d, -1 elsewhere; ``recv_topk_weights`` the weight there, +0.0 elsewhere. The per-expert
    list counts received (row, k) selections per local expert, each rounded up to ``expert_alignment``.
    ``num_worst_tokens > 0``: every output has that many rows (padding: zero data and scales,
    ``recv_topk_idx`` -1, weights 0, ``src_idx``/``src_rank`` -1) and the per-expert list is ``[]``;
    ArgumentError if a rank receives more rows than that.
    """
    parts, fp8, hidden = _split_xs(xs)
    R = len(parts)
    num_experts = check_num_experts(num_experts, R)
    e_loc = num_experts // R
    expert_alignment = check_int(expert_alignment, "expert_alignment", min_value=1)
    num_worst_tokens = check_int(num_worst_tokens, "num_worst_tokens", min_value=0)
    idx_list = check_rank_list(topk_idx, "topk_idx", R)
    idxs = [check_topk_idx(i, num_experts, f"topk_idx[{r}]", parts[r][0].shape[0]) for r, i in enumerate(idx_list)]
    K = idxs[0].shape[1]
    for r, i in enumerate(idxs):
        if i.shape[1] != K:
            raise ArgumentError(f"topk_idx[{r}]: expected K = {K} columns (as on rank 0), got {i.shape[1]}")
    ws = None
    if topk_weights is not None:
        w_list = check_rank_list(topk_weights, "topk_weights", R)
        ws = [check_array(w, f"topk_weights[{r}]", (F32,), idxs[r].shape) for r, w in enumerate(w_list)]

    in_rank = [token_rank_map(i, num_experts, R) for i in idxs]
    counts = np.stack([m.sum(axis=0, dtype=np.int64) for m in in_rank])  # [src, dst]
    prefix = np.cumsum(counts, axis=0).astype(np.int32)
    recv_n = counts.sum(axis=0)
    if num_worst_tokens:
        over = np.nonzero(recv_n > num_worst_tokens)[0]
        if len(over):
            d = int(over[0])
            raise ArgumentError(
                f"num_worst_tokens: expected at least the received row count, but rank {d} receives "
                f"{int(recv_n[d])} rows, more than {num_worst_tokens}"
            )
    # send_slot[s][t, d] = rows rank d receives from ranks < s + tokens of s before t that go to d
    send_slot = []
    for s in range(R):
        base = counts[:s].sum(axis=0)
        before = np.cumsum(in_rank[s], axis=0, dtype=np.int64) - in_rank[s]
        send_slot.append(np.where(in_rank[s], base[None, :] + before, -1).astype(np.int32))

    results = []
    for d in range(R):
        n = int(recv_n[d])
        rows = num_worst_tokens if num_worst_tokens else n
        toks = [np.nonzero(in_rank[s][:, d])[0] for s in range(R)]  # source tokens, ascending
        src_idx = np.full(rows, -1, np.int32)
        src_rank = np.full(rows, -1, np.int32)
        src_idx[:n] = np.concatenate(toks)
        src_rank[:n] = np.repeat(np.arange(R, dtype=np.int32), counts[:, d])

        data = np.zeros((rows, hidden), parts[0][0].dtype)
        _gather_rows(data, [p[0] for p in parts], toks)
        if fp8:
            scales = np.zeros((rows, hidden // 128), np.float32)
            _gather_rows(scales, [p[1] for p in parts], toks)
            recv_x = (data, scales)
        else:
            recv_x = data

        gidx = np.concatenate([idxs[s][toks[s]] for s in range(R)])  # [n, K] global ids
        here = (gidx >= d * e_loc) & (gidx < (d + 1) * e_loc)  # excludes -1
        recv_idx = np.full((rows, K), -1, np.int64)
        recv_idx[:n] = np.where(here, gidx - d * e_loc, -1)
        recv_w = None
        if ws is not None:
            gw = np.concatenate([ws[s][toks[s]] for s in range(R)])
            recv_w = np.zeros((rows, K), np.float32)
            recv_w[:n] = np.where(here, gw, np.float32(0))
        if num_worst_tokens:
            per_expert = []
        else:
            c = np.bincount(recv_idx[:n][here], minlength=e_loc)
            per_expert = [int(-(-int(v) // expert_alignment) * expert_alignment) for v in c]
        handle = HTHandle(
            rank_prefix_matrix=prefix.copy(),
            src_idx=src_idx,
            src_rank=src_rank,
            is_token_in_rank=in_rank[d],
            send_slot=send_slot[d],
            num_recv_tokens=n,
            num_tokens=parts[d][0].shape[0],
            rank=d,
            num_ranks=R,
            hidden=hidden,
            num_experts=num_experts,
        )
        results.append(HTDispatchResult(recv_x, recv_idx, recv_w, per_expert, handle))
    return results


def _check_handles(handles, num_ranks: int) -> list:
    handles = check_rank_list(handles, "handles", num_ranks)
    for r, h in enumerate(handles):
        if not isinstance(h, HTHandle):
            raise ArgumentError(f"handles[{r}]: expected an HTHandle from ht_dispatch, got {type(h).__name__}")
        if h.rank != r or h.num_ranks != num_ranks:
            raise ArgumentError(
                f"handles[{r}]: expected the handle of rank {r} of {num_ranks}, got rank {h.rank} of {h.num_ranks}"
            )
    return handles


def ht_cached_dispatch(xs, handles):
    """recv_x of every rank for new inputs ``xs`` (BF16 or FP8 pairs, T_r rows as in the handles) moved along
    the layout of ``handles`` (one per rank, from one ``ht_dispatch``): the same rows as that dispatch,
    padding rows (worst-tokens handles) zero."""
    parts, fp8, hidden = _split_xs(xs)
    R = len(parts)
    handles = _check_handles(handles, R)
    for r, h in enumerate(handles):
        if parts[r][0].shape[0] != h.num_tokens:
            got = parts[r][0].shape[0]
            raise ArgumentError(f"xs[{r}]: expected {h.num_tokens} tokens (as in handles[{r}]), got {got}")
    out = []
    for d in range(R):
        rows = handles[d].num_rows
        data = np.zeros((rows, hidden), parts[0][0].dtype)
        scales = np.zeros((rows, hidden // 128), np.float32) if fp8 else None
        for s in range(R):
            slots = handles[s].send_slot[:, d]
            sent = np.nonzero(slots >= 0)[0]
            rows = _row_selector(slots[sent])
            _copy_rows(_raw(data), rows, _raw(parts[s][0]), sent)
            if fp8:
                _copy_rows(scales, rows, parts[s][1], sent)
        out.append((data, scales) if fp8 else data)
    return out


def _row_selector(slots: np.ndarray):
    """A slice when the (ascending) slots are consecutive - they are for reference handles: a source rank's
    rows form one block - else the index array itself."""
    if len(slots) and int(slots[-1]) - int(slots[0]) + 1 == len(slots):
        return slice(int(slots[0]), int(slots[-1]) + 1)
    return slots


def _copy_rows(dst: np.ndarray, rows, src: np.ndarray, tokens: np.ndarray) -> None:
    """dst[rows] = src[tokens], without a temporary when ``rows`` is a slice."""
    if isinstance(rows, slice):
        np.take(np.ascontiguousarray(src), tokens, axis=0, out=dst[rows])
    else:
        dst[rows] = src[tokens]


def _per_rank_optional(values, name: str, num_ranks: int) -> list:
    if values is None:
        return [None] * num_ranks
    return check_rank_list(values, name, num_ranks)


def ht_combine(ys, handles, topk_weights=None, bias_0=None, bias_1=None, rank_to_node=None):
    """HT combine of all ranks: a list indexed by rank of (combined_x BF16 [T_r, H], combined_topk_weights
    float32 [T_r, K] or None).

    ``ys[j]``: BF16 [N_j, H], rows aligned with rank j's recv_x (rows past ``num_recv_tokens`` are ignored);
    ``topk_weights``: None or per rank float32 [N_j, K] (the recv_topk_weights being returned);
    ``bias_0`` / ``bias_1``: None or per rank BF16 (or float32) [T_r, H] or None.
    Order (float32, RNE after every addition): acc = +0.0; acc += bias_0; acc += bias_1; for destination
    ranks j ascending with ``is_token_in_rank[t, j]``: acc += float32(ys[j][send_slot[t, j]]); BF16 RNE. A
    token sent nowhere gets its biases (or +0.0). combined_topk_weights[t] = +0.0 + the returned weight rows
    of the ranks it went to, j ascending. ``rank_to_node`` (node index per rank) with two or more nodes: the
    two-level order of the module doc; None or one node: the order above.
    """
    ys = check_rank_list(ys, "ys")
    R = len(ys)
    nodes = check_rank_to_node(rank_to_node, R)
    groups = [list(range(R))] if nodes is None or int(nodes.max()) == 0 else None
    if groups is None:
        groups = [[j for j in range(R) if nodes[j] == n] for n in range(int(nodes.max()) + 1)]
    handles = _check_handles(handles, R)
    H = None
    y_arrs = []
    for j, y in enumerate(ys):
        y = check_array(y, f"ys[{j}]", (BF16,), (None, None) if H is None else (None, H))
        H = y.shape[1]
        if y.shape[0] < handles[j].num_recv_tokens:
            raise ArgumentError(
                f"ys[{j}]: expected at least {handles[j].num_recv_tokens} rows (as received), got {y.shape[0]}"
            )
        y_arrs.append(y)
    w_arrs = None
    if topk_weights is not None:
        w_list = check_rank_list(topk_weights, "topk_weights", R)
        w_arrs, K = [], None
        for j, w in enumerate(w_list):
            w = check_array(w, f"topk_weights[{j}]", (F32,), (y_arrs[j].shape[0], K))
            K = w.shape[1]
            w_arrs.append(w)
    biases = []
    for name, b in (("bias_0", bias_0), ("bias_1", bias_1)):
        b = _per_rank_optional(b, name, R)
        biases.append(
            [
                None if v is None else check_array(v, f"{name}[{s}]", (BF16, F32), (handles[s].num_tokens, H))
                for s, v in enumerate(b)
            ]
        )

    out = []
    for s in range(R):
        h = handles[s]
        acc = np.zeros((h.num_tokens, H), np.float32)
        for b in biases:
            if b[s] is not None:
                acc = (acc + b[s].astype(np.float32)).astype(np.float32)
        w_acc = np.zeros((h.num_tokens, w_arrs[0].shape[1]), np.float32) if w_arrs is not None else None
        if len(groups) == 1:
            _add_returned(acc, w_acc, h, groups[0], y_arrs, w_arrs)
        else:
            for ranks in groups:  # nodes ascending: a BF16 partial (float32 weights) per node the token went to
                part = np.zeros_like(acc)
                w_part = None if w_acc is None else np.zeros_like(w_acc)
                _add_returned(part, w_part, h, ranks, y_arrs, w_arrs)
                went = np.nonzero((h.send_slot[:, ranks] >= 0).any(axis=1))[0]
                acc[went] += part[went].astype(BF16).astype(np.float32)
                if w_acc is not None:
                    w_acc[went] += w_part[went]
        out.append((acc.astype(BF16), w_acc))
    return out


def _add_returned(acc, w_acc, h: HTHandle, ranks, y_arrs, w_arrs) -> None:
    """acc[t] += float32(ys[j][send_slot[t, j]]) for the ranks ``ranks`` ascending that t went to (weights too)."""
    for j in ranks:
        slots = h.send_slot[:, j]
        sent = np.nonzero(slots >= 0)[0]  # distinct rows: each acc row gets one float32 addition
        rows = _row_selector(slots[sent])
        acc[sent] += y_arrs[j][rows].astype(np.float32)
        if w_acc is not None:
            w_acc[sent] += w_arrs[j][rows]
