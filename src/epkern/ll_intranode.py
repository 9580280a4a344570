"""Low-latency (LL) dispatch / combine on one node over CUDA IPC (methods of GpuBuffer).

Kernels: ``kernels/ll_dispatch.cu`` and ``kernels/ll_combine.cu`` (layout and protocol in
``kernels/ll_common.cuh``; the per-peer send sites in ``kernels/ll_route.cuh``).

- LL area: ``num_rdma_bytes`` of the Buffer's symmetric region, at ``self.ll_offset`` (after the control
  area and the HT heap). Two alternating buffer sets of ``set_stride`` bytes each; ``ll_layout`` (ll_layout.py,
  with the limits and the device-state words) gives the offsets inside a set. Masks, the buffer clean and the
  raise-once path of a silent peer are in ll_masks.py. The hot path allocates nothing when the ``out_*``
  arrays are given.
- The set a call uses comes from a call counter in the Buffer's device state, advanced by the kernels
  themselves, so a captured dispatch + combine pair replays correctly in a CUDA graph. The host keeps only a
  count of the sending launches it issued, to tell a recv hook how many sends came after its own (``back``,
  a relative number that graph replay preserves).
- Masked peers (``low_latency_update_mask_buffer``, or a peer that let a wait expire) are skipped at every
  send and wait site. A deadline expiry raises TimeoutError once (at the next check: the next call or an
  explicit sync) and leaves that peer masked; the Buffer stays usable. Masking is sticky: a masked rank that
  comes back needs ``clean_low_latency_buffer`` on every rank (its call counter is behind) and an unmask.
- Errors recorded by a kernel surface at the next check; the outputs of calls launched between the failing
  one and that check are not valid. Out-of-range ``topk_idx`` values are found by the kernel (no host sync):
  they are skipped and raise ArgumentError at that next check.
- Two sets, as DeepEP: a call reuses the set of the call two before it, so every rank must have run that
  call's receive (its hook) before any rank issues the new one. The plain sequence dispatch, combine,
  dispatch, ... (with or without hooks called right away) always satisfies it; two dispatches in flight
  (send A, send B, hook A, hook B) need every rank past hook A before any rank's combine A.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from . import _env, ll_plans
from ._validate import as_device_array, check_array, check_int, check_num_experts
from .buffer import EventHandle
from .errors import ArgumentError
from .ll_layout import (  # noqa: F401 - re-exported: the LL names tests and benchmarks know from here
    LL_BAD_INDEX_PHASE,
    LL_PHASES,
    LL_RECOVERABLE_PHASES,
    LL_TIMEOUT_PHASES,
    MAX_EXPERTS,
    MAX_NUM_MAX,
    MAX_RANKS,
    MAX_TOPK,
    PHASE_RECV,
    PHASE_SEND,
    ROUTE_IPC,
    ROUTE_NONE,
    STATE_COUNTER,
    STATE_DONE,
    STATE_MASK,
    STATE_MAX_RANKS,
    STATE_PAIR,
    STATE_ROUTE,
    STATE_SLOT,
    STATE_TICKET,
    STATE_WORDS,
    THREADS,
    LLLayout,
    direct_recv_layout,
    ll_area_bytes,
    ll_layout,
    min_num_rdma_bytes,
    set_stride_of,
)

BF16 = np.dtype(ml_dtypes.bfloat16)
FP8_DTYPES = (np.uint8, np.dtype(ml_dtypes.float8_e4m3fn))


@dataclass(eq=False)
class GpuLLHandle:
    """What low_latency_combine needs (DeepEP's handle; iterating gives DeepEP's tuple
    ``(src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts)``)."""

    src_info: object  # int32 [E_loc, R·num_max] (device)
    layout_range: object  # int64 [E_loc, R] (device)
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int
    layout: LLLayout

    def _fields(self):
        return (self.src_info, self.layout_range, self.num_max_dispatch_tokens_per_rank, self.hidden, self.num_experts)

    def __iter__(self):
        return iter(self._fields())

    def __getitem__(self, i):
        return self._fields()[i]

    def __len__(self) -> int:
        return 5


# ---- setup (called once from GpuBuffer.__init__) ----
def init_low_latency(self) -> None:
    """LL device state (call counter, ticket, mask, routes, per-expert counters), allocated once."""
    import cupy

    self.ll_state = cupy.zeros(STATE_WORDS, dtype=np.int32)
    self._ll_one = cupy.asarray(np.ones(1, np.int32))  # source of the state words set to 1 (ll_masks.py)
    kinds = np.array([ROUTE_IPC if p else ROUTE_NONE for p in self.region.peer_ptrs], dtype=np.int32)
    self.ll_state[STATE_ROUTE : STATE_ROUTE + self.num_ranks] = cupy.asarray(kinds)
    cupy.cuda.get_current_stream().synchronize()
    self._ll_sends = 0  # sending launches issued (host side; the device counter is the truth)
    self._ll_fast_host = _env.ll_fast_host()  # repeat calls replay a validated call's launch (ll_plans.py)
    self._ll_plans = ll_plans.CallPlans(8)
    self._ll_combine_views: dict = {}  # (num_max, hidden, num_experts, set) -> the zero-copy combine buffer
    self._ll_recv_views: dict = {}  # (sizes, fp8, ue8m0, set) -> the zero_copy_recv outputs (_direct_outputs)
    self._ll_replays = 0  # calls served by a plan (tests check the fast path was taken)
    self._ll_direct = 0  # ... of them launched straight onto the caller's stream
    self._ll_checked: set = set()  # (num_max, hidden, num_experts) agreed on by every rank
    # The polling knobs (docs/environment.md), read once per Buffer so the hot path reads no environment.
    sleep_ns = _env.ll_poll_sleep_ns()
    if sleep_ns is None:  # auto: measured on 8 ranks of one H200, docs/performance.md
        sleep_ns = 200 if self.ranks_per_gpu > 1 else 0
    self._ll_poll_defines = {"EPK_POLL_SLEEP_NS": sleep_ns, "EPK_POLL_RELAXED": _env.ll_poll_relaxed()}
    self._ll_combine_split = _env.ll_combine_split()
    self._ll_combine_ahead = _env.ll_combine_ahead()
    self._ll_copy_inflight = _env.ll_copy_inflight()
    self._ll_dispatch_pull = _env.ll_dispatch_pull()
    self._ll_combine_pull = _env.ll_combine_pull()
    self._ll_diag = _env.ll_diag()


def capturing(stream) -> bool:
    is_capturing = getattr(stream, "is_capturing", None)
    try:
        return bool(is_capturing()) if is_capturing is not None else False
    except Exception:  # noqa: BLE001 - an invalidated capture reports through CuPy later
        return False


def _plan(self, num_max: int, hidden: int, num_experts: int) -> tuple[LLLayout, int]:
    lay = ll_layout(num_max, hidden, num_experts)
    stride = set_stride_of(self.ll_bytes)
    if lay.per_set > stride:
        from .reference import get_low_latency_rdma_size_hint

        hint = get_low_latency_rdma_size_hint(num_max, hidden, self.num_ranks, num_experts)
        why = "" if self.ll_bytes else " (the Buffer has no LL area: pass num_rdma_bytes, low_latency_mode=True)"
        raise ArgumentError(
            f"num_rdma_bytes: expected at least {2 * lay.per_set} bytes for num_max_dispatch_tokens_per_rank="
            f"{num_max}, hidden={hidden}, num_experts={num_experts} (get_low_latency_rdma_size_hint gives "
            f"{hint}), got {self.num_rdma_bytes}{why}"
        )
    return lay, stride


def _agree(self, num_max: int, hidden: int, num_experts: int, stream) -> None:
    """First use of these sizes: every rank must use the same (one allgather, then cached). Collective."""
    key = (num_max, hidden, num_experts)
    if key in self._ll_checked:
        return
    if capturing(stream):
        raise ArgumentError(
            f"num_max_dispatch_tokens_per_rank: sizes {key} are used for the first time inside a CUDA graph "
            "capture; run one low_latency_dispatch with them before capturing (the first use is collective)"
        )
    seen = self.group.allgather_object(key)
    if any(s != key for s in seen):
        raise ArgumentError(
            "num_max_dispatch_tokens_per_rank: (num_max_dispatch_tokens_per_rank, hidden, num_experts) must be "
            f"the same on all ranks, got {seen}"
        )
    self._ll_checked.add(key)


def _ensure_warm(self, source: str, name: str, defines: dict, stream) -> None:
    if not self._is_warm(source, name, defines) and capturing(stream):
        raise ArgumentError(
            f"{name}: this specialisation ({defines}) is used for the first time inside a CUDA graph capture; "
            "call it once before capturing (its first launch synchronises and is collective)"
        )


def _blocks(self) -> int:
    # Spin-waiting kernels of every rank sharing this GPU must be resident at once: one block per SM each.
    return self.sm_share


def _ptr(a) -> np.uintp:
    return np.uintp(a.data.ptr if a is not None else 0)


def _check_out(arr, name, dtypes, shape, device):
    arr = as_device_array(arr, name)
    return check_array(arr, name, dtypes=dtypes, shape=shape, device=device)


def _check_scales_out(arr, name, dtype, shape, device):
    """Scales are stored column-major (DeepEP): ``arr`` [E_loc, rows, S] must be the transposed view
    ``base.transpose(0, 2, 1)`` of a C-contiguous base [E_loc, S, rows]."""
    arr = as_device_array(arr, name)
    check_array(arr, name, dtypes=(dtype,), shape=shape, contiguous=False, device=device)
    if not arr.transpose(0, 2, 1).flags.c_contiguous:
        raise ArgumentError(
            f"{name}: expected the column-major layout of DeepEP's scales, i.e. "
            f"cupy.empty(({shape[0]}, {shape[2]}, {shape[1]})).transpose(0, 2, 1) (strides {arr.strides})"
        )
    return arr


def _check_topk(self, topk_idx, name: str, num_tokens: int | None):
    topk_idx = as_device_array(topk_idx, name)
    check_array(topk_idx, name, dtypes=(np.int64,), ndim=2, device=self.device)
    if num_tokens is not None and topk_idx.shape[0] != num_tokens:
        raise ArgumentError(f"{name}: expected {num_tokens} rows (one per token of x), got {topk_idx.shape}")
    if not 1 <= topk_idx.shape[1] <= MAX_TOPK:
        raise ArgumentError(f"{name}: expected 1..{MAX_TOPK} columns, got {topk_idx.shape[1]}")
    return topk_idx


def _check_common(self, num_max, num_experts):
    if self.num_ranks > MAX_RANKS:
        raise ArgumentError(f"group: LL kernels support up to {MAX_RANKS} ranks, got {self.num_ranks}")
    num_max = check_int(num_max, "num_max_dispatch_tokens_per_rank", min_value=1, max_value=MAX_NUM_MAX)
    num_experts = check_num_experts(num_experts, self.num_ranks)
    if num_experts > MAX_EXPERTS:
        raise ArgumentError(f"num_experts: expected at most {MAX_EXPERTS}, got {num_experts}")
    return num_max, num_experts


# ---- public API ----
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
    out_x=None,
    out_scales=None,
    out_src_info=None,
    out_layout_range=None,
    out_count=None,
    zero_copy_recv=False,
):
    """DeepEP's ``low_latency_dispatch``: returns ``(recv_x, recv_count, handle, event, hook)``.

    ``recv_x``: BF16 [E_loc, R·num_max, H], or with ``use_fp8`` the pair (e4m3 bytes as uint8
    [E_loc, R·num_max, H], scales): float32 [E_loc, R·num_max, H/128], or with ``use_ue8m0`` int32
    [E_loc, R·num_max, H/512]; scales are a transposed (column-major) view as in DeepEP. H must be a multiple
    of 128 (of 512 with UE8M0). ``round_scale`` / ``use_ue8m0`` are ignored without ``use_fp8``.
    ``out_*``: preallocated outputs of exactly those shapes and dtypes (``out_scales`` as the transposed view
    of a C-contiguous [E_loc, S, R·num_max] array), so a hot loop allocates nothing.
    ``return_recv_hook``: only the sends are issued; ``hook()`` issues the receive (no SM held between).
    ``zero_copy_recv`` (epkern's own): every output is a view into this Buffer's LL area, where each sender
    writes its rows once, straight into their final place (no staging, no copy at the receiver; blocks in arrival
    order). The next LL call uses the other buffer set; the one after it writes this set again, and peers may
    start it as soon as they have this rank's part of the next call. So read the outputs with work enqueued
    before the next LL call (the expert computation before its combine); the handle stays valid for that
    combine, also when it runs in this set (two-batch overlap; a combine whose ``x`` is such an output is
    refused there). ``out_*`` cannot be given with it.
    """
    import cupy

    self._check_usable()
    plan_key = plan_shapes = None
    if self._ll_fast_host:
        # The flags as given (True and 1 are one key); the arrays by identity. Written out: this is the
        # whole host cost of a replayed call besides the launch.
        plan_key = (
            "dispatch",
            id(x),
            id(topk_idx),
            num_max_dispatch_tokens_per_rank,
            num_experts,
            use_fp8,
            round_scale,
            use_ue8m0,
            async_finish,
            return_recv_hook,
            id(cumulative_local_expert_recv_stats),
            id(dispatch_wait_recv_cost_stats),
            id(out_x),
            id(out_scales),
            id(out_src_info),
            id(out_layout_range),
            id(out_count),
            # the outputs of a zero_copy_recv call are the set's: one plan per set
            (self._ll_sends + 1) & 1 if zero_copy_recv else -1,
        )
        plan_shapes = (getattr(x, "shape", None), getattr(topk_idx, "shape", None))
        plan = self._ll_plans.get(plan_key, plan_shapes)
        if plan is not None:
            return dispatch_returns(plan, *_replay(self, plan, async_finish, return_recv_hook, 2))
        # The caller's objects, before the checks rebind any (x to a CuPy view), inputs first (a hook keeps
        # those alive): a plan holds them so that the ids in its key stay theirs.
        plan_refs = (
            x,
            topk_idx,
            cumulative_local_expert_recv_stats,
            dispatch_wait_recv_cost_stats,
            out_x,
            out_scales,
            out_src_info,
            out_layout_range,
            out_count,
        )
    R, dev = self.num_ranks, self.device
    num_max, num_experts = _check_common(self, num_max_dispatch_tokens_per_rank, num_experts)
    e_loc, rows = num_experts // R, R * num_max
    x = as_device_array(x, "x")
    check_array(x, "x", dtypes=(BF16,), ndim=2, device=dev)
    T, H = x.shape
    if T > num_max:
        raise ArgumentError(f"x: expected at most num_max_dispatch_tokens_per_rank={num_max} tokens, got {T}")
    if H <= 0 or H % 128:
        raise ArgumentError(f"x: expected a hidden size that is a positive multiple of 128, got {H}")
    use_fp8 = bool(use_fp8)
    round_scale = bool(round_scale) and use_fp8
    use_ue8m0 = bool(use_ue8m0) and use_fp8
    if use_ue8m0 and not round_scale:
        raise ArgumentError("use_ue8m0: requires round_scale=True (UE8M0 stores powers of two)")
    if use_ue8m0 and H % 512:
        raise ArgumentError(f"x: use_ue8m0 packs four scales per int32, so H must be a multiple of 512, got {H}")
    topk_idx = _check_topk(self, topk_idx, "topk_idx", T)
    K = topk_idx.shape[1]
    if cumulative_local_expert_recv_stats is not None:
        cumulative_local_expert_recv_stats = _check_out(
            cumulative_local_expert_recv_stats, "cumulative_local_expert_recv_stats", (np.int32,), (e_loc,), dev
        )
    if dispatch_wait_recv_cost_stats is not None:
        dispatch_wait_recv_cost_stats = _check_out(
            dispatch_wait_recv_cost_stats, "dispatch_wait_recv_cost_stats", (np.int64,), (R,), dev
        )
    data_dtypes = FP8_DTYPES if use_fp8 else (BF16,)
    S = (H // 512 if use_ue8m0 else H // 128) if use_fp8 else 0
    scale_dtype = np.int32 if use_ue8m0 else np.float32
    zero_copy_recv = bool(zero_copy_recv)
    if zero_copy_recv:
        given = [
            n
            for n, o in (
                ("out_x", out_x),
                ("out_scales", out_scales),
                ("out_src_info", out_src_info),
                ("out_layout_range", out_layout_range),
                ("out_count", out_count),
            )
            if o is not None
        ]
        if given:
            raise ArgumentError(f"{given[0]}: not with zero_copy_recv=True (the outputs are views into the Buffer)")
    if out_x is not None:
        out_x = _check_out(out_x, "out_x", data_dtypes, (e_loc, rows, H), dev)
    if out_scales is not None:
        if not use_fp8:
            raise ArgumentError("out_scales: only with use_fp8=True")
        out_scales = _check_scales_out(out_scales, "out_scales", scale_dtype, (e_loc, rows, S), dev)
    if out_src_info is not None:
        out_src_info = _check_out(out_src_info, "out_src_info", (np.int32,), (e_loc, rows), dev)
    if out_layout_range is not None:
        out_layout_range = _check_out(out_layout_range, "out_layout_range", (np.int64,), (e_loc, R), dev)
    if out_count is not None:
        out_count = _check_out(out_count, "out_count", (np.int32,), (e_loc,), dev)
    lay, stride = _plan(self, num_max, H, num_experts)
    defines = {
        "EPK_NUM_RANKS": R,
        "EPK_HIDDEN": H,
        "EPK_TOPK": K,
        "EPK_USE_FP8": int(use_fp8),
        "EPK_ROUND_SCALE": int(round_scale),
        "EPK_USE_UE8M0": int(use_ue8m0),
        "EPK_THREADS": THREADS,
        "EPK_LL_PULL": self._ll_dispatch_pull,
        "EPK_LL_COPY_INFLIGHT": self._ll_copy_inflight,
        "EPK_LL_DIAG": self._ll_diag,
        "EPK_LL_DIRECT": int(zero_copy_recv),
        **self._ll_poll_defines,
    }
    caller = cupy.cuda.get_current_stream()
    _ensure_warm(self, "ll_dispatch.cu", "epk_ll_dispatch", defines, caller)
    _agree(self, num_max, H, num_experts, caller)  # collective on first use; after every local check

    compute = self._begin(None, async_finish)
    with self.on_comm_stream():
        if zero_copy_recv:
            out_x, out_scales, out_src_info, out_layout_range, out_count = _direct_outputs(
                self, lay, stride, use_fp8, use_ue8m0, S
            )
        outs = [out_x, out_scales, out_src_info, out_layout_range, out_count]
        sizes = [
            e_loc * rows * H * (1 if use_fp8 else 2),
            e_loc * rows * S * 4,
            e_loc * rows * 4,
            e_loc * R * 8,
            e_loc * 4,
        ]
        missing = [i for i, o in enumerate(outs) if o is None and sizes[i] > 0]
        if missing:
            bufs, _ = self._alloc_out([sizes[i] for i in missing], compute, False, shared=False)
            for i, b in zip(missing, bufs, strict=True):
                if i == 0:
                    outs[0] = b.view(np.uint8 if use_fp8 else BF16).reshape(e_loc, rows, H)
                elif i == 1:
                    outs[1] = b.view(scale_dtype).reshape(e_loc, S, rows).transpose(0, 2, 1)
                elif i == 2:
                    outs[2] = b.view(np.int32).reshape(e_loc, rows)
                elif i == 3:
                    outs[3] = b.view(np.int64).reshape(e_loc, R)
                else:
                    outs[4] = b.view(np.int32).reshape(e_loc)
        recv_x, recv_scales, src_info, layout_range, recv_count = outs

        rest = (
            _ptr(x),
            np.int32(T),
            _ptr(topk_idx),
            np.int32(num_experts),
            np.int32(num_max),
            self.peer_table,
            np.int64(self.ll_offset),
            np.int64(stride),
            np.int64(lay.send_off),
            np.int64(lay.recv_off),
            self.ll_state,
            _ptr(recv_x),
            _ptr(recv_scales),
            _ptr(src_info),
            _ptr(layout_range),
            _ptr(recv_count),
            _ptr(cumulative_local_expert_recv_stats),
            _ptr(dispatch_wait_recv_cost_stats),
            *self._deadline_args(),
        )

        def launch(phase: int, back: int) -> None:
            self._launch(
                "ll_dispatch.cu",
                "epk_ll_dispatch",
                defines,
                _blocks(self),
                THREADS,
                (np.int32(self.rank), np.int32(phase), np.int32(back), *rest),
            )

        launch(PHASE_SEND if return_recv_hook else PHASE_SEND | PHASE_RECV, 0)
        self._ll_sends += 1
    event = self._end(compute, async_finish)
    handle = GpuLLHandle(src_info, layout_range, num_max, H, num_experts, lay)
    hook = _make_hook(self, launch, x, topk_idx) if return_recv_hook else None
    out = (recv_x, recv_scales) if use_fp8 else recv_x
    if plan_key is not None and not missing:  # every output preallocated: repeat calls can replay this one
        fast = ll_plans.launcher(self, "ll_dispatch.cu", "epk_ll_dispatch", defines, _blocks(self), THREADS, rest)
        result = (out, recv_count, handle)
        self._ll_plans.put(plan_key, ll_plans.Plan(plan_shapes, fast, result, plan_refs))
    return out, recv_count, handle, event, hook


def _next_set(self, stride: int) -> tuple[int, int]:
    """(parity, address) of the buffer set the next LL call runs in, as the host counts the sending calls."""
    parity = (self._ll_sends + 1) & 1
    return parity, self.region.ptr + self.ll_offset + parity * stride


def _direct_outputs(self, lay, stride, use_fp8: bool, use_ue8m0: bool, S: int):
    """The zero_copy_recv outputs of the call about to be issued: views into the receive region of its set
    (ll_layout.direct_recv_layout; the direct kernel's senders write there). One set of views per (sizes, set)."""
    import cupy

    R = self.num_ranks
    parity, set_ptr = _next_set(self, stride)
    key = (lay.num_max, lay.hidden, lay.num_experts, use_fp8, use_ue8m0, parity)
    views = self._ll_recv_views.get(key)
    if views is None:
        d = direct_recv_layout(lay, R)
        e_loc, rows, H = lay.num_experts // R, R * lay.num_max, lay.hidden
        base = set_ptr + lay.recv_off
        mem = cupy.cuda.UnownedMemory(base, d.end, self)

        def at(off, dtype, shape):
            return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(mem, off))

        x = at(d.x_off, np.uint8 if use_fp8 else BF16, (e_loc, rows, H))
        scales = None
        if use_fp8:
            scales = at(d.scales_off, np.int32 if use_ue8m0 else np.float32, (e_loc, S, rows)).transpose(0, 2, 1)
        views = self._ll_recv_views[key] = (
            x,
            scales,
            at(d.src_off, np.int32, (e_loc, rows)),
            at(d.layout_off, np.int64, (e_loc, R)),
            at(d.count_off, np.int32, (e_loc,)),
        )
    return views


def dispatch_returns(plan, event, hook):
    """What a replayed low_latency_dispatch returns: the validated call's outputs and handle (the handle only
    names those preallocated arrays and the sizes, so every replay may share it)."""
    out, recv_count, handle = plan.result
    return out, recv_count, handle, event, hook


_NO_EVENT = EventHandle(None)  # what a direct replay returns as its event (nothing to wait for); read-only


def _replay(self, plan, async_finish, return_recv_hook, hook_refs: int):
    """A repeat of a validated call with the same arrays and flags (EPKERN_LL_FAST_HOST): the launch only.
    Returns (event, hook); the hook keeps the plan's first ``hook_refs`` arrays (the call's inputs) alive."""
    import cupy

    self._ll_replays += 1
    phase = PHASE_SEND if return_recv_hook else PHASE_SEND | PHASE_RECV
    compute = cupy.cuda.get_current_stream()
    if compute.ptr == self._joined_ptr and not async_finish and not return_recv_hook:
        # The caller's stream already follows all of this Buffer's work (and is one of the Buffer's device), and
        # the caller waits for this call: the launch goes straight onto that stream, with no comm-stream round
        # trip (two events, two waits).
        in_process_sync = self.in_process and self.num_ranks > 1
        captured = capturing(compute) if self._ll_fast_host == 3 or in_process_sync else False
        if self._ll_fast_host == 3 and not captured:
            graph = plan.graphs.get(phase)
            if graph is None:
                graph = plan.graphs[phase] = ll_plans.capture_launch(plan.launch, phase)
            graph.launch(compute)
        else:
            plan.launch(phase, 0, compute.ptr)
        self._ll_sends += 1
        self._ll_direct += 1
        self._direct_stream = compute
        if in_process_sync and not captured:
            self._sync_bounded(compute, "waiting for this call's kernel (in-process ranks)")  # as GpuBuffer._end
        return _NO_EVENT, None
    compute = self._begin(None, async_finish)
    with self.on_comm_stream():
        plan.launch(phase, 0)
        self._ll_sends += 1
    event = self._end(compute, async_finish)
    hook = _make_hook(self, plan.launch, *plan.refs[:hook_refs]) if return_recv_hook else None
    return event, hook


def _make_hook(self, launch, *keep):
    """The receive phase of the call just issued, for ``return_recv_hook``: finds its own call by counting
    the sends issued after it. Runs on the caller's current stream order, like any call."""
    sent_at = self._ll_sends
    called = []

    def hook():
        if called:
            raise ArgumentError("hook: a receive hook can be called once")
        self._check_usable()
        called.append(True)
        compute = self._begin(None)
        with self.on_comm_stream():
            launch(PHASE_RECV, self._ll_sends - sent_at)
        self._end(compute, False)

    hook.inputs = keep  # the call's inputs stay alive as long as its receive may still be enqueued
    return hook


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
    """DeepEP's ``low_latency_combine``: returns ``(combined_x, event, hook)``.

    ``x``: BF16 [E_loc, R·num_max, H], rows as received. ``zero_copy``: the expert outputs were written into
    ``get_next_low_latency_combine_buffer(handle)`` (``x`` is checked but not read). ``out``: preallocated
    BF16 [T, H]. Tokens whose expert lives on a masked rank get nothing from that expert."""
    import cupy

    self._check_usable()
    plan_key = plan_shapes = None
    preallocated = out is not None
    if self._ll_fast_host and preallocated and type(handle) is GpuLLHandle:
        # The handle object is new on every dispatch; its arrays and sizes are what the launch uses. A zero-copy
        # combine reads the buffer of the set it runs in: one plan per set.
        plan_key = (
            "combine",
            (self._ll_sends + 1) & 1 if zero_copy else -1,
            id(x),
            id(topk_idx),
            id(topk_weights),
            handle.num_max_dispatch_tokens_per_rank,
            handle.hidden,
            handle.num_experts,
            use_logfmt,
            async_finish,
            return_recv_hook,
            id(combine_wait_recv_cost_stats),
            id(handle.src_info),
            id(handle.layout_range),
            id(out),
        )
        plan_shapes = (
            getattr(x, "shape", None),
            getattr(topk_idx, "shape", None),
            getattr(topk_weights, "shape", None),
        )
        plan = self._ll_plans.get(plan_key, plan_shapes)
        if plan is not None:
            event, hook = _replay(self, plan, async_finish, return_recv_hook, 3)
            return plan.result, event, hook
        # The caller's objects before the checks rebind any, inputs first (a hook keeps those alive).
        plan_refs = (x, topk_idx, topk_weights, combine_wait_recv_cost_stats, handle.src_info, handle.layout_range, out)
    if not isinstance(handle, GpuLLHandle):
        raise ArgumentError("handle: expected the handle returned by this Buffer's low_latency_dispatch")
    if use_logfmt:
        raise ArgumentError("use_logfmt: not supported")
    R, dev = self.num_ranks, self.device
    num_max, H, num_experts = handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts
    e_loc, rows = num_experts // R, R * num_max
    x = as_device_array(x, "x")
    check_array(x, "x", dtypes=(BF16,), shape=(e_loc, rows, H), device=dev)
    topk_idx = _check_topk(self, topk_idx, "topk_idx", None)
    T, K = topk_idx.shape
    if T > num_max:
        raise ArgumentError(f"topk_idx: expected at most num_max_dispatch_tokens_per_rank={num_max} rows, got {T}")
    topk_weights = as_device_array(topk_weights, "topk_weights")
    check_array(topk_weights, "topk_weights", dtypes=(np.float32,), shape=(T, K), device=dev)
    if out is not None:
        out = _check_out(out, "out", (BF16,), (T, H), dev)
    if combine_wait_recv_cost_stats is not None:
        combine_wait_recv_cost_stats = _check_out(
            combine_wait_recv_cost_stats, "combine_wait_recv_cost_stats", (np.int64,), (R,), dev
        )
    lay, stride = _plan(self, num_max, H, num_experts)
    if not zero_copy:
        _check_outside_combine_slots(self, x, lay, stride, num_experts)
    src = _combine_buffer(self, handle) if zero_copy else x
    defines = {
        "EPK_NUM_RANKS": R,
        "EPK_HIDDEN": H,
        "EPK_TOPK": K,
        "EPK_THREADS": THREADS,
        "EPK_LL_COMBINE_SPLIT": self._ll_combine_split,
        "EPK_LL_COMBINE_AHEAD": self._ll_combine_ahead,
        # Zero-copy outputs lie in the owners' LL areas: sources may read them there (EPKERN_LL_COMBINE_PULL).
        "EPK_LL_COMBINE_PULL": int(bool(zero_copy) and self._ll_combine_pull),
        **self._ll_poll_defines,
    }
    caller = cupy.cuda.get_current_stream()
    _ensure_warm(self, "ll_combine.cu", "epk_ll_combine", defines, caller)

    compute = self._begin(None, async_finish)
    with self.on_comm_stream():
        if out is None:
            bufs, _ = self._alloc_out([T * H * 2], compute, False, shared=False)
            out = bufs[0].view(BF16).reshape(T, H)

        rest = (
            _ptr(src),
            handle.src_info,
            handle.layout_range,
            _ptr(topk_idx),
            _ptr(topk_weights),
            np.int32(T),
            _ptr(out),
            np.int32(num_experts),
            np.int32(num_max),
            self.peer_table,
            np.int64(self.ll_offset),
            np.int64(stride),
            np.int64(lay.recv_off),
            self.ll_state,
            _ptr(combine_wait_recv_cost_stats),
            *self._deadline_args(),
        )

        def launch(phase: int, back: int) -> None:
            self._launch(
                "ll_combine.cu",
                "epk_ll_combine",
                defines,
                _blocks(self),
                THREADS,
                (np.int32(self.rank), np.int32(phase), np.int32(back), *rest),
            )

        launch(PHASE_SEND if return_recv_hook else PHASE_SEND | PHASE_RECV, 0)
        self._ll_sends += 1
    event = self._end(compute, async_finish)
    hook = _make_hook(self, launch, x, topk_idx, topk_weights) if return_recv_hook else None
    if plan_key is not None:  # preallocated: repeat calls can replay this one
        fast = ll_plans.launcher(self, "ll_combine.cu", "epk_ll_combine", defines, _blocks(self), THREADS, rest)
        self._ll_plans.put(plan_key, ll_plans.Plan(plan_shapes, fast, out, plan_refs))
    return out, event, hook


def _check_outside_combine_slots(self, x, lay, stride, num_experts) -> None:
    """A combine (not zero-copy) gets its peers' rows in the receive region of its set: ``x`` must not lie there
    (the zero_copy_recv output of the dispatch two LL calls back, as in two-batch overlap)."""
    lo = _next_set(self, stride)[1] + lay.recv_off
    hi = lo + num_experts * lay.num_max * 2 * lay.hidden
    start = x.data.ptr
    if start < hi and lo < start + x.nbytes:
        raise ArgumentError(
            "x: lies in this Buffer's receive area that this combine overwrites (the zero_copy_recv output of the "
            "dispatch two LL calls back); copy it first, or write the expert outputs into "
            "get_next_low_latency_combine_buffer and combine with zero_copy=True"
        )


def _combine_buffer(self, handle: GpuLLHandle):
    """The send region of the set the next call will use, as BF16 [E_loc, R·num_max, H]: a zero-copy combine
    reads it in place (any LL call between the caller's writes and that combine overwrites it or reads the
    other set). One array object per (shape, set), so repeated zero-copy combines replay (ll_plans.py)."""
    import cupy

    num_max, hidden, num_experts = handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts
    key = (num_max, hidden, num_experts, (self._ll_sends + 1) & 1)  # the set of the next call
    views = self._ll_combine_views
    view = views.get(key)
    if view is None:
        lay, stride = _plan(self, num_max, hidden, num_experts)
        e_loc, rows = num_experts // self.num_ranks, self.num_ranks * num_max
        ptr = _next_set(self, stride)[1] + lay.send_off
        mem = cupy.cuda.UnownedMemory(ptr, e_loc * rows * hidden * 2, self)
        view = views[key] = cupy.ndarray((e_loc, rows, hidden), BF16, cupy.cuda.MemoryPointer(mem, 0))
    return view


def get_next_low_latency_combine_buffer(self, handle):
    """Where to write the expert outputs for ``low_latency_combine(..., zero_copy=True)``: BF16
    [E_loc, R·num_max, H] inside this Buffer's LL area (of the set the next LL call uses; call it after the
    dispatch, write, then combine with no LL call in between)."""
    self._check_usable()
    if not isinstance(handle, GpuLLHandle):
        raise ArgumentError("handle: expected the handle returned by this Buffer's low_latency_dispatch")
    return _combine_buffer(self, handle)
