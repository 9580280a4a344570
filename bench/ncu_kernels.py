"""One call of each HT and LL kernel inside a profiler range, for Nsight Compute (issue #22 item 5).

    ncu --profile-from-start off --clock-control none --section SpeedOfLight ... python3 bench/ncu_kernels.py

One in-process rank (ncu replays each kernel alone, so a kernel that waits for other ranks' kernels cannot be
profiled beside them; with one rank every wait is for itself): every token goes to rank 0, so the bytes moved are
one read and one write of each row, the same per-row work as with 8 ranks but without peers' concurrent traffic.
Each call runs twice first (compilation, the first-use launches, replay plans), then once between
``cudaProfilerStart`` / ``cudaProfilerStop``: non-cached dispatch (BF16), cached dispatch (BF16, FP8), combine of
the dispatch output, LL dispatch (BF16, FP8) and LL combine. Every output is checked against numpy afterwards (the
profiler's replays restore memory, so a wrong result would be a real one).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workload import BF16, add_workload_args, ht_rank_inputs  # noqa: E402


def rank_main(group, args):
    import epkern
    from epkern import reference

    gpu = args.backend == "gpu"
    if gpu:
        import cupy

        xp = cupy
    else:  # the same calls on the CPU backend (a smoke test of this script where there is no GPU)
        xp = np

    T, H, E, K = int(args.tokens), args.hidden, args.experts, args.topk
    x, idx, w = ht_rank_inputs(group.rank, T, H, E, K)
    q, s = reference.per_token_cast_to_fp8(x)  # e4m3 values and float32 scales, as DeepEP's per-token cast
    dx, didx, dw, dq, ds = (xp.asarray(a) for a in (x, idx, w, q.view(np.uint8), s))
    ht = epkern.Buffer(group, num_nvl_bytes=args.nvl_mb << 20, backend=args.backend)
    lt = min(args.ll_tokens, T)
    ll_bytes = epkern.Buffer.get_low_latency_rdma_size_hint(lt, H, group.size, E)
    ll = epkern.Buffer(group, num_rdma_bytes=ll_bytes, low_latency_mode=True, backend=args.backend)
    lx, lidx, lw = dx[:lt], didx[:lt], dw[:lt]
    out = {}

    def calls():
        per_rank, _, per_expert, in_rank, _ = ht.get_dispatch_layout(didx, E)
        recv_x, _, recv_w, _, handle, _ = ht.dispatch(
            dx, topk_idx=didx, topk_weights=dw, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
        )  # fmt: skip
        out["cached"] = ht.dispatch(dx, handle=handle)[0]
        ht.dispatch((dq, ds), handle=handle)  # FP8: profiled, its exactness is the GPU tests'
        out["combined"] = ht.combine(recv_x, handle, topk_weights=recv_w)[0]
        recv, _, lh, _, _ = ll.low_latency_dispatch(lx, lidx, lt, E, use_fp8=False)
        ll.low_latency_dispatch(lx, lidx, lt, E, use_fp8=True)
        out["ll_combined"] = ll.low_latency_combine(recv, lidx, lw, lh)[0]

    for _ in range(2):
        calls()
    if gpu:
        cupy.cuda.Device().synchronize()
        cupy.cuda.runtime.profilerStart()
    calls()
    if gpu:
        cupy.cuda.Device().synchronize()
        cupy.cuda.runtime.profilerStop()
    host = {k: (out[k].get() if gpu else np.asarray(out[k])) for k in ("cached", "combined", "ll_combined")}
    return _check(host, x, w, lt)


def _check(out, x, w, lt) -> list[str]:
    """What differs from numpy (one rank: every token comes back to this rank once)."""
    bad = []
    # one source: the received rows are the sent tokens in token order (every token has a selection here)
    if not np.array_equal(out["cached"].view(np.int16), x.view(np.int16)):
        bad.append("cached")
    combined = out["combined"].astype(np.float32)
    # one rank: the combine sums this rank's single copy of each row (weighted by nothing: weights go out only)
    if not np.array_equal(combined, x.astype(np.float32)):
        bad.append("combined")
    llc = out["ll_combined"].astype(np.float32)
    ref = (x[:lt].astype(np.float32) * w[:lt].sum(axis=1, keepdims=True)).astype(BF16).astype(np.float32)
    if np.abs(llc - ref).max() > np.abs(ref).max() * 2**-6:  # BF16 sum of 8 weighted BF16 rows: rounding only
        bad.append("ll_combined")
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p, tokens="4096")
    p.add_argument("--ll-tokens", type=int, default=128)
    p.add_argument("--nvl-mb", type=int, default=512, help="HT Buffer, MiB")
    p.add_argument("--backend", default="gpu", choices=("gpu", "cpu"))
    args = p.parse_args(argv)
    from epkern.group import run_in_process

    bad = run_in_process(rank_main, 1, args, timeout_s=600)[0]
    print(f"ncu_kernels: outputs {'differ: ' + ', '.join(bad) if bad else 'checked'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
