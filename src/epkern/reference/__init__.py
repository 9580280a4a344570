"""numpy oracle of every epkern operation (shared/reference/semantics.md): bit-exact and deterministic, with
the float32 order of every accumulation stated in the docstrings (GPU kernels are compared at max diff 0).
Functions taking lists evaluate all ranks at once (list index = rank). Needs only numpy and ml_dtypes;
BF16 is ``ml_dtypes.bfloat16``, FP8 ``ml_dtypes.float8_e4m3fn``."""

from ._checks import BF16, FP8
from .fp8 import pack_ue8m0, per_token_cast_back, per_token_cast_to_fp8, unpack_ue8m0
from .high_throughput import HTDispatchResult, HTHandle, ht_cached_dispatch, ht_combine, ht_dispatch
from .layout import DispatchLayout, get_dispatch_layout
from .low_latency import (
    CanonicalLLRecv,
    LLDispatchResult,
    LLHandle,
    canonicalize_ll_recv,
    get_low_latency_rdma_size_hint,
    ll_combine,
    ll_dispatch,
)

__all__ = [
    "BF16",
    "FP8",
    "CanonicalLLRecv",
    "DispatchLayout",
    "HTDispatchResult",
    "HTHandle",
    "LLDispatchResult",
    "LLHandle",
    "canonicalize_ll_recv",
    "get_dispatch_layout",
    "get_low_latency_rdma_size_hint",
    "ht_cached_dispatch",
    "ht_combine",
    "ht_dispatch",
    "ll_combine",
    "ll_dispatch",
    "pack_ue8m0",
    "per_token_cast_back",
    "per_token_cast_to_fp8",
    "unpack_ue8m0",
]
