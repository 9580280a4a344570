"""Replaying a validated LL call.

A decode loop calls low_latency_dispatch / low_latency_combine with the same preallocated arrays every step.
When a call's arrays (by identity, and x's / topk's shapes) and flags equal those of one of the last eight
validated calls (a double-batch loop alternates two sets of arrays, and a zero-copy combine has a plan per
buffer set, since it reads the set it runs in), the call only launches: the checks, the argument packing and
the kernel lookup are the first call's. The launch goes through ``cuLaunchKernel`` with the arguments packed
once, or, straight onto the caller's stream, as a one-kernel CUDA graph captured once per plan (a graph launch
cost 2 µs under MPS, a kernel launch 13 µs; docs/performance.md). A plan holds strong references to its call's
arrays, so their ids cannot be reused while it is kept. Contents may change freely (the kernels check index
ranges on the device); an array reshaped in place is seen by the shape check. Calls that allocate an output
never replay.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ..._cuda_driver import DriverLaunch


@dataclass(frozen=True, eq=False)
class Plan:
    shapes: tuple  # shapes the arrays had when validated
    launch: object  # launch(phase, back, stream_ptr=None): the kernel launch with the validated arguments
    result: object  # what the call returns besides event and hook
    refs: tuple  # the call's arrays, kept alive (ids in the key stay theirs)
    graphs: dict = field(default_factory=dict)  # phase -> that launch captured once


def capture_launch(launch, phase: int):
    """A CUDA graph of the one launch ``launch(phase, 0)``. The kernel reads its call counter from the device, so
    every replay is the next call, as a replayed graph of a captured pair is."""
    return capture_one(lambda stream_ptr: launch(phase, 0, stream_ptr))


def capture_one(issue):
    """A CUDA graph of what ``issue(stream_ptr)`` launches, captured on a stream of its own (relaxed mode: other
    threads, such as in-process ranks, are not disturbed)."""
    import cupy

    stream = cupy.cuda.Stream(non_blocking=True)
    stream.begin_capture()
    try:
        issue(stream.ptr)
    finally:
        graph = stream.end_capture()
    return graph


class CallPlans:
    """The last ``size`` validated calls, by key (the ids of the arrays and the flags)."""

    def __init__(self, size: int = 8):
        self.size = size
        self._plans: OrderedDict = OrderedDict()
        self.last: Plan | None = None  # the plan of the latest put or hit (prepared.py reads it)
        self.generation = 0  # advanced by clear(): plans held outside (prepared calls) are stale then

    def get(self, key, shapes) -> Plan | None:
        plans = self._plans
        plan = plans.get(key)
        if plan is None or plan.shapes != shapes:
            return None
        if len(plans) >= self.size:  # least-recently-used order matters only once a put may evict
            plans.move_to_end(key)
        self.last = plan
        return plan

    def put(self, key, plan: Plan) -> None:
        self.last = plan
        self._plans[key] = plan
        self._plans.move_to_end(key)
        while len(self._plans) > self.size:
            self._plans.popitem(last=False)

    def clear(self) -> None:
        self._plans.clear()
        self.last = None
        self.generation += 1

    def __len__(self) -> int:
        return len(self._plans)


def launcher(rt, spec, defines: dict, blocks: int, threads: int, args: tuple):
    """launch(phase, back, stream_ptr=None) of an already launched (so loaded and warmed) specialisation, its
    packed ``args`` (dry_run 0) laid out once for cuLaunchKernel; on the comm stream unless ``stream_ptr``."""
    import cupy

    with cupy.cuda.Device(rt.device):
        func = rt.kernel(spec, defines)[0]
    packed = DriverLaunch(func.kernel.ptr, blocks, threads, args)
    i_phase, i_back = spec.index("phase"), spec.index("back")
    stream = rt.comm_stream

    def launch(phase: int, back: int, stream_ptr: int | None = None) -> None:
        packed.set(i_phase, phase)
        packed.set(i_back, back)
        packed.launch(stream.ptr if stream_ptr is None else stream_ptr)

    launch.packed = packed  # tests read the arguments
    return launch


def with_phase(spec, args: tuple, phase: int, back: int) -> tuple:
    """``args`` (packed by ``spec``) with phase and back replaced."""
    out = list(args)
    out[spec.index("phase")] = np.int32(phase)
    out[spec.index("back")] = np.int32(back)
    return tuple(out)
