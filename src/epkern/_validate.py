"""Argument checks shared by every public entry point. Each error names the argument and what was
expected, and is raised before anything is launched."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

from .errors import ArgumentError


def check_int(value, name: str, *, min_value: int | None = None, max_value: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if min_value is not None and value < min_value:
        raise ArgumentError(f"{name}: expected an int >= {min_value}, got {value}")
    if max_value is not None and value > max_value:
        raise ArgumentError(f"{name}: expected an int <= {max_value}, got {value}")
    return value


def as_device_array(obj, name: str):
    """A CuPy view of ``obj`` (CuPy array, ``__cuda_array_interface__`` or DLPack producer on the GPU)."""
    import cupy

    if isinstance(obj, cupy.ndarray):
        return obj
    if hasattr(obj, "__cuda_array_interface__"):
        return cupy.asarray(obj)
    if isinstance(obj, np.ndarray):
        raise ArgumentError(
            f"{name}: expected a GPU array (CuPy, or DLPack / __cuda_array_interface__), got a numpy array"
        )
    if hasattr(obj, "__dlpack__"):
        try:
            return cupy.from_dlpack(obj)
        except Exception as exc:  # noqa: BLE001 - e.g. a CPU torch tensor
            raise ArgumentError(f"{name}: expected a GPU array; DLPack import failed ({exc})") from None
    raise ArgumentError(f"{name}: expected a GPU array, got {type(obj).__name__}")


_ALLOWED: dict = {}  # dtypes tuple -> [np.dtype]


def check_array(
    arr,
    name: str,
    *,
    dtypes: Sequence,
    shape: Sequence[int | None] | None = None,
    ndim: int | None = None,
    contiguous: bool = True,
    device: int | None = None,
):
    """Checks dtype (one of ``dtypes``), ndim/shape (None entries match any size), C-contiguity and,
    for CuPy arrays, the device. Returns ``arr``."""
    allowed = _ALLOWED.get(dtypes)
    if allowed is None:  # callers pass constant tuples: convert each one once (a per-call cost otherwise)
        allowed = [np.dtype(d) for d in dtypes]
        if isinstance(dtypes, tuple):
            _ALLOWED[dtypes] = allowed
    if arr.dtype not in allowed:
        names = " or ".join(str(d) for d in allowed)
        raise ArgumentError(f"{name}: expected dtype {names}, got {arr.dtype}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and arr.ndim != ndim:
        raise ArgumentError(f"{name}: expected {ndim} dimensions, got shape {tuple(arr.shape)}")
    if shape is not None:
        for axis, (want, got) in enumerate(zip(shape, arr.shape, strict=True)):
            if want is not None and want != got:
                expected = tuple("*" if s is None else s for s in shape)
                raise ArgumentError(f"{name}: expected shape {expected}, got {tuple(arr.shape)} (axis {axis})")
    if contiguous and not arr.flags.c_contiguous:
        raise ArgumentError(f"{name}: expected a C-contiguous array (strides {arr.strides})")
    if device is not None:
        got = device_of(arr)
        if got is not None and got != device:
            raise ArgumentError(f"{name}: expected an array on device {device}, got device {got}")
    return arr


def device_of(arr) -> int | None:
    """The CUDA device of a device array (None for host arrays): CuPy's ``data.device_id``, which makes no Device
    object (``arr.device`` does, per access), else ``arr.device.id``."""
    dev = getattr(getattr(arr, "data", None), "device_id", None)
    if dev is not None:
        return dev
    return getattr(getattr(arr, "device", None), "id", None)


def check_num_experts(num_experts, num_ranks: int, name: str = "num_experts") -> int:
    num_experts = check_int(num_experts, name, min_value=1)
    if num_experts % num_ranks != 0:
        raise ArgumentError(f"{name}: expected a multiple of the number of ranks ({num_ranks}), got {num_experts}")
    return num_experts


def check_rank_to_node(rank_to_node, num_ranks: int, name: str = "rank_to_node") -> tuple[int, ...] | None:
    """None, or a node index per rank with nodes numbered 0..N-1 (every index used)."""
    if rank_to_node is None:
        return None
    try:
        nodes = tuple(int(n) for n in rank_to_node)
    except (TypeError, ValueError):
        raise ArgumentError(f"{name}: expected a sequence of {num_ranks} node indices") from None
    if len(nodes) != num_ranks:
        raise ArgumentError(f"{name}: expected {num_ranks} node indices (one per rank), got {len(nodes)}")
    if nodes and (min(nodes) < 0 or set(nodes) != set(range(max(nodes) + 1))):
        raise ArgumentError(f"{name}: expected node indices 0..N-1 each used at least once, got {nodes}")
    return nodes


def bias_list(bias, name: str = "bias") -> list:
    """combine's ``bias``: None, one array, or a pair -> a list of 0, 1 or 2 arrays (not yet checked)."""
    biases = [] if bias is None else list(bias) if isinstance(bias, tuple | list) else [bias]
    if len(biases) > 2:
        raise ArgumentError(f"{name}: expected an array or a pair of arrays")
    return biases
