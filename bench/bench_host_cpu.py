"""Python host time per call of the GPU backend's hot paths, on a CPU, over the fake CuPy of the tests
(tests/fake_cupy.py: kernels recorded, not run). It measures epkern's own Python (checks, argument
packing, allocation from the shared heap, streams and events), not CuPy's launch cost or a GPU: use it to
compare host-path changes; bench_ht.py / bench_ll.py measure the real thing on a GPU.

    python3 bench/bench_host_cpu.py [--calls 1000] [--repeats 7] [--profile]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
import types
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fake_cupy as F  # noqa: E402
from _timing import profile_text_host  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)


def cases(T=128, H=7168, K=8, E=256, num_max=128):
    """(name, fn) of each hot path, on one fake rank; built inside F.installed()."""
    import cupy

    from epkern.gpu.ll.layout import min_num_rdma_bytes
    from epkern.gpu.tuning import LLTuning, Tuning

    out = []
    buf = F.fake_buffer(num_nvl_bytes=1 << 26)
    inputs = F.ht_inputs(T, H, K, E)
    x, idx, w = inputs[:3]
    recv_x, _, recv_w, _, handle, _ = F.full_dispatch(buf, inputs, num_worst_tokens=T)
    out.append(("ht cached dispatch", lambda: buf.dispatch(x, handle=handle)))
    out.append(("ht combine", lambda: buf.combine(recv_x, handle, topk_weights=recv_w)))
    # non-cached: with num_worst_tokens (no count to wait for)
    out.append(("ht dispatch (non-cached, num_worst_tokens)", lambda: F.full_dispatch(buf, inputs, num_worst_tokens=T)))
    for replay in (False, True):
        ll = F.fake_buffer(
            num_nvl_bytes=0,
            num_rdma_bytes=min_num_rdma_bytes(num_max, H, E),
            low_latency_mode=True,
            _tuning=Tuning(ll=LLTuning(replay=replay)),
        )
        outs = dict(
            out_x=cupy.empty((E, num_max, H), BF16),
            out_src_info=cupy.empty((E, num_max), np.int32),
            out_layout_range=cupy.empty((E, 1), np.int64),
            out_count=cupy.empty((E,), np.int32),
        )
        y, combined = cupy.empty((E, num_max, H), BF16), cupy.empty((T, H), BF16)
        h = ll.low_latency_dispatch(x, idx, num_max, E, use_fp8=False, **outs)[2]

        for asy in (True, False):  # async_finish=False replays go straight onto the caller's stream

            def lld(ll=ll, outs=outs, asy=asy):
                return ll.low_latency_dispatch(x, idx, num_max, E, use_fp8=False, async_finish=asy, **outs)

            def llc(ll=ll, h=h, y=y, combined=combined, asy=asy):
                return ll.low_latency_combine(y, idx, w, h, out=combined, async_finish=asy)

            tag = (" (replayed)" if replay else "") + (" async" if asy else "")
            out.append((f"ll dispatch, preallocated{tag}", lld))
            out.append((f"ll combine, out={tag}", llc))
        if replay:  # new arrays every call (DeepEP's calls: rebind.py), six sets in turn: never the same twice in four
            sets = [
                dict(outs=dict(out_x=cupy.empty((E, num_max, H), BF16), out_src_info=cupy.empty((E, num_max), np.int32),
                               out_layout_range=cupy.empty((E, 1), np.int64), out_count=cupy.empty((E,), np.int32)),
                     out=cupy.empty((T, H), BF16))
                for _ in range(6)
            ]  # fmt: skip
            turn = itertools.count()

            def lld_new(ll=ll, sets=sets, turn=turn):
                return ll.low_latency_dispatch(x, idx, num_max, E, use_fp8=False, **sets[next(turn) % 6]["outs"])

            def llc_new(ll=ll, sets=sets, turn=turn, h=h, y=y):
                return ll.low_latency_combine(y, idx, w, h, out=sets[next(turn) % 6]["out"])

            out.append(("ll dispatch, new outputs each call (rebound)", lld_new))
            out.append(("ll combine, new out each call (rebound)", llc_new))
            # outputs left to the library (DeepEP's calls through the native API): rebound, outputs made per call
            out.append(("ll dispatch, outputs by the library (rebound)",
                        lambda ll=ll: ll.low_latency_dispatch(x, idx, num_max, E, use_fp8=False)))  # fmt: skip
            out.append(
                (
                    "ll combine, out by the library (rebound)",
                    lambda ll=ll, h=h, y=y: ll.low_latency_combine(y, idx, w, h),
                )
            )
        if replay:  # prepared calls (Buffer.prepare_low_latency_*), synchronous: the decode loop's shortest path
            prepared = ll.prepare_low_latency_dispatch(x, idx, num_max, E, use_fp8=False, **outs)
            out.append(("ll dispatch, prepared", prepared))
            out.append(("ll combine, prepared", ll.prepare_low_latency_combine(y, idx, w, h, out=combined)))
    return out


def counts_cases(T=128, H=7168, K=8, E=256):
    """The non-cached dispatch that waits for the counts (built inside F.installed with the notify emulated for one
    rank, whose array registry makes every call of that context slower: these rows compare with each other only):
    the copy launched before the host reads the counts (gpu/ht_outputs.py), and counts first (in-process ranks and a
    shape's first dispatch still do that)."""
    from epkern.gpu import ht_outputs

    buf = F.fake_buffer(num_nvl_bytes=1 << 26)
    inputs = F.ht_inputs(T, H, K, E)
    F.full_dispatch(buf, inputs, num_worst_tokens=T)  # the specialisation's first use

    def waiting_first():
        early, ht_outputs.reservation = ht_outputs.reservation, lambda *a: None
        try:
            return F.full_dispatch(buf, inputs)
        finally:
            ht_outputs.reservation = early

    return [
        ("ht dispatch (non-cached, counts; emulated notify)", lambda: F.full_dispatch(buf, inputs)),
        ("ht dispatch (non-cached, counts first; emulated notify)", waiting_first),
    ]


_launched = []  # perf_counter() of each launch through the libcuda stand-in (replays)


def _until_launch(fn, calls: int):
    """Median µs from a call's start to its launch (the stand-in's cuLaunchKernel), None if it launched nothing
    there: what every rank's kernel waits for in a single call, where the call's host time after it does not count."""
    waits = []
    for _ in range(calls):
        _launched.clear()
        t0 = time.perf_counter()
        fn()
        if _launched:
            waits.append((_launched[0] - t0) * 1e6)
    return statistics.median(waits) if waits else None


def _run(fn_cases, args):
    for name, fn in fn_cases:
        fn()
        runs = []
        for _ in range(args.repeats):  # the fastest run: the least disturbed by whatever else runs here
            t0 = time.perf_counter()
            for _ in range(args.calls):
                fn()
            runs.append((time.perf_counter() - t0) / args.calls * 1e6)
        until = _until_launch(fn, args.calls)
        launch = f"; {until:5.1f} until the launch (median)" if until is not None else ""
        print(f"{name:56s} {min(runs):7.1f} us per call (best of {args.repeats} runs of {args.calls}){launch}")
        if args.profile:
            print(profile_text_host(fn, args.calls, top=12))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--profile", action="store_true", help="also the top functions of each path")
    args = p.parse_args(argv)
    from epkern import _cuda_driver
    from epkern.gpu.ll import plans

    # Replays launch through the real packed cuLaunchKernel call into a no-op stand-in for libcuda: their rows are
    # epkern's Python and the ctypes call only (the fake's recording stand-in would add its own bookkeeping).
    # The stand-in notes when it was called: "until the launch".
    _cuda_driver._lib = types.SimpleNamespace(cuLaunchKernel=lambda *a: _launched.append(time.perf_counter()) or 0)
    with F.installed():
        plans.DriverLaunch = _cuda_driver.DriverLaunch
        _run(cases(), args)
    with F.installed(emulate={"epk_ht_notify": F.emulate_ht_notify_one_rank}):
        _run(counts_cases(), args)


if __name__ == "__main__":
    main()
