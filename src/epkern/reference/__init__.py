"""numpy oracle of every epkern operation (shared/reference/semantics.md), bit-exact and deterministic.
Functions taking lists evaluate all ranks at once (index = rank)."""

from .fp8 import per_token_cast_back, per_token_cast_to_fp8, unpack_ue8m0
from .high_throughput import HTDispatchResult, HTHandle, ht_cached_dispatch, ht_combine, ht_dispatch
from .layout import DispatchLayout, get_dispatch_layout
from .low_latency import (
    LLDispatchResult,
    canonicalize_ll_recv,
    get_low_latency_rdma_size_hint,
    ll_combine,
    ll_dispatch,
)

__all__ = [
    "DispatchLayout",
    "HTDispatchResult",
    "HTHandle",
    "LLDispatchResult",
    "canonicalize_ll_recv",
    "get_dispatch_layout",
    "get_low_latency_rdma_size_hint",
    "ht_cached_dispatch",
    "ht_combine",
    "ht_dispatch",
    "ll_combine",
    "ll_dispatch",
    "per_token_cast_back",
    "per_token_cast_to_fp8",
    "unpack_ue8m0",
]
