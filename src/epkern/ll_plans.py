"""Replaying a validated LL call (EPKERN_LL_FAST_HOST=1, 2 or 3; 3 by default; run on an H200, docs/performance.md).

A decode loop calls low_latency_dispatch / low_latency_combine with the same preallocated arrays every step.
When a call's arrays (by identity, and x's / topk's shapes) and flags equal those of one of the last eight
validated calls (a double-batch loop alternates two sets of arrays, and a zero-copy combine has a plan per
buffer set, since it reads the set it runs in), the call only launches: the checks, the argument packing and
the kernel lookup are the first call's. A plan holds strong references to its
call's arrays, so their ids cannot be reused while it is kept. Contents may change freely (the kernels check
index ranges on the device); an array reshaped in place is seen by the shape check. Calls that allocate an
output never replay.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, eq=False)
class Plan:
    shapes: tuple  # shapes the arrays had when validated
    launch: object  # launch(phase, back): the kernel launch with the validated arguments
    result: object  # what the call returns besides event and hook
    refs: tuple  # the call's arrays, kept alive (ids in the key stay theirs)
    graphs: dict = field(default_factory=dict)  # phase -> that launch captured once (EPKERN_LL_FAST_HOST=3)


def capture_launch(launch, phase: int):
    """A CUDA graph of the one launch ``launch(phase, 0)``, captured on a stream of its own (relaxed mode: other
    threads, such as in-process ranks, are not disturbed). Launching it costs the host about a fifth of a
    cuLaunchKernel under MPS (2.3 against 13 µs measured on 8 ranks of an H200). The kernel reads its call
    counter from the device, so every replay is the next call, as a replayed graph of a captured pair is."""
    import cupy

    stream = cupy.cuda.Stream(non_blocking=True)
    stream.begin_capture()
    try:
        launch(phase, 0, stream.ptr)
    finally:
        graph = stream.end_capture()
    return graph


class CallPlans:
    """The last ``size`` validated calls, by key (the ids of the arrays and the flags)."""

    def __init__(self, size: int = 4):
        self.size = size
        self._plans: OrderedDict = OrderedDict()
        self.last_put: Plan | None = None  # the plan of the latest put (ll_prepared.py reads it)
        self.generation = 0  # advanced by clear(): plans held outside (prepared calls) are stale then

    def get(self, key, shapes) -> Plan | None:
        plans = self._plans
        plan = plans.get(key)
        if plan is None or plan.shapes != shapes:
            return None
        if len(plans) >= self.size:  # least-recently-used order matters only once a put may evict
            plans.move_to_end(key)
        return plan

    def put(self, key, plan: Plan) -> None:
        self.last_put = plan
        self._plans[key] = plan
        self._plans.move_to_end(key)
        while len(self._plans) > self.size:
            self._plans.popitem(last=False)

    def clear(self) -> None:
        self._plans.clear()
        self.last_put = None
        self.generation += 1

    def __len__(self) -> int:
        return len(self._plans)


def launcher(buf, source: str, name: str, defines: dict, blocks: int, threads: int, rest: tuple):
    """launch(phase, back, stream_ptr=None) of an already launched (so loaded and warmed) specialisation: the
    kernel and every argument but phase and back resolved once. On the current stream: the Buffer's comm stream
    inside ``on_comm_stream``, or the caller's (``_replay``'s direct launch, which passes its ``stream_ptr``).
    ``buf._ll_fast_host >= 2``: through cuLaunchKernel with the arguments packed once."""
    import cupy

    from . import kernel_loader
    from .config import CTRL_BYTES

    # The kernel GpuBuffer._launch resolved for this call site (on the Buffer's device), else a lookup there.
    cached = getattr(buf, "_launch_cache", {}).get((source, name, tuple(defines.items())))
    with cupy.cuda.Device(buf.device):
        full = {**defines, "EPK_CTRL_BYTES": CTRL_BYTES}
        func = cached[0] if cached else kernel_loader.get_function(source, name, full)
        function_ptr = func.kernel.ptr if getattr(buf, "_ll_fast_host", 1) >= 2 else None
    grid, block, head = (blocks,), (threads,), (np.int32(0), np.int32(buf.rank))
    if function_ptr is not None:
        from ._driver_launch import DriverLaunch

        packed = DriverLaunch(function_ptr, blocks, threads, (*head, np.int32(0), np.int32(0), *rest))
        stream = buf.comm_stream

        def launch_driver(phase: int, back: int, stream_ptr: int | None = None) -> None:
            packed.set(2, phase)
            packed.set(3, back)
            packed.launch(stream.ptr if stream_ptr is None else stream_ptr)

        return launch_driver

    def launch(phase: int, back: int, stream_ptr: int | None = None) -> None:  # CuPy: the current stream
        func(grid, block, (*head, np.int32(phase), np.int32(back), *rest))

    return launch
