"""LL combine (DeepEP's ``low_latency_combine``) on the GPU: kernels/ll_combine.cu."""

from __future__ import annotations

import numpy as np

from ... import api_checks
from ..._validate import as_device_array, check_array
from ...errors import ArgumentError
from ..kernels import LL_COMBINE
from . import rebind
from .engine import GpuLLHandle
from .layout import MAX_TOPK, THREADS

BF16 = api_checks.BF16


class LLCombine:
    def __init__(self, eng):
        self.eng = eng

    def __call__(
        self,
        x,
        topk_idx,
        topk_weights,
        handle,
        use_logfmt,
        zero_copy,
        async_finish,
        return_recv_hook,
        out,
        combine_wait_recv_cost_stats,
    ):
        import cupy

        eng = self.eng
        rt = eng.rt
        rt.check_usable()
        plan_key = plan_shapes = rebind_key = None
        out_given = out is not None
        if eng.replay_on and type(handle) is GpuLLHandle:
            parity = (eng.sends + 1) & 1 if zero_copy else -1  # a zero-copy combine reads its set's buffer
            if out_given:
                # The handle object is new on every dispatch; its arrays and sizes are what the launch uses.
                plan_key = (
                    "combine",
                    parity,
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
                plan = eng.plans.get(plan_key, plan_shapes)
                if plan is not None:
                    event, hook = eng.replay(plan, async_finish, return_recv_hook, 3)
                    return plan.result, event, hook
                # The caller's objects before the checks rebind any, inputs first (a hook keeps those alive).
                plan_refs = (
                    x,
                    topk_idx,
                    topk_weights,
                    combine_wait_recv_cost_stats,
                    handle.src_info,
                    handle.layout_range,
                    out,
                )
            # New arrays of a validated call's layout (DeepEP's calls: a new out, or none, a new handle each time)
            per_call = [x, handle.src_info, handle.layout_range, topk_idx, topk_weights, out,
                        combine_wait_recv_cost_stats]  # fmt: skip
            lays = rebind.layouts(per_call)
            if lays is not None:
                rebind_key = ("combine", parity, lays, handle.num_max_dispatch_tokens_per_rank, handle.hidden,
                              handle.num_experts, use_logfmt, zero_copy, async_finish, return_recv_hook)  # fmt: skip
                again = eng.rebinds.get(rebind_key, None)
                if again is not None:
                    # what the validated path checks of the call's objects themselves, not of their layouts
                    api_checks.own_handle(handle, GpuLLHandle, rt, "low_latency_dispatch")
                    # x in the other set's receive area: fine here, not for an identity plan's replay in that set
                    other_set = not zero_copy and eng.check_outside_combine_slots(x, again.statics)
                    again.allocate(per_call, rt)  # out left to the library: a new one, as validated
                    eng.rebound += 1
                    # zero-copy: the kernel reads the set's buffer, the plan's own (x is only checked)
                    bound = again.bound(per_call[1:] if zero_copy else per_call, (x, topk_idx, topk_weights))
                    event, hook = eng.replay(bound, async_finish, return_recv_hook, 3)
                    if out_given and not other_set and eng.seen_again(plan_key, plan_refs):  # the same arrays again
                        eng.plans.put(plan_key, again.identity(bound, plan_shapes, out, plan_refs))
                    return per_call[5], event, hook
        R, dev = rt.num_ranks, rt.device
        x, num_max, H, num_experts = api_checks.ll_combine_x(
            x, handle, GpuLLHandle, rt, use_logfmt, R, dev, as_device_array
        )
        topk_idx = as_device_array(topk_idx, "topk_idx")
        api_checks.topk_idx(topk_idx, "topk_idx", None, MAX_TOPK, dev)
        T, K = topk_idx.shape
        eng.check_nic_batch(num_max, K, num_experts // R)
        if T > num_max:
            raise ArgumentError(f"topk_idx: expected at most num_max_dispatch_tokens_per_rank={num_max} rows, got {T}")
        topk_weights = as_device_array(topk_weights, "topk_weights")
        check_array(topk_weights, "topk_weights", dtypes=(np.float32,), shape=(T, K), device=dev)
        if out is not None:
            out = api_checks.out_array(out, "out", (BF16,), (T, H), dev, as_device_array)
        if combine_wait_recv_cost_stats is not None:
            combine_wait_recv_cost_stats = api_checks.out_array(
                combine_wait_recv_cost_stats, "combine_wait_recv_cost_stats", (np.int64,), (R,), dev, as_device_array
            )
        st = eng.size_state(num_max, H, num_experts)
        if not zero_copy:
            if eng.check_outside_combine_slots(x, st):  # in the other set's receive region: no plan replays it there
                plan_key = rebind_key = None
        src = eng.combine_buffer(st) if zero_copy else x
        defines = LL_COMBINE.defines(
            EPK_NUM_RANKS=R,
            EPK_HIDDEN=H,
            EPK_TOPK=K,
            EPK_THREADS=THREADS,
            # Zero-copy outputs lie in the owners' LL areas: sources may read them there.
            EPK_LL_COMBINE_PULL=int(bool(zero_copy) and eng.combine_pull),
            EPK_POLL_SLEEP_NS=eng.poll_sleep_ns,
            EPK_LL_NIC=eng.nic_build,
        )
        caller = cupy.cuda.get_current_stream()
        eng.ensure_warm(LL_COMBINE, defines, caller)

        compute = rt.begin(None, async_finish)
        with rt.on_comm_stream():
            if out is None:
                bufs, _ = rt.alloc_out([T * H * 2], compute, False, shared=False)
                out = bufs[0].view(BF16).reshape(T, H)
            args = LL_COMBINE.pack(
                dry_run=0,
                rank=rt.rank,
                phase=0,
                back=0,
                x=src,
                src_info=handle.src_info,
                layout=handle.layout_range,
                topk_idx=topk_idx,
                topk_weights=topk_weights,
                num_tokens=T,
                out=out,
                num_experts=num_experts,
                num_max=num_max,
                peers=rt.peer_table,
                ll_off=rt.ll_offset,
                set_stride=st.stride,
                send_off=st.layout.send_off,
                recv_off=st.layout.recv_off,
                state=eng.state,
                wait_stats=combine_wait_recv_cost_stats,
                **rt.deadline(),
            )
            launch = eng.validated_launcher(LL_COMBINE, defines, args)
            launch(eng.first_phase(return_recv_hook), 0)
            eng.issued()
        event = eng.end(compute, async_finish)
        hook = eng.make_hook(launch, x, topk_idx, topk_weights) if return_recv_hook else None
        if plan_key is not None:  # preallocated: repeat calls can replay this one
            eng.keep_plan(plan_key, plan_shapes, LL_COMBINE, defines, args, out, plan_refs)
        if rebind_key is not None:  # calls on new arrays of the same layouts (rebind.py)
            names = rebind.COMBINE_ARRAYS[1:] if zero_copy else rebind.COMBINE_ARRAYS
            made = () if out_given else [(5, ((T, H), BF16, False))]  # out made here: made per rebound call too
            eng.rebinds.put(rebind_key, rebind.Plan(eng, LL_COMBINE, defines, args, names, st, made))
        return out, event, hook
