"""The layout kernel against the numpy reference, exactly, on the GPU."""

import numpy as np
import pytest

from epkern import reference
from epkern.errors import ArgumentError

pytestmark = pytest.mark.gpu


def _random_topk(rng, num_tokens, num_experts, topk, minus_one_fraction=0.1):
    """Distinct experts per token (as a router gives), some selections masked with -1."""
    scores = rng.random((num_tokens, num_experts))
    idx = np.argsort(scores, axis=1)[:, :topk].astype(np.int64)
    idx[rng.random(idx.shape) < minus_one_fraction] = -1
    return idx


def _check(topk_idx_np, num_experts, num_ranks, rank_to_node=None, dtype=np.int64):
    import cupy

    from epkern.dispatch_layout import get_dispatch_layout

    got = get_dispatch_layout(cupy.asarray(topk_idx_np.astype(dtype)), num_experts, num_ranks, rank_to_node)
    want = reference.get_dispatch_layout(topk_idx_np, num_experts, num_ranks, rank_to_node)
    np.testing.assert_array_equal(cupy.asnumpy(got.num_tokens_per_rank), want.num_tokens_per_rank)
    np.testing.assert_array_equal(cupy.asnumpy(got.num_tokens_per_expert), want.num_tokens_per_expert)
    np.testing.assert_array_equal(cupy.asnumpy(got.is_token_in_rank), want.is_token_in_rank)
    if want.num_tokens_per_rdma_rank is None:
        assert got.num_tokens_per_rdma_rank is None
    else:
        np.testing.assert_array_equal(cupy.asnumpy(got.num_tokens_per_rdma_rank), want.num_tokens_per_rdma_rank)
    assert got.is_token_in_rank.dtype == np.bool_ and got.num_tokens_per_rank.dtype == np.int32


@pytest.mark.parametrize(
    "num_tokens,num_experts,num_ranks,topk",
    [
        (4096, 256, 8, 8),
        (1, 256, 8, 8),
        (0, 64, 8, 4),
        (777, 60, 6, 5),
        (16384, 1024, 64, 16),
        (16384, 1024, 8, 16),
        (3000, 32, 32, 1),
        (5000, 12, 3, 12),
    ],
)
def test_random(num_tokens, num_experts, num_ranks, topk):
    rng = np.random.default_rng()
    _check(_random_topk(rng, num_tokens, num_experts, topk), num_experts, num_ranks)


def test_int32_indices_and_nodes():
    rng = np.random.default_rng()
    idx = _random_topk(rng, 2048, 128, 8)
    _check(idx, 128, 16, rank_to_node=[r // 4 for r in range(16)], dtype=np.int32)
    _check(idx, 128, 16, rank_to_node=[r % 2 for r in range(16)])


def test_skewed_all_to_one_expert():
    idx = np.full((16384, 16), -1, dtype=np.int64)
    idx[:, 0] = 17
    _check(idx, 1024, 8)
    idx[:, :] = 5  # every selection the same expert (duplicates inside a token, too)
    _check(idx, 256, 8)


def test_all_minus_one():
    _check(np.full((1000, 8), -1, dtype=np.int64), 256, 8)


def test_workspace_reused_across_calls_and_streams():
    import cupy

    rng = np.random.default_rng()
    for _ in range(3):
        _check(_random_topk(rng, 1500, 64, 4), 64, 8)
    with cupy.cuda.Stream():
        _check(_random_topk(rng, 1500, 64, 4), 64, 8)


def test_out_of_range_index_raises():
    import cupy

    from epkern.dispatch_layout import get_dispatch_layout

    idx = np.zeros((10, 2), dtype=np.int64)
    idx[3, 1] = 64
    with pytest.raises(ArgumentError, match="topk_idx"):
        get_dispatch_layout(cupy.asarray(idx), 64, 8)
    idx[3, 1] = -2
    with pytest.raises(ArgumentError, match="topk_idx"):
        get_dispatch_layout(cupy.asarray(idx), 64, 8)
    _check(np.zeros((10, 2), dtype=np.int64), 64, 8)  # workspace left clean after the errors


@pytest.mark.parametrize(
    "args,match",
    [
        ((np.zeros((4, 2), np.int64), 64, 8), "GPU array"),
        (("float", 64, 8), "dtype"),
        (("1d", 64, 8), "dimensions"),
        (("ok", 60, 8), "num_experts"),
        (("ok", 64, 0), "num_ranks"),
        (("ok", 64, 8, [0, 1]), "rank_to_node"),
        (("wide", 64, 8), "top-k"),
        (("strided", 64, 8), "contiguous"),
    ],
)
def test_bad_arguments(args, match):
    import cupy

    from epkern.dispatch_layout import get_dispatch_layout

    arrays = {
        "float": cupy.zeros((4, 2), cupy.float32),
        "1d": cupy.zeros(4, cupy.int64),
        "ok": cupy.zeros((4, 2), cupy.int64),
        "wide": cupy.zeros((4, 40), cupy.int64),
        "strided": cupy.zeros((4, 4), cupy.int64)[:, ::2],
    }
    first = arrays.get(args[0], args[0]) if isinstance(args[0], str) else args[0]
    with pytest.raises(ArgumentError, match=match):
        get_dispatch_layout(first, *args[1:])
