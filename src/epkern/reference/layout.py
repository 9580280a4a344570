"""Reference ``get_dispatch_layout`` (semantics.md). Integer counting only, so it is exact by construction."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._checks import check_int, check_num_experts, check_rank_to_node, check_topk_idx

__all__ = ["DispatchLayout", "check_topk_idx", "get_dispatch_layout", "token_rank_map"]


class DispatchLayout(NamedTuple):
    num_tokens_per_rank: np.ndarray  # int32 [R]
    num_tokens_per_rdma_rank: np.ndarray | None  # int32 [N]; None for one node
    num_tokens_per_expert: np.ndarray  # int32 [E]
    is_token_in_rank: np.ndarray  # bool [T, R]


def token_rank_map(topk_idx: np.ndarray, num_experts: int, num_ranks: int) -> np.ndarray:
    """bool [T, R]: token t selected at least one expert of rank r (experts [r·E/R, (r+1)·E/R))."""
    in_rank = np.zeros((topk_idx.shape[0], num_ranks), dtype=bool)
    sel = topk_idx >= 0
    rows = np.nonzero(sel)[0]
    in_rank[rows, topk_idx[sel] // (num_experts // num_ranks)] = True
    return in_rank


def get_dispatch_layout(topk_idx, num_experts, num_ranks, rank_to_node=None) -> DispatchLayout:
    """Layout of one rank's tokens.

    ``topk_idx``: integer [T, K] (int64; int32 accepted) with entries in [-1, num_experts).
    ``num_experts`` a multiple of ``num_ranks``. ``rank_to_node``: None, or the node index of each rank
    (length R, nodes 0..N-1, each used); with None or a single node ``num_tokens_per_rdma_rank`` is None.

    - ``num_tokens_per_rank[j]``: tokens with at least one selected expert on rank j;
    - ``num_tokens_per_rdma_rank[n]``: tokens with at least one selected expert on a rank of node n;
    - ``num_tokens_per_expert[e]``: (t, k) selections of expert e (a token listing e twice counts twice);
    - ``is_token_in_rank[t, j]``.
    """
    num_ranks = check_int(num_ranks, "num_ranks", min_value=1)
    num_experts = check_num_experts(num_experts, num_ranks)
    nodes = check_rank_to_node(rank_to_node, num_ranks)
    topk_idx = check_topk_idx(topk_idx, num_experts)
    in_rank = token_rank_map(topk_idx, num_experts, num_ranks)
    per_expert = np.bincount(topk_idx[topk_idx >= 0], minlength=num_experts).astype(np.int32)
    per_rank = in_rank.sum(axis=0, dtype=np.int64).astype(np.int32)
    per_node = None
    if nodes is not None and int(nodes.max()) >= 1:
        num_nodes = int(nodes.max()) + 1
        in_node = np.zeros((topk_idx.shape[0], num_nodes), dtype=bool)
        for r in range(num_ranks):
            in_node[:, nodes[r]] |= in_rank[:, r]
        per_node = in_node.sum(axis=0, dtype=np.int64).astype(np.int32)
    return DispatchLayout(per_rank, per_node, per_expert, in_rank)
