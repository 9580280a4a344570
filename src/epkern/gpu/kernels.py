"""One typed launch description per library kernel: its source, entry point, compile-time parameters (every
one required: kernels have no fallback defaults) and runtime arguments in the order of its C signature.

The validated paths, the LL replays, the first-use warm-up and tests/test_kernel_signatures_cpu.py all use
these; ``pack`` is the only place kernel arguments are laid out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

I32, I64, U64, PTR = "i32", "i64", "u64", "ptr"
_NULL = np.uintp(0)


def _pointer(value):
    """A pointer argument: a device array stays itself (CuPy and the driver launch pass its address), an integer
    address becomes a 64-bit scalar, None the null pointer."""
    if value is None:
        return _NULL
    if isinstance(value, int | np.integer):
        return np.uintp(value)
    return value


def _packer(name: str, args: tuple):
    """pack(**arguments) for one kernel, as generated code: Python's own argument binding names a missing or
    unknown argument, and a call costs one conversion per argument (this runs on every validated launch)."""
    conv = {I32: "_i32", I64: "_i64", U64: "_u64", PTR: "_ptr"}
    params = ", ".join(n for n, _ in args)
    body = ", ".join(f"{conv[k]}({n})" for n, k in args)
    namespace = {"_i32": np.int32, "_i64": np.int64, "_u64": np.uint64, "_ptr": _pointer}
    exec(f"def pack_{name}(*, {params}):\n    return ({body},)\n", namespace)  # noqa: S102 - our own names
    return namespace[f"pack_{name}"]


@dataclass(frozen=True)
class KernelSpec:
    source: str
    name: str
    params: tuple[str, ...]  # -D defines, all required
    args: tuple[tuple[str, str], ...]  # (name as in the C signature, kind)

    def __post_init__(self):
        object.__setattr__(self, "pack", _packer(self.name, self.args))
        object.__setattr__(self, "_index", {n: i for i, (n, _) in enumerate(self.args)})
        object.__setattr__(self, "_specialisations", {})  # values in params order -> the defines dict

    def defines(self, **values) -> dict:
        """The defines of one specialisation, in the spec's order (a fixed order keys the launch cache). One dict
        per specialisation, kept: callers must not change it."""
        key = tuple(values.get(p) for p in self.params)
        found = self._specialisations.get(key)
        if found is not None and len(values) == len(self.params):
            return found
        if len(values) != len(self.params) or not all(p in values for p in self.params):
            missing, extra = set(self.params) - set(values), set(values) - set(self.params)
            raise TypeError(f"{self.name}: defines missing {sorted(missing)}, unknown {sorted(extra)}")
        return self._specialisations.setdefault(key, {p: values[p] for p in self.params})

    # pack(**arguments) -> tuple: the arguments in signature order, scalars as numpy scalars of their C type,
    # pointers as device arrays or 64-bit addresses (see _pointer); set per spec in __post_init__.

    def index(self, arg: str) -> int:
        return self._index[arg]


def _args(*names_kinds: str) -> tuple[tuple[str, str], ...]:
    """ "name:kind" strings -> ((name, kind), ...)."""
    return tuple(tuple(s.split(":")) for s in names_kinds)  # type: ignore[misc]


_DEADLINE = ("err:ptr", "timeout_ns:u64")

LAYOUT = KernelSpec(
    "layout.cu",
    "epk_get_dispatch_layout",
    ("EPK_NUM_EXPERTS", "EPK_NUM_RANKS", "EPK_NUM_NODES", "EPK_TOPK", "EPK_IDX_T", "EPK_THREADS"),
    _args(
        *("topk_idx:ptr", "num_tokens:i32", "rank_to_node:ptr", "num_tokens_per_rank:ptr", "num_tokens_per_node:ptr"),
        *("num_tokens_per_expert:ptr", "is_token_in_rank:ptr", "ticket:ptr", "counters:ptr", "invalid_out:ptr"),
    ),
)

HT_NOTIFY = KernelSpec(
    "ht_notify.cu",
    "epk_ht_notify",
    ("EPK_NUM_RANKS",),
    _args(
        *("dry_run:i32", "rank:i32", "call:i32", "num_tokens:i32", "num_tokens_per_rank:ptr"),
        *("num_tokens_per_expert:ptr", "is_token_in_rank:ptr", "peers:ptr", "rank_prefix_matrix:ptr"),
        *("send_slot:ptr", "topk_idx:ptr", "topk:i32", "num_experts:i32", "row_bytes:i32", "scale_cols:i32"),
        *("host_out:ptr", *_DEADLINE),
    ),
)

HT_INTER_NOTIFY = KernelSpec(  # across nodes (issue #18)
    "ht_inter_notify.cu",
    "epk_ht_inter_notify",
    ("EPK_NUM_RANKS", "EPK_NUM_NODES"),
    _args(
        *("dry_run:i32", "rank:i32", "call:i32", "num_tokens:i32", "num_tokens_per_rank:ptr"),
        *("num_tokens_per_rdma_rank:ptr", "num_tokens_per_expert:ptr", "is_token_in_rank:ptr", "peers:ptr"),
        *("area_offset:i64", "qps:ptr", "node_of:ptr", "peer_of_node:ptr", "rank_prefix_matrix:ptr"),
        *("send_slot:ptr", "node_slot:ptr", "node_tokens:ptr", "node_counts:ptr", "topk_idx:ptr", "topk:i32"),
        *("num_experts:i32", "row_bytes:i32", "scale_cols:i32", "host_out:ptr", *_DEADLINE),
    ),
)

HT_DISPATCH = KernelSpec(
    "ht_dispatch.cu",
    "epk_ht_dispatch",
    (
        *("EPK_NUM_RANKS", "EPK_TOPK", "EPK_ROW_BYTES", "EPK_SCALE_COLS", "EPK_NUM_LOCAL_EXPERTS", "EPK_WITH_META"),
        *("EPK_THREADS", "EPK_MIN_BLOCKS", "EPK_PROBE", "EPK_UNROLL"),
    ),
    _args(
        *("dry_run:i32", "rank:i32", "call:i32", "num_tokens:i32", "x:ptr", "x_scales:ptr", "topk_idx:ptr"),
        *("topk_weights:ptr", "is_token_in_rank:ptr", "send_slot:ptr", "peers:ptr", "out_x:i64", "out_scales:i64"),
        *("out_idx:i64", "out_weights:i64", "out_src:i64", "out_rows:i32", "ticket:ptr", *_DEADLINE),
    ),
)

HT_INTER_DISPATCH = KernelSpec(  # across nodes (issue #18)
    "ht_inter_dispatch.cu",
    "epk_ht_inter_dispatch",
    (
        *("EPK_NUM_RANKS", "EPK_NUM_NODES", "EPK_TOPK", "EPK_ROW_BYTES", "EPK_SCALE_COLS", "EPK_NUM_LOCAL_EXPERTS"),
        *("EPK_WITH_META", "EPK_THREADS", "EPK_MIN_BLOCKS", "EPK_UNROLL"),
    ),
    _args(
        *("dry_run:i32", "rank:i32", "call:i32", "num_tokens:i32", "x:ptr", "x_scales:ptr", "topk_idx:ptr"),
        *("topk_weights:ptr", "send_slot:ptr", "node_tokens:ptr", "node_counts:ptr", "fwd_slots:ptr", "fwd_cap:i32"),
        *("notify_out:ptr", "peers:ptr", "area_offset:i64", "qps:ptr", "node_of:ptr", "peer_of_node:ptr"),
        "ring_offset:i64",
        *("ring:i32", "chunk:i32"),
        *("out_x:i64", "out_scales:i64", "out_idx:i64", "out_weights:i64", "out_src:i64", "out_rows:i32"),
        *("ticket:ptr", *_DEADLINE),
    ),
)

HT_INTER_COMBINE = KernelSpec(  # across nodes (issue #18)
    "ht_inter_combine.cu",
    "epk_ht_inter_combine",
    ("EPK_NUM_RANKS", "EPK_NUM_NODES", "EPK_TOPK", "EPK_HIDDEN", "EPK_HAS_WEIGHTS", "EPK_THREADS", "EPK_MIN_BLOCKS"),
    _args(
        *("dry_run:i32", "rank:i32", "call:i32", "num_tokens:i32", "in_x:i64", "in_weights:i64", "send_slot:ptr"),
        *("node_slot:ptr", "fwd_slots:ptr", "fwd_cap:i32", "node_counts:ptr", "bias0:ptr", "bias1:ptr", "peers:ptr"),
        *("area_offset:i64", "qps:ptr", "node_of:ptr", "peer_of_node:ptr", "ring_offset:i64", "ring:i32"),
        *("chunk:i32", "scratch:ptr", "copied:ptr", "out_x:ptr", "out_weights:ptr", "ticket:ptr", *_DEADLINE),
    ),
)

HT_COMBINE = KernelSpec(
    "ht_combine.cu",
    "epk_ht_combine",
    (
        *("EPK_NUM_RANKS", "EPK_TOPK", "EPK_HIDDEN", "EPK_HAS_WEIGHTS", "EPK_THREADS", "EPK_MIN_BLOCKS"),
        *("EPK_PROBE", "EPK_UNROLL", "EPK_LOADS_FIRST"),
    ),
    _args(
        *("dry_run:i32", "rank:i32", "call:i32", "num_tokens:i32", "in_x:i64", "in_weights:i64", "send_slot:ptr"),
        *("bias0:ptr", "bias1:ptr", "peers:ptr", "out_x:ptr", "out_weights:ptr", "ticket:ptr", *_DEADLINE),
    ),
)

LL_DISPATCH = KernelSpec(
    "ll_dispatch.cu",
    "epk_ll_dispatch",
    (
        *("EPK_NUM_RANKS", "EPK_HIDDEN", "EPK_TOPK", "EPK_USE_FP8", "EPK_ROUND_SCALE", "EPK_USE_UE8M0"),
        *("EPK_THREADS", "EPK_LL_PULL", "EPK_LL_DIRECT", "EPK_POLL_SLEEP_NS", "EPK_LL_NIC"),
    ),
    _args(
        *("dry_run:i32", "rank:i32", "phase:i32", "back:i32", "x:ptr", "num_tokens:i32", "topk_idx:ptr"),
        *("num_experts:i32", "num_max:i32", "peers:ptr", "ll_off:i64", "set_stride:i64", "send_off:i64"),
        *("recv_off:i64", "state:ptr", "out_x:ptr", "out_scales:ptr", "out_src:ptr", "out_layout:ptr"),
        *("out_count:ptr", "recv_stats:ptr", "wait_stats:ptr", *_DEADLINE),
    ),
)

LL_COMBINE = KernelSpec(
    "ll_combine.cu",
    "epk_ll_combine",
    (
        *("EPK_NUM_RANKS", "EPK_HIDDEN", "EPK_TOPK", "EPK_THREADS", "EPK_LL_COMBINE_PULL", "EPK_POLL_SLEEP_NS"),
        "EPK_LL_NIC",
    ),
    _args(
        *("dry_run:i32", "rank:i32", "phase:i32", "back:i32", "x:ptr", "src_info:ptr", "layout:ptr", "topk_idx:ptr"),
        *("topk_weights:ptr", "num_tokens:i32", "out:ptr", "num_experts:i32", "num_max:i32", "peers:ptr"),
        *("ll_off:i64", "set_stride:i64", "send_off:i64", "recv_off:i64", "state:ptr", "wait_stats:ptr"),
        *_DEADLINE,
    ),
)

LIBRARY_KERNELS = (
    LAYOUT,
    HT_NOTIFY,
    HT_DISPATCH,
    HT_COMBINE,
    LL_DISPATCH,
    LL_COMBINE,
    HT_INTER_NOTIFY,
    HT_INTER_DISPATCH,
    HT_INTER_COMBINE,
)
