"""Demo: dispatch -> a stand-in expert -> combine across in-process ranks, validated and timed.

    python -m epkern.demo [--ranks 4] [--tokens 256] [--hidden 1024] [--experts 32] [--topk 4]

The stand-in expert multiplies every received row by 2, so the combined result must be exactly
``2 · x · (number of ranks the token reached)`` (high-throughput) and ``Σ_k 2 · w_k · x`` (low-latency);
integer-valued inputs keep every sum exact, so the check is equality, not a tolerance.
"""

from __future__ import annotations

import argparse
import statistics
import time

import ml_dtypes
import numpy as np

from . import _env
from .buffer import Buffer, resolve_backend
from .group import run_in_process

BF16 = ml_dtypes.bfloat16


def _host(a):
    """numpy view of a result (CuPy arrays are copied to the host)."""
    return a if isinstance(a, np.ndarray) else a.get()


def _rank_main(group, args, backend):
    rng = np.random.default_rng(1000 + group.rank)
    t, h, e, k = args.tokens, args.hidden, args.experts, args.topk
    x_np = rng.integers(-8, 9, size=(t, h)).astype(BF16)
    idx_np = np.argsort(rng.random((t, e)), axis=1)[:, :k].astype(np.int64)
    idx_np[rng.random((t, k)) < 0.05] = -1
    w_np = rng.choice(np.array([0.25, 0.5, 1.0, 2.0], np.float32), size=(t, k)).astype(np.float32)
    if backend == "gpu":
        import cupy

        x, topk_idx, weights = cupy.asarray(x_np), cupy.asarray(idx_np), cupy.asarray(w_np)
        to_device = cupy.asarray
    else:
        x, topk_idx, weights = x_np, idx_np, w_np
        to_device = np.asarray
    times = {"dispatch": [], "combine": [], "ll_dispatch": [], "ll_combine": []}
    ll_bytes = Buffer.get_low_latency_rdma_size_hint(t, h, group.size, e)
    with Buffer(group, num_rdma_bytes=ll_bytes, backend=backend) as buf:
        for _ in range(args.iters):
            t0 = time.perf_counter()
            per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, e)
            recv_x, recv_idx, recv_w, per_expert_list, handle, _ = buf.dispatch(
                x,
                num_tokens_per_rank=per_rank,
                is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert,
                topk_idx=topk_idx,
                topk_weights=weights,
            )
            t1 = time.perf_counter()
            y = to_device((_host(recv_x).astype(np.float32) * 2).astype(BF16))  # the stand-in expert
            t1b = time.perf_counter()
            combined, combined_w, _ = buf.combine(y, handle, topk_weights=recv_w)
            combined, combined_w = _host(combined), _host(combined_w)
            t2 = time.perf_counter()
            reached = _host(in_rank).sum(axis=1, dtype=np.float32)[:, None]
            want = (np.float32(0) + x_np.astype(np.float32) * 2 * reached).astype(BF16)  # +0 where unsent
            assert np.array_equal(combined.view(np.uint16), want.view(np.uint16)), "HT combine mismatch"
            want_w = np.where(idx_np >= 0, w_np, 0).astype(np.float32)
            assert np.array_equal(combined_w, want_w), "HT combined weights mismatch"
            times["dispatch"].append(t1 - t0)
            times["combine"].append(t2 - t1b)

            t3 = time.perf_counter()
            ll_x, ll_count, ll_handle, _, _ = buf.low_latency_dispatch(x, topk_idx, t, e, use_fp8=False)
            t4 = time.perf_counter()
            ll_y = to_device((_host(ll_x).astype(np.float32) * 2).astype(BF16))  # rows past the counts too
            ll_out, _, _ = buf.low_latency_combine(ll_y, topk_idx, weights, ll_handle)
            ll_out = _host(ll_out)
            t5 = time.perf_counter()
            acc = np.zeros((t, h), np.float32)
            for kk in range(k):
                sel = idx_np[:, kk] >= 0
                acc[sel] += w_np[sel, kk, None] * (x_np[sel].astype(np.float32) * 2)
            assert np.array_equal(ll_out.view(np.uint16), acc.astype(BF16).view(np.uint16)), "LL mismatch"
            times["ll_dispatch"].append(t4 - t3)
            times["ll_combine"].append(t5 - t4)
        return {name: statistics.median(v) for name, v in times.items() if v}, int(len(recv_x))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=_env.num_thread_ranks() or 4)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--backend", choices=("auto", "gpu", "cpu"), default="auto")
    args = p.parse_args(argv)

    backend = resolve_backend(args.backend)
    if backend == "gpu":
        print("epkern demo on the GPU backend: in-process ranks sharing one GPU, HT and LL kernels over CUDA IPC")
    else:
        why = "asked for" if args.backend == "cpu" else "no CUDA GPU found"
        print(f"epkern demo on the CPU backend ({why}): the numpy reference across in-process ranks")
    print(
        f"  {args.ranks} ranks, {args.tokens} tokens/rank, hidden {args.hidden}, {args.experts} experts, "
        f"top-{args.topk}, BF16, {args.iters} iterations"
    )
    results = run_in_process(_rank_main, args.ranks, args, backend)
    row_bytes = args.hidden * 2
    print("  validated: HT combine(expert(dispatch(x))) and the LL weighted combine exact on every rank")
    print(f"  {'op':12s} {'median ms (slowest rank)':>26s} {'recv rows (rank 0)':>20s}")
    for op in [op for op in ("dispatch", "combine", "ll_dispatch", "ll_combine") if op in results[0][0]]:
        ms = max(r[0][op] for r in results) * 1e3
        print(f"  {op:12s} {ms:26.2f} {results[0][1]:20d}")
    total_rows = sum(r[1] for r in results)
    print(f"  HT dispatch moved {total_rows} rows ({total_rows * row_bytes / 1e6:.1f} MB) over all ranks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
