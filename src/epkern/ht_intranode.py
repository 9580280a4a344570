"""Intranode high-throughput dispatch / combine on the GPU (methods of GpuBuffer).

Flow of a non-cached dispatch: ``ht_notify`` exchanges counts and computes the handle (send slots, prefix
matrix) -> the host reads the receive count from host-mapped memory and allocates outputs ->
``ht_dispatch`` writes every row straight into its final place in each destination's output. Cached
dispatch and ``num_worst_tokens`` skip the host wait. Combine pulls returned rows from the peers and
reduces them in the reference's order.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from . import dispatch_layout
from ._validate import as_device_array, bias_list, check_array, check_int
from .errors import ArgumentError

BF16 = np.dtype(ml_dtypes.bfloat16)
# CuPy has no float8 dtype: FP8 data travels as its e4m3 bytes (uint8); float8_e4m3fn is accepted too.
FP8_DTYPES = (np.uint8, np.dtype(ml_dtypes.float8_e4m3fn))
MAX_TOPK = 32


@dataclass
class HtHandle:
    """What combine and cached dispatch need (DeepEP's handle, intranode)."""

    rank_prefix_matrix: object  # int32 [R, R]: rows rank j receives from ranks 0..i
    send_slot: object  # int32 [T, R]: row of token t in rank d's output, -1 if not sent
    is_token_in_rank: object  # bool [T, R]
    recv_src_idx: object  # int32 [N]: source token index of each received row
    num_recv_tokens: int  # real rows received (-1 when unknown on the host: num_worst_tokens)
    num_out_rows: int  # rows of recv_x (num_worst_tokens when used)
    num_tokens: int
    hidden: int
    topk: int
    keep: tuple = ()  # heap blocks that peers wrote into


def _check_x(self, x):
    """BF16 [T, H] or (FP8 [T, H], float32 [T, H/128]); returns (data, scales or None, T, row_bytes)."""
    if isinstance(x, tuple | list):
        if len(x) != 2:
            raise ArgumentError("x: expected a BF16 array or an FP8 pair (x_fp8, scales)")
        data = as_device_array(x[0], "x[0]")
        scales = as_device_array(x[1], "x[1]")
        check_array(data, "x[0]", dtypes=FP8_DTYPES, ndim=2, device=self.device)
        t, h = data.shape
        if h % 128:
            raise ArgumentError(f"x[0]: expected a hidden size that is a multiple of 128, got {h}")
        check_array(scales, "x[1]", dtypes=(np.float32,), shape=(t, h // 128), device=self.device)
        return data, scales, t, h
    data = as_device_array(x, "x")
    check_array(data, "x", dtypes=(BF16,), ndim=2, device=self.device)
    t, h = data.shape
    if (h * 2) % 16:
        raise ArgumentError(f"x: expected hidden size × 2 bytes to be a multiple of 16, got H={h}")
    return data, None, t, h * 2


def get_dispatch_layout(
    self, topk_idx, num_experts, previous_event=None, async_finish=False, allocate_on_comm_stream=False
):

    self._check_usable()
    compute = self._begin(previous_event, async_finish, allocate_on_comm_stream)
    with self.on_comm_stream():
        lay = dispatch_layout.get_dispatch_layout(
            topk_idx, num_experts, self.num_ranks, alloc_stream=None if allocate_on_comm_stream else compute
        )
        key = (
            "layout",
            num_experts,
            lay.is_token_in_rank.shape[1],
            str(getattr(topk_idx, "dtype", "")),
            getattr(topk_idx, "shape", (0, 0))[-1],
        )
        if key not in self._warmed:  # see GpuBuffer._launch: load code before any peer spins
            self.comm_stream.synchronize()
            self.group.barrier()
            self._warmed.add(key)
    event = self._end(compute, async_finish)
    return lay.num_tokens_per_rank, lay.num_tokens_per_rdma_rank, lay.num_tokens_per_expert, lay.is_token_in_rank, event


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
    import cupy

    self._check_usable()
    R = self.num_ranks
    data, scales, T, row_bytes = _check_x(self, x)
    hidden = data.shape[1]
    num_worst_tokens = check_int(num_worst_tokens, "num_worst_tokens", min_value=0)
    expert_alignment = check_int(expert_alignment, "expert_alignment", min_value=1)
    blocks = self.ht_grid(config)
    cached = handle is not None
    if cached:
        if not isinstance(handle, HtHandle):
            raise ArgumentError("handle: expected the handle returned by this Buffer's dispatch")
        if topk_idx is not None or topk_weights is not None:
            raise ArgumentError("topk_idx: must be None for a cached dispatch (handle given)")
        if handle.num_tokens != T:
            raise ArgumentError(f"x: expected {handle.num_tokens} tokens (as in the handle), got {T}")
        if handle.hidden != hidden:
            raise ArgumentError(f"x: expected hidden size {handle.hidden} (as in the handle), got {hidden}")
        topk = handle.topk
    else:
        for name, arr in (
            ("topk_idx", topk_idx),
            ("num_tokens_per_rank", num_tokens_per_rank),
            ("is_token_in_rank", is_token_in_rank),
            ("num_tokens_per_expert", num_tokens_per_expert),
        ):
            if arr is None:
                raise ArgumentError(f"{name}: required unless a cached handle is given")
        topk_idx = as_device_array(topk_idx, "topk_idx")
        check_array(topk_idx, "topk_idx", dtypes=(np.int64,), ndim=2, device=self.device)
        if topk_idx.shape[0] != T:
            raise ArgumentError(f"topk_idx: expected {T} rows (one per token of x), got {topk_idx.shape}")
        topk = topk_idx.shape[1]
        if not 1 <= topk <= MAX_TOPK:
            raise ArgumentError(f"topk_idx: expected 1..{MAX_TOPK} columns, got {topk}")
        if topk_weights is not None:
            topk_weights = as_device_array(topk_weights, "topk_weights")
            check_array(topk_weights, "topk_weights", dtypes=(np.float32,), shape=(T, topk), device=self.device)
        num_tokens_per_rank = as_device_array(num_tokens_per_rank, "num_tokens_per_rank")
        check_array(num_tokens_per_rank, "num_tokens_per_rank", dtypes=(np.int32,), shape=(R,), device=self.device)
        is_token_in_rank = as_device_array(is_token_in_rank, "is_token_in_rank")
        check_array(is_token_in_rank, "is_token_in_rank", dtypes=(np.bool_,), shape=(T, R), device=self.device)
        num_tokens_per_expert = as_device_array(num_tokens_per_expert, "num_tokens_per_expert")
        check_array(num_tokens_per_expert, "num_tokens_per_expert", dtypes=(np.int32,), ndim=1, device=self.device)
        E = num_tokens_per_expert.shape[0]
        if E % R or E // R > 1024:
            raise ArgumentError(
                f"num_tokens_per_expert: expected a length that is a multiple of {R} ranks "
                f"with at most 1024 experts per rank, got {E}"
            )

    compute = self._begin(previous_event, async_finish, allocate_on_comm_stream)
    with self.on_comm_stream():
        if not cached:
            E_loc = num_tokens_per_expert.shape[0] // R
            rank_prefix = cupy.empty((R, R), dtype=np.int32)
            send_slot = cupy.empty((T, R), dtype=np.int32)
            notify_epoch = self._next_epoch()
            self.notify_out[0] = 0
            self._launch(
                "ht_notify.cu",
                "epk_ht_notify",
                {"EPK_NUM_RANKS": R, "EPK_NUM_LOCAL_EXPERTS": E_loc},
                1,
                1024,
                (
                    np.int32(self.rank),
                    np.int32(notify_epoch),
                    np.int32(T),
                    num_tokens_per_rank,
                    num_tokens_per_expert,
                    is_token_in_rank,
                    self.peer_table,
                    rank_prefix,
                    send_slot,
                    np.uintp(self.host.device_ptr + 32),
                    *self._deadline_args(),
                ),
            )
            if num_worst_tokens:
                num_recv, per_expert = -1, []
                out_rows = num_worst_tokens
            else:
                self._wait_host_word(self.notify_out, notify_epoch, "dispatch notify")
                num_recv = int(self.notify_out[1])
                raw = self.notify_out[2 + R : 2 + R + E_loc].astype(np.int64)
                per_expert = [int(-(-c // expert_alignment) * expert_alignment) for c in raw]
                out_rows = num_recv
        else:
            rank_prefix, send_slot, is_token_in_rank = (
                handle.rank_prefix_matrix,
                handle.send_slot,
                handle.is_token_in_rank,
            )
            out_rows = handle.num_out_rows
        # Outputs, allocated where peers can write them.
        sizes = [out_rows * row_bytes, out_rows * (hidden // 128) * 4 if scales is not None else 0]
        if not cached:
            sizes += [out_rows * topk * 8, out_rows * topk * 4, out_rows * 4]
        bufs, keep = self._alloc_out(sizes, compute, allocate_on_comm_stream)
        recv_data = bufs[0].view(data.dtype).reshape(out_rows, hidden)
        recv_scales = bufs[1].view(np.float32).reshape(out_rows, hidden // 128) if scales is not None else None
        if not cached:
            recv_idx = bufs[2].view(np.int64).reshape(out_rows, topk)
            recv_w = bufs[3].view(np.float32).reshape(out_rows, topk)
            recv_src = bufs[4].view(np.int32)
            if num_worst_tokens:  # rows past the real count: no selection
                recv_idx.fill(-1)
                recv_w.fill(0)
                recv_src.fill(-1)
        epoch = self._next_epoch()
        defines = {
            "EPK_NUM_RANKS": R,
            "EPK_TOPK": topk,
            "EPK_ROW_BYTES": row_bytes,
            "EPK_SCALE_COLS": hidden // 128 if scales is not None else 0,
            "EPK_NUM_LOCAL_EXPERTS": (num_tokens_per_expert.shape[0] // R) if not cached else 1,
            "EPK_WITH_META": 0 if cached else 1,
            "EPK_THREADS": self.ht_threads,
            "EPK_MIN_BLOCKS": self.ht_blocks_per_sm,
            "EPK_PROBE": self.ht_probe,
            "EPK_UNROLL": self.ht_dispatch_unroll,
        }

        def addr(a):
            return np.int64(a.data.ptr) if a is not None else np.int64(0)

        meta = (recv_idx, recv_w, recv_src) if not cached else (None, None, None)
        self._launch(
            "ht_dispatch.cu",
            "epk_ht_dispatch",
            defines,
            blocks,
            self.ht_threads,
            (
                np.int32(self.rank),
                np.int32(epoch),
                np.int32(T),
                data,
                np.uintp(scales.data.ptr if scales is not None else 0),
                np.uintp(topk_idx.data.ptr if not cached else 0),
                np.uintp(topk_weights.data.ptr if (not cached and topk_weights is not None) else 0),
                is_token_in_rank,
                send_slot,
                self.peer_table,
                addr(recv_data),
                addr(recv_scales),
                addr(meta[0]),
                addr(meta[1]),
                addr(meta[2]),
                np.int32(out_rows),
                np.uintp(self.tickets.data.ptr),
                *self._deadline_args(),
            ),
        )
    event = self._end(compute, async_finish)
    recv_x = (recv_data, recv_scales) if scales is not None else recv_data
    if cached:
        return recv_x, None, None, None, handle, event
    new_handle = HtHandle(rank_prefix, send_slot, is_token_in_rank, recv_src, num_recv, out_rows, T, hidden, topk, keep)
    return (recv_x, recv_idx, recv_w if topk_weights is not None else None, per_expert, new_handle, event)


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

    self._check_usable()
    if not isinstance(handle, HtHandle):
        raise ArgumentError("handle: expected the handle returned by this Buffer's dispatch")
    x = as_device_array(x, "x")
    check_array(x, "x", dtypes=(BF16,), shape=(handle.num_out_rows, None), device=self.device)
    hidden = x.shape[1]
    if hidden % 8:
        raise ArgumentError(f"x: expected a hidden size that is a multiple of 8, got {hidden}")
    if topk_weights is not None:
        topk_weights = as_device_array(topk_weights, "topk_weights")
        check_array(
            topk_weights,
            "topk_weights",
            dtypes=(np.float32,),
            shape=(handle.num_out_rows, handle.topk),
            device=self.device,
        )
    biases = bias_list(bias)
    for i, b in enumerate(biases):
        biases[i] = as_device_array(b, f"bias[{i}]")
        check_array(biases[i], f"bias[{i}]", dtypes=(BF16,), shape=(handle.num_tokens, hidden), device=self.device)
    blocks = self.ht_grid(config)

    compute = self._begin(previous_event, async_finish, allocate_on_comm_stream)
    with self.on_comm_stream():
        keep = []
        if not self.in_process:
            # Peers read these in place: they must live in the shared region; stage them there if not.
            x, k1 = _in_region(self, x)
            keep += k1
            if topk_weights is not None:
                topk_weights, k2 = _in_region(self, topk_weights)
                keep += k2
        sizes = [handle.num_tokens * hidden * 2, handle.num_tokens * handle.topk * 4 if topk_weights is not None else 0]
        bufs, _ = self._alloc_out(sizes, compute, allocate_on_comm_stream, shared=False)
        out = bufs[0].view(BF16).reshape(handle.num_tokens, hidden)
        out_w = bufs[1].view(np.float32).reshape(handle.num_tokens, handle.topk) if topk_weights is not None else None
        epoch = self._next_epoch()
        defines = {
            "EPK_NUM_RANKS": self.num_ranks,
            "EPK_TOPK": handle.topk,
            "EPK_HIDDEN": hidden,
            "EPK_HAS_WEIGHTS": int(topk_weights is not None),
            "EPK_THREADS": self.ht_threads,
            "EPK_MIN_BLOCKS": self.ht_blocks_per_sm,
            "EPK_PROBE": self.ht_probe,
            "EPK_UNROLL": self.ht_combine_unroll,
            "EPK_LOADS_FIRST": self.ht_combine_loads_first,
        }
        self._launch(
            "ht_combine.cu",
            "epk_ht_combine",
            defines,
            blocks,
            self.ht_threads,
            (
                np.int32(self.rank),
                np.int32(epoch),
                np.int32(handle.num_tokens),
                np.int64(x.data.ptr),
                np.int64(topk_weights.data.ptr if topk_weights is not None else 0),
                handle.send_slot,
                np.uintp(biases[0].data.ptr if biases else 0),
                np.uintp(biases[1].data.ptr if len(biases) > 1 else 0),
                self.peer_table,
                out,
                np.uintp(out_w.data.ptr if out_w is not None else 0),
                np.uintp(self.tickets.data.ptr + 4),
                *self._deadline_args(),
            ),
        )
    event = self._end(compute, async_finish)
    del keep  # staged copies stay alive until here; the stream orders their reuse after the kernel
    return out, out_w, event


def _in_region(self, arr):
    base, end = self.region.ptr, self.region.ptr + self.region.nbytes
    if base <= arr.data.ptr and arr.data.ptr + arr.nbytes <= end:
        return arr, []
    block = self.heap.alloc(arr.nbytes)
    staged = block.array(arr.shape, arr.dtype)
    staged[...] = arr
    return staged, [block]
