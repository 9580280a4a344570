"""Reference high-throughput dispatch / combine across all ranks at once (semantics.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ArgumentError
from .fp8 import BF16, FP8
from .layout import check_topk_idx, token_rank_map


@dataclass
class HTHandle:
    """Per rank. ``rank_prefix_matrix[i, j]``: rows rank j receives from ranks 0..i (inclusive);
    ``src_idx``/``src_rank``: source of each received row (-1 on padding rows); ``is_token_in_rank`` and
    ``send_slot`` (row of my token t in rank j's output, -1 if not sent) describe this rank as a sender."""

    rank_prefix_matrix: np.ndarray
    src_idx: np.ndarray
    src_rank: np.ndarray
    is_token_in_rank: np.ndarray
    send_slot: np.ndarray
    num_recv_tokens: int
    num_tokens: int


@dataclass
class HTDispatchResult:
    recv_x: object  # BF16 [N, H] or (e4m3 [N, H], float32 [N, H/128])
    recv_topk_idx: np.ndarray | None
    recv_topk_weights: np.ndarray | None
    num_recv_tokens_per_expert_list: list
    handle: HTHandle


def _split_x(x, name):
    if isinstance(x, tuple):
        data, scales = (np.asarray(v) for v in x)
        if data.dtype != FP8 or scales.dtype != np.float32 or scales.shape != (data.shape[0], data.shape[1] // 128):
            raise ArgumentError(f"{name}: expected (e4m3 [T, H], float32 [T, H/128])")
        return data, scales
    x = np.asarray(x)
    if x.ndim != 2 or x.dtype != BF16:
        raise ArgumentError(f"{name}: expected a 2-D BF16 array, got {x.dtype} {x.shape}")
    return x, None


def ht_dispatch(xs, topk_idx, num_experts, topk_weights=None, expert_alignment=1, num_worst_tokens=0):
    R = len(xs)
    if len(topk_idx) != R:
        raise ArgumentError(f"topk_idx: expected one array per rank ({R}), got {len(topk_idx)}")
    if num_experts % R:
        raise ArgumentError(f"num_experts: expected a multiple of {R} ranks, got {num_experts}")
    if expert_alignment < 1:
        raise ArgumentError(f"expert_alignment: expected >= 1, got {expert_alignment}")
    e_loc = num_experts // R
    parts = [_split_x(x, f"xs[{r}]") for r, x in enumerate(xs)]
    idxs = [check_topk_idx(i, num_experts, f"topk_idx[{r}]") for r, i in enumerate(topk_idx)]
    for r, (d, _) in enumerate(parts):
        if idxs[r].shape[0] != d.shape[0]:
            raise ArgumentError(f"topk_idx[{r}]: expected {d.shape[0]} rows, got {idxs[r].shape[0]}")
    in_rank = [token_rank_map(i, num_experts, R) for i in idxs]
    counts = np.array([[m[:, j].sum() for j in range(R)] for m in in_rank], dtype=np.int64)  # [src, dst]
    prefix = np.cumsum(counts, axis=0).astype(np.int32)
    send_slot = []
    for s in range(R):
        base = counts[:s].sum(axis=0)
        excl = np.cumsum(in_rank[s], axis=0) - in_rank[s]
        send_slot.append(np.where(in_rank[s], base[None, :] + excl, -1).astype(np.int32))
    results = []
    for d in range(R):
        n = int(counts[:, d].sum())
        rows = n if not num_worst_tokens else num_worst_tokens
        if num_worst_tokens and n > num_worst_tokens:
            raise ArgumentError(f"num_worst_tokens: rank {d} receives {n} rows, more than {num_worst_tokens}")
        src_rank = np.concatenate([np.full(counts[s, d], s, np.int32) for s in range(R)]) if R else []
        src_idx = np.concatenate([np.nonzero(in_rank[s][:, d])[0].astype(np.int32) for s in range(R)])
        hdim = parts[0][0].shape[1] if parts else 0
        data = np.zeros((rows, hdim), parts[0][0].dtype)
        data[:n] = np.concatenate([parts[s][0][in_rank[s][:, d]] for s in range(R)]) if n else data[:0]
        recv_x = data
        if parts and parts[0][1] is not None:
            sc = np.zeros((rows, hdim // 128), np.float32)
            if n:
                sc[:n] = np.concatenate([parts[s][1][in_rank[s][:, d]] for s in range(R)])
            recv_x = (data, sc)
        K = idxs[0].shape[1]
        gidx = np.concatenate([idxs[s][in_rank[s][:, d]] for s in range(R)]) if n else np.zeros((0, K), np.int64)
        local = gidx - d * e_loc
        here = (gidx >= 0) & (local >= 0) & (local < e_loc)
        r_idx = np.full((rows, K), -1, np.int64)
        r_idx[:n] = np.where(here, local, -1)
        r_w = None
        if topk_weights is not None:
            gw = (
                np.concatenate([np.asarray(topk_weights[s], np.float32)[in_rank[s][:, d]] for s in range(R)])
                if n
                else np.zeros((0, K), np.float32)
            )
            r_w = np.zeros((rows, K), np.float32)
            r_w[:n] = np.where(here, gw, np.float32(0))
        if num_worst_tokens:
            per_expert = []
        else:
            c = np.bincount(local[here], minlength=e_loc)
            per_expert = [int(-(-v // expert_alignment) * expert_alignment) for v in c]
        s_idx = np.full(rows, -1, np.int32)
        s_idx[:n] = src_idx
        s_rank = np.full(rows, -1, np.int32)
        s_rank[:n] = src_rank
        handle = HTHandle(prefix, s_idx, s_rank, in_rank[d], send_slot[d], n, parts[d][0].shape[0])
        results.append(HTDispatchResult(recv_x, r_idx, r_w, per_expert, handle))
    return results


def ht_cached_dispatch(xs, handles):
    """recv_x of every rank for new inputs ``xs`` along the layout of ``handles``."""
    R = len(xs)
    parts = [_split_x(x, f"xs[{r}]") for r, x in enumerate(xs)]
    out = []
    for d in range(R):
        h = handles[d]
        rows = len(h.src_idx)
        data = np.zeros((rows, parts[0][0].shape[1]), parts[0][0].dtype)
        sc = np.zeros((rows, parts[0][0].shape[1] // 128), np.float32) if parts[0][1] is not None else None
        for s in range(R):
            slots = handles[s].send_slot[:, d]
            sent = slots >= 0
            data[slots[sent]] = parts[s][0][sent]
            if sc is not None:
                sc[slots[sent]] = parts[s][1][sent]
        out.append((data, sc) if sc is not None else data)
    return out


def ht_combine(ys, handles, topk_weights=None, bias_0=None, bias_1=None):
    """Per rank (combined_x BF16 [T, H], combined_topk_weights float32 [T, K] or None).

    float32, rounded at each step: acc = 0; acc += bias_0; acc += bias_1; then for destination ranks j
    ascending that token t was sent to: acc += ys[j][send_slot[t, j]]; RNE to BF16. ``bias_0``/``bias_1``:
    None or a list per rank (entries may be None)."""
    R = len(ys)
    out = []
    for s in range(R):
        h = handles[s]
        T = h.num_tokens
        H = np.asarray(ys[0]).shape[1]
        acc = np.zeros((T, H), np.float32)
        for b in (bias_0, bias_1):
            if b is not None and b[s] is not None:
                acc = (acc + np.asarray(b[s]).astype(np.float32)).astype(np.float32)
        w_acc = None
        if topk_weights is not None:
            K = np.asarray(topk_weights[0]).shape[1]
            w_acc = np.zeros((T, K), np.float32)
        for j in range(R):
            slots = h.send_slot[:, j]
            sent = slots >= 0
            acc[sent] = (acc[sent] + np.asarray(ys[j])[slots[sent]].astype(np.float32)).astype(np.float32)
            if w_acc is not None:
                w_acc[sent] = (w_acc[sent] + np.asarray(topk_weights[j], np.float32)[slots[sent]]).astype(np.float32)
        out.append((acc.astype(BF16), w_acc))
    return out
