"""Reference get_dispatch_layout (semantics.md)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._validate import check_int, check_num_experts, check_rank_to_node
from ..errors import ArgumentError


class DispatchLayout(NamedTuple):
    num_tokens_per_rank: np.ndarray  # int32 [R]
    num_tokens_per_rdma_rank: np.ndarray | None  # int32 [N], None for one node
    num_tokens_per_expert: np.ndarray  # int32 [E]
    is_token_in_rank: np.ndarray  # bool [T, R]


def check_topk_idx(topk_idx, num_experts: int, name: str = "topk_idx") -> np.ndarray:
    topk_idx = np.asarray(topk_idx)
    if topk_idx.ndim != 2 or topk_idx.dtype.kind not in "iu":
        raise ArgumentError(f"{name}: expected a 2-D integer array [T, K], got {topk_idx.dtype} {topk_idx.shape}")
    if topk_idx.size and (topk_idx.min() < -1 or topk_idx.max() >= num_experts):
        raise ArgumentError(f"{name}: expected entries in [-1, {num_experts})")
    return topk_idx.astype(np.int64)


def token_rank_map(topk_idx: np.ndarray, num_experts: int, num_ranks: int) -> np.ndarray:
    """bool [T, R]: token t selected at least one expert of rank r."""
    in_rank = np.zeros((topk_idx.shape[0], num_ranks), dtype=bool)
    sel = topk_idx >= 0
    rows = np.nonzero(sel)[0]
    in_rank[rows, topk_idx[sel] // (num_experts // num_ranks)] = True
    return in_rank


def get_dispatch_layout(topk_idx, num_experts, num_ranks, rank_to_node=None) -> DispatchLayout:
    num_ranks = check_int(num_ranks, "num_ranks", min_value=1)
    num_experts = check_num_experts(num_experts, num_ranks)
    nodes = check_rank_to_node(rank_to_node, num_ranks)
    topk_idx = check_topk_idx(topk_idx, num_experts)
    in_rank = token_rank_map(topk_idx, num_experts, num_ranks)
    per_expert = np.bincount(topk_idx[topk_idx >= 0], minlength=num_experts).astype(np.int32)
    per_rank = in_rank.sum(axis=0, dtype=np.int64).astype(np.int32)
    per_node = None
    if nodes is not None and max(nodes) >= 1:
        node_of = np.asarray(nodes)
        in_node = np.zeros((topk_idx.shape[0], max(nodes) + 1), dtype=bool)
        for r in range(num_ranks):
            in_node[:, node_of[r]] |= in_rank[:, r]
        per_node = in_node.sum(axis=0, dtype=np.int64).astype(np.int32)
    return DispatchLayout(per_rank, per_node, per_expert, in_rank)
