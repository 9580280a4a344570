"""Replaying a validated cached HT dispatch (issue #22, item 2: single calls at the floor).

A training step's backward (and a benchmark loop) repeats ``dispatch(x, handle=handle)`` with the same handle and
inputs of the same layout. When a call matches one of the last eight validated cached dispatches — the same
handle (by identity, held weakly), x (and FP8 scales) of the same shape, strides, dtype and device, the same
config, flags and integer arguments — it only allocates its outputs and launches: the checks, the kernel lookup and
the argument packing are the first call's. Per call the launch gets x's pointers (x itself is never held: a step's
activations are not kept alive by a plan), a new call number and the new outputs' pointers.

Nothing a plan skips can differ: every argument of the kernel besides those set per call comes from the handle,
the Buffer and the matched layout. A plan whose handle was dropped never matches again (the weak reference is
checked), so a stale handle's pointers are never launched and its heap blocks are not kept.
"""

from __future__ import annotations

import functools
import sys
import weakref

import numpy as np

from .. import _cuda_driver
from ..config import Config
from ..memory.heap import packed_offsets
from .direct import direct_stream, end_direct
from .ll import plans as ll_plans


def array_layout(a, cupy) -> tuple | None:
    """(shape, strides, dtype, device) of a CuPy array, None for anything else (the full path converts or refuses)."""
    if type(a) is not cupy.ndarray:
        return None
    return a.shape, a.strides, a.dtype, a.data.device_id  # not a.device: CuPy makes a Device object for it


def cached_key(x, handle, config, num_worst_tokens, expert_alignment, topk_idx, topk_weights, async_finish,
               allocate_on_comm_stream) -> tuple | None:  # fmt: skip
    """The plan key of a cached dispatch, or None where the call cannot replay (only the full path's checks know
    what to make of it: host arrays, unusual argument types, top-k arguments given with a handle)."""
    cupy = sys.modules.get("cupy")
    if cupy is None or topk_idx is not None or topk_weights is not None:
        return None
    if not (config is None or type(config) is Config):
        return None
    if not all(type(v) is int for v in (num_worst_tokens, expert_alignment)):
        return None
    if not all(type(v) is bool for v in (async_finish, allocate_on_comm_stream)):
        return None
    if isinstance(x, tuple):
        if len(x) != 2:
            return None
        layouts = (array_layout(x[0], cupy), array_layout(x[1], cupy))
        if None in layouts:
            return None
    else:
        layouts = array_layout(x, cupy)
        if layouts is None:
            return None
    return (id(handle), layouts, config, num_worst_tokens, expert_alignment, async_finish, allocate_on_comm_stream)


class _Plan:
    """What both plans share: the handle held weakly, the launch packed at the first replay (a plan is made after
    every validated call, most of which never repeat: building it must cost the full path little), ``launch``
    (KernelClock wraps it)."""

    shapes = None  # ll_plans.CallPlans compares it; the layouts are in the key
    graph_replay = False  # HtTuning.replay_graph: launch as a one-kernel graph (the constructors' graph_replay)

    def _keep_launch(self, rt, spec, defines, blocks, threads, args) -> None:
        """What the launch needs, every device array as its pointer: a plan holds no array (the per-call ones are
        set before each launch)."""
        generic = np.generic  # pack() gives numpy scalars, and device arrays for pointers
        by_value = tuple(a if isinstance(a, generic) else np.uint64(a.data.ptr) for a in args)
        self._launch_of = (rt, spec, defines, blocks, threads, by_value)

    @functools.cached_property
    def packed(self):
        import cupy

        rt, spec, defines, blocks, threads, by_value = self._launch_of
        with cupy.cuda.Device(rt.device):
            func = rt.kernel(spec, defines)[0]
        return ll_plans.DriverLaunch(func.kernel.ptr, blocks, threads, by_value)

    @functools.cached_property
    def graph(self):
        """``packed`` as an instantiated one-kernel CUDA graph (HtTuning.replay_graph), captured at its first use."""
        import cupy

        rt, packed = self._launch_of[0], self.packed
        with cupy.cuda.Device(rt.device):
            return _cuda_driver.GraphLaunch(packed, ll_plans.capture_one(packed.launch))

    def launch(self, stream_ptr: int, captured: bool = False) -> None:
        """The kernel with the arguments set (bench/_timing.KernelClock wraps this, as it wraps Runtime.launch);
        inside a capture always as a kernel launch (the caller's graph records it)."""
        if self.graph_replay and not captured:
            self.graph.launch(stream_ptr)
        else:
            self.packed.launch(stream_ptr)

    def matches(self, handle) -> bool:
        held = self.handle_ref()
        return held is not None and held is handle


def combine_inputs_in_region(rt, x, topk_weights, captured: bool):
    """A combine's input and weights where peers read them in place (between processes: the shared region, staged
    there if not); returns them and the staged blocks to keep until the launch is queued (``captured``: for the
    Buffer's life, since a graph replays reading them)."""
    keep = []
    if not rt.in_process:
        x, k1 = rt.in_region(x)
        keep += k1
        if topk_weights is not None:
            topk_weights, k2 = rt.in_region(topk_weights)
            keep += k2
        if keep and captured:
            rt.graph_held.append(keep)  # a graph replays reading the staged copies: kept for the Buffer's life
    return x, topk_weights, keep


def combine_key(x, handle, topk_weights, bias, config, async_finish, allocate_on_comm_stream) -> tuple | None:
    """The plan key of a combine, or None where it cannot replay (see :func:`cached_key`)."""
    cupy = sys.modules.get("cupy")
    if cupy is None or not (config is None or type(config) is Config):
        return None
    if not all(type(v) is bool for v in (async_finish, allocate_on_comm_stream)):
        return None
    biases = () if bias is None else bias if isinstance(bias, tuple) else (bias,)
    if len(biases) > 2:
        return None
    layouts = [array_layout(a, cupy) for a in (x, *biases)]
    weights = None if topk_weights is None else array_layout(topk_weights, cupy)
    if None in layouts or (topk_weights is not None and weights is None):
        return None
    return ("combine", id(handle), tuple(layouts), weights, config, async_finish, allocate_on_comm_stream)


class CombinePlan(_Plan):
    """One validated combine, ready to launch again: per call the inputs (staged into the region between
    processes, as the full path does), the biases, a new call number and the new outputs."""

    def __init__(
        self, rt, spec, defines, blocks, threads, args, handle, sizes, forms, with_weights, graph_replay=False
    ):
        self.rt, self.handle_ref, self.graph_replay = rt, weakref.ref(handle), graph_replay
        # the validated call's outputs (ht_outputs.combine_outputs): byte sizes and (shape, dtype) forms
        self.sizes, self.forms, self.with_weights = list(sizes), list(forms), with_weights
        self._keep_launch(rt, spec, defines, blocks, threads, args)
        self.index = {n: spec.index(n) for n in ("in_x", "in_weights", "bias0", "bias1", "call", "out_x",
                                                 "out_weights")}  # fmt: skip

    def run(self, x, handle, topk_weights, bias, previous_event, async_finish, allocate_on_comm_stream, captured):
        rt = self.rt
        direct = None if captured else direct_stream(rt, async_finish, previous_event, allocate_on_comm_stream)
        if direct is not None:  # straight onto the caller's stream (gpu/direct.py)
            out, out_w, keep = self._issue(x, topk_weights, bias, None, True, False, direct.ptr)
            return out, out_w, end_direct(rt, direct)
        compute = rt.begin(previous_event, async_finish, allocate_on_comm_stream)
        with rt.on_comm_stream():
            out, out_w, keep = self._issue(
                x, topk_weights, bias, compute, allocate_on_comm_stream, captured, rt.comm_stream.ptr
            )
        event = rt.end(compute, async_finish)
        del keep  # staged copies stay alive until here; the stream orders their reuse after the kernel
        return out, out_w, event

    def _issue(self, x, topk_weights, bias, compute, on_current, captured, stream_ptr):
        """Inputs staged, outputs allocated (on the current stream, or in ``compute``'s order: Runtime.alloc_out),
        arguments set, the kernel launched onto ``stream_ptr`` (the current stream)."""
        rt, i = self.rt, self.index
        biases = () if bias is None else bias if isinstance(bias, tuple) else (bias,)
        x, topk_weights, keep = combine_inputs_in_region(rt, x, topk_weights, captured)
        bufs, _ = rt.alloc_out(self.sizes, compute, on_current, shared=False, captured=captured, typed=self.forms)
        out = bufs[0]
        out_w = bufs[1] if self.with_weights else None
        packed = self.packed
        packed.set(i["in_x"], x.data.ptr)
        packed.set(i["call"], rt.next_call())
        packed.set(i["out_x"], out.data.ptr)
        if self.with_weights:
            packed.set(i["in_weights"], topk_weights.data.ptr)
            packed.set(i["out_weights"], out_w.data.ptr)
        for n, b in enumerate(biases):
            packed.set(i[f"bias{n}"], b.data.ptr)
        self.launch(stream_ptr, captured)
        return out, out_w, keep


class CachedDispatchPlan(_Plan):
    """One validated cached dispatch, ready to launch again (see the module docstring)."""

    def __init__(self, rt, spec, defines, blocks, threads, args, handle, sizes, forms, fp8, graph_replay=False):
        self.rt, self.handle_ref, self.graph_replay = rt, weakref.ref(handle), graph_replay
        # the validated call's outputs (ht_outputs.dispatch_outputs): x, and FP8's scales (BF16 has none to allocate)
        n = 2 if fp8 else 1
        self.sizes, self.forms, self.fp8 = list(sizes[:n]), list(forms[:n]), fp8
        self._keep_launch(rt, spec, defines, blocks, threads, args)
        self.i_x, self.i_scales, self.i_call = spec.index("x"), spec.index("x_scales"), spec.index("call")
        self.i_out_x, self.i_out_scales = spec.index("out_x"), spec.index("out_scales")
        self.offsets, self.total = packed_offsets(self.sizes)  # in their heap block, as Runtime.alloc_out has them

    def run(self, x, handle, previous_event, async_finish, allocate_on_comm_stream, captured):
        """The call again: outputs, pointers, call number, launch; returns what dispatch returns."""
        rt = self.rt
        direct = None if captured else direct_stream(rt, async_finish, previous_event, allocate_on_comm_stream)
        if direct is not None:  # straight onto the caller's stream (gpu/direct.py)
            recv_x = self._issue(x, None, True, False, direct.ptr)
            return recv_x, None, None, None, handle, end_direct(rt, direct)
        compute = rt.begin(previous_event, async_finish, allocate_on_comm_stream)
        with rt.on_comm_stream():
            recv_x = self._issue(x, compute, allocate_on_comm_stream, captured, rt.comm_stream.ptr)
        return recv_x, None, None, None, handle, rt.end(compute, async_finish)

    def _issue(self, x, compute, on_current, captured, stream_ptr):
        """Outputs allocated (see CombinePlan._issue), pointers and call number set, the kernel launched. Between
        processes (one block of the shared heap, as Runtime.alloc_out takes it) the launch gets the block's addresses
        and the output arrays are made after it: CuPy's array objects cost host time that every rank's kernel would
        otherwise wait for in a single call."""
        rt = self.rt
        data, scales = x if self.fp8 else (x, None)
        outs = block = None
        if rt.in_process or captured or rt.poison:  # CuPy's pool, a block held for a graph, poison fills: alloc_out
            outs, _ = rt.alloc_out(self.sizes, compute, on_current, captured=captured, typed=self.forms)
            ptrs = [a.data.ptr for a in outs]
        else:
            block = rt.heap.alloc(self.total)
            ptrs = [block.ptr + off for off in self.offsets]
        packed = self.packed
        packed.set(self.i_x, data.data.ptr)
        packed.set(self.i_call, rt.next_call())
        packed.set(self.i_out_x, ptrs[0])
        if self.fp8:
            packed.set(self.i_scales, scales.data.ptr)
            packed.set(self.i_out_scales, ptrs[1])
        self.launch(stream_ptr, captured)
        if block is not None:
            outs = [
                block.array(shape, dtype, off) for (shape, dtype), off in zip(self.forms, self.offsets, strict=True)
            ]
        return (outs[0], outs[1]) if self.fp8 else outs[0]
