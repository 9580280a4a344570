"""LL dispatch (DeepEP's ``low_latency_dispatch``) on the GPU: kernels/ll_dispatch.cu (staged) and its
direct variant for ``zero_copy_recv`` (kernels/ll_dispatch_direct.cuh)."""

from __future__ import annotations

import math

import numpy as np

from ... import api_checks
from ..._validate import as_device_array
from ...errors import ArgumentError
from ..kernels import LL_DISPATCH
from . import rebind
from .engine import GpuLLHandle
from .layout import MAX_RANKS, MAX_TOPK, THREADS

BF16 = api_checks.BF16
_OUTS = ("out_x", "out_scales", "out_src_info", "out_layout_range", "out_count")


def check_common(eng, num_max, num_experts):
    """Checks every LL call shares: rank count, num_max and num_experts within the kernels' limits."""
    R = eng.rt.num_ranks
    if R > MAX_RANKS:
        raise ArgumentError(f"group: LL kernels support up to {MAX_RANKS} ranks, got {R}")
    return api_checks.ll_sizes(num_max, num_experts, R)


def dispatch_returns(plan, event, hook):
    """What a replayed low_latency_dispatch returns: the validated call's outputs and handle (the handle only
    names those preallocated arrays and the sizes, so every replay may share it)."""
    out, recv_count, handle = plan.result
    return out, recv_count, handle, event, hook


def output_forms(e_loc, rows, hidden, num_ranks, scale_cols, fp8: bool, scale_dtype) -> list:
    """(shape, dtype, transposed) of each LL dispatch output the library makes: x, scales (DeepEP's column-major
    view: [E_loc, S, rows] transposed), src_info, layout_range, count."""
    return [
        ((e_loc, rows, hidden), np.uint8 if fp8 else BF16, False),
        ((e_loc, scale_cols, rows), scale_dtype, True),
        ((e_loc, rows), np.int32, False),
        ((e_loc, num_ranks), np.int64, False),
        ((e_loc,), np.int32, False),
    ]


class LLDispatch:
    def __init__(self, eng):
        self.eng = eng

    def __call__(
        self,
        x,
        topk_idx,
        num_max_dispatch_tokens_per_rank,
        num_experts,
        cumulative_local_expert_recv_stats,
        dispatch_wait_recv_cost_stats,
        use_fp8,
        round_scale,
        use_ue8m0,
        async_finish,
        return_recv_hook,
        out_x,
        out_scales,
        out_src_info,
        out_layout_range,
        out_count,
        zero_copy_recv,
    ):
        import cupy

        eng = self.eng
        rt = eng.rt
        rt.check_usable()
        plan_key = plan_shapes = rebind_key = None
        if eng.replay_on:
            # The flags as given (True and 1 are one key); the arrays by identity. Written out: this is the whole
            # host cost of a replayed call besides the launch.
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
                (eng.sends + 1) & 1 if zero_copy_recv else -1,
            )
            plan_shapes = (getattr(x, "shape", None), getattr(topk_idx, "shape", None))
            plan = eng.plans.get(plan_key, plan_shapes)
            if plan is not None:
                return dispatch_returns(plan, *eng.replay(plan, async_finish, return_recv_hook, 2))
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
            # New arrays of a validated call's layout (DeepEP's calls: new outputs each time, or none given): rebind.py
            per_call = [x, topk_idx, out_x, out_scales, out_src_info, out_layout_range, out_count,
                        cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats]  # fmt: skip
            lays = None if zero_copy_recv else rebind.layouts(per_call)
            if lays is not None:
                rebind_key = ("dispatch", lays, num_max_dispatch_tokens_per_rank, num_experts, use_fp8, round_scale,
                              use_ue8m0, async_finish, return_recv_hook)  # fmt: skip
                again = eng.rebinds.get(rebind_key, None)
                if again is not None:
                    given = again.allocate(per_call, rt)  # outputs left to the library: new ones, as validated
                    bound = again.bound(per_call, per_call)
                    eng.rebound += 1
                    event, hook = eng.replay(bound, async_finish, return_recv_hook, 2)
                    result = rebind.dispatch_result(again, eng, per_call[2:7])
                    if given and eng.seen_again(plan_key, plan_refs):  # the same arrays again: an identity plan
                        eng.plans.put(plan_key, again.identity(bound, plan_shapes, result, plan_refs))
                    return (*result, event, hook)
        R, dev = rt.num_ranks, rt.device
        num_max, num_experts = check_common(eng, num_max_dispatch_tokens_per_rank, num_experts)
        e_loc, rows = num_experts // R, R * num_max
        x = as_device_array(x, "x")
        T, H = api_checks.ll_x(x, num_max, dev)
        use_fp8, round_scale, use_ue8m0, S = api_checks.ll_dispatch_flags(use_fp8, round_scale, use_ue8m0, H)
        topk_idx = as_device_array(topk_idx, "topk_idx")
        api_checks.topk_idx(topk_idx, "topk_idx", T, MAX_TOPK, dev)
        K = topk_idx.shape[1]
        eng.check_nic_batch(num_max, K, e_loc)
        conv = as_device_array
        if cumulative_local_expert_recv_stats is not None:
            cumulative_local_expert_recv_stats = api_checks.out_array(
                cumulative_local_expert_recv_stats,
                "cumulative_local_expert_recv_stats",
                (np.int32,),
                (e_loc,),
                dev,
                conv,
            )
        if dispatch_wait_recv_cost_stats is not None:
            dispatch_wait_recv_cost_stats = api_checks.out_array(
                dispatch_wait_recv_cost_stats, "dispatch_wait_recv_cost_stats", (np.int64,), (R,), dev, conv
            )
        data_dtypes = api_checks.FP8_DTYPES if use_fp8 else (BF16,)
        scale_dtype = np.int32 if use_ue8m0 else np.float32
        zero_copy_recv = bool(zero_copy_recv)
        outs = [out_x, out_scales, out_src_info, out_layout_range, out_count]
        if zero_copy_recv:
            if eng.nic_build:
                raise ArgumentError(
                    "zero_copy_recv: not with peers reached over the NIC (PROXY or RDMA route): its senders reserve "
                    "rows in the owners' memory, which a NIC route cannot do; use zero_copy_recv=False"
                )
            given = [n for n, o in zip(_OUTS, outs, strict=True) if o is not None]
            if given:
                raise ArgumentError(f"{given[0]}: not with zero_copy_recv=True (the outputs are views into the Buffer)")
        if out_x is not None:
            out_x = api_checks.out_array(out_x, "out_x", data_dtypes, (e_loc, rows, H), dev, conv)
        if out_scales is not None:
            if not use_fp8:
                raise ArgumentError("out_scales: only with use_fp8=True")
            out_scales = api_checks.scales_out(out_scales, "out_scales", scale_dtype, (e_loc, rows, S), dev, conv)
        if out_src_info is not None:
            out_src_info = api_checks.out_array(out_src_info, "out_src_info", (np.int32,), (e_loc, rows), dev, conv)
        if out_layout_range is not None:
            out_layout_range = api_checks.out_array(
                out_layout_range, "out_layout_range", (np.int64,), (e_loc, R), dev, conv
            )
        if out_count is not None:
            out_count = api_checks.out_array(out_count, "out_count", (np.int32,), (e_loc,), dev, conv)
        st = eng.size_state(num_max, H, num_experts)
        lay = st.layout
        defines = LL_DISPATCH.defines(
            EPK_NUM_RANKS=R,
            EPK_HIDDEN=H,
            EPK_TOPK=K,
            EPK_USE_FP8=int(use_fp8),
            EPK_ROUND_SCALE=int(round_scale),
            EPK_USE_UE8M0=int(use_ue8m0),
            EPK_THREADS=THREADS,
            EPK_LL_PULL=eng.dispatch_pull,
            EPK_LL_DIRECT=int(zero_copy_recv),
            EPK_POLL_SLEEP_NS=eng.poll_sleep_ns,
            EPK_LL_NIC=eng.nic_build,
        )
        caller = cupy.cuda.get_current_stream()
        eng.ensure_warm(LL_DISPATCH, defines, caller)
        eng.agree(st, caller)  # collective on first use; after every local check

        compute = rt.begin(None, async_finish)
        with rt.on_comm_stream():
            if zero_copy_recv:
                out_x, out_scales, out_src_info, out_layout_range, out_count = eng.direct_outputs(
                    st, use_fp8, use_ue8m0, S
                )
            outs = [out_x, out_scales, out_src_info, out_layout_range, out_count]
            forms = output_forms(e_loc, rows, H, R, S, use_fp8, scale_dtype)
            sizes = [math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype, _ in forms]
            missing = [i for i, o in enumerate(outs) if o is None and sizes[i] > 0]
            if missing:
                typed = [forms[i][:2] for i in missing]
                bufs, _ = rt.alloc_out([sizes[i] for i in missing], compute, False, shared=False, typed=typed)
                for i, b in zip(missing, bufs, strict=True):
                    outs[i] = b.transpose(0, 2, 1) if forms[i][2] else b
            recv_x, recv_scales, src_info, layout_range, recv_count = outs
            args = LL_DISPATCH.pack(
                dry_run=0,
                rank=rt.rank,
                phase=0,
                back=0,
                x=x,
                num_tokens=T,
                topk_idx=topk_idx,
                num_experts=num_experts,
                num_max=num_max,
                peers=rt.peer_table,
                ll_off=rt.ll_offset,
                set_stride=st.stride,
                send_off=lay.send_off,
                recv_off=lay.recv_off,
                state=eng.state,
                out_x=recv_x,
                out_scales=recv_scales,
                out_src=src_info,
                out_layout=layout_range,
                out_count=recv_count,
                recv_stats=cumulative_local_expert_recv_stats,
                wait_stats=dispatch_wait_recv_cost_stats,
                **rt.deadline(),
            )
            launch = eng.validated_launcher(LL_DISPATCH, defines, args)
            launch(eng.first_phase(return_recv_hook), 0)
            eng.issued()
        event = eng.end(compute, async_finish)
        handle = api_checks.stamp(GpuLLHandle(src_info, layout_range, num_max, H, num_experts, lay), eng.rt)
        hook = eng.make_hook(launch, x, topk_idx) if return_recv_hook else None
        out = (recv_x, recv_scales) if use_fp8 else recv_x
        if plan_key is not None and not missing:  # every output preallocated: repeat calls can replay this one
            eng.keep_plan(plan_key, plan_shapes, LL_DISPATCH, defines, args, (out, recv_count, handle), plan_refs)
        if rebind_key is not None:  # calls on new arrays of the same layouts (rebind.py)
            statics = (num_max, H, num_experts, lay, use_fp8)
            made = [(2 + i, forms[i]) for i in missing]  # each output made here: its index in per_call, its form
            again = rebind.Plan(eng, LL_DISPATCH, defines, args, rebind.DISPATCH_ARRAYS, statics, made)
            eng.rebinds.put(rebind_key, again)
        return out, recv_count, handle, event, hook
