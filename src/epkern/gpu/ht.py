"""Intranode high-throughput (HT) get_dispatch_layout / dispatch / combine on the GPU.

Flow of a non-cached dispatch: ``ht_notify`` exchanges counts and computes the handle (send slots, prefix
matrix) -> ``ht_dispatch`` writes every row straight into its final place in each destination's output, reserved in
the shared heap for as many rows as fit (ht_outputs.py) -> meanwhile the host reads the receive count from host-mapped
memory and keeps that many rows of the reservation. In-process ranks (outputs from CuPy's pool) read the count first
and then allocate and launch. Cached dispatch and ``num_worst_tokens`` need no count. Combine pulls returned rows
from the peers and reduces them in the reference's order.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import SimpleNamespace

import numpy as np

from .. import api_checks, dispatch_layout
from .. import kernel_constants as K
from .._validate import as_device_array, bias_list, check_array, check_int
from ..config import Config
from ..errors import ArgumentError
from . import ht_outputs, ht_replay
from .capture import capturing
from .ht_outputs import combine_outputs, dispatch_outputs, work_arrays
from .kernels import HT_COMBINE, HT_DISPATCH, HT_NOTIFY
from .ll import plans as ll_plans
from .tuning import HtTuning

BF16 = api_checks.BF16


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


_NOTIFY_SHAPE, _NOTIFY_BAD = K.get("EPK_HT_NOTIFY_SHAPE"), K.get("EPK_HT_NOTIFY_BAD_INDEX")
# What each shape field of ht_notify is: the argument it comes from and what it holds.
_SHAPE_FIELDS = (
    ("x", "row bytes (hidden size x element size)"),
    ("topk_idx", "top-k (columns)"),
    ("x", "FP8 scale columns"),
    ("num_tokens_per_expert", "experts per rank"),
    ("topk_idx", "all entries in [-1, num_experts) (1: yes)"),
    ("num_tokens_per_rdma_rank", "tokens per node as is_token_in_rank gives them (1: yes)"),  # across nodes only
)


def refuse_mismatched_calls(host_out, topk: int, rank: int, shape_at=_NOTIFY_SHAPE, bad_at=_NOTIFY_BAD) -> None:
    """What ht_notify found before any row moved: this rank's topk_idx entry outside [-1, num_experts), or a peer
    whose call differs from this one in a shape (then every rank of the group refuses the same call, and the
    Buffer stays usable). ``shape_at`` / ``bad_at``: where the notify kernel wrote them (across nodes: its own)."""
    bad = int(host_out[bad_at])
    if bad:
        t, k = divmod(bad - 1, topk)
        raise ArgumentError(
            f"topk_idx: entry [{t}, {k}] = {int(host_out[bad_at + 1])} is outside [-1, num_experts) "
            "(every rank refuses this dispatch)"
        )
    peer = int(host_out[shape_at]) - 1
    if peer >= 0:
        field = int(host_out[shape_at + 1])
        arg, what = _SHAPE_FIELDS[field]
        theirs, mine = int(host_out[shape_at + 2]), int(host_out[shape_at + 3])
        raise ArgumentError(
            f"{arg}: rank {rank}'s dispatch differs from rank {peer}'s in {what}: {mine} here, {theirs} there; "
            "every rank must dispatch with the same hidden size, dtype, top-k and experts (every rank refuses it)"
        )


def notify_result(
    rt, topk, num_local_experts, expert_alignment, experts_at, shape_at=_NOTIFY_SHAPE, bad_at=_NOTIFY_BAD
):
    """Once a notify's host words are in (intranode or across nodes): refuse a call the ranks disagree on, and return
    (rows received, per local expert the selections received rounded up to ``expert_alignment``)."""
    refuse_mismatched_calls(rt.notify_out, topk, rt.rank, shape_at, bad_at)
    raw = rt.notify_out[experts_at : experts_at + num_local_experts].astype(np.int64)
    return int(rt.notify_out[1]), (-(-raw // expert_alignment) * expert_alignment).tolist()


def check_capture(what: str, rt) -> bool:
    """Whether this HT call is being captured into a CUDA graph (asked once per call; what it allocates then follows
    from it), refusing (ArgumentError, before any launch) what a graph cannot hold. Captured: the calls DeepEP allows
    there: a dispatch with ``num_worst_tokens`` or a handle (HtEngine.dispatch refuses one that waits on the host for
    the counts), and combine (their kernels count epochs on the device, kernels/ht_common.cuh, so every replay is a
    new call), intranode and across nodes alike. Refused here: a Buffer without a heap."""
    import cupy

    if not capturing(cupy.cuda.get_current_stream()):
        return False
    if rt.heap is None or rt.heap.nbytes == 0:
        raise ArgumentError(
            f"num_nvl_bytes: a captured HT {what} takes its outputs from the Buffer's heap (num_nvl_bytes), which is "
            "empty; create the Buffer with num_nvl_bytes > 0 (Config.get_nvl_buffer_size_hint)"
        )
    return True


class HtEngine:
    def __init__(self, rt, tuning: HtTuning):
        self.rt = rt
        self.tuning = tuning
        # SMs per HT kernel: 24 on a GPU of its own (DeepEP-like; the rest stays for compute); ranks sharing a GPU
        # (MPS processes or in-process ranks standing in for several GPUs) each take their share of all of it.
        self.num_sms = min(24, rt.sm_share) if rt.ranks_per_gpu == 1 else rt.sm_share
        self.plans = ll_plans.CallPlans(8)  # validated cached dispatches and combines (ht_replay.py)
        self.inter = None  # ht_inter.HtInter when the group spans nodes (the backend sets it)
        self.replays = 0

    def clear_plans(self) -> None:
        """After any change of what a validated call launched with (tuning, SMs) and at destroy."""
        self.plans.clear()

    def retune(self, **changes) -> None:
        """Benchmarks only: the same Buffer with other HtTuning fields (e.g. ``probe=1``)."""
        self.tuning = replace(self.tuning, **changes)
        self.clear_plans()

    def set_num_sms(self, num_sms: int) -> None:
        self.num_sms = check_int(num_sms, "num_sms", min_value=1, max_value=self.rt.sm_share)
        self.clear_plans()

    def get_config(self) -> Config:
        return Config(num_sms=self.num_sms)

    def grid(self, config) -> int:
        """Blocks of one HT copy kernel: num_sms (the config's or the Buffer's, at most this rank's share of the
        device's SMs) times blocks_per_sm, so that every rank sharing the GPU is resident at once."""
        api_checks.config(config)
        sms = min(config.num_sms if config is not None else self.num_sms, self.rt.sm_share)
        return max(1, sms) * self.tuning.blocks_per_sm

    def get_dispatch_layout(self, topk_idx, num_experts, previous_event, async_finish, allocate_on_comm_stream):
        rt = self.rt
        rt.check_usable()
        compute = rt.begin(previous_event, async_finish, allocate_on_comm_stream)
        with rt.on_comm_stream():
            nodes = tuple(rt.group.node_of_rank)
            lay = dispatch_layout.get_dispatch_layout(
                topk_idx,
                num_experts,
                rt.num_ranks,
                nodes if len(set(nodes)) > 1 else None,  # per-node counts across nodes (as the CPU backend)
                alloc_stream=None if allocate_on_comm_stream else compute,
                # No host wait for the index check: it made every layout call synchronous, and put all of the host's
                # work between the layout and the notify launch into the GPU's time (session R's trace: +320 µs per
                # non-cached dispatch through the torch front end). The dispatch's notify refuses bad entries itself.
                check_indices=False,
            )
            shape = getattr(topk_idx, "shape", (0, 0))
            rt.warm_once(("layout", num_experts, rt.num_ranks, str(getattr(topk_idx, "dtype", "")), shape[-1]))
        event = rt.end(compute, async_finish)
        return (
            lay.num_tokens_per_rank,
            lay.num_tokens_per_rdma_rank,
            lay.num_tokens_per_expert,
            lay.is_token_in_rank,
            event,
        )

    def dispatch(
        self,
        x,
        handle,
        num_tokens_per_rank,
        num_tokens_per_rdma_rank,
        is_token_in_rank,
        num_tokens_per_expert,
        topk_idx,
        topk_weights,
        expert_alignment,
        num_worst_tokens,
        config,
        previous_event,
        async_finish,
        allocate_on_comm_stream,
    ):

        rt = self.rt
        rt.check_usable()
        captured = check_capture("dispatch", rt)
        plan_key = None
        if handle is not None:  # a cached dispatch like a validated one only allocates and launches (ht_replay.py)
            plan_key = ht_replay.cached_key(
                x, handle, config, num_worst_tokens, expert_alignment, topk_idx, topk_weights, async_finish,
                allocate_on_comm_stream,
            )  # fmt: skip
            plan = self.plans.get(plan_key, None) if plan_key is not None else None
            if plan is not None and plan.matches(handle):
                self.replays += 1
                return plan.run(x, handle, previous_event, async_finish, allocate_on_comm_stream, captured)
        R, dev = rt.num_ranks, rt.device
        data, scales, T, row_bytes = api_checks.ht_x(x, dev, as_device_array)
        hidden = data.shape[1]
        num_worst_tokens = check_int(num_worst_tokens, "num_worst_tokens", min_value=0)
        if captured and handle is None and not num_worst_tokens:
            raise ArgumentError(
                "dispatch: a dispatch without a handle waits on the host for the received counts, which a CUDA graph "
                "cannot; inside a capture pass num_worst_tokens (outputs sized for the worst case) or a cached handle"
            )
        expert_alignment = check_int(expert_alignment, "expert_alignment", min_value=1)
        blocks = self.grid(config)
        cached = handle is not None
        if cached:
            api_checks.ht_cached_handle(handle, HtHandle, rt, topk_idx, topk_weights, T, hidden)
            topk = handle.topk
        else:
            api_checks.ht_layout_given(topk_idx, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert)
            topk_idx = as_device_array(topk_idx, "topk_idx")
            api_checks.topk_idx(topk_idx, "topk_idx", T, api_checks.HT_MAX_TOPK, dev)
            topk = topk_idx.shape[1]
            if topk_weights is not None:
                topk_weights = as_device_array(topk_weights, "topk_weights")
                check_array(topk_weights, "topk_weights", dtypes=(np.float32,), shape=(T, topk), device=dev)
            num_tokens_per_rank = as_device_array(num_tokens_per_rank, "num_tokens_per_rank")
            is_token_in_rank = as_device_array(is_token_in_rank, "is_token_in_rank")
            num_tokens_per_expert = as_device_array(num_tokens_per_expert, "num_tokens_per_expert")
            api_checks.ht_dispatch_layout_inputs(
                R, T, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, dev
            )

        if self.inter is not None:  # the group spans nodes (ht_inter.py)
            return self.inter.dispatch(self, SimpleNamespace(
                data=data, scales=scales, T=T, row_bytes=row_bytes, hidden=hidden, topk=topk, handle=handle,
                cached=cached, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
                num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, num_tokens_per_expert=num_tokens_per_expert,
                topk_idx=topk_idx, topk_weights=topk_weights, expert_alignment=expert_alignment,
                num_worst_tokens=num_worst_tokens, blocks=blocks, previous_event=previous_event,
                async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream, captured=captured,
            ))  # fmt: skip
        tun = self.tuning

        def dispatch_defines():  # the copy's specialisation (worked out after the notify's launch: peers wait for it)
            return HT_DISPATCH.defines(
                EPK_NUM_RANKS=R,
                EPK_TOPK=topk,
                EPK_ROW_BYTES=row_bytes,
                EPK_SCALE_COLS=hidden // 128 if scales is not None else 0,
                EPK_NUM_LOCAL_EXPERTS=(num_tokens_per_expert.shape[0] // R) if not cached else 1,
                EPK_WITH_META=0 if cached else 1,
                EPK_THREADS=tun.threads,
                EPK_MIN_BLOCKS=tun.blocks_per_sm,
                EPK_PROBE=tun.probe,
                EPK_UNROLL=tun.dispatch_unroll,
            )

        compute = rt.begin(previous_event, async_finish, allocate_on_comm_stream)
        with rt.on_comm_stream():
            early = None
            if not cached:
                E_loc = num_tokens_per_expert.shape[0] // R
                rank_prefix, send_slot = work_arrays(rt, [(R, R), (T, R)], np.int32, compute, captured)
                notify_call = rt.next_call()
                rt.notify_out[0] = 0
                rt.launch(
                    HT_NOTIFY,
                    HT_NOTIFY.defines(EPK_NUM_RANKS=R),
                    1,
                    1024,
                    HT_NOTIFY.pack(
                        dry_run=0,
                        rank=rt.rank,
                        call=notify_call,
                        num_tokens=T,
                        num_tokens_per_rank=num_tokens_per_rank,
                        num_tokens_per_expert=num_tokens_per_expert,
                        is_token_in_rank=is_token_in_rank,
                        peers=rt.peer_table,
                        rank_prefix_matrix=rank_prefix,
                        send_slot=send_slot,
                        topk_idx=topk_idx,
                        topk=topk,
                        num_experts=num_tokens_per_expert.shape[0],
                        row_bytes=row_bytes,
                        scale_cols=hidden // 128 if scales is not None else 0,
                        host_out=rt.notify_out_ptr,
                        **rt.deadline(),
                    ),
                )
                defines = dispatch_defines()
                # Outputs reserved before the counts: the copy starts now, the host waits for them after (ht_outputs).
                # Not at a first use: its warm-up is collective, and only a call the counts accept reaches it.
                if not num_worst_tokens and rt.is_warm(HT_DISPATCH, defines):
                    early = ht_outputs.reservation(rt, data, scales, topk, captured)
                if num_worst_tokens:
                    num_recv, per_expert = -1, []
                    out_rows = num_worst_tokens
                elif early is not None:
                    out_rows = early.rows
                else:
                    rt.wait_host_word(rt.notify_out, notify_call, "dispatch notify")
                    num_recv, per_expert = notify_result(rt, topk, E_loc, expert_alignment, 2 + R)
                    out_rows = num_recv
            else:
                rank_prefix, send_slot, is_token_in_rank = (
                    handle.rank_prefix_matrix,
                    handle.send_slot,
                    handle.is_token_in_rank,
                )
                out_rows = handle.num_out_rows
                defines = dispatch_defines()
            if early is None:
                out = dispatch_outputs(
                    rt, out_rows, data, scales, topk, cached, num_worst_tokens, compute, allocate_on_comm_stream,
                    captured=captured,
                )  # fmt: skip
                out_ptrs = [0 if a is None else a.data.ptr for a in (out.x, out.scales, out.idx, out.weights, out.src)]
            else:
                out_ptrs = early.pointers()
            args = HT_DISPATCH.pack(
                dry_run=0,
                rank=rt.rank,
                call=rt.next_call(),
                num_tokens=T,
                x=data,
                x_scales=scales,
                topk_idx=None if cached else topk_idx,
                topk_weights=None if cached else topk_weights,
                is_token_in_rank=is_token_in_rank,
                send_slot=send_slot,
                peers=rt.peer_table,
                out_x=out_ptrs[0],
                out_scales=out_ptrs[1],
                out_idx=out_ptrs[2],
                out_weights=out_ptrs[3],
                out_src=out_ptrs[4],
                out_rows=out_rows,
                ticket=rt.tickets.data.ptr,
                **rt.deadline(),
            )
            rt.launch(HT_DISPATCH, defines, blocks, tun.threads, args)
            if early is not None:  # the copy runs: now the counts, and the outputs they say this rank receives
                rt.wait_host_word(rt.notify_out, notify_call, "dispatch notify", ht_outputs.tolerate_shape_record(rt))
                try:
                    num_recv, per_expert = notify_result(rt, topk, E_loc, expert_alignment, 2 + R)
                except ArgumentError:
                    early.refused()
                    raise
                out_rows = num_recv
                out = early.keep(num_recv)
        sizes, keep, recv_data, recv_scales = out.sizes, out.keep, out.x, out.scales
        recv_idx, recv_w, recv_src = out.idx, out.weights, out.src
        event = rt.end(compute, async_finish)
        recv_x = (recv_data, recv_scales) if scales is not None else recv_data
        if cached:
            if plan_key is not None:
                fp8 = scales is not None
                self.plans.put(plan_key, ht_replay.CachedDispatchPlan(
                    rt, HT_DISPATCH, defines, blocks, tun.threads, args, handle, sizes, out.forms, fp8,
                    tun.replay_graph,
                ))  # fmt: skip
            return recv_x, None, None, None, handle, event
        new_handle = HtHandle(
            rank_prefix, send_slot, is_token_in_rank, recv_src, num_recv, out_rows, T, hidden, topk, keep
        )
        api_checks.stamp(new_handle, rt)
        return recv_x, recv_idx, recv_w if topk_weights is not None else None, per_expert, new_handle, event

    def combine_buffer(self, handle):
        """BF16 [N, H] for the expert outputs, in this rank's HT heap (peers read a combine's input in place).
        In-process ranks read any device memory: a plain array then."""
        import cupy

        rt = self.rt
        rt.check_usable()
        api_checks.own_handle(handle, HtHandle, rt, "dispatch")
        shape = (handle.num_out_rows, handle.hidden)
        with cupy.cuda.Device(rt.device):
            if rt.in_process:
                return cupy.empty(shape, BF16)
            return rt.heap.alloc(shape[0] * shape[1] * 2).array(shape, BF16)

    def combine(self, x, handle, topk_weights, bias, config, previous_event, async_finish, allocate_on_comm_stream):
        rt = self.rt
        rt.check_usable()
        captured = check_capture("combine", rt)
        plan_key = ht_replay.combine_key(x, handle, topk_weights, bias, config, async_finish, allocate_on_comm_stream)
        plan = self.plans.get(plan_key, None) if plan_key is not None else None
        if plan is not None and plan.matches(handle):  # a combine like a validated one (ht_replay.py)
            self.replays += 1
            return plan.run(
                x, handle, topk_weights, bias, previous_event, async_finish, allocate_on_comm_stream, captured
            )
        dev = rt.device
        api_checks.own_handle(handle, HtHandle, rt, "dispatch")
        x = as_device_array(x, "x")
        check_array(x, "x", dtypes=(BF16,), shape=(handle.num_out_rows, handle.hidden), device=dev)
        hidden = x.shape[1]
        if hidden % 8:
            raise ArgumentError(f"x: expected a hidden size that is a multiple of 8, got {hidden}")
        if topk_weights is not None:
            topk_weights = as_device_array(topk_weights, "topk_weights")
            check_array(
                topk_weights, "topk_weights", dtypes=(np.float32,), shape=(handle.num_out_rows, handle.topk), device=dev
            )
        biases = bias_list(bias)
        for i, b in enumerate(biases):
            biases[i] = as_device_array(b, f"bias[{i}]")
            check_array(biases[i], f"bias[{i}]", dtypes=(BF16,), shape=(handle.num_tokens, hidden), device=dev)
        blocks = self.grid(config)
        if self.inter is not None:  # the group spans nodes (ht_inter.py)
            return self.inter.combine(
                self, x, handle, topk_weights, biases, blocks, previous_event, async_finish, allocate_on_comm_stream,
                captured,
            )  # fmt: skip
        tun = self.tuning

        compute = rt.begin(previous_event, async_finish, allocate_on_comm_stream)
        with rt.on_comm_stream():
            x, topk_weights, keep = ht_replay.combine_inputs_in_region(rt, x, topk_weights, captured)
            T, K = handle.num_tokens, handle.topk
            out, out_w, outputs = combine_outputs(
                rt, T, K, hidden, topk_weights is not None, compute, allocate_on_comm_stream, captured
            )
            defines = HT_COMBINE.defines(
                EPK_NUM_RANKS=rt.num_ranks,
                EPK_TOPK=K,
                EPK_HIDDEN=hidden,
                EPK_HAS_WEIGHTS=int(topk_weights is not None),
                EPK_THREADS=tun.threads,
                EPK_MIN_BLOCKS=tun.blocks_per_sm,
                EPK_PROBE=tun.probe,
                EPK_UNROLL=tun.combine_unroll,
                EPK_LOADS_FIRST=tun.combine_loads_first,
            )
            args = HT_COMBINE.pack(
                dry_run=0,
                rank=rt.rank,
                call=rt.next_call(),
                num_tokens=T,
                in_x=x.data.ptr,
                in_weights=topk_weights.data.ptr if topk_weights is not None else 0,
                send_slot=handle.send_slot,
                bias0=biases[0] if biases else None,
                bias1=biases[1] if len(biases) > 1 else None,
                peers=rt.peer_table,
                out_x=out,
                out_weights=out_w,
                ticket=rt.tickets.data.ptr + 4,
                **rt.deadline(),
            )
            rt.launch(HT_COMBINE, defines, blocks, tun.threads, args)
        event = rt.end(compute, async_finish)
        del keep  # staged copies stay alive until here; the stream orders their reuse after the kernel
        if plan_key is not None:
            self.plans.put(plan_key, ht_replay.CombinePlan(
                rt, HT_COMBINE, defines, blocks, tun.threads, args, handle, *outputs, topk_weights is not None,
                tun.replay_graph,
            ))  # fmt: skip
        return out, out_w, event

    def read_probe(self, source: str):
        """Phase timestamps (ns, the GPU's global timer) of the last launch of HT kernel ``source``
        ("ht_dispatch.cu" / "ht_combine.cu") built with ``HtTuning(probe=1)``: int64 [blocks, 4] of start, peers'
        entries received, copies done, every peer done (the last block's; 0 elsewhere). Syncs the comm stream."""
        import cupy

        from .. import kernel_loader

        defines = self.rt.last_defines(source)
        if defines is None or not defines.get("EPK_PROBE"):
            raise ArgumentError(f"source: no launch of {source} with HtTuning(probe=1) on this Buffer")
        self.rt.sync_bounded(self.rt.comm_stream, "reading the HT probe")
        ptr = kernel_loader.get_module(source, defines).get_global("epk_probe")
        blocks = self.grid(None)
        return cupy.ndarray((1024, 4), dtype=np.uint64, memptr=ptr)[:blocks].get().astype(np.int64)
