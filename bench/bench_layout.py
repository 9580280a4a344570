"""Benchmark get_dispatch_layout against its memory floor and the launch floor.

PYTHONPATH=src python3 bench/bench_layout.py [--tokens 4096 --topk 8 --experts 256 --ranks 8]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import copy_bandwidth_gbs, event_median_us, graph_average_us, host_overhead_us, need  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--json", type=str, default=None, help="also write the results here")
    args = p.parse_args(argv)
    need("bench_layout.py")

    import cupy

    from epkern.dispatch_layout import get_dispatch_layout

    rng = np.random.default_rng()
    # Several input sets, rotated, so repeated runs do not just re-read one set from L2.
    sets = []
    for _ in range(8):
        idx = np.argsort(rng.random((args.tokens, args.experts)), axis=1)[:, : args.topk].astype(np.int64)
        sets.append(cupy.asarray(idx))
    state = {"i": 0}

    def call(check=False):
        state["i"] = (state["i"] + 1) % len(sets)
        return get_dispatch_layout(sets[state["i"]], args.experts, args.ranks, check_indices=check)

    empty = cupy.RawKernel('extern "C" __global__ void e() {}', "e")

    def launch_empty():
        empty((1,), (32,), ())

    bw = copy_bandwidth_gbs()
    res = {
        "config": vars(args),
        "device": cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode(),
        "copy_bandwidth_GBps": bw,
        "kernel_us_event_median": event_median_us(call),
        "kernel_us_graph_avg": graph_average_us(call),
        "empty_kernel_us_event_median": event_median_us(launch_empty),
        "empty_kernel_us_graph_avg": graph_average_us(launch_empty),
        "host_us_per_call_async": host_overhead_us(call),
        "host_us_per_call_checked": host_overhead_us(lambda: call(True), calls=500),
    }
    moved = args.tokens * args.topk * 8 + args.tokens * args.ranks + 4 * (args.ranks + args.experts)
    res["bytes_moved"] = moved
    res["memory_floor_us"] = moved / (bw * 1e9) * 1e6
    for k in ("kernel_us_event_median", "kernel_us_graph_avg"):
        if res[k]:
            res[f"floor_ratio_{k}"] = res["memory_floor_us"] / res[k]
    cfg = f"T={args.tokens} K={args.topk} E={args.experts} R={args.ranks}"
    print(f"get_dispatch_layout {cfg} on {res['device']}")
    for k, v in res.items():
        if k != "config":
            print(f"  {k:36s} {v:.3f}" if isinstance(v, float) else f"  {k:36s} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
