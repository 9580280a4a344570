"""Argument checks of the reference. Every failure raises ``ArgumentError`` naming the argument and what
was expected. Self-contained (numpy and ml_dtypes only) so that the reference imports without the rest of
epkern's machinery."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import ml_dtypes
import numpy as np

from ..errors import ArgumentError

BF16 = np.dtype(ml_dtypes.bfloat16)
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
F32 = np.dtype(np.float32)


def check_int(value, name: str, *, min_value: int | None = None) -> int:
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise ArgumentError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if min_value is not None and value < min_value:
        raise ArgumentError(f"{name}: expected an int >= {min_value}, got {value}")
    return value


def check_num_experts(num_experts, num_ranks: int, name: str = "num_experts") -> int:
    num_experts = check_int(num_experts, name, min_value=1)
    if num_experts % num_ranks:
        raise ArgumentError(f"{name}: expected a multiple of the number of ranks ({num_ranks}), got {num_experts}")
    return num_experts


def check_rank_list(values, name: str, num_ranks: int | None = None) -> list:
    """A list/tuple with one entry per rank (``num_ranks`` of them when given, at least one otherwise)."""
    if not isinstance(values, list | tuple):
        raise ArgumentError(f"{name}: expected a list with one entry per rank, got {type(values).__name__}")
    if num_ranks is None and not values:
        raise ArgumentError(f"{name}: expected at least one rank, got an empty list")
    if num_ranks is not None and len(values) != num_ranks:
        raise ArgumentError(f"{name}: expected one entry per rank ({num_ranks}), got {len(values)}")
    return list(values)


def check_array(arr, name: str, dtypes: Sequence, shape: Sequence[int | None]) -> np.ndarray:
    """``arr`` as a numpy array of one of ``dtypes`` with the given shape (None entries match any size)."""
    arr = np.asarray(arr)
    allowed = [np.dtype(d) for d in dtypes]
    if arr.dtype not in allowed:
        names = " or ".join(str(d) for d in allowed)
        raise ArgumentError(f"{name}: expected dtype {names}, got {arr.dtype}")
    if arr.ndim != len(shape) or any(w is not None and w != g for w, g in zip(shape, arr.shape, strict=False)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ArgumentError(f"{name}: expected shape {want}, got {list(arr.shape)}")
    return arr


def check_topk_idx(topk_idx, num_experts: int, name: str = "topk_idx", num_tokens: int | None = None) -> np.ndarray:
    """[T, K] integer array (int64 or int32; any integer kind) with entries in [-1, num_experts) -> int64."""
    topk_idx = np.asarray(topk_idx)
    if topk_idx.dtype.kind not in "iu":
        raise ArgumentError(f"{name}: expected an integer (int64) array, got dtype {topk_idx.dtype}")
    if topk_idx.ndim != 2:
        raise ArgumentError(f"{name}: expected shape [T, K], got {list(topk_idx.shape)}")
    if num_tokens is not None and topk_idx.shape[0] != num_tokens:
        raise ArgumentError(f"{name}: expected {num_tokens} rows (one per token), got {topk_idx.shape[0]}")
    if topk_idx.size:
        lo, hi = int(topk_idx.min()), int(topk_idx.max())
        if lo < -1 or hi >= num_experts:
            raise ArgumentError(f"{name}: expected entries in [-1, {num_experts}), got values in [{lo}, {hi}]")
    return topk_idx.astype(np.int64)


def check_rank_to_node(rank_to_node, num_ranks: int, name: str = "rank_to_node") -> np.ndarray | None:
    """None, or int64 [R] node index per rank, nodes numbered 0..N-1 with every node used."""
    if rank_to_node is None:
        return None
    try:
        nodes = np.asarray([int(n) for n in rank_to_node], dtype=np.int64)
    except (TypeError, ValueError):
        raise ArgumentError(f"{name}: expected a sequence of {num_ranks} integer node indices") from None
    if len(nodes) != num_ranks:
        raise ArgumentError(f"{name}: expected {num_ranks} node indices (one per rank), got {len(nodes)}")
    if nodes.min() < 0 or set(nodes.tolist()) != set(range(int(nodes.max()) + 1)):
        raise ArgumentError(f"{name}: expected node indices 0..N-1 with every node used, got {nodes.tolist()}")
    return nodes
