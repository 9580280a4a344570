"""Shared timing helpers for benchmarks: CUDA-event medians, graph-replay averages, copy bandwidth."""

from __future__ import annotations

import statistics
import time


def need(script: str, gpu: bool = True, modules: tuple = ()) -> None:
    """Exit with a one-line reason (status 2) when what ``script`` needs is absent: a CUDA GPU, or a module
    (instead of a CUDA or import traceback on a machine without them)."""
    import importlib.util

    for name in modules:
        if importlib.util.find_spec(name) is None:
            raise SystemExit(f"{script}: needs the Python module {name!r}, which is not installed")
    if gpu:
        from epkern import _cuda

        count, why = _cuda._probe()
        if count == 0:
            raise SystemExit(f"{script}: needs a CUDA GPU, and there is none here ({why})")


def event_median_us(fn, iters: int = 200, warmup: int = 20) -> float:
    """Median over ``iters`` of the device time between events around one ``fn()`` call."""
    import cupy

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) * 1e3)
    return statistics.median(times)


def graph_average_us(fn, calls: int = 100, replays: int = 20) -> float | None:
    """Average device time per ``fn()`` inside a captured graph of ``calls`` calls (no launch gaps);
    None when capture is not possible."""
    import cupy

    stream = cupy.cuda.Stream(non_blocking=True)
    try:
        with stream:
            fn()  # make sure modules are loaded outside the capture
            stream.synchronize()
            stream.begin_capture()
            for _ in range(calls):
                fn()
            graph = stream.end_capture()
            graph.launch(stream)
            stream.synchronize()
            start, stop = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(stream)
            for _ in range(replays):
                graph.launch(stream)
            stop.record(stream)
            stop.synchronize()
    except Exception:  # noqa: BLE001 - capture unsupported for this fn
        return None
    return cupy.cuda.get_elapsed_time(start, stop) * 1e3 / (calls * replays)


def host_overhead_us(fn, calls: int = 2000) -> float:
    """Host time per call when ``calls`` calls are enqueued back to back (no sync inside)."""
    import cupy

    fn()
    cupy.cuda.get_current_stream().synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    cupy.cuda.get_current_stream().synchronize()
    return (t1 - t0) * 1e6 / calls


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    import cupy

    src = cupy.ones(nbytes // 4, dtype=cupy.float32)
    dst = cupy.empty_like(src)
    us = event_median_us(lambda: dst.__setitem__(slice(None), src), iters=20, warmup=3)
    return 2 * nbytes / (us * 1e-6) / 1e9


class KernelClock:
    """Benchmark-only: events around every kernel a Buffer launches through the runtime (on the comm stream) and
    every replayed HT call's plan launch (on the stream it goes onto: a direct replay's is the caller's); wraps
    ``launch`` (``restore()`` undoes it). Replayed LL calls bypass it. ``take()`` returns each kernel's device
    µs since the last take."""

    def __init__(self, buf):
        from epkern.gpu import ht_replay

        self.rt = buf._backend.rt
        self.buf, self.spans, self._launch = buf, [], self.rt.launch
        self.rt.launch = self.launch
        # replayed cached HT dispatches launch through their plan: timed the same way
        self._plans, self._plan_launch = ht_replay._Plan, ht_replay._Plan.launch
        clock = self

        def plan_launch(plan, stream_ptr, *rest):  # onto the comm stream, or a direct replay's caller stream
            clock._timed(lambda: clock._plan_launch(plan, stream_ptr, *rest), stream_ptr)

        self._plans.launch = plan_launch

    def launch(self, *args, **kwargs):
        self._timed(lambda: self._launch(*args, **kwargs))

    def _timed(self, launch, stream_ptr=None):
        import cupy

        comm = self.buf._backend.rt.comm_stream
        stream = comm if stream_ptr in (None, comm.ptr) else cupy.cuda.ExternalStream(stream_ptr)
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        launch()
        stop.record(stream)
        self.spans.append((start, stop))

    def take(self) -> list[float]:
        import cupy

        out = []
        for start, stop in self.spans:
            stop.synchronize()
            out.append(cupy.cuda.get_elapsed_time(start, stop) * 1e3)
        self.spans = []
        return out

    def restore(self):
        del self.rt.launch  # the class's method again
        self._plans.launch = self._plan_launch


def profile_text(fn, calls: int, top: int = 25) -> str:
    """cProfile of ``calls`` back-to-back ``fn()`` calls (one sync after, not profiled): the ``top``
    functions by own time, as µs per call of ``fn`` (own and cumulative), to find where the host's time per
    call goes. Time inside Cython methods without profiling hooks (CuPy's kernel launch) counts as the
    caller's own time."""
    import cupy

    fn()
    cupy.cuda.get_current_stream().synchronize()
    text = profile_text_host(fn, calls, top)
    cupy.cuda.get_current_stream().synchronize()
    return text


def profile_text_host(fn, calls: int, top: int = 25, between=None) -> str:
    """The profile of :func:`profile_text` without the stream syncs (host-only callers). ``between()``, if given,
    runs after every call, not profiled (e.g. a sync and a barrier between collective calls)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    if between is None:
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
    else:
        for _ in range(calls):
            prof.enable()
            fn()
            prof.disable()
            between()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (primitive calls, calls, own s, cumulative s, callers)}
    total = sum(v[2] for v in stats.values())
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    head = f"{total * 1e6 / calls:.1f} us per call profiled (profiler overhead included)"
    lines = [head + "; own / cumulative us per call:"]
    for (file, line, name), (_, ncalls, own, cum, _) in rows:
        where = f"{file.rsplit('/', 2)[-1]}:{line}" if line else file
        lines.append(f"  {own * 1e6 / calls:8.2f} {cum * 1e6 / calls:9.2f}  x{ncalls / calls:<5.1f} {name} ({where})")
    return "\n".join(lines)
