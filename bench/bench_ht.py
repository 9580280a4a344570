"""Benchmark HT dispatch / combine: intranode, or across virtual nodes (issue #18, ``--ranks-per-node``).

    # 8 MPS processes on one GPU (start MPS first: bash scripts/mps.sh start)
    mpiexec -n 8 python3 bench/bench_ht.py --tokens 4096 --hidden 7168 --topk 8 --experts 256
    # or in-process ranks
    python3 bench/bench_ht.py --inprocess 8 ...
    # across 2 virtual nodes of 4 (over the emulated NIC): also the bytes on the network per call
    mpiexec -n 8 python3 bench/bench_ht.py --ranks-per-node 4 ...

Across nodes the network bytes of one cached dispatch and one combine (the HT transport's NIC counters, summed over
ranks) are reported against the minimum: each token's row once per remote node it has a destination on.

Times are CUDA-event medians on each rank's stream (max over ranks is reported), after warm-up, with a
group barrier before every timed call so ranks start together. Byte accounting (docs/performance.md):
logical = received rows x row bytes per rank / time (DeepEP's convention); the HBM floor, when all ranks
share one GPU, = (rows read + rows written, summed over ranks) x row bytes / measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import KernelClock, copy_bandwidth_gbs, need, profile_text  # noqa: E402
from _workload import add_workload_args, ht_rank_inputs  # noqa: E402

BF16 = ml_dtypes.bfloat16
# One call after a barrier (host time included); *_kernel: the same calls, only the time from each kernel's launch
# on the comm stream to its end (waiting for slower peers included, the caller's Python before it not);
# *_pipelined: back-to-back calls (see _pipelined; their host µs: per call while queueing them).
OPS = (
    "layout",
    "layout_dispatch",
    "dispatch",
    "dispatch_kernel",
    "cached_dispatch",
    "cached_dispatch_kernel",
    "cached_dispatch_pipelined",
    "combine",
    "combine_kernel",
    "combine_pipelined",
    "combine_fresh",
    "combine_buffer",
    "combine_buffer_pipelined",
    "combine_alloc",
)


def _timed(fn, group, iters, clock=None):
    import cupy

    times, host, kernel = [], [], []
    stream = cupy.cuda.get_current_stream()
    for _ in range(iters):
        group.barrier()
        if clock is not None:
            clock.spans = []
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        t0 = time.perf_counter()
        out = fn()
        host.append((time.perf_counter() - t0) * 1e6)
        stop.record(stream)
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) * 1e3)
        if clock is not None:
            kernel.append(sum(clock.take()))
    return statistics.median(times), statistics.median(host), (statistics.median(kernel) if kernel else None), out


def _pipelined(fn, group, calls):
    """Device time per call of ``calls`` calls enqueued back to back (one barrier before the first): the
    steady state of a training loop, where the host runs ahead and launch overhead and rank skew are
    hidden behind the previous call's kernels. Also the host time per call while queueing them (issue #22's
    "host time per repeated HT call"; a call that waits on the host for its peers shows its wait here)."""
    import cupy

    stream = cupy.cuda.get_current_stream()
    fn()
    stream.synchronize()
    group.barrier()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record(stream)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) * 1e6 / calls
    stop.record(stream)
    stop.synchronize()
    return cupy.cuda.get_elapsed_time(start, stop) * 1e3 / calls, host


def _probe(buf, group, calls: dict, n: int = 5) -> dict:
    """Phase timestamps of the last of ``n`` back-to-back calls of each kernel (the probe build): per
    rank, ns on the GPU's global timer, [first block start, last block start, last 'entries received',
    last 'copies done', 'every peer done']."""
    import cupy

    ht = buf._backend.ht
    ht.retune(probe=1)
    out = {}
    for source, fn in calls.items():
        fn()  # the probe build's first use (dry run and barrier) outside the sequence
        cupy.cuda.get_current_stream().synchronize()
        group.barrier()
        for _ in range(n):
            fn()
        p = buf._backend.ht.read_probe(source)
        out[source] = [int(p[:, 0].min())] + [int(p[:, c].max()) for c in range(4)]
    ht.retune(probe=0)
    return out


def print_probe(per_rank: list[dict]) -> None:
    """Rank by rank, µs from the earliest start of any rank: when its blocks started, had every peer's
    entries, finished their copies, and heard every peer done."""
    for source in per_rank[0]["probe"]:
        rows = [p["probe"][source] for p in per_rank]
        t0 = min(r[0] for r in rows)
        print(f"probe {source} (µs from the first block start of any rank, last of 5 back-to-back calls):")
        print("  rank  start_first  start_last  entries_last  copies_last  all_done")
        for rank, r in enumerate(rows):
            print(f"  {rank:4d}" + "".join(f"  {(v - t0) / 1e3:11.1f}" for v in r))


def _network_bytes(buf, group, cached, combine, in_rank) -> dict:
    """Bytes this rank's HT transport put on the (emulated) network in one cached dispatch and one combine, and
    its messages: one per (token, remote node it has a destination on)."""
    import cupy

    transport = buf._backend.ht_inter.transport

    def total():
        cupy.cuda.get_current_stream().synchronize()
        group.barrier()  # every rank's kernels ended: what they posted is all there is
        return sum(c["bytes"] for c in transport.drained_counters().values())

    b0 = total()
    cached()
    b1 = total()
    combine()
    b2 = total()
    nodes = np.asarray(group.node_of_rank)
    mine = cupy.asnumpy(in_rank)
    msgs = sum(int(mine[:, nodes == n].any(axis=1).sum()) for n in set(nodes.tolist()) if n != nodes[group.rank])
    return {"net_dispatch_bytes": b1 - b0, "net_combine_bytes": b2 - b1, "net_messages": msgs}


def rank_main(group, args, tokens):
    import cupy

    from epkern import Buffer, Config
    from epkern.gpu.tuning import HtTuning, Tuning

    R = group.size
    rng = np.random.default_rng(1234 + group.rank)
    x_np, idx_np, w_np = ht_rank_inputs(group.rank, tokens, args.hidden, args.experts, args.topk, rng)
    if args.fp8:
        from epkern import reference as ref

        data, scales = ref.per_token_cast_to_fp8(x_np)
        x = (cupy.asarray(data.view(np.uint8)), cupy.asarray(scales))
        row_bytes = args.hidden + args.hidden // 128 * 4
    else:
        x = cupy.asarray(x_np)
        row_bytes = args.hidden * 2
    idx, w = cupy.asarray(idx_np), cupy.asarray(w_np)
    # The hint covers two dispatches' outputs and one staged combine input alive at once; the bench keeps a
    # non-cached and a cached dispatch's outputs, the expert output and a combine alive: twice the hint.
    nvl = 2 * Config.get_nvl_buffer_size_hint(args.hidden * 2, R, num_max_tokens_per_rank=tokens, topk=args.topk)
    bw = None
    tuning = Tuning(
        ht=HtTuning(
            threads=args.threads,
            blocks_per_sm=args.blocks_per_sm,
            dispatch_unroll=args.dunroll,
            combine_unroll=args.cunroll,
            combine_loads_first=args.loads_first,
            replay_graph=bool(args.replay_graph),
        )
    )
    nodes = group.num_nodes
    # in-process ranks write each other's outputs anywhere, but HT across nodes needs a heap all the same
    nvl_bytes = 0 if getattr(group, "is_in_process", False) and nodes == 1 else nvl
    rdma_bytes = Config.get_rdma_buffer_size_hint(args.hidden * 2, R, num_nodes=nodes) if nodes > 1 else 0
    with Buffer(group, num_nvl_bytes=nvl_bytes, num_rdma_bytes=rdma_bytes, backend="gpu", _tuning=tuning) as buf:
        if args.num_sms:
            buf.set_num_sms(args.num_sms)
        if group.rank == 0:
            bw = copy_bandwidth_gbs(1 << 30)
        group.barrier()

        def layout():
            return buf.get_dispatch_layout(idx, args.experts)

        per_rank, per_node, per_expert, in_rank, _ = layout()

        def dispatch_given(per_rank, per_node, per_expert, in_rank, _event=None):  # a layout's outputs
            return buf.dispatch(
                x,
                num_tokens_per_rank=per_rank,
                num_tokens_per_rdma_rank=per_node,
                is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert,
                topk_idx=idx,
                topk_weights=w,
            )

        def dispatch():
            return dispatch_given(per_rank, per_node, per_expert, in_rank)

        def layout_dispatch():  # as a step calls them: the layout, then the dispatch given its outputs
            return dispatch_given(*layout())

        recv_x, _, recv_w, _, handle, _ = dispatch()
        for _ in range(2):
            recv_x, _, recv_w, _, handle, _ = dispatch()
        y = (
            recv_x
            if not args.fp8
            else cupy.asarray(rng.standard_normal((handle.num_out_rows, args.hidden), dtype=np.float32).astype(BF16))
        )

        def cached():
            return buf.dispatch(x, handle=handle)

        def combine():
            return buf.combine(y, handle, topk_weights=recv_w)

        # The expert output as a model step makes it: a fresh array outside the Buffer (staged into it by every
        # combine between processes), and the same values written into get_combine_buffer (read in place).
        y_fresh = cupy.array(y)
        y_buf = buf.get_combine_buffer(handle)
        y_buf[...] = y
        with buf.allocating_in_buffer():  # and made by CuPy code inside allocating_in_buffer (read in place too)
            y_alloc = cupy.array(y)

        def combine_alloc():
            return buf.combine(y_alloc, handle, topk_weights=recv_w)

        def combine_fresh():
            return buf.combine(y_fresh, handle, topk_weights=recv_w)

        def combine_buffer():
            return buf.combine(y_buf, handle, topk_weights=recv_w)

        for _ in range(3):
            cached(), combine(), combine_fresh(), combine_buffer(), combine_alloc()
        # the four combines read the same values from four places: their outputs must be bitwise equal
        outs = [fn()[0].view(cupy.uint16) for fn in (combine, combine_fresh, combine_buffer, combine_alloc)]
        if not all(bool(cupy.array_equal(outs[0], o)) for o in outs[1:]):
            raise AssertionError(f"rank {group.rank}, {tokens} tokens: the four combines' outputs differ")
        res = {}
        res["layout_us"], res["layout_host_us"], _, _ = _timed(layout, group, args.iters)
        single = (
            ("layout_dispatch", layout_dispatch),
            ("dispatch", dispatch),
            ("cached_dispatch", cached),
            ("combine", combine),
            ("combine_fresh", combine_fresh),
            ("combine_buffer", combine_buffer),
            ("combine_alloc", combine_alloc),
        )
        # Single calls as a user makes them (the headline rows), then again with events around every kernel (the
        # _kernel rows): the clock's event creations and records sit on the host path before each launch.
        for op, fn in single:
            res[f"{op}_us"], res[f"{op}_host_us"], _, _ = _timed(fn, group, args.iters)
        clock = KernelClock(buf)
        for op, fn in single:
            _, res[f"{op}_kernel_host_us"], res[f"{op}_kernel_us"], _ = _timed(fn, group, args.iters, clock)
        clock.restore()  # pipelined runs without the extra events
        for op, fn in (("cached_dispatch", cached), ("combine", combine), ("combine_buffer", combine_buffer)):
            res[f"{op}_pipelined_us"], res[f"{op}_pipelined_host_us"] = _pipelined(fn, group, args.iters)
        if args.profile:  # every rank calls (the kernels wait for peers); rank 0 prints
            for name, fn in (("cached dispatch", cached), ("combine", combine), ("non-cached dispatch", dispatch)):
                group.barrier()
                text = profile_text(fn, args.iters)
                if group.rank == 0:
                    print(f"==== profile: {args.iters} {name} calls\n{text}")
        if args.probe:
            res["probe"] = _probe(buf, group, {"ht_dispatch.cu": cached, "ht_combine.cu": combine})
        if nodes > 1:  # one cached dispatch and one combine: this rank's NIC bytes, and its messages
            res.update(_network_bytes(buf, group, cached, combine, in_rank))
        res["recv_rows"] = handle.num_recv_tokens
        res["sent_tokens"] = int(cupy.asnumpy(in_rank).any(axis=1).sum())
        res["tokens"] = tokens
        res["num_sms"] = buf._backend.ht.num_sms
        t = buf._backend.ht.tuning
        res["launch"] = (t.threads, t.blocks_per_sm, t.dispatch_unroll, t.combine_unroll, t.combine_loads_first)
        res["ranks_per_gpu"] = buf._backend.rt.ranks_per_gpu
        res["row_bytes"] = row_bytes
        res["copy_bandwidth_GBps"] = bw
        res["device"] = cupy.cuda.runtime.getDeviceProperties(buf._backend.rt.device)["name"].decode()
    return res


# The headline: what MoE code gets (a single call with a sync; the combine of a fresh expert output), then beside it,
# labelled, the figures of calls queued back to back and of a combine whose input already sits in the Buffer.
HEADLINE = (
    ("layout_dispatch", "layout + dispatch"),
    ("dispatch", "dispatch"),
    ("cached_dispatch", "cached dispatch"),
    ("combine_fresh", "combine of a fresh expert output"),
    ("combine_buffer", "the same written into get_combine_buffer"),
    ("combine_alloc", "made inside allocating_in_buffer"),
)
BESIDE = (
    ("combine", "combine of the dispatch output (in place)"),
    ("cached_dispatch_pipelined", "cached dispatch, pipelined"),
    ("combine_pipelined", "combine, pipelined"),
    ("combine_buffer_pipelined", "combine from get_combine_buffer, pipelined"),
)


def headline_lines(r: dict) -> list[str]:
    """The headline rows of one token count (µs and floor ratio where there is a floor), and the others beside them."""

    def part(op, label):
        ratio = r.get(f"{op}_floor_ratio")
        return f"{label} {r[f'{op}_us']:.1f}" + (f" ({ratio:.2f} of the floor)" if ratio else "")

    t = r["tokens_per_rank"]
    return [
        f"{t:>7} headline, single calls with a sync: " + "; ".join(part(op, label) for op, label in HEADLINE),
        f"{t:>7} beside (not what a step gets): " + "; ".join(part(op, label) for op, label in BESIDE),
    ]


def summarize(per_rank: list[dict], args) -> dict:
    r0 = per_rank[0]
    R = len(per_rank)
    row = r0["row_bytes"]
    out = {
        "ranks": R,
        "tokens_per_rank": r0["tokens"],
        "hidden": args.hidden,
        "topk": args.topk,
        "experts": args.experts,
        "fp8": args.fp8,
        "num_sms": r0["num_sms"],
        "launch": r0["launch"],
        "device": r0["device"],
        "ranks_per_gpu": r0["ranks_per_gpu"],
        "copy_bandwidth_GBps": r0["copy_bandwidth_GBps"],
    }
    if "net_messages" in r0:  # across nodes: network bytes against each token's row once per remote node
        msgs = sum(p["net_messages"] for p in per_rank)
        out["nodes"] = args.ranks_per_node and R // args.ranks_per_node
        out["net_messages"] = msgs
        out["net_min_dispatch_bytes"] = msgs * row
        out["net_min_combine_bytes"] = msgs * args.hidden * 2
        for op in ("dispatch", "combine"):
            out[f"net_{op}_bytes"] = sum(p[f"net_{op}_bytes"] for p in per_rank)
            out[f"net_{op}_over_min"] = out[f"net_{op}_bytes"] / max(1, out[f"net_min_{op}_bytes"])
    recv = sum(p["recv_rows"] for p in per_rank)
    sent = sum(p["sent_tokens"] for p in per_rank)
    tokens = sum(p["tokens"] for p in per_rank)
    for op in OPS:
        out[f"{op}_us"] = max(p[f"{op}_us"] for p in per_rank)
        out[f"{op}_host_us"] = statistics.median(p[f"{op}_host_us"] for p in per_rank)
    # Combine moves BF16 rows whatever the dispatch dtype.
    for op, rows_read, rows_written, rb in (
        ("layout_dispatch", sent, recv, row),  # the layout's own bytes (topk_idx, counts) are not counted
        ("dispatch", sent, recv, row),
        ("dispatch_kernel", sent, recv, row),
        ("cached_dispatch", sent, recv, row),
        ("cached_dispatch_kernel", sent, recv, row),
        ("cached_dispatch_pipelined", sent, recv, row),
        ("combine", recv, tokens, args.hidden * 2),
        ("combine_kernel", recv, tokens, args.hidden * 2),
        ("combine_pipelined", recv, tokens, args.hidden * 2),
        ("combine_fresh", recv, tokens, args.hidden * 2),
        ("combine_buffer", recv, tokens, args.hidden * 2),
        ("combine_buffer_pipelined", recv, tokens, args.hidden * 2),
        ("combine_alloc", recv, tokens, args.hidden * 2),
    ):
        logical_bytes = recv / R * rb
        out[f"{op}_logical_GBps"] = logical_bytes / (out[f"{op}_us"] * 1e-6) / 1e9
        if r0["ranks_per_gpu"] == R and r0["copy_bandwidth_GBps"]:
            floor_bytes = (rows_read + rows_written) * rb
            out[f"{op}_floor_bytes"] = floor_bytes
            out[f"{op}_floor_us"] = floor_bytes / (r0["copy_bandwidth_GBps"] * 1e9) * 1e6
            out[f"{op}_floor_ratio"] = out[f"{op}_floor_us"] / out[f"{op}_us"]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p, tokens="4096")
    p.add_argument("--fp8", action="store_true")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--num-sms", type=int, default=0)
    p.add_argument("--threads", type=int, default=512, help="threads per block of the HT copy kernels")
    p.add_argument("--dunroll", type=int, default=4, help="16-byte loads in flight per lane, dispatch")
    p.add_argument("--cunroll", type=int, default=1, help="16-byte loads in flight per lane and peer, combine")
    p.add_argument("--blocks-per-sm", type=int, default=1, help="blocks of the HT copy kernels per SM of num_sms")
    p.add_argument("--loads-first", type=int, default=1, help="combine: 1 = every peer's loads before the adds")
    p.add_argument("--probe", action="store_true", help="also print the kernels' phase timestamps per rank")
    p.add_argument("--replay-graph", type=int, default=0, help="1: replayed HT calls launch as one-kernel graphs")
    p.add_argument("--profile", action="store_true", help="rank 0 prints a cProfile of the HT calls' host path")
    p.add_argument("--inprocess", type=int, default=0, help="run this many in-process ranks instead of MPI")
    p.add_argument("--ranks-per-node", type=int, default=0, help="virtual nodes of this many ranks (HT across nodes)")
    p.add_argument("--json", type=str, default=None)
    p.add_argument("--plot", type=str, default=None, help="PNG of GB/s against tokens per rank")
    args = p.parse_args(argv)
    need("bench_ht.py")
    token_list = [int(t) for t in args.tokens.split(",")]

    results = []
    for tokens in token_list:
        if args.inprocess:
            from epkern.group import run_in_process

            per_rank = run_in_process(
                rank_main, args.inprocess, args, tokens, timeout_s=600, ranks_per_node=args.ranks_per_node or None
            )
            rank = 0
        else:
            import os

            from mpi4py import MPI

            from epkern.group import as_group

            if args.ranks_per_node:  # read when the group is made
                os.environ["EPKERN_RANKS_PER_NODE"] = str(args.ranks_per_node)

            group = as_group(MPI.COMM_WORLD)
            per_rank = group.allgather_object(rank_main(group, args, tokens))
            rank = group.rank
        if rank == 0:
            results.append(summarize(per_rank, args))
            if args.probe:
                print_probe(per_rank)
    if results:
        mode = f"{args.inprocess} in-process ranks" if args.inprocess else f"{results[0]['ranks']} MPI processes"
        where = f"across {results[0]['nodes']} virtual nodes" if results[0].get("nodes") else "intranode"
        print(
            f"HT {where}, {mode}, {results[0]['device']}, H={args.hidden} top-{args.topk} "
            f"E={args.experts} {'FP8' if args.fp8 else 'BF16'} dispatch, SMs/rank={results[0]['num_sms']}, "
            f"threads/blocks-per-SM/dunroll/cunroll/loads-first {results[0]['launch']}, "
            f"copy bw {results[0]['copy_bandwidth_GBps']:.0f} GB/s"
        )
        hdr = (
            f"{'tokens':>7} {'op':>26} {'us':>9} {'GB/s logical':>12} {'floor us':>9} {'floor ratio':>11} "
            f"{'host us':>8}"
        )
        print(hdr)
        for r in results:
            for op in OPS:
                fl = r.get(f"{op}_floor_us")
                print(
                    f"{r['tokens_per_rank']:>7} {op:>26} {r[f'{op}_us']:>9.1f} "
                    f"{r.get(f'{op}_logical_GBps', float('nan')):>12.1f} "
                    f"{fl if fl else float('nan'):>9.1f} {r.get(f'{op}_floor_ratio', float('nan')):>11.2f} "
                    f"{r[f'{op}_host_us']:>8.1f}"
                )
        for r in results:
            print("\n".join(headline_lines(r)))
        for r in results:
            if "net_messages" in r:
                print(
                    f"{r['tokens_per_rank']:>7} network: {r['net_messages']} messages; dispatch "
                    f"{r['net_dispatch_bytes']} B = {r['net_dispatch_over_min']:.3f} x the minimum (rows once per "
                    f"remote node), combine {r['net_combine_bytes']} B = {r['net_combine_over_min']:.3f} x"
                )
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        if args.plot and len(results) > 1:
            try:
                import matplotlib

                matplotlib.use("Agg")
                import matplotlib.pyplot as plt

                fig, ax = plt.subplots(figsize=(6, 4))
                for op in ("cached_dispatch", "combine", "cached_dispatch_pipelined", "combine_pipelined"):
                    ax.plot(
                        [r["tokens_per_rank"] for r in results],
                        [r[f"{op}_logical_GBps"] for r in results],
                        marker="o",
                        label=op,
                    )
                ax.set_xscale("log", base=2)
                ax.set_xlabel("tokens per rank")
                ax.set_ylabel("GB/s per rank (logical)")
                ax.set_title(mode)
                ax.legend()
                fig.tight_layout()
                fig.savefig(args.plot, dpi=120)
            except ImportError:
                print("matplotlib missing: no plot")
    return results


if __name__ == "__main__":
    main()
