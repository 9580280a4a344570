"""CPU checks of bench/bench_ll.py's pure-Python parts: inputs, byte accounting, floor, summary, report, and the
validation helpers against the numpy reference (no GPU)."""

import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_ll  # noqa: E402
from epkern import reference  # noqa: E402

BF16 = ml_dtypes.bfloat16


def test_inputs_deterministic_and_distinct_experts():
    x, idx, w = bench_ll.make_rank_inputs(7, 3, 16, 256, 32, 8)
    x2, idx2, w2 = bench_ll.make_rank_inputs(7, 3, 16, 256, 32, 8)
    assert np.array_equal(x.view(np.uint16), x2.view(np.uint16)) and np.array_equal(idx, idx2)
    assert np.array_equal(w, w2)
    assert x.dtype == BF16 and idx.dtype == np.int64 and w.dtype == np.float32
    assert x.shape == (16, 256) and idx.shape == (16, 8) and w.shape == (16, 8)
    assert all(len(set(row)) == 8 for row in idx.tolist()) and idx.min() >= 0 and idx.max() < 32
    assert set(np.unique(w).tolist()) <= {1.0, 0.5, 0.25}
    assert np.abs(x.astype(np.float32)).max() <= 16
    other = bench_ll.make_rank_inputs(7, 4, 16, 256, 32, 8)[1]
    idx3, w3 = bench_ll.make_rank_routing(7, 3, 16, 32, 8)  # the routing alone, as the layout checks rebuild it
    assert np.array_equal(idx3, idx) and np.array_equal(w3, w)
    assert not np.array_equal(idx, other)


def test_message_and_row_bytes():
    H = 7168
    assert bench_ll.dispatch_message_bytes(H, True) == H + H // 128 * 4 + 16 == 7408
    assert bench_ll.dispatch_message_bytes(H, False) == 2 * H
    assert bench_ll.combine_message_bytes(H) == 2 * H
    assert bench_ll.dispatch_out_row_bytes(H, False) == 2 * H
    assert bench_ll.dispatch_out_row_bytes(H, True) == H + H // 128 * 4
    assert bench_ll.dispatch_out_row_bytes(H, True, ue8m0=True) == H + H // 512 * 4
    assert bench_ll.logical_bytes("dispatch", 1024, H, True) == 1024 * 7408
    assert bench_ll.logical_bytes("combine", 1024, H, True) == 1024 * 2 * H
    assert bench_ll.logical_bytes("pair", 10, H, False) == 10 * 4 * H


def test_floor_bytes():
    H, sent, recv, tokens = 128, 100, 800, 128
    assert bench_ll.floor_bytes("dispatch", sent, recv, tokens, H, False) == sent * 2 * H + recv * 2 * H
    assert bench_ll.floor_bytes("dispatch", sent, recv, tokens, H, True) == sent * 2 * H + recv * (H + 4)
    assert bench_ll.floor_bytes("combine", sent, recv, tokens, H, True) == recv * 2 * H + tokens * 2 * H
    assert bench_ll.floor_bytes("pair", sent, recv, tokens, H, False) == (
        bench_ll.floor_bytes("dispatch", sent, recv, tokens, H, False)
        + bench_ll.floor_bytes("combine", sent, recv, tokens, H, False)
    )
    assert bench_ll.floor_us(3e9, 3000.0) == pytest.approx(1000.0)
    assert bench_ll.gbps(1e6, 1.0) == pytest.approx(1000.0)


def _rank_result(rank, R=8, tokens=128, H=7168, K=8, fp8=False, ranks_per_gpu=None, bw=3000.0, scale=1.0):
    res = {
        "tokens": tokens,
        "selections": tokens * K,
        "sent_tokens": tokens,
        "recv_rows": tokens * K,
        "validated": True,
        "hidden": H,
        "topk": K,
        "experts": 256,
        "num_max": tokens,
        "fp8": fp8,
        "round_scale": False,
        "ue8m0": False,
        "device": "NVIDIA H100 80GB HBM3",
        "ranks_per_gpu": R if ranks_per_gpu is None else ranks_per_gpu,
        "copy_bandwidth_GBps": bw,
        "blocks": 16,
        "num_rdma_bytes": 1 << 30,
        "calls": 200,
        "iters": 30,
    }
    for op, _ in bench_ll.DEVICE_OPS:
        res[f"{op}_us"] = (100.0 + rank) * scale
    for op in bench_ll.HOST_OPS:
        res[f"{op}_us"] = 5.0 + rank
    return res


def test_summarize_bf16_one_gpu():
    R, T, H, K = 8, 128, 7168, 8
    per_rank = [_rank_result(r) for r in range(R)]
    s = bench_ll.summarize(per_rank)
    assert s["ranks"] == R and s["tokens_per_rank"] == T and s["validated"]
    assert s["dispatch_us"] == 107.0  # max over ranks
    assert s["dispatch_host_us"] == pytest.approx(8.5) and s["dispatch_host_us_max"] == 12.0  # median, max
    sel = T * K
    assert s["dispatch_logical_GBps"] == pytest.approx(sel * 2 * H / 107e-6 / 1e9)
    assert s["combine_pipelined_logical_GBps"] == pytest.approx(sel * 2 * H / 107e-6 / 1e9)
    fb = R * (T * 2 * H + sel * 2 * H)
    assert s["dispatch_floor_bytes"] == fb
    assert s["dispatch_floor_us"] == pytest.approx(fb / 3000e9 * 1e6)
    assert s["dispatch_floor_ratio"] == pytest.approx(s["dispatch_floor_us"] / 107.0)
    pair_fb = fb + R * (sel * 2 * H + T * 2 * H)
    assert s["pair_graph_floor_bytes"] == pair_fb
    assert s["pair_graph_logical_GBps"] == pytest.approx(sel * 4 * H / 107e-6 / 1e9)
    assert "dispatch_send_floor_us" not in s and "dispatch_recv_logical_GBps" not in s
    assert s["graph_python_per_call_us"] == 0.0
    assert s["targets"]["host_met"] == {"dispatch_host": True, "combine_host": True}
    assert s["targets"]["floor_ratio"]["pair_graph"] == pytest.approx(s["pair_graph_floor_ratio"])
    json.dumps(s)


def test_summarize_fp8_and_floor_target():
    R, T, H, K = 8, 128, 7168, 8
    s = bench_ll.summarize([_rank_result(r, fp8=True, scale=0.01) for r in range(R)])
    sel = T * K
    us = 1.07
    assert s["dispatch_logical_GBps"] == pytest.approx(sel * (H + H // 128 * 4 + 16) / (us * 1e-6) / 1e9)
    assert s["dispatch_floor_bytes"] == R * (T * 2 * H + sel * (H + H // 128 * 4))
    assert all(s["targets"]["floor_ratio_met"].values())  # absurdly fast: above the floor target


def test_summarize_no_floor_when_ranks_span_gpus_and_missing_graph():
    per_rank = [_rank_result(r, ranks_per_gpu=1) for r in range(4)]
    for p in per_rank:
        p["pair_graph_us"] = p["graph_launch_host_us"] = None
    s = bench_ll.summarize(per_rank)
    assert "dispatch_floor_us" not in s and s["dispatch_logical_GBps"] > 0
    assert s["pair_graph_us"] is None and s["graph_launch_host_us"] is None
    assert "pair_graph" not in s["targets"]["floor_ratio_met"]
    text = bench_ll.format_report([s], "4 MPI processes")
    assert "pair_graph" in text and "-" in text


def test_format_report_sweep():
    results = [bench_ll.summarize([_rank_result(r, tokens=t) for r in range(8)]) for t in (64, 128)]
    text = bench_ll.format_report(results, "8 MPI processes")
    assert "LL intranode, 8 MPI processes" in text and "copy bw 3000 GB/s" in text
    for op, _ in bench_ll.DEVICE_OPS:
        assert f" {op} " in text
    assert text.count("graph replay Python") == 2 and "targets @ 64 tokens" in text


def test_parse_args():
    args, tokens = bench_ll.parse_args(["--tokens", "32,128", "--fp8", "--ue8m0"])
    assert tokens == [32, 128] and args.round_scale and args.ue8m0 and args.num_max == 0
    with pytest.raises(SystemExit):
        bench_ll.parse_args(["--round-scale"])
    with pytest.raises(SystemExit):
        bench_ll.parse_args(["--tokens", "256", "--num-max", "128"])
    with pytest.raises(SystemExit):
        bench_ll.parse_args(["--tokens", "2048"])


def _reference_case(R=4, T=10, H=512, E=16, K=4, fp8=False, round_scale=False, ue8m0=False):
    inputs = [bench_ll.make_rank_inputs(5, s, T, H, E, K) for s in range(R)]
    xs, idxs, ws = ([i[j] for i in inputs] for j in range(3))
    want = reference.ll_dispatch(xs, idxs, 16, E, use_fp8=fp8, round_scale=round_scale, use_ue8m0=ue8m0)
    return xs, idxs, ws, want


@pytest.mark.parametrize("fp8,round_scale,ue8m0", [(False, False, False), (True, False, False), (True, True, True)])
def test_validation_helpers_match_reference(fp8, round_scale, ue8m0):
    R, E = 4, 16
    xs, idxs, ws, want = _reference_case(R=R, E=E, fp8=fp8, round_scale=round_scale, ue8m0=ue8m0)
    for d in range(R):
        res = want[d]
        rows = bench_ll.check_recv_layout(res.recv_count, res.src_info, res.layout_range, idxs, d, E)
        assert len(rows["row"]) == int(res.recv_count.sum())
        data, scales = bench_ll.expected_recv_rows(xs, rows, fp8, round_scale, ue8m0)
        if fp8:
            got = res.recv_x[0].view(np.uint8)[rows["e"], rows["row"]]
            assert np.array_equal(data, got)
            assert np.array_equal(scales, res.recv_x[1][rows["e"], rows["row"]])
        else:
            assert np.array_equal(data, res.recv_x.view(np.uint16)[rows["e"], rows["row"]])
    # combine(dispatch(x)) with an identity expert, against the reference combine
    bf = reference.ll_dispatch(xs, idxs, 16, E)
    ref = reference.ll_combine([r.recv_x for r in bf], bf, idxs, ws)
    for d in range(R):
        got = bench_ll.expected_combine_identity(xs[d], idxs[d], ws[d])
        assert np.array_equal(got.view(np.uint16), ref[d].view(np.uint16))


def test_check_recv_layout_accepts_arrival_order_and_rejects_errors():
    R, E = 4, 16
    xs, idxs, _, want = _reference_case(R=R, E=E)
    res = want[1]
    src, lr, count = res.src_info.copy(), res.layout_range.copy(), res.recv_count.copy()
    # arrival order: blocks in reverse source order, rows reversed inside each block
    e_loc = E // R
    new_src, new_lr = np.full_like(src, -1), np.zeros_like(lr)
    for e in range(e_loc):
        pos = 0
        for s in reversed(range(R)):
            b, c = int(lr[e, s] >> 32), int(lr[e, s] & 0xFFFFFFFF)
            new_src[e, pos : pos + c] = src[e, b : b + c][::-1]
            new_lr[e, s] = (pos << 32) | c
            pos += c
    rows = bench_ll.check_recv_layout(count, new_src, new_lr, idxs, 1, E)
    canon = bench_ll.check_recv_layout(count, src, lr, idxs, 1, E)

    def keyed(r):
        order = np.lexsort((r["src_token"], r["src_rank"], r["e"]))
        return np.stack([r["e"][order], r["src_rank"][order], r["src_token"][order]])

    assert np.array_equal(keyed(rows), keyed(canon))
    assert not np.array_equal(rows["row"], canon["row"]) or len(rows["row"]) <= 1
    # the rows of the arrival-ordered buffer hold the same source rows as the reference's
    data, _ = bench_ll.expected_recv_rows(xs, rows, False)
    moved = np.zeros_like(res.recv_x.view(np.uint16))
    moved[rows["e"], rows["row"]] = data
    for e in range(e_loc):
        for s in range(R):
            b, c = int(new_lr[e, s] >> 32), int(new_lr[e, s] & 0xFFFFFFFF)
            rb = int(lr[e, s] >> 32)
            assert np.array_equal(moved[e, b : b + c], res.recv_x.view(np.uint16)[e, rb : rb + c][::-1])
    bad_count = count.copy()
    bad_count[0] += 1
    with pytest.raises(AssertionError):
        bench_ll.check_recv_layout(bad_count, src, lr, idxs, 1, E)
    e = int(np.argmax(count))
    bad_src = src.copy()
    bad_src[e, 0] = (bad_src[e, 0] + 1) % 10
    with pytest.raises(AssertionError):
        bench_ll.check_recv_layout(count, bad_src, lr, idxs, 1, E)
    with pytest.raises(AssertionError):  # another rank's layout is not this rank's
        bench_ll.check_recv_layout(want[2].recv_count, want[2].src_info, want[2].layout_range, idxs, 1, E)
