"""The CPU backend of ``epkern.Buffer``: every call evaluated by the numpy reference across the group.

Methods take the public Buffer's arguments positionally, in the public order, as GpuBackend's do (buffer.py
holds the signatures and docstrings; tests/test_backend_parity.py runs one list of calls against both). A call
first checks this rank's arguments with the checks the GPU backend uses (api_checks: the same argument named with
the same text), alone, as on the GPU; then each rank contributes its inputs through ``group.allgather_object``,
evaluates the reference for all ranks and keeps its own part (R times redundant: fine for laptops, notebooks and
tests). Arrays are numpy; BF16 is ``ml_dtypes.bfloat16``. FP8 crosses the API as on the GPU: inputs are e4m3 bytes
(uint8) or ``ml_dtypes.float8_e4m3fn``, outputs uint8; LL scales are DeepEP's column-major (transposed) view.

Where the CPU differs from the GPU, by design:

- It checks more: ``topk_idx`` values, that HT dispatch's layout arrays are ``get_dispatch_layout(topk_idx)``'s
  (the GPU routes by the arrays as given), that an LL combine gets its dispatch's ``topk_idx`` (entries may be set
  to -1 to leave selections out, as the GPU allows) and that no LL expert is selected more than num_max times.
- ``num_rdma_bytes`` is honoured as the GPU honours it: LL calls need the LL area the GPU would need, so code that
  runs here runs there.
- ``zero_copy_recv``: there is no LL area to view, so it is accepted with the GPU's checks (not with ``out_*``) and
  the outputs are fresh arrays, valid as long as they are referenced (more than the GPU promises).
- ``get_next_low_latency_combine_buffer``: a BF16 array per (sizes, buffer set), alternating like the GPU's two
  sets; ``low_latency_combine(..., zero_copy=True)`` reads the one of the set it runs in.
- Wait-cost statistics are checked and left as they are (nothing waits on a device); events are complete when a
  call returns; a receive hook runs nothing (the receive happened in the call) and may be called once.
- Masks (``low_latency_update_mask_buffer``): calls stay collective (every rank still calls), but the data moves
  as on the GPU, where a rank skips the peers it masked at every send and wait: a selection of rank s for an
  expert of rank d is delivered only if neither rank masked the other (masks as they are at the dispatch), and
  in a combine rank s sums nothing from an owner d that either masked (masks at the combine).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import numpy as np

from . import api_checks, reference
from ._validate import bias_list, check_array, check_int
from .config import Config
from .errors import ArgumentError, EpkernError
from .events import EventHandle
from .handles import DeepEPTuple

BF16 = api_checks.BF16
FP8 = np.dtype(reference.FP8)
DEFAULT_NUM_SMS = 24  # what the GPU backend takes on a GPU of its own; the CPU launches nothing


@dataclass(eq=False)
class CpuHTHandle:
    """HT handle of the CPU backend: every rank's reference handle (combine and cached dispatch need them)."""

    rank: int
    handles: list
    num_tokens: int
    hidden: int
    topk: int

    @property
    def own(self):
        return self.handles[self.rank]

    @property
    def num_recv_tokens(self) -> int:
        return self.own.num_recv_tokens

    @property
    def num_out_rows(self) -> int:
        return self.own.num_rows


@dataclass(eq=False)
class CpuLLHandle(DeepEPTuple):
    """LL handle of the CPU backend. Iterating gives DeepEP's tuple ``(src_info, layout_range,
    num_max_dispatch_tokens_per_rank, hidden, num_experts)``, as the GPU handle does."""

    src_info: np.ndarray  # int32 [E_loc, R·num_max] (the array returned: out_src_info when given)
    layout_range: np.ndarray  # int64 [E_loc, R]
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int
    rank: int
    ref_handles: list  # every rank's reference LLHandle
    sent_idx: list  # every rank's topk_idx as delivered: -1 where a mask dropped the selection
    topk_idx: np.ndarray  # this rank's topk_idx as given


def _host(obj, name: str):
    """The CPU backend's arrays are numpy arrays (the ``convert`` of api_checks)."""
    if isinstance(obj, np.ndarray):
        return obj
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    raise ArgumentError(f"{name}: expected a numpy array (the CPU backend's arrays), got {kind}")


def _fp8_in(data):
    """FP8 input data as the reference takes it (float8_e4m3fn; uint8 e4m3 bytes are viewed)."""
    return data.view(FP8) if data.dtype == np.uint8 else data


def _fp8_out(recv):
    """An FP8 pair as the API returns it: uint8 e4m3 bytes (CuPy has no float8, so the GPU does the same)."""
    return (recv[0].view(np.uint8), recv[1]) if isinstance(recv, tuple) else recv


def _column_major(scales):
    """LL scales [E_loc, rows, S] as DeepEP's transposed view of a C-contiguous [E_loc, S, rows]."""
    return np.ascontiguousarray(scales.transpose(0, 2, 1)).transpose(0, 2, 1)


def _into(out, value):
    """``value`` written into the preallocated ``out`` (bit for bit) and ``out`` returned, or ``value``."""
    if out is None:
        return value
    out.view(value.dtype)[...] = value
    return out


def _make_hook():
    called = []

    def hook():
        if called:
            raise ArgumentError("hook: a receive hook can be called once")
        called.append(True)

    return hook


class CpuBackend:
    name = "cpu"

    def __init__(self, group, options):
        self.group = group
        self.rank, self.num_ranks = group.rank, group.size
        self.options = options
        nodes = group.node_of_rank
        self._rank_to_node = nodes if len(set(nodes)) > 1 else None
        self.num_sms = DEFAULT_NUM_SMS
        self._closed = False
        self._mask = np.zeros(self.num_ranks, np.int32)  # 1 where this rank masked a peer
        self._sends = 0  # LL calls issued: picks the buffer set of the next one, as the GPU's counter does
        self._combine_buffers: dict = {}  # (num_max, hidden, num_experts, set) -> BF16 [E_loc, R·num_max, H]
        group.barrier()  # collective, like the GPU backend's constructor

    # ---- lifecycle and settings ----
    def destroy(self) -> None:
        self._closed = True
        self._combine_buffers.clear()

    def _usable(self) -> None:
        if self._closed:
            raise EpkernError("Buffer was destroyed")

    def check(self) -> None:
        self._usable()

    def set_num_sms(self, num_sms) -> None:
        self.num_sms = check_int(num_sms, "num_sms", min_value=1, max_value=1024)  # Config's limit

    def get_config(self):
        return Config(num_sms=self.num_sms)

    def _gather(self, obj) -> list:
        return self.group.allgather_object(obj)

    # ---- high throughput ----
    def get_dispatch_layout(self, topk_idx, num_experts, previous_event, async_finish, allocate_on_comm_stream):
        self._usable()
        api_checks.stream_args(previous_event, async_finish, allocate_on_comm_stream)
        topk_idx = _host(topk_idx, "topk_idx")
        num_experts = api_checks.layout_topk_idx(topk_idx, num_experts, self.num_ranks)
        api_checks.topk_values(topk_idx, "topk_idx", num_experts)
        lay = reference.get_dispatch_layout(topk_idx, num_experts, self.num_ranks, self._rank_to_node)
        return (lay.num_tokens_per_rank, lay.num_tokens_per_rdma_rank, lay.num_tokens_per_expert,
                lay.is_token_in_rank, EventHandle())  # fmt: skip

    def _check_layout(self, topk_idx, num_experts, per_rank, per_rdma_rank, in_rank, per_expert) -> None:
        """CPU only: the layout arrays are get_dispatch_layout(topk_idx)'s (the reference routes by topk_idx)."""
        lay = reference.get_dispatch_layout(topk_idx, num_experts, self.num_ranks, self._rank_to_node)
        given = [("num_tokens_per_rank", per_rank, lay.num_tokens_per_rank),
                 ("is_token_in_rank", in_rank, lay.is_token_in_rank),
                 ("num_tokens_per_expert", per_expert, lay.num_tokens_per_expert)]  # fmt: skip
        if per_rdma_rank is not None and lay.num_tokens_per_rdma_rank is not None:  # ignored on one node (as GPU)
            given.append(("num_tokens_per_rdma_rank", _host(per_rdma_rank, "num_tokens_per_rdma_rank"),
                          lay.num_tokens_per_rdma_rank))  # fmt: skip
        for name, arr, want in given:
            if arr.shape != want.shape or not np.array_equal(arr, want):
                raise ArgumentError(
                    f"{name}: does not match topk_idx (expected get_dispatch_layout(topk_idx, {num_experts})'s)"
                )

    def dispatch(self, x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                 num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, num_worst_tokens, config,
                 previous_event, async_finish, allocate_on_comm_stream):  # fmt: skip
        self._usable()
        R = self.num_ranks
        data, scales, T, _ = api_checks.ht_x(x, None, _host)
        hidden = data.shape[1]
        ref_x = (_fp8_in(data), scales) if scales is not None else data
        num_worst_tokens = check_int(num_worst_tokens, "num_worst_tokens", min_value=0)
        expert_alignment = check_int(expert_alignment, "expert_alignment", min_value=1)
        api_checks.config(config)
        if handle is not None:
            api_checks.ht_cached_handle(handle, CpuHTHandle, self, topk_idx, topk_weights, T, hidden)
            api_checks.stream_args(previous_event, async_finish, allocate_on_comm_stream)
            recv = reference.ht_cached_dispatch(self._gather(ref_x), handle.handles)[self.rank]
            return _fp8_out(recv), None, None, None, handle, EventHandle()

        api_checks.ht_layout_given(topk_idx, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert)
        topk_idx = api_checks.topk_idx(_host(topk_idx, "topk_idx"), "topk_idx", T, api_checks.HT_MAX_TOPK)
        topk = topk_idx.shape[1]
        if topk_weights is not None:
            topk_weights = _host(topk_weights, "topk_weights")
            check_array(topk_weights, "topk_weights", dtypes=(np.float32,), shape=(T, topk))
        num_tokens_per_rank = _host(num_tokens_per_rank, "num_tokens_per_rank")
        is_token_in_rank = _host(is_token_in_rank, "is_token_in_rank")
        num_tokens_per_expert = _host(num_tokens_per_expert, "num_tokens_per_expert")
        num_experts = api_checks.ht_dispatch_layout_inputs(R, T, num_tokens_per_rank, is_token_in_rank,
                                                           num_tokens_per_expert)  # fmt: skip
        api_checks.stream_args(previous_event, async_finish, allocate_on_comm_stream)
        api_checks.topk_values(topk_idx, "topk_idx", num_experts)
        self._check_layout(topk_idx, num_experts, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                           num_tokens_per_expert)  # fmt: skip

        inputs = self._gather((ref_x, topk_idx, topk_weights))
        weights = None
        if any(i[2] is not None for i in inputs):  # ranks without weights send zeros (and get None back)
            weights = [i[2] if i[2] is not None else np.zeros(i[1].shape, np.float32) for i in inputs]
        results = reference.ht_dispatch([i[0] for i in inputs], [i[1] for i in inputs], num_experts,
                                        topk_weights=weights, expert_alignment=expert_alignment,
                                        num_worst_tokens=num_worst_tokens)  # fmt: skip
        mine = results[self.rank]
        new_handle = api_checks.stamp(CpuHTHandle(self.rank, [r.handle for r in results], T, hidden, topk), self)
        recv_w = mine.recv_topk_weights if topk_weights is not None else None
        return (_fp8_out(mine.recv_x), mine.recv_topk_idx, recv_w, mine.num_recv_tokens_per_expert_list, new_handle,
                EventHandle())  # fmt: skip

    def combine(self, x, handle, topk_weights, bias, config, previous_event, async_finish, allocate_on_comm_stream):
        self._usable()
        api_checks.own_handle(handle, CpuHTHandle, self, "dispatch")
        x = check_array(_host(x, "x"), "x", dtypes=(BF16,), shape=(handle.num_out_rows, handle.hidden))
        hidden = x.shape[1]
        if hidden % 8:
            raise ArgumentError(f"x: expected a hidden size that is a multiple of 8, got {hidden}")
        if topk_weights is not None:
            topk_weights = _host(topk_weights, "topk_weights")
            check_array(topk_weights, "topk_weights", dtypes=(np.float32,), shape=(handle.num_out_rows, handle.topk))
        biases = bias_list(bias)
        for i, b in enumerate(biases):
            biases[i] = check_array(_host(b, f"bias[{i}]"), f"bias[{i}]", dtypes=(BF16,),
                                    shape=(handle.num_tokens, hidden))  # fmt: skip
        api_checks.config(config)
        api_checks.stream_args(previous_event, async_finish, allocate_on_comm_stream)

        inputs = self._gather((x, topk_weights))
        ws = None
        if any(i[1] is not None for i in inputs):
            ws = [i[1] if i[1] is not None else np.zeros((len(i[0]), handle.topk), np.float32) for i in inputs]

        def own(b):  # biases are local: this rank's, None elsewhere
            return [b if r == self.rank else None for r in range(self.num_ranks)]

        b0 = own(biases[0]) if biases else None
        b1 = own(biases[1]) if len(biases) > 1 else None
        combined, combined_w = reference.ht_combine([i[0] for i in inputs], handle.handles, topk_weights=ws,
                                                    bias_0=b0, bias_1=b1)[self.rank]  # fmt: skip
        return combined, combined_w if topk_weights is not None else None, EventHandle()

    # ---- low latency ----
    def _ll_area(self, num_max: int, hidden: int, num_experts: int) -> None:
        o = self.options
        api_checks.ll_area(o.num_rdma_bytes, o.low_latency_mode, num_max, hidden, num_experts, self.num_ranks)

    def _delivered(self, masks) -> np.ndarray:
        """bool [R, R]: [s, d] where neither rank s nor rank d masked the other (``masks[s, d]``: s masked d)."""
        return (masks == 0) & (masks.T == 0)

    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                             cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats, use_fp8, round_scale,
                             use_ue8m0, async_finish, return_recv_hook, out_x, out_scales, out_src_info,
                             out_layout_range, out_count, zero_copy_recv):  # fmt: skip
        """``zero_copy_recv``: accepted (with the GPU's checks: not with ``out_*``), outputs are fresh arrays."""
        self._usable()
        R = self.num_ranks
        num_max, num_experts = api_checks.ll_sizes(num_max_dispatch_tokens_per_rank, num_experts, R)
        e_loc, rows = num_experts // R, R * num_max
        x = _host(x, "x")
        T, H = api_checks.ll_x(x, num_max)
        use_fp8, round_scale, use_ue8m0, S = api_checks.ll_dispatch_flags(use_fp8, round_scale, use_ue8m0, H)
        topk_idx = api_checks.topk_idx(_host(topk_idx, "topk_idx"), "topk_idx", T, api_checks.ll_max_topk())
        stats = cumulative_local_expert_recv_stats
        if stats is not None:
            stats = api_checks.out_array(stats, "cumulative_local_expert_recv_stats", (np.int32,), (e_loc,), None,
                                         _host)  # fmt: skip
        if dispatch_wait_recv_cost_stats is not None:
            api_checks.out_array(dispatch_wait_recv_cost_stats, "dispatch_wait_recv_cost_stats", (np.int64,), (R,),
                                 None, _host)  # fmt: skip
        outs = {"out_x": out_x, "out_scales": out_scales, "out_src_info": out_src_info,
                "out_layout_range": out_layout_range, "out_count": out_count}  # fmt: skip
        if zero_copy_recv:
            given = [n for n, o in outs.items() if o is not None]
            if given:
                raise ArgumentError(f"{given[0]}: not with zero_copy_recv=True (the outputs are views into the Buffer)")
        data_dtypes = api_checks.FP8_DTYPES if use_fp8 else (BF16,)
        if out_x is not None:
            out_x = api_checks.out_array(out_x, "out_x", data_dtypes, (e_loc, rows, H), None, _host)
        if out_scales is not None:
            if not use_fp8:
                raise ArgumentError("out_scales: only with use_fp8=True")
            scale_dtype = np.int32 if use_ue8m0 else np.float32
            out_scales = api_checks.scales_out(out_scales, "out_scales", scale_dtype, (e_loc, rows, S), None, _host)
        if out_src_info is not None:
            out_src_info = api_checks.out_array(out_src_info, "out_src_info", (np.int32,), (e_loc, rows), None, _host)
        if out_layout_range is not None:
            out_layout_range = api_checks.out_array(out_layout_range, "out_layout_range", (np.int64,), (e_loc, R),
                                                    None, _host)  # fmt: skip
        if out_count is not None:
            out_count = api_checks.out_array(out_count, "out_count", (np.int32,), (e_loc,), None, _host)
        self._ll_area(num_max, H, num_experts)
        api_checks.topk_values(topk_idx, "topk_idx", num_experts)
        picked = np.bincount(topk_idx[topk_idx >= 0], minlength=num_experts)
        if picked.size and picked.max() > num_max:
            g = int(picked.argmax())
            raise ArgumentError(
                f"topk_idx: expert {g} is selected {int(picked[g])} times (repeated entries in a row count), more "
                f"than the num_max_dispatch_tokens_per_rank={num_max} rows its block can hold"
            )

        sizes = (num_max, H, num_experts)
        peers = self._gather((sizes, x, topk_idx, self._mask.copy()))
        self._sends += 1
        seen = [p[0] for p in peers]
        if any(s != sizes for s in seen):
            raise ArgumentError(
                "num_max_dispatch_tokens_per_rank: (num_max_dispatch_tokens_per_rank, hidden, num_experts) must be "
                f"the same on all ranks, got {seen}"
            )
        delivered = self._delivered(np.stack([p[3] for p in peers]))
        sent_idx = []
        for s, p in enumerate(peers):
            idx = p[2].copy()
            idx[(idx >= 0) & ~delivered[s][np.maximum(idx, 0) // e_loc]] = -1
            sent_idx.append(idx)
        results = reference.ll_dispatch([p[1] for p in peers], sent_idx, num_max, num_experts, use_fp8=use_fp8,
                                        round_scale=round_scale, use_ue8m0=use_ue8m0)  # fmt: skip
        mine = results[self.rank]
        if use_fp8:
            recv_x = (_into(out_x, mine.recv_x[0].view(np.uint8)), _into(out_scales, _column_major(mine.recv_x[1])))
        else:
            recv_x = _into(out_x, mine.recv_x)
        src_info = _into(out_src_info, mine.src_info)
        layout_range = _into(out_layout_range, mine.layout_range)
        recv_count = _into(out_count, mine.recv_count)
        if stats is not None:
            stats += mine.recv_count
        handle = CpuLLHandle(src_info, layout_range, num_max, H, num_experts, self.rank,
                             [r.handle for r in results], sent_idx, topk_idx.copy())  # fmt: skip
        api_checks.stamp(handle, self)
        return recv_x, recv_count, handle, EventHandle(), _make_hook() if return_recv_hook else None

    def _combine_buffer(self, handle: CpuLLHandle):
        """The zero-copy combine buffer of the set the next LL call runs in."""
        R = self.num_ranks
        n, H, E = handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts
        key = (n, H, E, (self._sends + 1) & 1)
        buf = self._combine_buffers.get(key)
        if buf is None:
            buf = self._combine_buffers[key] = np.zeros((E // R, R * n, H), BF16)
        return buf

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, use_logfmt, zero_copy, async_finish,
                            return_recv_hook, out, combine_wait_recv_cost_stats):  # fmt: skip
        self._usable()
        R, s = self.num_ranks, self.rank
        x, num_max, H, num_experts = api_checks.ll_combine_x(x, handle, CpuLLHandle, self, use_logfmt, R, None, _host)
        e_loc = num_experts // R
        topk_idx = api_checks.topk_idx(_host(topk_idx, "topk_idx"), "topk_idx", None, api_checks.ll_max_topk())
        T, K = topk_idx.shape
        if T > num_max:
            raise ArgumentError(f"topk_idx: expected at most num_max_dispatch_tokens_per_rank={num_max} rows, got {T}")
        topk_weights = check_array(_host(topk_weights, "topk_weights"), "topk_weights", dtypes=(np.float32,),
                                   shape=(T, K))  # fmt: skip
        if out is not None:
            out = api_checks.out_array(out, "out", (BF16,), (T, H), None, _host)
        if combine_wait_recv_cost_stats is not None:
            api_checks.out_array(combine_wait_recv_cost_stats, "combine_wait_recv_cost_stats", (np.int64,), (R,),
                                 None, _host)  # fmt: skip
        self._ll_area(num_max, H, num_experts)
        given = handle.topk_idx
        if topk_idx.shape != given.shape or np.any((topk_idx != given) & (topk_idx != -1)):
            raise ArgumentError(
                "topk_idx: expected the topk_idx of the low_latency_dispatch that returned handle (entries may be "
                f"-1 to leave a selection out), shape {given.shape}"
            )

        src = self._combine_buffer(handle) if zero_copy else x
        peers = self._gather((src, self._mask.copy()))
        self._sends += 1
        delivered = self._delivered(np.stack([p[1] for p in peers]))[s]  # by owner, as the masks are now
        ys = [p[0] for p in peers]
        sent = handle.sent_idx[s]
        owner = np.maximum(sent, 0) // e_loc
        drop = (sent >= 0) & ((topk_idx < 0) | ~delivered[owner])
        weights = topk_weights.copy()
        if drop.any():  # a dropped selection adds nothing: its weight and its row are zero (+0.0 leaves acc as is)
            weights[drop] = 0
            ys = self._zero_rows(ys, handle, drop)
        ws = [weights if r == s else np.zeros(handle.sent_idx[r].shape, np.float32) for r in range(R)]
        combined = reference.ll_combine(ys, handle.ref_handles, handle.sent_idx, ws)[s]
        combined = _into(out, combined)
        return combined, EventHandle(), _make_hook() if return_recv_hook else None

    def _zero_rows(self, ys, handle: CpuLLHandle, drop) -> list:
        """``ys`` with the owners' rows of this rank's dropped selections zeroed: rows of (expert g, source s) are
        the block of s in g's buffer, in the reference's canonical order (token, then k, ascending)."""
        s, e_loc = self.rank, handle.num_experts // self.num_ranks
        sent = handle.sent_idx[s]
        t, k = np.nonzero(sent >= 0)
        g = sent[t, k]
        order = np.argsort(g, kind="stable")
        t, k, g = t[order], k[order], g[order]
        pos = np.arange(len(g)) - np.searchsorted(g, g, side="left")
        hit = drop[t, k]
        d, e = np.divmod(g[hit], e_loc)
        ys = list(ys)
        for dst in np.unique(d):
            m = d == dst
            begin = handle.ref_handles[dst].layout_range[e[m], s] >> 32
            ys[dst] = ys[dst].copy()
            ys[dst][e[m], begin + pos[hit][m]] = 0
        return ys

    def get_combine_buffer(self, handle):
        self._usable()
        api_checks.own_handle(handle, CpuHTHandle, self, "dispatch")
        return np.zeros((handle.num_out_rows, handle.hidden), BF16)

    def allocating_in_buffer(self):
        self._usable()
        return contextlib.nullcontext()  # the CPU backend reads combine inputs wherever they are

    def get_next_low_latency_combine_buffer(self, handle):
        self._usable()
        api_checks.own_handle(handle, CpuLLHandle, self, "low_latency_dispatch")
        self._ll_area(handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts)
        return self._combine_buffer(handle)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank, hidden, num_experts) -> None:
        self._usable()
        num_max, num_experts = api_checks.ll_sizes(num_max_dispatch_tokens_per_rank, num_experts, self.num_ranks)
        hidden = api_checks.ll_hidden(hidden)
        self._ll_area(num_max, hidden, num_experts)
        self.group.barrier()  # collective, as on the GPU; masks stay (as on the GPU)
        self._sends = 0
        for buf in self._combine_buffers.values():
            buf[...] = 0

    def low_latency_update_mask_buffer(self, rank_to_mask, mask) -> None:
        self._usable()
        r = check_int(rank_to_mask, "rank_to_mask", min_value=0, max_value=self.num_ranks - 1)
        self._mask[r] = 1 if mask else 0

    def low_latency_query_mask_buffer(self, mask_status):
        self._usable()
        if mask_status is None:
            return self._mask.copy()
        mask_status = api_checks.out_array(mask_status, "mask_status", (np.int32,), (self.num_ranks,), None, _host)
        mask_status[...] = self._mask
        return mask_status

    def low_latency_clean_mask_buffer(self) -> None:
        self._usable()
        self._mask[...] = 0

    def prepare_low_latency_dispatch(self, call, args, kwargs):
        return functools.partial(call, *args, **kwargs)

    def prepare_low_latency_combine(self, call, args, kwargs):
        return functools.partial(call, *args, **kwargs)
