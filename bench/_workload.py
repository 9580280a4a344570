"""The MoE workload the benchmarks share: command-line sizes and the HT inputs of one rank.

bench_ht.py and bench_a2a_nccl.py draw their inputs here, so the NCCL baseline moves exactly epkern's rows."""

from __future__ import annotations

import ml_dtypes
import numpy as np

BF16 = ml_dtypes.bfloat16


def add_workload_args(p, tokens: str) -> None:
    """--tokens (a comma list sweeps), --hidden, --topk, --experts with DeepEP's benchmark defaults."""
    p.add_argument("--tokens", type=str, default=tokens, help="tokens per rank; a comma list sweeps")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)


def ht_rank_inputs(rank: int, tokens: int, hidden: int, experts: int, topk: int, rng=None):
    """Rank ``rank``'s x (BF16 [T, H], standard normal), topk_idx (int64 [T, K], distinct experts, uniformly
    random) and weights (float32 [T, K]), drawn in that order from ``rng`` (default: seeded 1234 + rank; pass
    that generator to draw more from it afterwards)."""
    rng = np.random.default_rng(1234 + rank) if rng is None else rng
    x = rng.standard_normal((tokens, hidden), dtype=np.float32).astype(BF16)
    idx = np.argsort(rng.random((tokens, experts)), axis=1)[:, :topk].astype(np.int64)
    w = rng.random((tokens, topk), dtype=np.float32)
    return x, idx, w
