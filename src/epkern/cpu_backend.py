"""The CPU backend: the public Buffer API computed by the numpy reference across the group's ranks.

Every call is collective: each rank contributes its inputs through ``group.allgather_object``, every rank
evaluates the reference for all ranks and keeps its own part. That is R times redundant work, which is
fine for laptops, notebooks and tests, and keeps the backend a thin, obviously-correct layer over the
reference. Arrays are numpy; BF16 is ``ml_dtypes.bfloat16`` and FP8 ``ml_dtypes.float8_e4m3fn``.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from . import reference
from ._validate import bias_list, check_array, check_int, check_num_experts
from .buffer import Buffer, EventHandle
from .errors import ArgumentError, EpkernError
from .group import as_group

BF16 = np.dtype(ml_dtypes.bfloat16)
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)


@dataclass
class CpuHTHandle:
    """High-throughput handle of the CPU backend: every rank's reference handle (combine needs them)."""

    rank: int
    handles: list
    num_recv_tokens: int

    @property
    def own(self):
        return self.handles[self.rank]


@dataclass
class CpuLLHandle:
    rank: int
    results: list
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int


def _check_x(x, name: str = "x"):
    """BF16 [T, H] or the FP8 pair (e4m3 [T, H], float32 [T, H/128]); returns (T, H)."""
    if isinstance(x, tuple):
        if len(x) != 2:
            raise ArgumentError(f"{name}: expected a BF16 array or an FP8 pair (x_fp8, scales)")
        data, scales = x
        check_array(data, f"{name}[0]", dtypes=(FP8,), ndim=2)
        t, h = data.shape
        if h % 128:
            raise ArgumentError(f"{name}[0]: expected a hidden size that is a multiple of 128, got {h}")
        check_array(scales, f"{name}[1]", dtypes=(np.float32,), shape=(t, h // 128), contiguous=False)
        return t, h
    check_array(x, name, dtypes=(BF16,), ndim=2)
    t, h = x.shape
    if (h * 2) % 16:
        raise ArgumentError(f"{name}: expected hidden size × 2 bytes to be a multiple of 16, got H={h}")
    return t, h


class CpuBuffer(Buffer):
    backend = "cpu"

    def __init__(
        self,
        group=None,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        *,
        backend: str | None = None,
        **_ignored,
    ):
        self.group = as_group(group)
        self.rank = self.group.rank
        self.num_ranks = self.group.size
        self.num_nvl_bytes = check_int(num_nvl_bytes, "num_nvl_bytes", min_value=0)
        self.num_rdma_bytes = check_int(num_rdma_bytes, "num_rdma_bytes", min_value=0)
        self.low_latency_mode = bool(low_latency_mode)
        nodes = self.group.node_of_rank
        self._rank_to_node = nodes if len(set(nodes)) > 1 else None
        self._alive = True

    # ---- lifecycle ----
    def destroy(self) -> None:
        self._alive = False

    def _check_alive(self):
        if not self._alive:
            raise EpkernError("Buffer was destroyed")

    def _gather(self, obj):
        return self.group.allgather_object(obj)

    def _check_topk(self, topk_idx, num_experts: int, num_tokens: int | None = None, name="topk_idx"):
        check_array(topk_idx, name, dtypes=(np.int64,), ndim=2)
        if num_tokens is not None and topk_idx.shape[0] != num_tokens:
            raise ArgumentError(f"{name}: expected {num_tokens} rows (one per token of x), got {topk_idx.shape}")
        if topk_idx.size and (topk_idx.min() < -1 or topk_idx.max() >= num_experts):
            raise ArgumentError(f"{name}: expected entries in [-1, {num_experts})")

    # ---- high throughput ----
    def get_dispatch_layout(
        self, topk_idx, num_experts, previous_event=None, async_finish=False, allocate_on_comm_stream=False
    ):
        self._check_alive()
        num_experts = check_num_experts(num_experts, self.num_ranks)
        self._check_topk(topk_idx, num_experts)
        lay = reference.get_dispatch_layout(topk_idx, num_experts, self.num_ranks, self._rank_to_node)
        return (
            lay.num_tokens_per_rank,
            lay.num_tokens_per_rdma_rank,
            lay.num_tokens_per_expert,
            lay.is_token_in_rank,
            EventHandle(),
        )

    def dispatch(
        self,
        x,
        handle=None,
        num_tokens_per_rank=None,
        num_tokens_per_rdma_rank=None,
        is_token_in_rank=None,
        num_tokens_per_expert=None,
        topk_idx=None,
        topk_weights=None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config=None,
        previous_event=None,
        async_finish=False,
        allocate_on_comm_stream=False,
    ):
        self._check_alive()
        num_tokens, _ = _check_x(x)
        if handle is not None:
            if not isinstance(handle, CpuHTHandle):
                raise ArgumentError("handle: expected the handle returned by this Buffer's dispatch")
            if topk_idx is not None or topk_weights is not None:
                raise ArgumentError("topk_idx: must be None for a cached dispatch (handle given)")
            if handle.own.num_tokens != num_tokens:
                raise ArgumentError(f"x: expected {handle.own.num_tokens} tokens (as in the handle), got {num_tokens}")
            xs = self._gather(x)
            recv = reference.ht_cached_dispatch(xs, handle.handles)[self.rank]
            return recv, None, None, None, handle, EventHandle()
        if topk_idx is None or num_tokens_per_expert is None:
            raise ArgumentError("topk_idx / num_tokens_per_expert: required unless a cached handle is given")
        check_array(num_tokens_per_expert, "num_tokens_per_expert", dtypes=(np.int32,), ndim=1)
        num_experts = check_num_experts(
            num_tokens_per_expert.shape[0], self.num_ranks, "num_tokens_per_expert (length)"
        )
        self._check_topk(topk_idx, num_experts, num_tokens)
        if topk_weights is not None:
            check_array(topk_weights, "topk_weights", dtypes=(np.float32,), shape=topk_idx.shape)
        if num_tokens_per_rank is not None:
            check_array(num_tokens_per_rank, "num_tokens_per_rank", dtypes=(np.int32,), shape=(self.num_ranks,))
        if is_token_in_rank is not None:
            check_array(is_token_in_rank, "is_token_in_rank", dtypes=(np.bool_,), shape=(num_tokens, self.num_ranks))
        expert_alignment = check_int(expert_alignment, "expert_alignment", min_value=1)
        num_worst_tokens = check_int(num_worst_tokens, "num_worst_tokens", min_value=0)
        inputs = self._gather((x, topk_idx, topk_weights))
        xs = [i[0] for i in inputs]
        idxs = [i[1] for i in inputs]
        weights = None if any(i[2] is None for i in inputs) else [i[2] for i in inputs]
        results = reference.ht_dispatch(
            xs,
            idxs,
            num_experts,
            topk_weights=weights,
            expert_alignment=expert_alignment,
            num_worst_tokens=num_worst_tokens,
        )
        mine = results[self.rank]
        handle = CpuHTHandle(self.rank, [r.handle for r in results], mine.handle.num_recv_tokens)
        return (
            mine.recv_x,
            mine.recv_topk_idx,
            mine.recv_topk_weights,
            mine.num_recv_tokens_per_expert_list,
            handle,
            EventHandle(),
        )

    def combine(
        self,
        x,
        handle,
        topk_weights=None,
        bias=None,
        config=None,
        previous_event=None,
        async_finish=False,
        allocate_on_comm_stream=False,
    ):
        self._check_alive()
        if not isinstance(handle, CpuHTHandle):
            raise ArgumentError("handle: expected the handle returned by this Buffer's dispatch")
        check_array(x, "x", dtypes=(BF16,), ndim=2)
        if x.shape[0] != len(handle.own.src_idx):
            raise ArgumentError(
                f"x: expected {len(handle.own.src_idx)} rows (as received in dispatch), got {x.shape[0]}"
            )
        if topk_weights is not None:
            check_array(topk_weights, "topk_weights", dtypes=(np.float32,), ndim=2)
            if topk_weights.shape[0] != x.shape[0]:
                raise ArgumentError(f"topk_weights: expected {x.shape[0]} rows, got {topk_weights.shape[0]}")
        biases = bias_list(bias)
        for i, b in enumerate(biases):
            check_array(b, f"bias[{i}]", dtypes=(BF16,), shape=(handle.own.num_tokens, x.shape[1]))
        inputs = self._gather((x, topk_weights))
        ys = [i[0] for i in inputs]
        ws = None if any(i[1] is None for i in inputs) else [i[1] for i in inputs]

        # Biases are local to each rank: give the reference this rank's and zero-free Nones elsewhere.
        def per_rank(b):
            return [b if r == self.rank else None for r in range(self.num_ranks)] if b is not None else None

        b0 = per_rank(biases[0] if biases else None)
        b1 = per_rank(biases[1] if len(biases) > 1 else None)
        combined, combined_w = reference.ht_combine(ys, handle.handles, topk_weights=ws, bias_0=b0, bias_1=b1)[
            self.rank
        ]
        return combined, combined_w, EventHandle()

    # ---- low latency ----
    def low_latency_dispatch(
        self,
        x,
        topk_idx,
        num_max_dispatch_tokens_per_rank,
        num_experts,
        cumulative_local_expert_recv_stats=None,
        dispatch_wait_recv_cost_stats=None,
        use_fp8=True,
        round_scale=False,
        use_ue8m0=False,
        async_finish=False,
        return_recv_hook=False,
    ):
        self._check_alive()
        check_array(x, "x", dtypes=(BF16,), ndim=2)
        num_tokens, hidden = x.shape
        num_max = check_int(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank", min_value=1)
        if num_tokens > num_max:
            raise ArgumentError(
                f"x: expected at most num_max_dispatch_tokens_per_rank={num_max} tokens, got {num_tokens}"
            )
        if hidden % 128:
            raise ArgumentError(f"x: expected a hidden size that is a multiple of 128, got {hidden}")
        num_experts = check_num_experts(num_experts, self.num_ranks)
        self._check_topk(topk_idx, num_experts, num_tokens)
        if use_ue8m0 and not round_scale:
            raise ArgumentError("use_ue8m0: requires round_scale=True")
        peers = self._gather((x, topk_idx, num_max))
        if any(p[2] != num_max for p in peers):
            raise ArgumentError(
                f"num_max_dispatch_tokens_per_rank: must be the same on all ranks, got {[p[2] for p in peers]}"
            )
        results = reference.ll_dispatch(
            [p[0] for p in peers],
            [p[1] for p in peers],
            num_max,
            num_experts,
            use_fp8=use_fp8,
            round_scale=round_scale,
            use_ue8m0=use_ue8m0,
        )
        mine = results[self.rank]
        if cumulative_local_expert_recv_stats is not None:
            check_array(
                cumulative_local_expert_recv_stats,
                "cumulative_local_expert_recv_stats",
                dtypes=(np.int32,),
                shape=mine.recv_count.shape,
            )
            cumulative_local_expert_recv_stats += mine.recv_count
        handle = CpuLLHandle(self.rank, results, num_max, hidden, num_experts)
        hook = (lambda: None) if return_recv_hook else None
        return mine.recv_x, mine.recv_count, handle, EventHandle(), hook

    def low_latency_combine(
        self,
        x,
        topk_idx,
        topk_weights,
        handle,
        use_logfmt=False,
        zero_copy=False,
        async_finish=False,
        return_recv_hook=False,
        out=None,
        combine_wait_recv_cost_stats=None,
    ):
        self._check_alive()
        if not isinstance(handle, CpuLLHandle):
            raise ArgumentError("handle: expected the handle returned by this Buffer's low_latency_dispatch")
        if use_logfmt:
            raise ArgumentError("use_logfmt: not supported")
        e_loc = handle.num_experts // self.num_ranks
        rows = self.num_ranks * handle.num_max_dispatch_tokens_per_rank
        check_array(x, "x", dtypes=(BF16,), shape=(e_loc, rows, handle.hidden))
        self._check_topk(topk_idx, handle.num_experts)
        check_array(topk_weights, "topk_weights", dtypes=(np.float32,), shape=topk_idx.shape)
        peers = self._gather((x, topk_idx, topk_weights))
        combined = reference.ll_combine(
            [p[0] for p in peers], handle.results, [p[1] for p in peers], [p[2] for p in peers]
        )[self.rank]
        if out is not None:
            check_array(out, "out", dtypes=(BF16,), shape=combined.shape)
            out[...] = combined
            combined = out
        hook = (lambda: None) if return_recv_hook else None
        return combined, EventHandle(), hook

    def get_low_latency_rdma_size_hint(self, num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts):
        return reference.get_low_latency_rdma_size_hint(
            num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts
        )
