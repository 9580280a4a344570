"""The reference get_dispatch_layout against brute force, edge cases and argument validation."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epkern import reference as ref
from epkern.errors import ArgumentError


def brute_layout(idx, E, R, nodes):
    T, K = idx.shape
    e_loc = E // R
    in_rank = np.zeros((T, R), bool)
    per_expert = [0] * E
    for t in range(T):
        for k in range(K):
            e = int(idx[t, k])
            if e >= 0:
                in_rank[t, e // e_loc] = True
                per_expert[e] += 1
    per_rank = [int(in_rank[:, r].sum()) for r in range(R)]
    per_node = None
    if nodes is not None and max(nodes) > 0:
        per_node = [
            sum(any(in_rank[t, r] for r in range(R) if nodes[r] == n) for t in range(T)) for n in range(max(nodes) + 1)
        ]
    return per_rank, per_node, per_expert, in_rank


@settings(max_examples=150, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 8),
    st.integers(0, 50),
    st.integers(1, 5),
    st.integers(0, 6),
    st.integers(1, 4),
    st.sampled_from([np.int64, np.int32]),
    st.booleans(),
)
def test_layout_matches_brute_force(seed, R, T, e_per_rank, K, n_nodes, dtype, distinct):
    rng = np.random.default_rng(seed)
    E = R * e_per_rank
    if distinct and K <= E:
        idx = np.argsort(rng.random((T, E)), axis=1)[:, :K]
    else:  # repeated experts allowed
        idx = rng.integers(0, E, size=(T, K))
    idx[rng.random((T, K)) < 0.2] = -1
    idx = idx.astype(dtype)
    n_nodes = min(n_nodes, R)
    nodes = None
    if rng.random() < 0.8:
        nodes = list(range(n_nodes)) + rng.integers(0, n_nodes, size=R - n_nodes).tolist()
        rng.shuffle(nodes)
    lay = ref.get_dispatch_layout(idx, E, R, nodes)
    per_rank, per_node, per_expert, in_rank = brute_layout(idx, E, R, nodes)
    assert lay.num_tokens_per_rank.dtype == np.int32 and lay.num_tokens_per_rank.tolist() == per_rank
    assert lay.num_tokens_per_expert.dtype == np.int32 and lay.num_tokens_per_expert.tolist() == per_expert
    assert lay.is_token_in_rank.dtype == np.bool_ and np.array_equal(lay.is_token_in_rank, in_rank)
    if per_node is None:
        assert lay.num_tokens_per_rdma_rank is None
    else:
        assert lay.num_tokens_per_rdma_rank.dtype == np.int32
        assert lay.num_tokens_per_rdma_rank.tolist() == per_node
    # the same answer for int64 and int32 input
    lay64 = ref.get_dispatch_layout(idx.astype(np.int64), E, R, nodes)
    for a, b in zip(lay, lay64, strict=True):
        assert (a is None and b is None) or np.array_equal(a, b)


def test_no_tokens():
    lay = ref.get_dispatch_layout(np.zeros((0, 4), np.int64), 8, 4, [0, 0, 1, 1])
    assert lay.num_tokens_per_rank.tolist() == [0] * 4
    assert lay.num_tokens_per_rdma_rank.tolist() == [0, 0]
    assert lay.num_tokens_per_expert.tolist() == [0] * 8
    assert lay.is_token_in_rank.shape == (0, 4)


def test_all_masked():
    lay = ref.get_dispatch_layout(np.full((5, 3), -1, np.int64), 6, 2)
    assert lay.num_tokens_per_rank.tolist() == [0, 0]
    assert lay.num_tokens_per_expert.tolist() == [0] * 6
    assert not lay.is_token_in_rank.any() and lay.is_token_in_rank.shape == (5, 2)


def test_repeated_expert_counts_twice_but_token_once():
    idx = np.array([[3, 3, -1], [0, 2, 1]], np.int64)  # E=4, R=2: experts 0,1 on rank 0; 2,3 on rank 1
    lay = ref.get_dispatch_layout(idx, 4, 2, [0, 1])
    assert lay.num_tokens_per_expert.tolist() == [1, 1, 1, 2]
    assert lay.num_tokens_per_rank.tolist() == [1, 2]
    assert lay.num_tokens_per_rdma_rank.tolist() == [1, 2]
    assert lay.is_token_in_rank.tolist() == [[False, True], [True, True]]


def test_single_node_gives_none():
    idx = np.array([[0, 5]], np.int64)
    assert ref.get_dispatch_layout(idx, 8, 4, [0, 0, 0, 0]).num_tokens_per_rdma_rank is None
    assert ref.get_dispatch_layout(idx, 8, 4).num_tokens_per_rdma_rank is None


@pytest.mark.parametrize(
    "args,match",
    [
        ((np.zeros((2, 2), np.float32), 8, 2), "topk_idx"),
        ((np.zeros((2, 2), bool), 8, 2), "topk_idx"),
        ((np.zeros(4, np.int64), 8, 2), "topk_idx"),
        ((np.full((2, 2), 8), 8, 2), "topk_idx"),
        ((np.full((2, 2), -2), 8, 2), "topk_idx"),
        ((np.zeros((2, 2), np.int64), 7, 2), "num_experts"),
        ((np.zeros((2, 2), np.int64), 0, 2), "num_experts"),
        ((np.zeros((2, 2), np.int64), 8.0, 2), "num_experts"),
        ((np.zeros((2, 2), np.int64), 8, 0), "num_ranks"),
        ((np.zeros((2, 2), np.int64), 8, 2, [0]), "rank_to_node"),
        ((np.zeros((2, 2), np.int64), 8, 2, [0, 2]), "rank_to_node"),
        ((np.zeros((2, 2), np.int64), 8, 2, [0, -1]), "rank_to_node"),
        ((np.zeros((2, 2), np.int64), 8, 2, ["a", "b"]), "rank_to_node"),
    ],
)
def test_validation_names_the_argument(args, match):
    with pytest.raises(ArgumentError, match=match):
        ref.get_dispatch_layout(*args)
