"""Tuning of the GPU kernels: frozen, typed, private (``Buffer(..., _tuning=Tuning(...))``).

The defaults are the measured choices (docs/performance.md); tests and benchmarks vary them through these
objects, never through the process environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class HtTuning:
    """Launch shape of the HT copy kernels (tuned by bench/bench_ht.py --sweep): threads per block, blocks per
    SM of num_sms (the kernels are compiled to fit that many per SM), loads in flight per lane, whether combine
    issues every peer's loads before adding; ``probe`` = 1 builds the kernels that record phase timestamps.
    ``replay_graph``: a replayed cached dispatch / combine (ht_replay.py) launches as a one-kernel CUDA graph whose
    node gets the call's arguments (an experiment, off until its A/B on a GPU: bench_ht.py --replay-graph)."""

    threads: int = 512
    blocks_per_sm: int = 1
    dispatch_unroll: int = 4
    combine_unroll: int = 1
    combine_loads_first: int = 1
    probe: int = 0
    replay_graph: bool = False


@dataclass(frozen=True)
class LLTuning:
    """``poll_sleep_ns``: ns a waiting LL thread sleeps between polls (None: 200 when ranks share a GPU, else 0).
    ``dispatch_pull`` / ``combine_pull``: receivers read rows from peers instead of senders pushing them
    (None: chosen from the routes, pull when every peer is reached by IPC). ``replay``: repeated calls replay
    the validated call's launch (ll/plans.py); False validates every call."""

    poll_sleep_ns: int | None = None
    dispatch_pull: bool | None = None
    combine_pull: bool | None = None
    replay: bool = True


@dataclass(frozen=True)
class Tuning:
    ht: HtTuning = field(default_factory=HtTuning)
    ll: LLTuning = field(default_factory=LLTuning)
