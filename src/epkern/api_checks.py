"""Argument checks of the public calls that both backends make the same way (shapes, dtypes, value ranges).

Arrays are numpy (CPU backend) or CuPy (GPU backend, converted by the caller with ``as_device_array`` and
checked on ``device``); every error names the argument and what was expected, before anything runs.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from . import kernel_constants as K
from ._validate import check_array, check_int, check_num_experts
from .config import Config
from .errors import ArgumentError
from .events import EventHandle

BF16 = np.dtype(ml_dtypes.bfloat16)
# CuPy has no float8 dtype: FP8 data crosses the API as its e4m3 bytes (uint8) on both backends;
# ml_dtypes.float8_e4m3fn is accepted as input too.
FP8_DTYPES = (np.uint8, np.dtype(ml_dtypes.float8_e4m3fn))
HT_MAX_TOPK = 32
HT_MAX_LOCAL_EXPERTS = 1024
LAYOUT_MAX_TOPK, LAYOUT_MAX_EXPERTS = 32, 8192  # get_dispatch_layout's kernel (kernels/layout.cu)


def ht_x(x, device=None, convert=None):
    """``x`` of HT dispatch: BF16 [T, H] or the FP8 pair (e4m3 [T, H], float32 [T, H/128]). Returns
    (data, scales or None, T, row bytes). ``convert(obj, name)``: the backend's array conversion."""
    convert = convert or (lambda a, _name: a)
    if isinstance(x, tuple | list):
        if len(x) != 2:
            raise ArgumentError("x: expected a BF16 array or an FP8 pair (x_fp8, scales)")
        data = convert(x[0], "x[0]")
        scales = convert(x[1], "x[1]")
        check_array(data, "x[0]", dtypes=FP8_DTYPES, ndim=2, device=device)
        t, h = data.shape
        if h % 128:
            raise ArgumentError(f"x[0]: expected a hidden size that is a multiple of 128, got {h}")
        check_array(scales, "x[1]", dtypes=(np.float32,), shape=(t, h // 128), device=device)
        return data, scales, t, h
    data = convert(x, "x")
    check_array(data, "x", dtypes=(BF16,), ndim=2, device=device)
    t, h = data.shape
    if (h * 2) % 16:
        raise ArgumentError(f"x: expected hidden size × 2 bytes to be a multiple of 16, got H={h}")
    return data, None, t, h * 2


def topk_idx(arr, name: str, num_tokens: int | None, max_topk: int, device=None):
    """int64 [T, K] with 1 <= K <= max_topk (and T = num_tokens when given)."""
    check_array(arr, name, dtypes=(np.int64,), ndim=2, device=device)
    if num_tokens is not None and arr.shape[0] != num_tokens:
        raise ArgumentError(f"{name}: expected {num_tokens} rows (one per token of x), got {tuple(arr.shape)}")
    if not 1 <= arr.shape[1] <= max_topk:
        raise ArgumentError(f"{name}: expected 1..{max_topk} columns, got {arr.shape[1]}")
    return arr


def ht_dispatch_layout_inputs(num_ranks, T, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, device=None):
    """The layout arrays of a non-cached HT dispatch; returns the number of experts."""
    check_array(num_tokens_per_rank, "num_tokens_per_rank", dtypes=(np.int32,), shape=(num_ranks,), device=device)
    check_array(is_token_in_rank, "is_token_in_rank", dtypes=(np.bool_,), shape=(T, num_ranks), device=device)
    check_array(num_tokens_per_expert, "num_tokens_per_expert", dtypes=(np.int32,), ndim=1, device=device)
    E = num_tokens_per_expert.shape[0]
    if E % num_ranks or E // num_ranks > HT_MAX_LOCAL_EXPERTS or E == 0:
        raise ArgumentError(
            f"num_tokens_per_expert: expected a length that is a positive multiple of {num_ranks} ranks "
            f"with at most {HT_MAX_LOCAL_EXPERTS} experts per rank, got {E}"
        )
    return E


def stamp(handle, owner):
    """Mark ``handle`` as made by the Buffer whose identity is ``owner`` (see :func:`own_handle`); returns it."""
    handle._epkern_owner = owner
    return handle


def own_handle(handle, handle_type, owner, call: str) -> None:
    """``handle`` is of this backend's type and was made by this Buffer (``owner``), by its ``call``."""
    if not isinstance(handle, handle_type):
        raise ArgumentError(f"handle: expected the handle returned by this Buffer's {call}")
    if getattr(handle, "_epkern_owner", None) is not owner:
        raise ArgumentError(
            f"handle: it was returned by another Buffer's {call}; a handle is valid only with the Buffer that made it"
        )


def ht_cached_handle(handle, handle_type, owner, topk_idx, topk_weights, num_tokens: int, hidden: int) -> None:
    """A cached dispatch: ``handle`` of this backend's type and Buffer, no topk arguments, x of the handle's sizes."""
    own_handle(handle, handle_type, owner, "dispatch")
    if topk_idx is not None or topk_weights is not None:
        raise ArgumentError("topk_idx: must be None for a cached dispatch (handle given)")
    if handle.num_tokens != num_tokens:
        raise ArgumentError(f"x: expected {handle.num_tokens} tokens (as in the handle), got {num_tokens}")
    if handle.hidden != hidden:
        raise ArgumentError(f"x: expected hidden size {handle.hidden} (as in the handle), got {hidden}")


def ht_layout_given(topk_idx, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert) -> None:
    """A non-cached dispatch needs the layout arrays."""
    for name, arr in (
        ("topk_idx", topk_idx),
        ("num_tokens_per_rank", num_tokens_per_rank),
        ("is_token_in_rank", is_token_in_rank),
        ("num_tokens_per_expert", num_tokens_per_expert),
    ):
        if arr is None:
            raise ArgumentError(f"{name}: required unless a cached handle is given")


def ll_combine_x(x, handle, handle_type, owner, use_logfmt, num_ranks: int, device=None, convert=None):
    """An LL combine's handle (of this backend's type and Buffer), ``use_logfmt`` and ``x`` (BF16
    [E_loc, R·num_max, H]). Returns (x, num_max, hidden, num_experts)."""
    own_handle(handle, handle_type, owner, "low_latency_dispatch")
    no_logfmt(use_logfmt)
    num_max, hidden, num_experts = handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts
    if convert is not None:
        x = convert(x, "x")
    shape = (num_experts // num_ranks, num_ranks * num_max, hidden)
    check_array(x, "x", dtypes=(BF16,), shape=shape, device=device)
    return x, num_max, hidden, num_experts


def ll_dispatch_flags(use_fp8, round_scale, use_ue8m0, hidden: int):
    """(use_fp8, round_scale, use_ue8m0, scale columns S) as the kernels take them; round_scale / use_ue8m0 are
    ignored without use_fp8."""
    use_fp8 = bool(use_fp8)
    round_scale = bool(round_scale) and use_fp8
    use_ue8m0 = bool(use_ue8m0) and use_fp8
    if use_ue8m0 and not round_scale:
        raise ArgumentError("use_ue8m0: requires round_scale=True (UE8M0 stores powers of two)")
    if use_ue8m0 and hidden % 512:
        raise ArgumentError(f"x: use_ue8m0 packs four scales per int32, so H must be a multiple of 512, got {hidden}")
    S = (hidden // 512 if use_ue8m0 else hidden // 128) if use_fp8 else 0
    return use_fp8, round_scale, use_ue8m0, S


def ll_x(x, num_max: int, device=None):
    """LL dispatch ``x``: BF16 [T, H], T <= num_max, H a positive multiple of 128. Returns (T, H)."""
    check_array(x, "x", dtypes=(BF16,), ndim=2, device=device)
    T, H = x.shape
    if T > num_max:
        raise ArgumentError(f"x: expected at most num_max_dispatch_tokens_per_rank={num_max} tokens, got {T}")
    if H <= 0 or H % 128:
        raise ArgumentError(f"x: expected a hidden size that is a positive multiple of 128, got {H}")
    return T, H


def ll_hidden(hidden) -> int:
    hidden = check_int(hidden, "hidden", min_value=128)
    if hidden % 128:
        raise ArgumentError(f"hidden: expected a multiple of 128, got {hidden}")
    return hidden


def no_logfmt(use_logfmt) -> None:
    if use_logfmt:
        raise ArgumentError("use_logfmt: not supported")


def out_array(arr, name, dtypes, shape, device=None, convert=None):
    """A preallocated output: exactly ``shape``, one of ``dtypes``, C-contiguous."""
    if convert is not None:
        arr = convert(arr, name)
    return check_array(arr, name, dtypes=dtypes, shape=shape, device=device)


def scales_out(arr, name, dtype, shape, device=None, convert=None):
    """Scales are stored column-major (DeepEP): ``arr`` [E_loc, rows, S] must be the transposed view
    ``base.transpose(0, 2, 1)`` of a C-contiguous base [E_loc, S, rows]."""
    if convert is not None:
        arr = convert(arr, name)
    check_array(arr, name, dtypes=(dtype,), shape=shape, contiguous=False, device=device)
    if not arr.transpose(0, 2, 1).flags.c_contiguous:
        raise ArgumentError(
            f"{name}: expected the column-major layout of DeepEP's scales, i.e. "
            f"empty(({shape[0]}, {shape[2]}, {shape[1]})).transpose(0, 2, 1) (strides {arr.strides})"
        )
    return arr


# ---- stream arguments, config, layout and LL sizes ----


def stream_args(previous_event, async_finish, allocate_on_comm_stream) -> None:
    """DeepEP's stream arguments (``previous_event`` an EventHandle; ``allocate_on_comm_stream`` only with it and
    ``async_finish``)."""
    if allocate_on_comm_stream and (previous_event is None or not async_finish):
        raise ArgumentError(
            "allocate_on_comm_stream: True needs previous_event and async_finish=True (as in DeepEP): "
            "outputs owned by the comm stream are only safe to use after waiting on the returned event"
        )
    if previous_event is not None and not isinstance(previous_event, EventHandle):
        raise ArgumentError("previous_event: expected an EventHandle returned by this library")


def config(cfg) -> None:
    """An HT call's ``config``: None or an ``epkern.Config``."""
    if cfg is not None and not isinstance(cfg, Config):
        raise ArgumentError(f"config: expected an epkern.Config, got {type(cfg).__name__}")


def layout_topk_idx(arr, num_experts, num_ranks: int, device=None) -> int:
    """``get_dispatch_layout``'s arguments (int64 or int32 [T, K], top-k and expert limits of the layout kernel).
    Returns num_experts."""
    num_experts = check_num_experts(num_experts, num_ranks)
    if num_experts > LAYOUT_MAX_EXPERTS:
        raise ArgumentError(f"num_experts: expected at most {LAYOUT_MAX_EXPERTS}, got {num_experts}")
    check_array(arr, "topk_idx", dtypes=(np.int64, np.int32), ndim=2, device=device)
    num_tokens, topk = arr.shape
    if not 1 <= topk <= LAYOUT_MAX_TOPK:
        raise ArgumentError(f"topk_idx: expected 1..{LAYOUT_MAX_TOPK} columns (top-k), got shape {arr.shape}")
    if num_tokens >= 2**31 // max(topk, num_ranks):
        raise ArgumentError(f"topk_idx: too many tokens ({num_tokens})")
    return num_experts


def topk_values(arr, name: str, num_experts: int) -> None:
    """Every entry of a host ``topk_idx`` in [-1, num_experts) (the text of the GPU layout kernel's report)."""
    bad = int(np.count_nonzero((arr < -1) | (arr >= num_experts)))
    if bad:
        raise ArgumentError(f"{name}: expected entries in [-1, {num_experts}), found {bad} outside that range")


def ll_sizes(num_max, num_experts, num_ranks: int) -> tuple[int, int]:
    """(num_max, num_experts) of an LL call within the LL kernels' limits (the GPU adds its rank limit: the number
    of ranks is a property of the backend, not an argument)."""
    from . import kernel_constants as K

    num_max = check_int(num_max, "num_max_dispatch_tokens_per_rank", min_value=1, max_value=K.get("EPK_LL_MAX_NUM_MAX"))
    num_experts = check_num_experts(num_experts, num_ranks)
    max_experts = K.get("EPK_LL_MAX_EXPERTS")
    if num_experts > max_experts:
        raise ArgumentError(f"num_experts: expected at most {max_experts}, got {num_experts}")
    return num_max, num_experts


def ll_max_topk() -> int:
    """Top-k limit of the LL calls (kernels/epk_constants.cuh)."""
    return K.get("EPK_LL_MAX_TOPK")


def ll_area(
    num_rdma_bytes: int, low_latency_mode: bool, num_max: int, hidden: int, num_experts: int, num_ranks: int
) -> None:
    """The Buffer's LL area (``num_rdma_bytes``) holds both buffer sets of LL calls of these sizes."""
    from .gpu.ll.layout import ll_area_bytes, ll_layout, set_stride_of
    from .reference import get_low_latency_rdma_size_hint

    ll_bytes = ll_area_bytes(num_rdma_bytes, low_latency_mode)
    lay = ll_layout(num_max, hidden, num_experts)
    if lay.per_set > set_stride_of(ll_bytes):
        hint = get_low_latency_rdma_size_hint(num_max, hidden, num_ranks, num_experts)
        why = "" if ll_bytes else " (the Buffer has no LL area: pass num_rdma_bytes, low_latency_mode=True)"
        raise ArgumentError(
            f"num_rdma_bytes: expected at least {2 * lay.per_set} bytes for num_max_dispatch_tokens_per_rank="
            f"{num_max}, hidden={hidden}, num_experts={num_experts} (get_low_latency_rdma_size_hint gives "
            f"{hint}), got {ll_bytes}{why}"
        )
