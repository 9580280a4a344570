"""Benchmark low-latency (LL) dispatch / combine (issue #4).

    # 8 MPS processes on one GPU (start MPS first: bash scripts/mps.sh start; export CUDA_MPS_PIPE_DIRECTORY)
    mpiexec -n 8 python3 bench/bench_ll.py --tokens 128 --hidden 7168 --topk 8 --experts 256 [--fp8]
    # or in-process ranks (one thread per rank, one GPU)
    python3 bench/bench_ll.py --inprocess 8 --tokens 128 ...

One Buffer per run (``num_rdma_bytes`` = get_low_latency_rdma_size_hint(num_max, H, R, E), ``low_latency_mode``),
``num_max`` = ``--num-max`` or the largest ``--tokens``; every output preallocated (``out_x``, ``out_scales``,
``out_src_info``, ``out_layout_range``, ``out_count``, combine ``out``), so no timed loop allocates. Inputs: BF16
small integers, distinct random experts per token (no -1), power-of-two weights, drawn from (seed, rank, tokens)
so every rank can rebuild every rank's inputs. Before any timing the outputs are checked exactly (receive counts,
blocks and source tokens per expert and source rank, every received row's bits, FP8 data and scales against
``epkern.reference.per_token_cast_to_fp8``, and combine of an identity stand-in expert against the reference
arithmetic); after the timing the last call's layout is checked again. A failure on any rank stops every rank.

Measured per op (dispatch, combine), times max over ranks of each rank's value:
- ``op``: one call after a group barrier as a user makes it (a replay of the warmed-up call), CUDA events on the
  caller's stream around the call (host Python included), median of ``--iters``. ``op_call_host``: the host time
  of those calls. ``op_kernel``: the same calls validated again (replays off) with events around the kernel on the
  comm stream, its span only (waiting for slower peers included).
- ``op_pipelined``: ``--calls`` calls enqueued back to back after one barrier (``async_finish=True``, the caller's
  stream waits for the last call only), device time per call; median of 3 repetitions.
- ``op_host`` / ``op_host_async``: host time of the Python call only, ``--calls`` calls back to back then one sync
  (``async_finish`` False / True). In-process ranks: the False form synchronises the comm stream inside every call
  (epkern.gpu.runtime.Runtime.end) and all ranks share one interpreter, so use MPS processes for this number.
- ``pair_pipelined``: dispatch + combine pairs back to back (eager). ``pair_graph``: one dispatch + combine pair
  captured once into a CUDA graph (after warm-up: every kernel specialisation and the size agreement are used
  before capture; ranks capture one after another), replayed ``--calls`` times; device time per pair. Python per
  call under graph replay is 0 by construction (the replay launches the captured kernels; no epkern Python runs):
  reported as ``graph_python_per_call_us`` = 0; ``graph_launch_host_us`` is the cost of ``graph.launch`` itself.
- ``op_send`` / ``op_recv`` (``return_recv_hook=True``): kernel spans of the send launch, and of the hook's
  receive launch issued after a stream sync and a group barrier (the data has arrived: the receive alone, as when
  the hook runs after overlapped compute); median of ``--iters``.

Byte accounting. Logical GB/s: shared/reference/semantics.md "Benchmark byte accounting": "LL: bytes = number of
valid (t, k) selections x message bytes (dispatch FP8: H + H/128*4 + 16; combine: 2H), over the kernel time";
BF16 dispatch counts 2H per selection (DeepEP's ``num_bf16_bytes``). Per rank: the mean selections per rank
over the slowest rank's time, for every timed variant (the ``*_kernel`` rows are the doc's "kernel time";
``*_pipelined`` and ``pair_graph`` the steady state). HBM floor (when all ranks share one GPU, ranks_per_gpu == R):
every input row read once and every output row written once, summed over the ranks — dispatch reads each sent
token's BF16 row (2H) and writes each received row (BF16 2H, or FP8 H plus its scales, H/128 float32 or H/512 int32
with UE8M0); combine reads each received row (2H) and writes each token's output row (2H); indices, weights and
headers are not counted. Floor us = bytes / copy bandwidth (bench/_timing.copy_bandwidth_gbs, read + write, rank 0,
broadcast); ratio = floor us / measured us (target >= 0.70).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import KernelClock, copy_bandwidth_gbs, need, profile_text  # noqa: E402
from _workload import add_workload_args  # noqa: E402
from epkern import reference  # noqa: E402

BF16 = ml_dtypes.bfloat16

# Device-time ops and the bytes they are credited with ("pair" = dispatch + combine; None: no GB/s, no floor).
DEVICE_OPS = (
    ("dispatch", "dispatch"),
    ("dispatch_kernel", "dispatch"),
    ("dispatch_pipelined", "dispatch"),
    ("dispatch_send", None),
    ("dispatch_recv", None),
    ("combine", "combine"),
    ("combine_kernel", "combine"),
    ("combine_pipelined", "combine"),
    ("combine_send", None),
    ("combine_recv", None),
    ("pair_pipelined", "pair"),
    ("pair_graph", "pair"),
)
# Host times (Python, per call).
HOST_OPS = (
    "dispatch_call_host",
    "dispatch_host",
    "dispatch_host_async",
    "combine_call_host",
    "combine_host",
    "combine_host_async",
    "dispatch_host_prepared",
    "combine_host_prepared",
    "dispatch_host_library",
    "combine_host_library",
    "graph_launch_host",
)
FLOOR_TARGET = 0.70
HOST_TARGET_US = 10.0
TARGET_OPS = ("dispatch_pipelined", "combine_pipelined", "pair_graph")


# ---------------------------------------------------------------- inputs and byte accounting (pure Python)
def make_rank_routing(seed: int, rank: int, tokens: int, num_experts: int, topk: int):
    """Rank ``rank``'s routing, a function of (seed, rank, tokens) only: topk_idx int64 [T, K] (distinct experts per
    token, no -1) and weights float32 powers of two."""
    rng = np.random.default_rng([seed, rank, tokens, 1])
    idx = np.argsort(rng.random((tokens, num_experts)), axis=1)[:, :topk].astype(np.int64)
    w = (2.0 ** -rng.integers(0, 3, size=(tokens, topk))).astype(np.float32)
    return idx, w


def make_rank_inputs(seed: int, rank: int, tokens: int, hidden: int, num_experts: int, topk: int):
    """Rank ``rank``'s inputs (x BF16 [T, H] small integers, so combine results are exact; make_rank_routing's
    topk_idx and weights), a function of (seed, rank, tokens) only: every rank can rebuild every rank's."""
    x = np.random.default_rng([seed, rank, tokens, 0]).integers(-16, 17, size=(tokens, hidden), dtype=np.int32)
    return (x.astype(BF16), *make_rank_routing(seed, rank, tokens, num_experts, topk))


def dispatch_message_bytes(hidden: int, fp8: bool) -> int:
    """Logical bytes per valid selection (semantics.md): FP8 H + H/128*4 + 16; BF16 2H (DeepEP)."""
    return hidden + hidden // 128 * 4 + 16 if fp8 else 2 * hidden


def combine_message_bytes(hidden: int) -> int:
    return 2 * hidden


def dispatch_out_row_bytes(hidden: int, fp8: bool, ue8m0: bool = False) -> int:
    """Bytes of one received row as stored: BF16 2H; FP8 H + scales (H/128 float32, or H/512 int32 for UE8M0)."""
    if not fp8:
        return 2 * hidden
    return hidden + (hidden // 512 if ue8m0 else hidden // 128) * 4


def logical_bytes(op: str, selections: float, hidden: int, fp8: bool) -> float:
    """Logical bytes of ``op`` ("dispatch", "combine", "pair") for ``selections`` valid (t, k) selections."""
    d = selections * dispatch_message_bytes(hidden, fp8)
    c = selections * combine_message_bytes(hidden)
    return {"dispatch": d, "combine": c, "pair": d + c}[op]


def floor_bytes(
    op: str, sent_tokens: int, recv_rows: int, tokens: int, hidden: int, fp8: bool, ue8m0: bool = False
) -> int:
    """HBM bytes of ``op`` summed over ranks: every input row read once, every output row written once.
    ``sent_tokens``: tokens with at least one valid selection; ``recv_rows``: received rows (= valid selections);
    ``tokens``: all tokens (combine writes every output row)."""
    d = sent_tokens * 2 * hidden + recv_rows * dispatch_out_row_bytes(hidden, fp8, ue8m0)
    c = recv_rows * 2 * hidden + tokens * 2 * hidden
    return {"dispatch": d, "combine": c, "pair": d + c}[op]


def floor_us(nbytes: float, copy_bandwidth_gbs: float) -> float:
    return nbytes / (copy_bandwidth_gbs * 1e9) * 1e6


def gbps(nbytes: float, us: float) -> float:
    return nbytes / (us * 1e-6) / 1e9 if us and us > 0 else float("nan")


def summarize(per_rank: list[dict]) -> dict:
    """One token count's result from every rank's dict (rank_main's output for that count)."""
    r0 = per_rank[0]
    R = len(per_rank)
    H, fp8, ue8m0 = r0["hidden"], r0["fp8"], r0["ue8m0"]
    out = {
        k: r0[k]
        for k in (
            "hidden",
            "topk",
            "experts",
            "num_max",
            "fp8",
            "round_scale",
            "ue8m0",
            "device",
            "ranks_per_gpu",
            "copy_bandwidth_GBps",
            "blocks",
            "num_rdma_bytes",
            "calls",
            "iters",
        )
    }
    out["ranks"] = R
    out["tokens_per_rank"] = r0["tokens"]
    out["transport"], out["ranks_per_node"] = r0.get("transport", "ipc"), r0.get("ranks_per_node", 0)
    for key in ("wqes", "doorbells", "cqes", "bytes"):  # NIC routes: the mean over ranks of each rank's per call
        vals = [p[f"nic_{key}_per_call"] for p in per_rank if f"nic_{key}_per_call" in p]
        if vals:
            out[f"nic_{key}_per_call"] = sum(vals) / len(vals)
    out["validated"] = all(p["validated"] for p in per_rank)
    sel = sum(p["selections"] for p in per_rank)
    sent = sum(p["sent_tokens"] for p in per_rank)
    recv = sum(p["recv_rows"] for p in per_rank)
    tokens = sum(p["tokens"] for p in per_rank)
    out["selections_per_rank"] = sel / R
    out["recv_rows_total"] = recv
    bw = r0["copy_bandwidth_GBps"]
    one_gpu = r0["ranks_per_gpu"] == R and bool(bw)
    for op, kind in DEVICE_OPS:
        vals = [p.get(f"{op}_us") for p in per_rank]
        us = max(vals) if all(v is not None for v in vals) else None
        out[f"{op}_us"] = us
        if kind is None or us is None:
            continue
        out[f"{op}_logical_GBps"] = gbps(logical_bytes(kind, sel / R, H, fp8), us)
        if one_gpu:
            fb = floor_bytes(kind, sent, recv, tokens, H, fp8, ue8m0)
            out[f"{op}_floor_bytes"] = fb
            out[f"{op}_floor_us"] = floor_us(fb, bw)
            out[f"{op}_floor_ratio"] = out[f"{op}_floor_us"] / us
    for op in HOST_OPS:
        vals = [p.get(f"{op}_us") for p in per_rank]
        if all(v is not None for v in vals):
            out[f"{op}_us"] = statistics.median(vals)
            out[f"{op}_us_max"] = max(vals)
        else:
            out[f"{op}_us"] = out[f"{op}_us_max"] = None
    out["graph_python_per_call_us"] = 0.0  # graph replay runs no epkern Python per call, by construction
    out["targets"] = {
        "floor_ratio": {op: out.get(f"{op}_floor_ratio") for op in TARGET_OPS},
        "floor_ratio_met": {
            op: (out.get(f"{op}_floor_ratio") or 0.0) >= FLOOR_TARGET for op in TARGET_OPS if out.get(f"{op}_us")
        },
        "host_us": {op: out[f"{op}_us"] for op in ("dispatch_host", "combine_host")},
        "host_met": {
            op: out[f"{op}_us"] is not None and out[f"{op}_us"] <= HOST_TARGET_US
            for op in ("dispatch_host", "combine_host")
        },
    }
    return out


def _f(v, width, prec=1):
    return f"{v:>{width}.{prec}f}" if isinstance(v, int | float) and v == v else f"{'-':>{width}}"


def format_report(results: list[dict], mode: str) -> str:
    r0 = results[0]
    dtype = "FP8" if r0["fp8"] else "BF16"
    if r0["fp8"]:
        dtype += " ue8m0" if r0["ue8m0"] else (" round_scale" if r0["round_scale"] else "")
    lines = [
        f"LL intranode, {mode}, {r0['device']}, H={r0['hidden']} top-{r0['topk']} E={r0['experts']} {dtype} "
        f"dispatch{', zero-copy recv' if r0.get('zero_copy_recv') else ''}"
        f"{', zero-copy combine' if r0.get('zero_copy') else ''}, num_max={r0['num_max']}, "
        f"blocks/kernel={r0['blocks']}, ranks/GPU={r0['ranks_per_gpu']}, "
        f"LL area {r0['num_rdma_bytes'] / 2**30:.2f} GiB/rank, copy bw {_f(r0['copy_bandwidth_GBps'], 0, 0)} GB/s, "
        f"validated={all(r['validated'] for r in results)}",
        f"{'tokens':>7} {'op':>20} {'us':>9} {'GB/s logical':>12} {'floor us':>9} {'floor ratio':>11}",
    ]
    if r0.get("transport", "ipc") != "ipc":
        lines.insert(
            1, f"peers on other virtual nodes of {r0['ranks_per_node']} ranks over the {r0['transport']} route"
        )
        for r in results:
            lines.insert(
                2,
                f"  {r['tokens_per_rank']} tokens: NIC per LL call and rank (mean): "
                + ", ".join(
                    f"{k} {r.get(f'nic_{k}_per_call', float('nan')):.1f}"
                    for k in ("wqes", "doorbells", "cqes", "bytes")
                ),
            )
    for r in results:
        for op, _ in DEVICE_OPS:
            lines.append(
                f"{r['tokens_per_rank']:>7} {op:>20} {_f(r[f'{op}_us'], 9)} {_f(r.get(f'{op}_logical_GBps'), 12)} "
                f"{_f(r.get(f'{op}_floor_us'), 9)} {_f(r.get(f'{op}_floor_ratio'), 11, 2)}"
            )
    lines.append(f"{'tokens':>7} {'host per call (Python)':>22} {'median us':>10} {'max us':>8}")
    for r in results:
        for op in HOST_OPS:
            lines.append(f"{r['tokens_per_rank']:>7} {op:>22} {_f(r[f'{op}_us'], 10)} {_f(r[f'{op}_us_max'], 8)}")
        lines.append(f"{r['tokens_per_rank']:>7} {'graph replay Python':>22} {0.0:>10.1f} {'(by construction)':>8}")
    for r in results:
        t = r["targets"]
        fr = ", ".join(f"{op} {_f(v, 0, 2).strip()}" for op, v in t["floor_ratio"].items())
        host = ", ".join(f"{op} {_f(v, 0, 1).strip()}" for op, v in t["host_us"].items())
        lines.append(
            f"targets @ {r['tokens_per_rank']} tokens: floor ratio >= {FLOOR_TARGET} ({fr}): "
            f"{all(t['floor_ratio_met'].values()) and bool(t['floor_ratio_met'])}; host <= {HOST_TARGET_US:g} us "
            f"({host}): {all(t['host_met'].values())}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- validation helpers (numpy)
def expected_tokens(idxs: list, rank: int, num_experts: int) -> list[list[np.ndarray]]:
    """[e][s]: source tokens of rank s that selected local expert e of ``rank``, ascending (one entry per
    selection), from every rank's topk_idx."""
    R = len(idxs)
    e_loc = num_experts // R
    return [[np.nonzero(idxs[s] == rank * e_loc + e)[0] for s in range(R)] for e in range(e_loc)]


def check_recv_layout(count, src_info, layout_range, idxs: list, rank: int, num_experts: int) -> dict:
    """Check one rank's LL receive layout (kernel row order is arrival order) against every rank's topk_idx:
    counts, non-overlapping blocks covering [0, count) (reference.canonicalize_ll_recv), and per (expert, source
    rank) block exactly the selecting tokens. AssertionError on a mismatch. Returns the valid rows in the
    kernel's order: int64 arrays ``e`` (local expert), ``row``, ``src_rank``, ``src_token``."""
    count, src_info, layout_range = np.asarray(count), np.asarray(src_info), np.asarray(layout_range)
    R = len(idxs)
    e_loc = num_experts // R
    rows = src_info.shape[1]
    want = expected_tokens(idxs, rank, num_experts)
    want_count = np.array([sum(len(t) for t in per_s) for per_s in want], np.int64)
    if count.shape != (e_loc,) or not np.array_equal(count.astype(np.int64), want_count):
        raise AssertionError(f"rank {rank}: recv_count {count.tolist()} != expected {want_count.tolist()}")
    reference.canonicalize_ll_recv(np.zeros((e_loc, rows, 1), np.uint8), count, src_info, layout_range, R)
    lr = layout_range.astype(np.int64)
    begin, cnt = lr >> 32, lr & 0xFFFFFFFF
    es, rs, ss, ts = [], [], [], []
    for e in range(e_loc):
        for s in range(R):
            b, c = int(begin[e, s]), int(cnt[e, s])
            toks = src_info[e, b : b + c].astype(np.int64)
            if c != len(want[e][s]) or not np.array_equal(np.sort(toks), want[e][s]):
                raise AssertionError(
                    f"rank {rank}: local expert {e} from rank {s}: source tokens {np.sort(toks)[:8].tolist()} "
                    f"(count {c}) != expected {want[e][s][:8].tolist()} (count {len(want[e][s])})"
                )
            es.append(np.full(c, e, np.int64))
            rs.append(np.arange(b, b + c, dtype=np.int64))
            ss.append(np.full(c, s, np.int64))
            ts.append(toks)
    cat = lambda a: np.concatenate(a) if a else np.zeros(0, np.int64)  # noqa: E731
    return {"e": cat(es), "row": cat(rs), "src_rank": cat(ss), "src_token": cat(ts)}


def expected_recv_rows(xs: list, rows: dict, fp8: bool, round_scale: bool = False, ue8m0: bool = False):
    """Expected received rows for ``rows`` (check_recv_layout's result): raw bits [n, H] (uint16 BF16, or uint8
    e4m3) and, with FP8, the scales [n, S] (float32, or int32 UE8M0) as reference.per_token_cast_to_fp8 gives."""
    n, H = len(rows["row"]), xs[0].shape[1]
    if not fp8:
        data = np.empty((n, H), np.uint16)
        for s, x in enumerate(xs):
            m = rows["src_rank"] == s
            data[m] = x.view(np.uint16)[rows["src_token"][m]]
        return data, None
    casts = [reference.per_token_cast_to_fp8(x, round_scale=round_scale, use_ue8m0=ue8m0) for x in xs]
    data = np.empty((n, H), np.uint8)
    scales = np.empty((n, casts[0][1].shape[1]), casts[0][1].dtype)
    for s, (q, sc) in enumerate(casts):
        m = rows["src_rank"] == s
        data[m] = q.view(np.uint8)[rows["src_token"][m]]
        scales[m] = sc[rows["src_token"][m]]
    return data, scales


def expected_combine_identity(x, idx, w) -> np.ndarray:
    """combine(dispatch(x)) with an identity expert (every expert returns its BF16 input row), in the reference's
    arithmetic (reference/low_latency.py): float32 acc over k in order, products rounded to float32, one BF16 cast."""
    xf = np.asarray(x).astype(np.float32)
    acc = np.zeros_like(xf)
    for k in range(idx.shape[1]):
        valid = idx[:, k] >= 0
        prod = (w[:, k, None] * xf).astype(np.float32)
        acc = np.where(valid[:, None], (acc + prod).astype(np.float32), acc)
    return acc.astype(BF16)


# ---------------------------------------------------------------- GPU timing helpers
def _settle(buf):
    import cupy

    cupy.cuda.get_current_stream().synchronize()
    buf._backend.rt.check_usable()  # raises what a kernel recorded (timeout, bad index)


def _collective_check(group, fn):
    """Run ``fn`` on every rank; if it raised anywhere, raise on every rank (all ranks take the same path)."""
    err = None
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - reported to every rank below
        err = f"rank {group.rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    errors = [e for e in group.allgather_object(err) if e]
    if errors:
        raise RuntimeError("LL benchmark check failed:\n" + "\n".join(errors))


def _one_call(fn, group, iters, clock=None):
    """(event us, host us, kernel-span us or None without ``clock``) medians of one call after a barrier."""
    import cupy

    stream = cupy.cuda.get_current_stream()
    times, host, kernel = [], [], []
    for _ in range(iters):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        stream.synchronize()
        group.barrier()
        if clock is not None:
            clock.spans = []
        start.record(stream)
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e6)
        stop.record(stream)
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) * 1e3)
        if clock is not None:
            kernel.append(sum(clock.take()))
    return statistics.median(times), statistics.median(host), statistics.median(kernel) if kernel else None


def _pipelined(fn, group, calls, reps=3):
    """Device time per call of ``calls`` calls enqueued back to back after one barrier; ``fn`` returns the
    EventHandle of its last call (async_finish=True), which the caller's stream waits for at the end."""
    import cupy

    stream = cupy.cuda.get_current_stream()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    res = []
    for _ in range(reps):
        stream.synchronize()
        group.barrier()
        start.record(stream)
        for _ in range(calls):
            ev = fn()
        ev.current_stream_wait()
        stop.record(stream)
        stop.synchronize()
        res.append(cupy.cuda.get_elapsed_time(start, stop) * 1e3 / calls)
    return statistics.median(res)


def _host_per_call(fn, group, calls):
    """Host time of the Python call only: ``calls`` calls back to back, then one sync (not timed)."""
    import cupy

    stream = cupy.cuda.get_current_stream()
    stream.synchronize()
    group.barrier()
    t0 = time.perf_counter()
    for _ in range(calls):
        ev = fn()
    t1 = time.perf_counter()
    ev.current_stream_wait()
    stream.synchronize()
    return (t1 - t0) * 1e6 / calls


def _hook_phases(dispatch, combine, group, iters, clock):
    """Kernel spans of send and receive with return_recv_hook; the receive is issued after a stream sync and a
    barrier (every rank's sends are done). Returns medians (dispatch send, dispatch recv, combine send, recv)."""
    import cupy

    stream = cupy.cuda.get_current_stream()
    got = {k: [] for k in ("ds", "dr", "cs", "cr")}
    for _ in range(iters):
        for op, fn in (("d", dispatch), ("c", combine)):
            stream.synchronize()
            group.barrier()
            clock.spans = []
            hook = fn()
            stream.synchronize()
            (send,) = clock.take()
            group.barrier()
            hook()
            stream.synchronize()
            (recv,) = clock.take()
            got[op + "s"].append(send)
            got[op + "r"].append(recv)
    return tuple(statistics.median(got[k]) for k in ("ds", "dr", "cs", "cr"))


def _graph_pair(pair, group, calls):
    """Capture one dispatch + combine (ranks one after another; nothing runs during a capture), replay
    ``calls`` times. Returns (device us per pair, host us per graph.launch)."""
    import cupy

    stream = cupy.cuda.get_current_stream()
    stream.synchronize()
    graph, err = None, None
    for r in range(group.size):
        group.barrier()
        if r == group.rank:
            try:
                stream.begin_capture()
                try:
                    pair()
                finally:
                    graph = stream.end_capture()
            except Exception as exc:  # noqa: BLE001 - reported to every rank below
                err = f"rank {group.rank}: graph capture: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    errors = [e for e in group.allgather_object(err) if e]
    if errors:
        raise RuntimeError("LL benchmark graph capture failed:\n" + "\n".join(errors))
    for _ in range(2):  # upload + warm
        graph.launch(stream)
    stream.synchronize()
    group.barrier()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record(stream)
    t0 = time.perf_counter()
    for _ in range(calls):
        graph.launch(stream)
    t1 = time.perf_counter()
    stop.record(stream)
    stop.synchronize()
    return cupy.cuda.get_elapsed_time(start, stop) * 1e3 / calls, (t1 - t0) * 1e6 / calls


# ---------------------------------------------------------------- one rank
def rank_main(group, args, token_list):
    """Every token count of ``token_list`` on one Buffer; returns one result dict per count."""
    import cupy

    from epkern import Buffer

    if not getattr(group, "is_in_process", False):  # capture needs a non-default stream (run_in_process sets one)
        cupy.cuda.Stream(non_blocking=True).use()
    R, H, E = group.size, args.hidden, args.experts
    num_max = args.num_max or max(token_list)
    e_loc, rows = E // R, R * num_max
    nbytes = reference.get_low_latency_rdma_size_hint(num_max, H, R, E)
    nic_kw = {} if args.transport == "ipc" else {"transport": args.transport}
    with Buffer(
        group, num_rdma_bytes=nbytes, low_latency_mode=True, backend="gpu", timeout_s=args.timeout_s, **nic_kw
    ) as buf:
        bw = None
        if group.rank == 0:
            bw = copy_bandwidth_gbs(1 << 30)
            cupy.get_default_memory_pool().free_all_blocks()
        bw = group.broadcast_object(bw)
        outs = {
            "out_x": cupy.empty((e_loc, rows, H), np.uint8 if args.fp8 else BF16),
            "out_src_info": cupy.empty((e_loc, rows), np.int32),
            "out_layout_range": cupy.empty((e_loc, R), np.int64),
            "out_count": cupy.empty((e_loc,), np.int32),
        }
        if args.fp8:
            S, sdt = (H // 512, np.int32) if args.ue8m0 else (H // 128, np.float32)
            outs["out_scales"] = cupy.empty((e_loc, S, rows), sdt).transpose(0, 2, 1)
        if args.zero_copy_recv:  # the outputs are the Buffer's views (each dispatch returns its set's)
            outs = {}
        y = cupy.empty((e_loc, rows, H), BF16)  # combine input: the stand-in expert's outputs
        y.view(np.uint16).fill(0)
        common = {
            "hidden": H,
            "topk": args.topk,
            "experts": E,
            "num_max": num_max,
            "fp8": args.fp8,
            "round_scale": args.round_scale,
            "ue8m0": args.ue8m0,
            "zero_copy": args.zero_copy,
            "zero_copy_recv": args.zero_copy_recv,
            "device": cupy.cuda.runtime.getDeviceProperties(buf._backend.rt.device)["name"].decode(),
            "ranks_per_gpu": buf._backend.rt.ranks_per_gpu,
            "copy_bandwidth_GBps": bw,
            "blocks": _kernel_blocks(buf),
            "num_rdma_bytes": nbytes,
            "calls": args.calls,
            "iters": args.iters,
        }
        common["transport"] = args.transport
        common["ranks_per_node"] = args.ranks_per_node
        results = []
        for tokens in token_list:
            nic = buf._backend.nic_routes
            before, sends = (nic.counters() if nic else {}), buf._backend.ll.sends
            res = bench_tokens(buf, group, args, tokens, num_max, outs, y)
            res.update(common)
            if nic:  # this rank's NIC traffic per LL call (every call of the run, all remote peers together)
                after, calls = nic.counters(), max(1, buf._backend.ll.sends - sends)
                for key in ("wqes", "doorbells", "cqes", "bytes"):
                    res[f"nic_{key}_per_call"] = sum(after[p][key] - before[p][key] for p in after) / calls
            results.append(res)
            group.barrier()
    return results


def _kernel_blocks(buf) -> int:
    return buf._backend.ll.blocks()


def bench_tokens(buf, group, args, tokens, num_max, outs, y) -> dict:
    """Validate, then time, one token count on every rank (collective: every rank calls it alike)."""
    import cupy

    R, rank = group.size, group.rank
    H, E, K = args.hidden, args.experts, args.topk
    fp8, round_scale, ue8m0 = args.fp8, args.round_scale, args.ue8m0
    x_np, idx_np, w_np = make_rank_inputs(args.seed, rank, tokens, H, E, K)
    x, idx, w = cupy.asarray(x_np), cupy.asarray(idx_np), cupy.asarray(w_np)
    out_c = cupy.empty((tokens, H), BF16)
    out_kw = outs or {"zero_copy_recv": True}
    latest = {}  # the last dispatch's outputs (with --zero-copy-recv: its set's views)

    def dispatch(async_finish=False, hook=False):
        res = buf.low_latency_dispatch(
            x,
            idx,
            num_max,
            E,
            use_fp8=fp8,
            round_scale=round_scale,
            use_ue8m0=ue8m0,
            async_finish=async_finish,
            return_recv_hook=hook,
            **out_kw,
        )
        recv_x, handle = res[0], res[2]
        latest.update(
            out_x=recv_x[0] if fp8 else recv_x,
            out_scales=recv_x[1] if fp8 else None,
            out_count=res[1],
            out_src_info=handle.src_info,
            out_layout_range=handle.layout_range,
            handle=handle,
        )
        return res

    # First use: compiles, loads and agrees on the sizes (collective). With preallocated outputs the handle's
    # src_info / layout_range are those arrays, rewritten by every later dispatch, so one handle serves every
    # combine; with --zero-copy-recv each combine takes the last dispatch's (the set's views).
    handle = dispatch()[2]

    def combine(async_finish=False, hook=False):
        return buf.low_latency_combine(
            y,
            idx,
            w,
            latest["handle"],
            zero_copy=args.zero_copy,
            async_finish=async_finish,
            return_recv_hook=hook,
            out=out_c,
        )

    def layout_now():
        idxs = [make_rank_routing(args.seed, s, tokens, E, K)[0] for s in range(R)]
        count, src, lr = (cupy.asnumpy(latest[k]) for k in ("out_count", "out_src_info", "out_layout_range"))
        return check_recv_layout(count, src, lr, idxs, rank, E)

    def validate():
        _settle(buf)
        dispatch()
        _settle(buf)
        got = layout_now()
        xs = [make_rank_inputs(args.seed, s, tokens, H, E, K)[0] for s in range(R)]
        want_data, want_scales = expected_recv_rows(xs, got, fp8, round_scale, ue8m0)
        y.view(np.uint16).fill(0)
        if len(got["row"]):
            e_d, r_d = cupy.asarray(got["e"]), cupy.asarray(got["row"])
            data = cupy.asnumpy(latest["out_x"].view(np.uint8 if fp8 else np.uint16)[e_d, r_d])
            if not np.array_equal(data, want_data):
                bad = np.nonzero((data != want_data).any(axis=1))[0]
                raise AssertionError(f"rank {rank}: {len(bad)} received rows differ, first {bad[:8].tolist()}")
            if fp8:
                sc = cupy.asnumpy(latest["out_scales"][e_d, r_d])
                if not np.array_equal(sc.view(np.int32), want_scales.view(np.int32)):
                    raise AssertionError(f"rank {rank}: received FP8 scales differ from the reference")
            ident, _ = expected_recv_rows(xs, got, False)  # identity expert: each row's BF16 source row
            y.view(np.uint16)[e_d, r_d] = cupy.asarray(ident)
        if args.zero_copy:  # the expert outputs where the next combine reads them (only this call's are checked)
            buf.get_next_low_latency_combine_buffer(latest["handle"]).view(np.uint16)[...] = y.view(np.uint16)
        combine()
        _settle(buf)
        want = expected_combine_identity(x_np, idx_np, w_np)
        if not np.array_equal(cupy.asnumpy(out_c).view(np.uint16), want.view(np.uint16)):
            raise AssertionError(f"rank {rank}: combine(dispatch(x)) with an identity expert != reference")

    _collective_check(group, validate)
    for _ in range(args.warmup):
        dispatch()
        combine()
    _settle(buf)

    res = {}
    # Single calls as a user makes them (replayed, no events around the kernels): the dispatch / combine rows.
    for op, fn in (("dispatch", dispatch), ("combine", combine)):
        res[f"{op}_us"], res[f"{op}_call_host_us"], _ = _one_call(fn, group, args.iters)
    # The kernel spans come from wrapping the runtime's launch, which a replayed call bypasses: these calls go the
    # validated way; the kernels they time are the same.
    eng = buf._backend.ll
    replay_on, eng.replay_on = eng.replay_on, False
    clock = KernelClock(buf)
    try:
        for op, fn in (("dispatch", dispatch), ("combine", combine)):
            _, _, res[f"{op}_kernel_us"] = _one_call(fn, group, args.iters, clock)
        phases = _hook_phases(lambda: dispatch(hook=True)[4], lambda: combine(hook=True)[2], group, args.iters, clock)
        res["dispatch_send_us"], res["dispatch_recv_us"], res["combine_send_us"], res["combine_recv_us"] = phases
    finally:
        clock.restore()
        eng.replay_on = replay_on
    _settle(buf)

    def pair():
        dispatch(async_finish=True)
        return combine(async_finish=True)[1]

    res["dispatch_pipelined_us"] = _pipelined(lambda: dispatch(async_finish=True)[3], group, args.calls)
    res["combine_pipelined_us"] = _pipelined(lambda: combine(async_finish=True)[1], group, args.calls)
    res["pair_pipelined_us"] = _pipelined(pair, group, args.calls)
    if args.profile:  # every rank calls (the kernels wait for peers); rank 0 prints
        named = (("low_latency_dispatch (preallocated outputs)", dispatch), ("low_latency_combine (out=)", combine))
        for name, fn in named:
            group.barrier()
            text = profile_text(lambda fn=fn: fn(async_finish=True), args.calls)
            if group.rank == 0:
                print(f"==== profile: {args.calls} {name} calls\n{text}")
    res["dispatch_host_us"] = _host_per_call(lambda: dispatch()[3], group, args.calls)
    res["combine_host_us"] = _host_per_call(lambda: combine()[1], group, args.calls)
    res["dispatch_host_async_us"] = _host_per_call(lambda: dispatch(async_finish=True)[3], group, args.calls)
    res["combine_host_async_us"] = _host_per_call(lambda: combine(async_finish=True)[1], group, args.calls)
    # The same calls prepared once (Buffer.prepare_low_latency_dispatch / _combine): no argument list per call.
    prep_d = buf.prepare_low_latency_dispatch(
        x, idx, num_max, E, use_fp8=fp8, round_scale=round_scale, use_ue8m0=ue8m0, **out_kw
    )
    prep_c = buf.prepare_low_latency_combine(y, idx, w, handle, out=out_c, zero_copy=args.zero_copy)
    res["dispatch_host_prepared_us"] = _host_per_call(lambda: prep_d()[3], group, args.calls)
    res["combine_host_prepared_us"] = _host_per_call(lambda: prep_c()[1], group, args.calls)

    # DeepEP's calls through the native API: outputs left to the library, new ones every call (rebound since session
    # S; validated every call before)
    def lib_dispatch():
        return buf.low_latency_dispatch(x, idx, num_max, E, use_fp8=fp8, round_scale=round_scale, use_ue8m0=ue8m0)

    lib_handle = lib_dispatch()[2]
    _settle(buf)
    res["dispatch_host_library_us"] = _host_per_call(lambda: lib_dispatch()[3], group, args.calls)
    res["combine_host_library_us"] = _host_per_call(
        lambda: buf.low_latency_combine(y, idx, w, lib_handle)[1], group, args.calls
    )
    _settle(buf)
    if args.no_graph:
        res["pair_graph_us"] = res["graph_launch_host_us"] = None
    else:
        res["pair_graph_us"], res["graph_launch_host_us"] = _graph_pair(
            lambda: (dispatch(), combine()), group, args.calls
        )

    def recheck():  # the last call's receive layout is still right (a kernel broken during the timing)
        _settle(buf)
        layout_now()

    _collective_check(group, recheck)
    valid = idx_np >= 0
    res.update(
        tokens=tokens,
        selections=int(valid.sum()),
        sent_tokens=int(valid.any(axis=1).sum()),
        recv_rows=int(cupy.asnumpy(latest["out_count"]).sum()),
        validated=True,
    )
    return res


def _plot(results, path, mode):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for op in ("dispatch_kernel", "dispatch_pipelined", "combine_kernel", "combine_pipelined", "pair_graph"):
        pts = [(r["tokens_per_rank"], r.get(f"{op}_logical_GBps")) for r in results]
        pts = [(t, v) for t, v in pts if v is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=op)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per rank")
    ax.set_ylabel("GB/s per rank (logical)")
    ax.set_title(f"LL, {mode}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p, tokens="128")
    p.add_argument("--num-max", type=int, default=0, help="num_max_dispatch_tokens_per_rank (default: max tokens)")
    p.add_argument("--fp8", action="store_true", help="FP8 dispatch (combine is BF16 either way)")
    p.add_argument("--round-scale", action="store_true", help="FP8 scales rounded to powers of two")
    p.add_argument("--ue8m0", action="store_true", help="UE8M0 packed scales (implies --round-scale)")
    p.add_argument("--iters", type=int, default=30, help="samples of one-call and hook timings")
    p.add_argument("--calls", type=int, default=200, help="calls per pipelined / host-overhead / graph run")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--timeout-s", type=float, default=30.0, help="Buffer deadline of every device-side wait")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA graph replay")
    p.add_argument(
        "--transport",
        choices=("ipc", "proxy", "rdma"),
        default="ipc",
        help="ipc: one node (default); proxy / rdma: peers on other (virtual) nodes over that NIC route",
    )
    p.add_argument(
        "--ranks-per-node", type=int, default=0, help="virtual nodes of this many ranks (EPKERN_RANKS_PER_NODE)"
    )
    p.add_argument(
        "--zero-copy",
        action="store_true",
        help="combine with zero_copy=True (outputs written into get_next_low_latency_combine_buffer; validated once, "
        "the timed calls read whatever the buffers hold)",
    )
    p.add_argument(
        "--zero-copy-recv",
        action="store_true",
        help="dispatch with zero_copy_recv=True (rows written once into the Buffer's views; no preallocated outputs)",
    )
    p.add_argument("--profile", action="store_true", help="rank 0 prints a cProfile of the host path per call")
    p.add_argument("--inprocess", type=int, default=0, help="run this many in-process ranks instead of MPI")
    p.add_argument(
        "--watchdog", type=float, default=0, help="after this many seconds print every thread's stack and exit (0: off)"
    )
    p.add_argument("--json", type=str, default=None)
    p.add_argument("--plot", type=str, default=None, help="PNG of logical GB/s against tokens per rank")
    args = p.parse_args(argv)
    if args.ue8m0:
        args.round_scale = True
    if args.round_scale and not args.fp8:
        p.error("--round-scale / --ue8m0 need --fp8")
    tokens = [int(t) for t in args.tokens.split(",")]
    if min(tokens) < 1 or max(tokens) > (args.num_max or max(tokens)) or (args.num_max or max(tokens)) > 1024:
        p.error("--tokens: expected 1 <= tokens <= num_max <= 1024")
    if min(args.iters, args.calls) < 1 or args.warmup < 0:
        p.error("--iters / --calls: at least 1; --warmup: at least 0")
    if args.hidden % (512 if args.ue8m0 else 128):
        p.error("--hidden: a multiple of 128 (512 with --ue8m0)")
    if args.transport != "ipc":
        if args.ranks_per_node < 1:
            p.error("--transport proxy / rdma: give --ranks-per-node (the virtual nodes)")
    return args, tokens


def main(argv=None):
    args, token_list = parse_args(argv)
    need("bench_ll.py")
    if args.watchdog > 0:  # a stuck run says where it is stuck before the launcher's limit kills it silently
        faulthandler.dump_traceback_later(args.watchdog, exit=True)
    import epkern  # noqa: F401 - before CUDA starts (sets CUDA_DEVICE_MAX_CONNECTIONS)

    if args.ranks_per_node and not args.inprocess:
        os.environ["EPKERN_RANKS_PER_NODE"] = str(args.ranks_per_node)  # before the group reads the node map
    if args.inprocess:
        from epkern.group import run_in_process

        if args.experts % args.inprocess:
            raise SystemExit(f"--experts {args.experts} is not a multiple of {args.inprocess} ranks")
        rpn = {"ranks_per_node": args.ranks_per_node} if args.ranks_per_node else {}
        per_rank = run_in_process(rank_main, args.inprocess, args, token_list, timeout_s=600, **rpn)
        rank = 0
        mode = f"{args.inprocess} in-process ranks"
    else:
        from mpi4py import MPI

        from epkern.group import as_group

        group = as_group(MPI.COMM_WORLD)
        rank = group.rank
        mode = f"{group.size} MPI processes"
        try:
            mine = rank_main(group, args, token_list)
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            MPI.COMM_WORLD.Abort(1)
        per_rank = group.allgather_object(mine)
    if rank != 0:
        return []
    results = [summarize([p[i] for p in per_rank]) for i in range(len(token_list))]
    print(format_report(results, mode), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"mode": mode, "argv": sys.argv, "results": results}, indent=2))
    if args.plot:
        _plot(results, args.plot, mode)
    return results


if __name__ == "__main__":
    main()
