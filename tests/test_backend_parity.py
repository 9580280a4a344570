"""The two backends answer the same calls the same way: ONE list of public calls (method, arguments, expected
outcome) run against the CPU backend for real (one rank, and two in-process ranks) and against the GPU backend
over the fake CuPy (tests/fake_cupy.py: its kernels do not run, so what is compared is the structure of the
results — tuple lengths, per element shape and dtype or None — and the errors — type and the argument that the
message starts with —, never values; tests/test_cpu_backend.py checks the CPU's values).

Arguments are written once as numpy data and placeholders (``Ref``) that each run turns into the backend's arrays
(numpy, or fake CuPy arrays) or the results of earlier calls (a dispatch's handle, a combine buffer).
"""

from __future__ import annotations

import inspect
import pydoc
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import pytest

import epkern
import fake_cupy as F
from epkern import reference
from epkern.config import Config
from epkern.errors import ArgumentError, EpkernError
from epkern.events import EventHandle

BF = np.dtype(ml_dtypes.bfloat16)
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
U8, I32, I64, F32 = np.dtype(np.uint8), np.dtype(np.int32), np.dtype(np.int64), np.dtype(np.float32)
T, H, K, E, NUM_MAX, W = 6, 512, 3, 8, 8, 16


# ---- placeholders: resolved per run against a Ctx ----
class Ref:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, c):
        return self.fn(c)


def resolve(value, c):
    if isinstance(value, Ref):
        return value(c)
    if isinstance(value, tuple):
        return tuple(resolve(v, c) for v in value)
    if isinstance(value, list):
        return [resolve(v, c) for v in value]
    if isinstance(value, dict):
        return {k: resolve(v, c) for k, v in value.items()}
    return value


def arr(name):
    """This rank's numpy input ``name`` as the backend's array."""
    return Ref(lambda c: c.dev(c.data[name]))


def empty(shape, dtype, transposed=False):
    """A fresh array of the backend (shape entries may name Ctx attributes); ``transposed``: DeepEP's scales
    layout, the transposed view of a C-contiguous [E_loc, S, rows]."""

    def make(c):
        s = c.shape(shape)
        if transposed:
            return c.xp.empty((s[0], s[2], s[1]), dtype).transpose(0, 2, 1)
        return c.xp.empty(s, dtype)

    return Ref(make)


def memo(key, fn):
    """``fn(c)`` once per case (a prerequisite call whose results several arguments use)."""

    def get(c):
        if key not in c.memo:
            c.memo[key] = fn(c)
        return c.memo[key]

    return Ref(get)


X, IDX, WTS = arr("x"), arr("idx"), arr("w")
LAYOUT = {"num_tokens_per_rank": arr("per_rank"), "is_token_in_rank": arr("in_rank"),
          "num_tokens_per_expert": arr("per_expert")}  # fmt: skip
X_FP8 = (arr("x_fp8"), arr("x_scales"))
X_E4M3 = (arr("x_e4m3"), arr("x_scales"))
HT = memo("ht", lambda c: c.buf.dispatch(**resolve(dict(x=X, topk_idx=IDX, topk_weights=WTS, **LAYOUT), c)))
HT_W = memo(
    "ht_w",
    lambda c: c.buf.dispatch(**resolve(dict(x=X, topk_idx=IDX, topk_weights=WTS, num_worst_tokens=W, **LAYOUT), c)),
)
HT_HANDLE, RECV_X, RECV_W = Ref(lambda c: HT(c)[4]), Ref(lambda c: HT(c)[0]), Ref(lambda c: HT(c)[2])
HT_W_HANDLE, RECV_X_W, RECV_W_W = Ref(lambda c: HT_W(c)[4]), Ref(lambda c: HT_W(c)[0]), Ref(lambda c: HT_W(c)[2])
LL = memo("ll", lambda c: c.buf.low_latency_dispatch(resolve(X, c), resolve(IDX, c), NUM_MAX, E, use_fp8=False))
LL_HANDLE = Ref(lambda c: LL(c)[2])
LL_Y = Ref(lambda c: c.xp.zeros(c.shape(("E_loc", "ROWS", H)), BF))
ZBUF = Ref(lambda c: c.buf.get_next_low_latency_combine_buffer(LL_HANDLE(c)))
GROUP = Ref(lambda c: c.group)


def _other_buffer(c):
    """A second Buffer of the same group (destroyed with the case's): its handles must not work with c.buf."""
    c.extra.append(c.make_buffer())
    return c.extra[-1]


OTHER = memo("other", _other_buffer)
OTHER_HT = memo("other_ht", lambda c: OTHER(c).dispatch(**resolve(dict(x=X, topk_idx=IDX, **LAYOUT), c)))
OTHER_LL = memo("other_ll", lambda c: OTHER(c).low_latency_dispatch(resolve(X, c), resolve(IDX, c), NUM_MAX, E))
OTHER_HT_HANDLE, OTHER_LL_HANDLE = Ref(lambda c: OTHER_HT(c)[4]), Ref(lambda c: OTHER_LL(c)[2])
OBJ = object()


def ll_outs(use_fp8=True, use_ue8m0=False, x_dtype=None):
    outs = {
        "out_x": empty(("E_loc", "ROWS", H), x_dtype or (U8 if use_fp8 else BF)),
        "out_src_info": empty(("E_loc", "ROWS"), I32),
        "out_layout_range": empty(("E_loc", "R"), I64),
        "out_count": empty(("E_loc",), I32),
    }
    if use_fp8:
        outs["out_scales"] = empty(("E_loc", "ROWS", H // 512 if use_ue8m0 else H // 128), I32 if use_ue8m0 else F32,
                                   transposed=True)  # fmt: skip
    return outs


# ---- expected outcomes ----
class Spec:
    def check(self, value, c, path) -> list:
        raise NotImplementedError


def _desc(v):
    if hasattr(v, "shape") and hasattr(v, "dtype"):
        return f"{type(v).__name__} {tuple(v.shape)} {v.dtype}"
    return type(v).__name__


@dataclass
class A(Spec):
    """An array of this shape (ints, None: any, str: a Ctx attribute) and dtype; ``colmajor``: DeepEP's scales."""

    shape: tuple
    dtype: object
    colmajor: bool = False

    def check(self, value, c, path):
        if not (hasattr(value, "shape") and hasattr(value, "dtype")):
            return [f"{path}: expected an array, got {_desc(value)}"]
        want = c.shape(self.shape)
        problems = []
        same_rank = len(value.shape) == len(want)
        if not same_rank or any(w is not None and w != g for w, g in zip(want, value.shape, strict=True)):
            problems.append(f"{path}: expected shape {want}, got {tuple(value.shape)}")
        if np.dtype(value.dtype) != np.dtype(self.dtype):
            problems.append(f"{path}: expected dtype {np.dtype(self.dtype)}, got {value.dtype}")
        if self.colmajor and not value.transpose(0, 2, 1).flags.c_contiguous:
            problems.append(f"{path}: expected the column-major (transposed) scales layout, strides {value.strides}")
        return problems


@dataclass
class Kind(Spec):
    kind: type

    def check(self, value, c, path):
        return [] if isinstance(value, self.kind) else [f"{path}: expected {self.kind.__name__}, got {_desc(value)}"]


@dataclass
class IntList(Spec):
    length: object

    def check(self, value, c, path):
        n = c.shape((self.length,))[0]
        if not isinstance(value, list) or len(value) != n or not all(isinstance(v, int) for v in value):
            return [f"{path}: expected a list of {n} ints, got {value!r}"]
        return []


@dataclass
class Same(Spec):
    """The very object passed as keyword argument ``name``."""

    name: str

    def check(self, value, c, path):
        if value is c.kwargs.get(self.name):
            return []
        return [f"{path}: expected the {self.name} passed, got {_desc(value)}"]


@dataclass
class Pred(Spec):
    what: str
    fn: object

    def check(self, value, c, path):
        return [] if self.fn(value, c) else [f"{path}: expected {self.what}, got {_desc(value)}"]


class _Callable(Spec):
    def check(self, value, c, path):
        return [] if callable(value) else [f"{path}: expected a callable, got {_desc(value)}"]


class _Handle(Spec):
    def check(self, value, c, path):
        return [] if value is not None else [f"{path}: expected a handle, got None"]


@dataclass
class LLHandle(Spec):
    """DeepEP's LL handle: iterable as (src_info, layout_range, num_max, hidden, num_experts)."""

    src_info: Spec = field(default_factory=lambda: A(("E_loc", "ROWS"), I32))

    def check(self, value, c, path):
        try:
            items = tuple(value)
        except TypeError:
            return [f"{path}: expected an iterable LL handle, got {_desc(value)}"]
        return check((self.src_info, A(("E_loc", "R"), I64), NUM_MAX, H, E), items, c, path)


@dataclass
class Raises:
    kind: type
    arg: str | None  # the message starts with "arg:"
    text: str = ""  # and contains this


CALLABLE, HANDLE, EV = _Callable(), _Handle(), Kind(EventHandle)


def bad(arg):
    """ArgumentError whose message starts with ``arg:``."""
    return Raises(ArgumentError, arg)


FOREIGN = Raises(ArgumentError, "handle", "another Buffer's")


def check(spec, value, c, path="result") -> list:
    if spec is None:
        return [] if value is None else [f"{path}: expected None, got {_desc(value)}"]
    if isinstance(spec, tuple):
        if not isinstance(value, tuple) or len(value) != len(spec):
            n = len(value) if isinstance(value, tuple) else "not a tuple"
            return [f"{path}: expected a tuple of {len(spec)}, got {_desc(value)} ({n})"]
        return [p for i, (s, v) in enumerate(zip(spec, value, strict=True)) for p in check(s, v, c, f"{path}[{i}]")]
    if isinstance(spec, int | str) and not isinstance(spec, bool):
        return [] if value == spec else [f"{path}: expected {spec!r}, got {value!r}"]
    return spec.check(value, c, path)


def ht_ret(x=None, rows=None, weights=True, per_expert="E_loc"):
    x = x or A((rows, H), BF)
    w = A((rows, K), F32) if weights else None
    return (x, A((rows, K), I64), w, IntList(per_expert), HANDLE, EV)


def fp8_pair(rows=None):
    return (A((rows, H), U8), A((rows, H // 128), F32))


def ll_ret(x=None, hook=None, count=None, handle=None):
    x = x or A(("E_loc", "ROWS", H), BF)
    return (x, count or A(("E_loc",), I32), handle or LLHandle(), EV, hook)


LL_FP8_X = (A(("E_loc", "ROWS", H), U8), A(("E_loc", "ROWS", H // 128), F32, colmajor=True))
LL_UE8M0_X = (A(("E_loc", "ROWS", H), U8), A(("E_loc", "ROWS", H // 512), I32, colmajor=True))
LL_OUTS_RET = ll_ret(
    (Same("out_x"), Same("out_scales")), count=Same("out_count"), handle=LLHandle(Same("out_src_info"))
)
COMBINE_RET = (A((T, H), BF), A((T, K), F32), EV)
LL_COMBINE_RET = (A((T, H), BF), EV, None)


@dataclass
class Case:
    id: str
    method: str  # a Buffer method, or "Buffer" (the constructor; backend= added)
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    expect: object = None  # a return spec, or Raises
    buffer: dict | None = None  # constructor arguments of this case's Buffer, if not the default's
    destroyed: bool = False  # destroy the Buffer first
    call_result: int = 0  # call the returned callable this many times (prepared calls); check the last result


def _ll(*extra, **kw):
    return (X, IDX, NUM_MAX, E, *extra), kw


# fmt: off
CASES = [
    # ---- lifecycle, settings ----
    Case("set_num_sms", "set_num_sms", (4,), expect=None),
    Case("set_num_sms/zero", "set_num_sms", (0,), expect=bad("num_sms")),
    Case("get_dispatch_config", "get_dispatch_config", expect=Kind(Config)),
    Case("get_combine_config", "get_combine_config", expect=Kind(Config)),
    Case("rdma_size_hint", "get_low_latency_rdma_size_hint", (NUM_MAX, H, 2, E), expect=Kind(int)),
    Case("destroy", "destroy", expect=None),
    Case("check", "check", expect=None),
    Case("destroyed/check", "check", expect=Raises(EpkernError, None, "destroyed"), destroyed=True),
    Case("destroyed/dispatch", "dispatch", (X,), dict(topk_idx=IDX, **LAYOUT), Raises(EpkernError, None, "destroyed"),
         destroyed=True),
    Case("destroyed/ll_dispatch", "low_latency_dispatch", *_ll(), expect=Raises(EpkernError, None, "destroyed"),
         destroyed=True),
    Case("destroyed/query_mask", "low_latency_query_mask_buffer", expect=Raises(EpkernError, None, "destroyed"),
         destroyed=True),
    # ---- constructor ----
    Case("ctor/unknown_keyword", "Buffer", (GROUP,), {"low_latancy_mode": True}, Raises(TypeError, None)),
    Case("ctor/comm_honoured", "Buffer", (None,), {"comm": GROUP},
         Pred("a Buffer over the group given as comm", lambda b, c: b.group is c.group)),
    Case("ctor/group_and_comm", "Buffer", (GROUP,), {"comm": GROUP}, bad("comm")),
    Case("ctor/bad_timeout", "Buffer", (GROUP,), {"timeout_s": 0}, bad("timeout_s")),
    # ---- get_dispatch_layout ----
    Case("layout", "get_dispatch_layout", (IDX, E),
         expect=(A(("R",), I32), None, A((E,), I32), A((T, "R"), np.bool_), EV)),
    Case("layout/int32", "get_dispatch_layout", (arr("idx32"), E),
         expect=(A(("R",), I32), None, A((E,), I32), A((T, "R"), np.bool_), EV)),
    Case("layout/async", "get_dispatch_layout", (IDX, E), {"async_finish": True},
         expect=(A(("R",), I32), None, A((E,), I32), A((T, "R"), np.bool_), EV)),
    Case("layout/float_idx", "get_dispatch_layout", (arr("idx_f32"), E), expect=bad("topk_idx")),
    Case("layout/wide_idx", "get_dispatch_layout", (arr("idx_wide"), E), expect=bad("topk_idx")),
    Case("layout/no_experts", "get_dispatch_layout", (IDX, 0), expect=bad("num_experts")),
    Case("layout/comm_stream_alone", "get_dispatch_layout", (IDX, E), {"allocate_on_comm_stream": True},
         bad("allocate_on_comm_stream")),
    Case("layout/bad_event", "get_dispatch_layout", (IDX, E), {"previous_event": "e"},
         bad("previous_event")),
    # ---- HT dispatch ----
    Case("dispatch", "dispatch", (X,), dict(topk_idx=IDX, topk_weights=WTS, **LAYOUT), ht_ret()),
    Case("dispatch/topk_idx_too_big", "dispatch", (X,), dict(topk_idx=arr("idx_big"), **LAYOUT), bad("topk_idx")),
    Case("dispatch/topk_idx_below_minus_one", "dispatch", (X,), dict(topk_idx=arr("idx_neg"), **LAYOUT),
         bad("topk_idx")),
    Case("combine/other_hidden", "combine", (Ref(lambda c: RECV_X(c)[:, :128].copy()), HT_HANDLE), expect=bad("x")),
    Case("dispatch/no_weights", "dispatch", (X,), dict(topk_idx=IDX, **LAYOUT), ht_ret(weights=False)),
    Case("dispatch/fp8_bytes", "dispatch", (X_FP8,), dict(topk_idx=IDX, topk_weights=WTS, **LAYOUT),
         ht_ret(fp8_pair())),
    Case("dispatch/fp8_e4m3fn", "dispatch", (X_E4M3,), dict(topk_idx=IDX, topk_weights=WTS, **LAYOUT),
         ht_ret(fp8_pair())),
    Case("dispatch/worst_tokens", "dispatch", (X,), dict(topk_idx=IDX, topk_weights=WTS, num_worst_tokens=W, **LAYOUT),
         ht_ret(rows=W, per_expert=0)),
    Case("dispatch/fp8_worst_tokens", "dispatch", (X_FP8,), dict(topk_idx=IDX, num_worst_tokens=W, **LAYOUT),
         ht_ret(fp8_pair(W), rows=W, weights=False, per_expert=0)),
    Case("dispatch/alignment", "dispatch", (X,), dict(topk_idx=IDX, expert_alignment=4, **LAYOUT),
         ht_ret(weights=False)),
    Case("dispatch/config", "dispatch", (X,), dict(topk_idx=IDX, config=Config(num_sms=4), **LAYOUT),
         ht_ret(weights=False)),
    Case("dispatch/events", "dispatch", (X,), dict(topk_idx=IDX, previous_event=EventHandle(), async_finish=True,
                                                  allocate_on_comm_stream=True, **LAYOUT), ht_ret(weights=False)),
    Case("cached", "dispatch", (X,), {"handle": HT_HANDLE}, (A((None, H), BF), None, None, None, HANDLE, EV)),
    Case("cached/fp8", "dispatch", (X_FP8,), {"handle": HT_HANDLE}, (fp8_pair(), None, None, None, HANDLE, EV)),
    Case("cached/worst_tokens", "dispatch", (X,), {"handle": HT_W_HANDLE},
         (A((W, H), BF), None, None, None, HANDLE, EV)),
    Case("cached/with_topk", "dispatch", (X,), {"handle": HT_HANDLE, "topk_idx": IDX},
         bad("topk_idx")),
    Case("cached/wrong_tokens", "dispatch", (arr("x_short"),), {"handle": HT_HANDLE}, bad("x")),
    Case("cached/bad_handle", "dispatch", (X,), {"handle": OBJ}, bad("handle")),
    Case("cached/ll_handle", "dispatch", (X,), {"handle": LL_HANDLE}, bad("handle")),
    Case("dispatch/x_float32", "dispatch", (arr("x_f32"),), dict(topk_idx=IDX, **LAYOUT), bad("x")),
    Case("dispatch/x_1d", "dispatch", (arr("x_1d"),), dict(topk_idx=IDX, **LAYOUT), bad("x")),
    Case("dispatch/fp8_bad_scales", "dispatch", ((arr("x_fp8"), arr("x_short_scales")),), dict(topk_idx=IDX, **LAYOUT),
         bad("x[1]")),
    Case("dispatch/fp8_bad_hidden", "dispatch", ((arr("x_fp8_h100"), arr("x_scales")),), dict(topk_idx=IDX, **LAYOUT),
         bad("x[0]")),
    Case("dispatch/fp8_triple", "dispatch", ((arr("x_fp8"), arr("x_scales"), arr("x_scales")),),
         dict(topk_idx=IDX, **LAYOUT), bad("x")),
    Case("dispatch/idx_rows", "dispatch", (X,), dict(topk_idx=arr("idx_short"), **LAYOUT), bad("topk_idx")),
    Case("dispatch/idx_wide", "dispatch", (X,), dict(topk_idx=arr("idx_wide"), **LAYOUT), bad("topk_idx")),
    Case("dispatch/idx_int32", "dispatch", (X,), dict(topk_idx=arr("idx32"), **LAYOUT), bad("topk_idx")),
    Case("dispatch/no_layout", "dispatch", (X,), {"topk_idx": IDX}, bad("num_tokens_per_rank")),
    Case("dispatch/no_topk", "dispatch", (X,), dict(LAYOUT), bad("topk_idx")),
    Case("dispatch/experts_length", "dispatch", (X,),
         dict(topk_idx=IDX, **{**LAYOUT, "num_tokens_per_expert": arr("per_expert_none")}),
         bad("num_tokens_per_expert")),
    Case("dispatch/in_rank_dtype", "dispatch", (X,),
         dict(topk_idx=IDX, **{**LAYOUT, "is_token_in_rank": arr("in_rank_i32")}),
         bad("is_token_in_rank")),
    Case("dispatch/weights_float64", "dispatch", (X,), dict(topk_idx=IDX, topk_weights=arr("w_f64"), **LAYOUT),
         bad("topk_weights")),
    Case("dispatch/worst_negative", "dispatch", (X,), dict(topk_idx=IDX, num_worst_tokens=-1, **LAYOUT),
         bad("num_worst_tokens")),
    Case("dispatch/alignment_zero", "dispatch", (X,), dict(topk_idx=IDX, expert_alignment=0, **LAYOUT),
         bad("expert_alignment")),
    Case("dispatch/bad_config", "dispatch", (X,), dict(topk_idx=IDX, config="c", **LAYOUT),
         bad("config")),
    Case("dispatch/comm_stream_alone", "dispatch", (X,), dict(topk_idx=IDX, allocate_on_comm_stream=True, **LAYOUT),
         bad("allocate_on_comm_stream")),
    # ---- HT combine ----
    Case("combine", "combine", (RECV_X, HT_HANDLE), {"topk_weights": RECV_W}, COMBINE_RET),
    Case("combine/no_weights", "combine", (RECV_X, HT_HANDLE), expect=(A((T, H), BF), None, EV)),
    Case("combine/bias_pair", "combine", (RECV_X, HT_HANDLE), {"bias": (X, X)}, (A((T, H), BF), None, EV)),
    Case("combine/worst_tokens", "combine", (RECV_X_W, HT_W_HANDLE), {"topk_weights": RECV_W_W}, COMBINE_RET),
    Case("combine/async", "combine", (RECV_X, HT_HANDLE), {"async_finish": True}, (A((T, H), BF), None, EV)),
    Case("combine/x_rows", "combine", (arr("x_rows_plus"), HT_HANDLE), expect=bad("x")),
    Case("combine/x_float32", "combine", (Ref(lambda c: c.xp.zeros(RECV_X(c).shape, F32)), HT_HANDLE),
         expect=bad("x")),
    Case("combine/weights_shape", "combine", (RECV_X, HT_HANDLE),
         {"topk_weights": Ref(lambda c: c.xp.zeros((RECV_X(c).shape[0], K + 1), F32))},
         bad("topk_weights")),
    Case("combine/bias_shape", "combine", (RECV_X, HT_HANDLE), {"bias": arr("x_short")}, bad("bias[0]")),
    Case("combine/bias_triple", "combine", (RECV_X, HT_HANDLE), {"bias": (X, X, X)}, bad("bias")),
    Case("combine/bad_handle", "combine", (RECV_X, OBJ), expect=bad("handle")),
    Case("combine/ll_handle", "combine", (X, LL_HANDLE), expect=bad("handle")),
    Case("combine/other_buffers_handle", "combine", (Ref(lambda c: OTHER_HT(c)[0]), OTHER_HT_HANDLE), expect=FOREIGN),
    Case("cached/other_buffers_handle", "dispatch", (X,), {"handle": OTHER_HT_HANDLE}, FOREIGN),
    Case("ll_combine/other_buffers_handle", "low_latency_combine", (LL_Y, IDX, WTS, OTHER_LL_HANDLE), expect=FOREIGN),
    Case("zbuf/other_buffers_handle", "get_next_low_latency_combine_buffer", (OTHER_LL_HANDLE,), expect=FOREIGN),
    Case("combine/bad_config", "combine", (RECV_X, HT_HANDLE), {"config": 3}, bad("config")),
    # ---- LL dispatch ----
    Case("ll_dispatch/bf16", "low_latency_dispatch", *_ll(use_fp8=False), expect=ll_ret()),
    Case("ll_dispatch/fp8", "low_latency_dispatch", *_ll(), expect=ll_ret(LL_FP8_X)),
    Case("ll_dispatch/round_scale", "low_latency_dispatch", *_ll(round_scale=True), expect=ll_ret(LL_FP8_X)),
    Case("ll_dispatch/ue8m0", "low_latency_dispatch", *_ll(round_scale=True, use_ue8m0=True),
         expect=ll_ret(LL_UE8M0_X)),
    Case("ll_dispatch/ue8m0_ignored_without_fp8", "low_latency_dispatch", *_ll(use_fp8=False, use_ue8m0=True),
         expect=ll_ret()),
    Case("ll_dispatch/hook", "low_latency_dispatch", *_ll(return_recv_hook=True), expect=ll_ret(LL_FP8_X, CALLABLE)),
    Case("ll_dispatch/async", "low_latency_dispatch", *_ll(use_fp8=False, async_finish=True), expect=ll_ret()),
    Case("ll_dispatch/out_fp8", "low_latency_dispatch", *_ll(**ll_outs()), expect=LL_OUTS_RET),
    Case("ll_dispatch/out_ue8m0", "low_latency_dispatch", *_ll(round_scale=True, use_ue8m0=True,
                                                               **ll_outs(use_ue8m0=True)), expect=LL_OUTS_RET),
    Case("ll_dispatch/out_e4m3fn", "low_latency_dispatch", *_ll(**ll_outs(x_dtype=E4M3)), expect=LL_OUTS_RET),
    Case("ll_dispatch/out_bf16", "low_latency_dispatch", *_ll(use_fp8=False, **ll_outs(use_fp8=False)),
         expect=ll_ret(Same("out_x"), count=Same("out_count"), handle=LLHandle(Same("out_src_info")))),
    Case("ll_dispatch/zero_copy_recv", "low_latency_dispatch", *_ll(zero_copy_recv=True), expect=ll_ret(LL_FP8_X)),
    Case("ll_dispatch/zero_copy_recv_bf16", "low_latency_dispatch", *_ll(use_fp8=False, zero_copy_recv=True),
         expect=ll_ret()),
    Case("ll_dispatch/zero_copy_recv_with_out", "low_latency_dispatch",
         *_ll(zero_copy_recv=True, out_x=empty(("E_loc", "ROWS", H), U8)), expect=bad("out_x")),
    Case("ll_dispatch/stats", "low_latency_dispatch",
         *_ll(cumulative_local_expert_recv_stats=empty(("E_loc",), I32),
              dispatch_wait_recv_cost_stats=empty(("R",), I64)),
         expect=ll_ret(LL_FP8_X)),
    Case("ll_dispatch/stats_dtype", "low_latency_dispatch",
         *_ll(cumulative_local_expert_recv_stats=empty(("E_loc",), I64)),
         expect=bad("cumulative_local_expert_recv_stats")),
    Case("ll_dispatch/wait_stats_shape", "low_latency_dispatch",
         *_ll(dispatch_wait_recv_cost_stats=empty((3,), I64)), expect=bad("dispatch_wait_recv_cost_stats")),
    Case("ll_dispatch/ue8m0_without_round_scale", "low_latency_dispatch", *_ll(use_ue8m0=True),
         expect=bad("use_ue8m0")),
    Case("ll_dispatch/x_float32", "low_latency_dispatch", (arr("x_f32"), IDX, NUM_MAX, E),
         expect=bad("x")),
    Case("ll_dispatch/too_many_tokens", "low_latency_dispatch", (X, IDX, T - 1, E), expect=bad("x")),
    Case("ll_dispatch/hidden_192", "low_latency_dispatch", (arr("x_h192"), IDX, NUM_MAX, E),
         expect=bad("x")),
    Case("ll_dispatch/ue8m0_hidden_384", "low_latency_dispatch", (arr("x_h384"), IDX, NUM_MAX, E),
         {"round_scale": True, "use_ue8m0": True}, bad("x")),
    Case("ll_dispatch/idx_wide", "low_latency_dispatch", (X, arr("idx_wide"), NUM_MAX, E),
         expect=bad("topk_idx")),
    Case("ll_dispatch/idx_rows", "low_latency_dispatch", (X, arr("idx_short"), NUM_MAX, E),
         expect=bad("topk_idx")),
    Case("ll_dispatch/idx_int32", "low_latency_dispatch", (X, arr("idx32"), NUM_MAX, E),
         expect=bad("topk_idx")),
    Case("ll_dispatch/num_max_zero", "low_latency_dispatch", (X, IDX, 0, E),
         expect=bad("num_max_dispatch_tokens_per_rank")),
    Case("ll_dispatch/num_max_huge", "low_latency_dispatch", (X, IDX, 5000, E),
         expect=bad("num_max_dispatch_tokens_per_rank")),
    Case("ll_dispatch/no_experts", "low_latency_dispatch", (X, IDX, NUM_MAX, 0),
         expect=bad("num_experts")),
    Case("ll_dispatch/out_x_dtype", "low_latency_dispatch", *_ll(out_x=empty(("E_loc", "ROWS", H), BF)),
         expect=bad("out_x")),
    Case("ll_dispatch/out_scales_row_major", "low_latency_dispatch",
         *_ll(out_scales=empty(("E_loc", "ROWS", H // 128), F32)), expect=bad("out_scales")),
    Case("ll_dispatch/out_scales_without_fp8", "low_latency_dispatch",
         *_ll(use_fp8=False, out_scales=empty(("E_loc", "ROWS", H // 128), F32, transposed=True)),
         expect=bad("out_scales")),
    Case("ll_dispatch/out_src_info_shape", "low_latency_dispatch", *_ll(out_src_info=empty(("E_loc", 3), I32)),
         expect=bad("out_src_info")),
    Case("ll_dispatch/out_layout_range_dtype", "low_latency_dispatch",
         *_ll(out_layout_range=empty(("E_loc", "R"), I32)), expect=bad("out_layout_range")),
    Case("ll_dispatch/out_count_shape", "low_latency_dispatch", *_ll(out_count=empty((E + 1,), I32)),
         expect=bad("out_count")),
    Case("ll_dispatch/no_ll_area", "low_latency_dispatch", *_ll(), expect=bad("num_rdma_bytes"),
         buffer={"num_rdma_bytes": 0, "low_latency_mode": False}),
    Case("ll_dispatch/masked", "low_latency_dispatch", *_ll(use_fp8=False), expect=ll_ret(),
         buffer={"mask_rank_0": True}),
    # ---- LL combine ----
    Case("ll_combine", "low_latency_combine", (LL_Y, IDX, WTS, LL_HANDLE), expect=LL_COMBINE_RET),
    Case("ll_combine/out", "low_latency_combine", (LL_Y, IDX, WTS, LL_HANDLE), {"out": empty((T, H), BF)},
         (Same("out"), EV, None)),
    Case("ll_combine/zero_copy", "low_latency_combine", (ZBUF, IDX, WTS, LL_HANDLE), {"zero_copy": True},
         LL_COMBINE_RET),
    Case("ll_combine/hook", "low_latency_combine", (LL_Y, IDX, WTS, LL_HANDLE), {"return_recv_hook": True},
         (A((T, H), BF), EV, CALLABLE)),
    Case("ll_combine/stats", "low_latency_combine", (LL_Y, IDX, WTS, LL_HANDLE),
         {"combine_wait_recv_cost_stats": empty(("R",), I64)}, LL_COMBINE_RET),
    Case("ll_combine/stats_dtype", "low_latency_combine", (LL_Y, IDX, WTS, LL_HANDLE),
         {"combine_wait_recv_cost_stats": empty(("R",), I32)}, bad("combine_wait_recv_cost_stats")),
    Case("ll_combine/logfmt", "low_latency_combine", (LL_Y, IDX, WTS, LL_HANDLE), {"use_logfmt": True},
         bad("use_logfmt")),
    Case("ll_combine/ht_handle", "low_latency_combine", (LL_Y, IDX, WTS, HT_HANDLE), expect=bad("handle")),
    Case("ll_combine/x_shape", "low_latency_combine", (empty(("E_loc", "ROWS", H + 128), BF), IDX, WTS, LL_HANDLE),
         expect=bad("x")),
    Case("ll_combine/weights_dtype", "low_latency_combine", (LL_Y, IDX, arr("w_f64"), LL_HANDLE),
         expect=bad("topk_weights")),
    Case("ll_combine/idx_wide", "low_latency_combine", (LL_Y, arr("idx_wide"), WTS, LL_HANDLE),
         expect=bad("topk_idx")),
    Case("ll_combine/out_dtype", "low_latency_combine", (LL_Y, IDX, WTS, LL_HANDLE), {"out": empty((T, H), F32)},
         bad("out")),
    # ---- LL buffers and masks ----
    Case("next_combine_buffer", "get_next_low_latency_combine_buffer", (LL_HANDLE,),
         expect=A(("E_loc", "ROWS", H), BF)),
    Case("next_combine_buffer/bad_handle", "get_next_low_latency_combine_buffer", (None,),
         expect=bad("handle")),
    Case("clean_ll_buffer", "clean_low_latency_buffer", (NUM_MAX, H, E), expect=None),
    Case("clean_ll_buffer/hidden", "clean_low_latency_buffer", (NUM_MAX, 100, E), expect=bad("hidden")),
    Case("clean_ll_buffer/num_max", "clean_low_latency_buffer", (0, H, E),
         expect=bad("num_max_dispatch_tokens_per_rank")),
    Case("clean_ll_buffer/no_ll_area", "clean_low_latency_buffer", (NUM_MAX, H, E),
         expect=bad("num_rdma_bytes"), buffer={"num_rdma_bytes": 0, "low_latency_mode": False}),
    Case("mask", "low_latency_update_mask_buffer", (0, True), expect=None),
    Case("mask/rank_out_of_range", "low_latency_update_mask_buffer", (Ref(lambda c: c.R), True),
         expect=bad("rank_to_mask")),
    Case("query_mask", "low_latency_query_mask_buffer", expect=A(("R",), I32)),
    Case("query_mask/out", "low_latency_query_mask_buffer", (), {"mask_status": empty(("R",), I32)},
         Same("mask_status")),
    Case("query_mask/out_dtype", "low_latency_query_mask_buffer", (), {"mask_status": empty(("R",), I64)},
         bad("mask_status")),
    Case("clean_mask", "low_latency_clean_mask_buffer", expect=None),
    # ---- prepared LL calls (called twice: a repeat may replay) ----
    Case("prepared_dispatch", "prepare_low_latency_dispatch", *_ll(**ll_outs()), expect=LL_OUTS_RET, call_result=2),
    Case("prepared_dispatch/allocating", "prepare_low_latency_dispatch", *_ll(use_fp8=False), expect=ll_ret(),
         call_result=2),
    Case("prepared_combine", "prepare_low_latency_combine", (LL_Y, IDX, WTS, LL_HANDLE), {"out": empty((T, H), BF)},
         (Same("out"), EV, None), call_result=2),
    Case("prepared_dispatch/bad_argument", "prepare_low_latency_dispatch", *_ll(use_ue8m0=True),
         expect=bad("use_ue8m0"), call_result=1),
]
# fmt: on


# ---- running the list ----
class Ctx:
    """One rank's view of a run: the backend's array module and converter, the inputs, the Buffer."""

    def __init__(self, backend, group, xp, dev, make_buffer):
        self.backend, self.group, self.xp, self.dev, self.make_buffer = backend, group, xp, dev, make_buffer
        self.R, self.rank = group.size, group.rank
        self.E_loc, self.ROWS = E // self.R, self.R * NUM_MAX
        self.data = _inputs(self.rank, self.R)
        self.memo, self.kwargs, self.buf, self.extra = {}, {}, None, []

    def shape(self, shape):
        return tuple(getattr(self, s) if isinstance(s, str) else s for s in shape)


def _inputs(rank, R):
    rng = np.random.default_rng(rank)
    x = rng.integers(-4, 5, (T, H)).astype(BF)
    idx = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int64)
    idx[0, 0] = -1
    lay = reference.get_dispatch_layout(idx, E, R)
    x_e4m3, scales = reference.per_token_cast_to_fp8(x)
    return {
        "x": x,
        "idx": idx,
        "w": rng.random((T, K)).astype(np.float32),
        "per_rank": lay.num_tokens_per_rank,
        "in_rank": lay.is_token_in_rank,
        "per_expert": lay.num_tokens_per_expert,
        "x_fp8": x_e4m3.view(np.uint8),
        "x_e4m3": x_e4m3,
        "x_scales": scales,
        "idx32": idx.astype(np.int32),
        "idx_f32": idx.astype(np.float32),
        "idx_wide": np.zeros((T, 33), np.int64),
        "idx_short": idx[: T - 1].copy(),
        "idx_big": np.where(np.arange(T * K).reshape(T, K) == 2 * K + 1, E, idx),  # [2, 1] = num_experts
        "idx_neg": np.where(np.arange(T * K).reshape(T, K) == 5, -2, idx),
        "x_short": x[: T - 1].copy(),
        "x_short_scales": scales[: T - 1].copy(),
        "x_f32": x.astype(np.float32),
        "x_1d": x[0].copy(),
        "x_fp8_h100": np.zeros((T, 100), np.uint8),
        "x_h192": x[:, :192].copy(),
        "x_h384": x[:, :384].copy(),
        "x_rows_plus": np.zeros((T * 2 * R + 1, H), BF),
        "per_expert_none": np.zeros(0, np.int32),
        "in_rank_i32": lay.is_token_in_rank.astype(np.int32),
        "w_f64": np.ones((T, K)),
    }


def run_case(case: Case, c: Ctx) -> list:
    """The problems of one case on one rank (empty: as expected)."""
    options = dict(case.buffer or {})
    mask_rank_0 = options.pop("mask_rank_0", False)
    buf = c.buf = c.make_buffer(**options)
    made = None
    try:
        if mask_rank_0:
            buf.low_latency_update_mask_buffer(0, True)
        if case.destroyed:
            buf.destroy()
        c.memo = {}
        try:
            args, kwargs = resolve(case.args, c), resolve(case.kwargs, c)
        except Exception as exc:  # noqa: BLE001 - reported as the case's problem
            return [f"setup failed: {type(exc).__name__}: {exc}"]
        c.kwargs = kwargs
        outcome = None
        try:
            if case.method == "Buffer":
                result = made = epkern.Buffer(*args, backend=c.backend, **kwargs)
            else:
                result = getattr(buf, case.method)(*args, **kwargs)
            prepared = result
            for _ in range(case.call_result):
                result = prepared()
        except Exception as exc:  # noqa: BLE001 - compared with the expectation below
            outcome = exc
        want = case.expect
        if isinstance(want, Raises):
            if outcome is None:
                return [f"expected {want.kind.__name__} ({want.arg}), got a result: {_desc(result)}"]
            msg = str(outcome)
            if not isinstance(outcome, want.kind):
                return [f"expected {want.kind.__name__}, got {type(outcome).__name__}: {msg}"]
            if want.arg is not None and not msg.startswith(f"{want.arg}:"):
                return [f"expected a message starting '{want.arg}:', got: {msg}"]
            if want.text not in msg:
                return [f"expected a message containing {want.text!r}, got: {msg}"]
            return []
        if outcome is not None:
            return [f"raised {type(outcome).__name__}: {outcome}"]
        return check(want, result, c)
    finally:
        for other in [made, *c.extra]:
            if other is not None:
                other.destroy()
        c.extra = []
        buf.destroy()


def _cpu_make_buffer(group):
    hint = epkern.Buffer.get_low_latency_rdma_size_hint(NUM_MAX, H, group.size, E)

    def make(**options):
        kw = dict(num_nvl_bytes=1 << 24, num_rdma_bytes=hint, low_latency_mode=True)
        kw.update(options)
        return epkern.Buffer(group, backend="cpu", **kw)

    return make


def _cpu_ctx(group):
    return Ctx("cpu", group, np, np.asarray, _cpu_make_buffer(group))


IDS = [case.id for case in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cpu_one_rank(case):
    from epkern.group.base import SingleGroup

    problems = run_case(case, _cpu_ctx(SingleGroup()))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cpu_two_ranks(case):
    from epkern.group import run_in_process

    results = run_in_process(lambda group: run_case(case, _cpu_ctx(group)), 2, timeout_s=60)
    problems = [f"rank {r}: {p}" for r, ps in enumerate(results) for p in ps]
    assert not problems, "\n".join(problems)


# ---- the GPU backend over the fake CuPy ----
def _emulate_layout_kernel(monkeypatch):
    """get_dispatch_layout over the fakes: its kernel computed by the reference (the counts land in the outputs and
    the invalid-index word, as the kernel leaves them), and the two CUDA facilities it uses that the fake lacks."""
    import ctypes

    from epkern import dispatch_layout, kernel_loader, memory

    monkeypatch.setattr(dispatch_layout, "_sm_count", lambda device: 132)
    monkeypatch.setattr(memory, "HostMapped", F.FakeHostMapped)
    monkeypatch.setattr(dispatch_layout, "_workspaces", {})
    recorded = kernel_loader.get_function

    def get_function(source, name, defines=None):
        fn = recorded(source, name, defines)
        if name != "epk_get_dispatch_layout":
            return fn

        def launch(grid, block, args):
            fn(grid, block, args)
            idx, per_rank, per_expert, in_rank, invalid_ptr = args[0]._a, args[3], args[5], args[6], int(args[9])
            num_experts, num_ranks = defines["EPK_NUM_EXPERTS"], defines["EPK_NUM_RANKS"]
            bad = int(np.count_nonzero((idx < -1) | (idx >= num_experts)))
            if not bad:
                lay = reference.get_dispatch_layout(idx, num_experts, num_ranks)
                per_rank._a[...] = lay.num_tokens_per_rank
                per_expert._a[...] = lay.num_tokens_per_expert
                in_rank._a[...] = lay.is_token_in_rank
            if invalid_ptr:
                ctypes.c_int32.from_address(invalid_ptr).value = bad

        return launch

    monkeypatch.setattr(kernel_loader, "get_function", get_function)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gpu_over_fake_cupy(case, monkeypatch):
    from epkern.group.base import SingleGroup

    with F.installed(monkeypatch, emulate={"epk_ht_notify": F.emulate_ht_notify_one_rank}):
        _emulate_layout_kernel(monkeypatch)
        import cupy

        hint = epkern.Buffer.get_low_latency_rdma_size_hint(NUM_MAX, H, 1, E)

        def make(**options):
            kw = dict(num_nvl_bytes=1 << 24, num_rdma_bytes=hint, low_latency_mode=True)
            kw.update(options)
            return F.fake_buffer(**kw)

        problems = run_case(case, Ctx("gpu", SingleGroup(), cupy, cupy.asarray, make))
    assert not problems, "\n".join(problems)


# ---- the surface itself ----
def _forwarded():
    """Buffer's public methods that forward to a backend method of the same name."""
    from epkern.gpu.backend import GpuBackend

    return sorted(n for n in vars(GpuBackend) if not n.startswith("_") and callable(getattr(GpuBackend, n)))


def test_backends_have_the_same_methods():
    from epkern.cpu_backend import CpuBackend
    from epkern.gpu.backend import GpuBackend

    def methods(cls):
        return {n for n, v in vars(cls).items() if not n.startswith("_") and inspect.isfunction(v)}

    assert methods(CpuBackend) == methods(GpuBackend)


def test_cpu_backend_takes_the_public_arguments_in_order():
    """Each CPU backend method's parameters are the public method's (Buffer forwards positionally)."""
    from epkern.cpu_backend import CpuBackend

    for name in _forwarded():
        public = getattr(epkern.Buffer, name, None)
        if public is None or name.startswith("prepare_"):
            continue
        got = list(inspect.signature(getattr(CpuBackend, name)).parameters)[1:]
        want = list(inspect.signature(public).parameters)[1:]
        assert got == want, name


def test_help_lists_every_method_with_its_docstring():
    text = pydoc.render_doc(epkern.Buffer, renderer=pydoc.plaintext)
    public = [n for n, v in vars(epkern.Buffer).items() if not n.startswith("_") and callable(v)]
    expected = set(_forwarded()) - {"get_config"} | {"get_dispatch_config", "get_combine_config"}
    assert expected <= set(public)
    for name in public:
        doc = inspect.getdoc(getattr(epkern.Buffer, name))
        assert doc, f"Buffer.{name} has no docstring"
        assert name in text and doc.splitlines()[0] in text, name


# ---- the GPU backend for real (a GPU machine) ----
@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gpu_for_real(case):
    """The same list on a GPU: one rank (its own process group), real CuPy arrays and kernels. CuPy cannot hold a
    float8_e4m3fn array (such inputs reach the GPU backend only through DLPack), so those cases run over the fake."""
    import cupy

    if "e4m3fn" in case.id:
        pytest.skip("CuPy has no float8_e4m3fn arrays to pass (the case runs over the fake CuPy)")

    from epkern.group.base import SingleGroup

    hint = epkern.Buffer.get_low_latency_rdma_size_hint(NUM_MAX, H, 1, E)

    def make(**options):
        kw = dict(num_nvl_bytes=1 << 24, num_rdma_bytes=hint, low_latency_mode=True)
        kw.update(options)
        return epkern.Buffer(SingleGroup(), backend="gpu", **kw)

    problems = run_case(case, Ctx("gpu", SingleGroup(), cupy, cupy.asarray, make))
    assert not problems, "\n".join(problems)
