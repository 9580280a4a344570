"""CPU checks of bench/bench_a2a_nccl.py's pure-Python parts (the NCCL baseline itself needs several GPUs)."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_a2a_nccl as A  # noqa: E402
import bench_ht  # noqa: E402
from epkern import reference  # noqa: E402


def test_multicast_is_forced_off_at_import():
    assert all(os.environ[k] == v for k, v in A.NO_MULTICAST.items())
    assert A.NO_MULTICAST["NCCL_NVLS_ENABLE"] == "0"


@pytest.mark.parametrize("R,E,K,T", [(8, 256, 8, 300), (4, 32, 4, 57), (2, 8, 1, 0), (1, 4, 2, 9)])
def test_plan_is_the_reference_layout(R, E, K, T):
    _, idx, _ = A.ht_rank_inputs(3, T, 128, E, K)
    idx[np.random.default_rng(0).random(idx.shape) < 0.2] = -1
    index, counts = A.a2a_plan(idx, E, R)
    lay = reference.get_dispatch_layout(idx, E, R)
    assert counts.tolist() == lay.num_tokens_per_rank.tolist()
    begin = 0
    for d in range(R):
        group = index[begin : begin + counts[d]]
        assert group.tolist() == np.nonzero(lay.is_token_in_rank[:, d])[0].tolist()  # tokens ascending
        begin += counts[d]
    assert begin == index.size


def test_baseline_draws_bench_hts_inputs():
    """Both benchmarks take their inputs from bench/_workload.py, so the baseline moves epkern's rows."""
    assert A.ht_rank_inputs is bench_ht.ht_rank_inputs
    x, idx, w = A.ht_rank_inputs(5, 64, 256, 32, 4)
    x2, idx2, w2 = A.ht_rank_inputs(5, 64, 256, 32, 4)
    assert np.array_equal(x.view(np.uint16), x2.view(np.uint16)) and np.array_equal(idx, idx2)
    assert np.array_equal(w, w2) and x.dtype == bench_ht.BF16 and idx.dtype == np.int64
    assert all(len(set(row)) == 4 for row in idx.tolist())
    assert not np.array_equal(idx, A.ht_rank_inputs(6, 64, 256, 32, 4)[1])


@pytest.mark.parametrize("fp8", [False, True])
def test_expected_recv_is_what_the_sources_send(fp8):
    R, T, H, E, K = 4, 40, 256, 16, 3
    want = [A.expected_recv(r, R, T, H, E, K, fp8) for r in range(R)]
    for r in range(R):
        assert want[r].shape[1] == (H if not fp8 else A.row_bytes(H, True))
    # every source's rows, cut by its plan, land exactly once across the destinations
    for s in range(R):
        x, idx, _ = A.ht_rank_inputs(s, T, H, E, K)
        index, counts = A.a2a_plan(idx, E, R)
        sent = A.rows_of(x, fp8)[index]
        got = []
        for r in range(R):
            before = sum(int(A.a2a_plan(A.ht_rank_inputs(q, T, H, E, K)[1], E, R)[1][r]) for q in range(s))
            got.append(want[r][before : before + int(counts[r])])
        assert np.array_equal(np.concatenate(got), sent)


def test_summarize_logical_convention():
    per_rank = [
        dict(tokens=10, device="d", world=2, recv_rows=30, dispatch_a2a_us=10.0, dispatch_us=20.0, combine_a2a_us=5.0,
             combine_us=8.0),
        dict(tokens=10, device="d", world=2, recv_rows=10, dispatch_a2a_us=12.0, dispatch_us=18.0, combine_a2a_us=6.0,
             combine_us=7.0),
    ]  # fmt: skip
    out = A.summarize(per_rank, 128, fp8=True)
    assert out["dispatch_a2a_us"] == 12.0 and out["combine_us"] == 8.0
    assert out["dispatch_a2a_logical_GBps"] == pytest.approx(20 * A.row_bytes(128, True) / 12e-6 / 1e9)
    assert out["combine_logical_GBps"] == pytest.approx(20 * 256 / 8e-6 / 1e9)


def test_bench_ht_headline_is_single_calls_and_the_fresh_output_combine():
    """bench_ht's headline rows (issue #22): single calls and the combine of a fresh expert output first, with their
    floor ratios; in-place and pipelined figures only beside them, labelled."""
    ops = [op for op, _ in bench_ht.HEADLINE + bench_ht.BESIDE]
    r = {"tokens_per_rank": 4096, **{f"{op}_us": 1000.0 + i for i, op in enumerate(ops)}}
    r.update({f"{op}_floor_ratio": 0.5 for op in ops if op != "dispatch"})
    head, beside = bench_ht.headline_lines(r)
    assert head.startswith(
        "   4096 headline, single calls with a sync: layout + dispatch 1000.0 (0.50 of the floor); dispatch 1001.0;"
    )
    assert "combine of a fresh expert output 1003.0 (0.50 of the floor)" in head
    assert "pipelined" not in head and "in place" not in head
    assert "made inside allocating_in_buffer 1005.0 (0.50 of the floor)" in head
    assert "combine of the dispatch output (in place) 1006.0" in beside and "combine, pipelined 1008.0" in beside
    assert set(ops) <= set(bench_ht.OPS)
