"""What the HT copy loops alone can reach on one GPU: the data movement of dispatch (scatter) and combine
(gather) for all ranks sharing the GPU, in one launch and without any synchronisation between ranks,
against the HBM floor (rows read + rows written over the measured copy bandwidth). Sweeps the loop shape.

    python3 bench/bench_copy_patterns.py --ranks 8 --tokens 4096 --hidden 7168 --topk 8 --experts 256

Every variant's output is checked (integer-valued data, exact) before it is timed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import copy_bandwidth_gbs, event_median_us  # noqa: E402


def routing(ranks, tokens, experts, topk, seed=7):
    """slot[t, d] over all ranks' tokens (rank-major): the row of token t in region d, as dispatch lays
    them out (source rank, then token order), or -1."""
    rng = np.random.default_rng(seed)
    idx = np.argsort(rng.random((ranks * tokens, experts)), axis=1)[:, :topk]
    in_rank = np.zeros((ranks * tokens, ranks), bool)
    np.put_along_axis(in_rank, idx // (experts // ranks), True, axis=1)
    slot = np.where(in_rank, np.cumsum(in_rank, axis=0) - 1, -1).astype(np.int32)
    return slot, in_rank.sum(0)


def main(argv=None):
    import cupy

    from epkern import kernel_loader

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--json", type=str, default=None)
    args = p.parse_args(argv)
    R, row_bytes = args.ranks, args.hidden * 2
    slot_np, per_region = routing(R, args.tokens, args.experts, args.topk)
    T = R * args.tokens
    region_rows = int(per_region.max())
    recv = int(per_region.sum())
    sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
    bw = copy_bandwidth_gbs(1 << 30)

    rng = np.random.default_rng(1)
    x = cupy.asarray(rng.integers(-8, 9, size=(T, args.hidden)).astype(np.float32)).astype(cupy.float32)
    x_bf16 = (x.view(cupy.uint32) >> 16).astype(cupy.uint16)  # exact: small integers
    slot = cupy.asarray(slot_np)
    regions = cupy.empty((R * region_rows, args.hidden), dtype=cupy.uint16)
    out = cupy.empty((T, args.hidden), dtype=cupy.uint16)
    # expected gather output: each token's rows summed = x * number of regions it went to
    fan = cupy.asarray((slot_np >= 0).sum(1).astype(np.float32))[:, None]
    want_gather = ((x * fan).view(cupy.uint32) >> 16).astype(cupy.uint16)
    rows_d = [cupy.asarray(np.nonzero(slot_np[:, d] >= 0)[0]) for d in range(R)]

    def check_scatter():
        for d in range(R):
            got = regions[d * region_rows : d * region_rows + len(rows_d[d])]
            assert bool((got == x_bf16[rows_d[d]]).all()), f"scatter region {d} wrong"

    results = []
    floor = {"scatter": int((slot_np >= 0).any(1).sum()) + recv, "gather": recv + T}
    for kind, threads, unroll, blocks_per_sm, cs, first in itertools.product(
        ("scatter", "gather"), (512, 1024), (2, 4, 8), (1, 2), (0, 1), (0, 1)
    ):
        if kind == "scatter" and first:
            continue
        if threads * blocks_per_sm > 2048 or (kind == "gather" and first and unroll > 4):
            continue
        defines = dict(
            EPK_NUM_RANKS=R,
            EPK_ROW_BYTES=row_bytes,
            EPK_THREADS=threads,
            EPK_UNROLL=unroll,
            EPK_STORE_CS=cs,
            EPK_LOADS_FIRST=first,
            EPK_CTRL_BYTES=1 << 17,
        )
        fn = kernel_loader.get_function("bench_copy_patterns.cu", f"epk_bench_{kind}", defines)
        grid = sms * blocks_per_sm
        if kind == "scatter":
            regions.fill(0xFFFF)

            def call(fn=fn, grid=grid, threads=threads):
                fn((grid,), (threads,), (np.int32(T), x_bf16, slot, regions, np.int64(region_rows)))

            call()
            check_scatter()
        else:
            out.fill(0xFFFF)

            def call(fn=fn, grid=grid, threads=threads):
                fn((grid,), (threads,), (np.int32(T), regions, slot, out, np.int64(region_rows)))

            call()
            assert bool((out == want_gather).all()), f"gather wrong {defines}"
        us = event_median_us(call, iters=10, warmup=2)
        floor_us = floor[kind] * row_bytes / (bw * 1e9) * 1e6
        res = dict(
            kind=kind,
            threads=threads,
            unroll=unroll,
            blocks_per_sm=blocks_per_sm,
            store_cs=cs,
            loads_first=first,
            us=us,
            floor_us=floor_us,
            ratio=floor_us / us,
        )
        results.append(res)
        print(json.dumps(res), flush=True)
    print(f"copy bandwidth {bw:.0f} GB/s; rows read+written: scatter {floor['scatter']}, gather {floor['gather']}")
    for kind in ("scatter", "gather"):
        best = max((r for r in results if r["kind"] == kind), key=lambda r: r["ratio"])
        print(f"best {kind}: {best}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(copy_bandwidth_GBps=bw, results=results), indent=1))


if __name__ == "__main__":
    main()
