"""The torch front end (epkern.deep_ep) against the native CuPy API, same calls, same group, one run (issue #19).

Each call is timed as users get it: one call, then a device sync (median over ``--iters`` of wall µs), and the host
time the call itself takes (until it returns). Beside them the call's GPU time: the call is issued while the current
stream is held by a device sleep longer than any rank's host time, and the time from the sleep's end to an event
recorded after the call is what the GPU spent on it (kernels, copies, waits for peers' kernels), without host time
(``gpu us``; the front end adds no GPU time when the two APIs' figures agree). Both APIs get the same inputs; their
outputs are compared bitwise once. Under mpiexec (``mpiexec -n 8 python bench/bench_deep_ep.py``, MPS on one GPU)
or ``--inprocess N``; ``--backend cpu`` runs the same on CPU tensors (a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import ml_dtypes
import numpy as np

from _timing import KernelClock, profile_text_host
from epkern import Buffer, deep_ep, torch_tensors
from epkern.group import as_group, run_in_process

BF16 = ml_dtypes.bfloat16


def _inputs(rank, tokens, hidden, experts, topk, seed):
    rng = np.random.default_rng(seed + rank)
    x = rng.integers(-8, 9, size=(tokens, hidden)).astype(BF16)
    idx = np.argsort(rng.random((tokens, experts)), axis=1)[:, :topk].astype(np.int64)
    w = rng.integers(1, 4, size=(tokens, topk)).astype(np.float32)
    return x, idx, w


class _Api:
    """One API's view of the inputs and its device sync."""

    def __init__(self, name, backend):
        self.name, self.backend = name, backend
        if name == "deep_ep":
            import torch

            self.torch = torch

    def array(self, a):
        if self.name == "deep_ep":
            t = torch_tensors.to_tensor(a)
            return t.to("cuda") if self.backend == "gpu" else t.clone()
        if self.backend == "gpu":
            import cupy

            return cupy.asarray(a)
        return a

    def sync(self):
        if self.backend != "gpu":
            return
        if self.name == "deep_ep":
            self.torch.cuda.synchronize()
        else:
            import cupy

            cupy.cuda.Device().synchronize()

    def sleep_then_events(self, sleep_us: float):
        """Hold the current stream for ``sleep_us`` on the GPU; returns (event after the sleep, a fresh end event)
        of this API's kind, the first already recorded."""
        if self.name == "deep_ep":
            torch = self.torch
            torch.cuda._sleep(int(sleep_us * self.cycles_per_us()))
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            return e0, e1
        import cupy

        _sleep_kernel()((1,), (1,), (np.int64(int(sleep_us * self.cycles_per_us())),))
        e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
        e0.record()
        return e0, e1

    def elapsed_us(self, e0, e1) -> float:
        if self.name == "deep_ep":
            e1.record()
            e1.synchronize()
            return e0.elapsed_time(e1) * 1e3
        import cupy

        e1.record()
        e1.synchronize()
        return cupy.cuda.get_elapsed_time(e0, e1) * 1e3

    def cycles_per_us(self) -> float:
        import cupy

        return cupy.cuda.Device().attributes["ClockRate"] / 1e3  # kHz -> cycles per us

    def host(self, a):
        """An output as numpy, BF16 as its 16-bit words (compared bitwise)."""
        if self.name == "deep_ep":
            a = torch_tensors.to_array(a.cpu(), "output", "cpu")
        elif not isinstance(a, np.ndarray):
            a = a.get()
        return a.view(np.int16) if a.dtype == BF16 else a


_SLEEP = []


def _sleep_kernel():
    """A one-thread kernel that spins for a number of clock cycles (the CuPy side's torch.cuda._sleep)."""
    if not _SLEEP:
        import cupy

        _SLEEP.append(
            cupy.RawKernel(
                r"""extern "C" __global__ void spin(long long cycles) {
                  long long t0 = clock64();
                  while (clock64() - t0 < cycles) {}
                }""",
                "spin",
            )
        )
    return _SLEEP[0]


def _time(group, api, fn, iters, gpu_sleep_us=0.0):
    walls, hosts, gpus = [], [], []
    for _ in range(iters):
        group.barrier()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        api.sync()
        t2 = time.perf_counter()
        walls.append((t2 - t0) * 1e6)
        hosts.append((t1 - t0) * 1e6)
    if gpu_sleep_us:
        for _ in range(iters):
            group.barrier()
            e0, e1 = api.sleep_then_events(gpu_sleep_us)
            fn()
            gpus.append(api.elapsed_us(e0, e1))
            api.sync()
    gpu = statistics.median(gpus) if gpus else float("nan")
    return statistics.median(walls), statistics.median(hosts), gpu


def _profile(group, api, fn, iters, label, top=18):
    """Every rank profiles ``iters`` calls, each followed by a sync and a barrier (not profiled); rank 0 prints the
    functions taking the most host time."""

    def settle():
        api.sync()
        group.barrier()

    settle()
    text = profile_text_host(fn, iters, top, between=settle)
    if group.rank == 0:
        print(f"---- profile {label} ({iters} calls)\n{text}", flush=True)


def _trace(group, api, fn, iters, sleep_us, native, label):
    """Where a call's GPU window goes: the call issued behind a device sleep as in ``_time``, with events around
    each kernel the native Buffer launches (``KernelClock``) and a CuPy event after the sleep and after the call
    (both on the one current stream); rank 0 prints each kernel's start / end and the end event, µs after the
    sleep's end, medians over ``iters`` (host gaps between kernels show as the distance between them)."""
    import cupy

    clock, marks = KernelClock(native), []
    try:
        for _ in range(iters):
            group.barrier()
            api.sleep_then_events(sleep_us)
            e0 = cupy.cuda.Event()
            e0.record()
            fn()
            e1 = cupy.cuda.Event()
            e1.record()
            e1.synchronize()
            at = [
                (cupy.cuda.get_elapsed_time(e0, a) * 1e3, cupy.cuda.get_elapsed_time(e0, b) * 1e3)
                for a, b in clock.spans
            ]
            marks.append([*at, (cupy.cuda.get_elapsed_time(e0, e1) * 1e3,) * 2])
            clock.spans = []
            api.sync()
    finally:
        clock.restore()
    if group.rank == 0 and marks and all(len(m) == len(marks[0]) for m in marks):
        cols = [
            (statistics.median(m[i][0] for m in marks), statistics.median(m[i][1] for m in marks))
            for i in range(len(marks[0]))
        ]
        text = "  ".join(f"k{i} {a:.1f}-{b:.1f}" for i, (a, b) in enumerate(cols[:-1]))
        print(f"trace {label}: {text}  end {cols[-1][0]:.1f}  (us after the sleep, median of {iters})", flush=True)


def _measure(group, args, name):
    """One API's four calls, timed; returns (rows, outputs to compare)."""
    R, backend = group.size, args.backend
    api = _Api(name, backend)
    ht_in = _inputs(group.rank, args.tokens_ht, args.hidden, args.experts, args.topk, 1)
    ll_in = _inputs(group.rank, args.tokens_ll, args.hidden, args.experts, args.topk, 2)
    x, idx, w = (api.array(a) for a in ht_in)
    lx, lidx, lw = (api.array(a) for a in ll_in)
    make = deep_ep.Buffer if name == "deep_ep" else Buffer
    ll_bytes = Buffer.get_low_latency_rdma_size_hint(args.tokens_ll, args.hidden, R, args.experts)
    ht = make(group, num_nvl_bytes=args.nvl_mb << 20, backend=backend)
    ll = make(group, num_rdma_bytes=ll_bytes, low_latency_mode=True, backend=backend)
    state = {}

    def ht_dispatch():
        per_rank, _, per_expert, in_rank, _ = ht.get_dispatch_layout(idx, args.experts)
        out = ht.dispatch(x, topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank,
                          is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)  # fmt: skip
        state["recv_x"], state["recv_w"], state["handle"] = out[0], out[2], out[4]

    def ht_combine():
        state["combined"] = ht.combine(state["recv_x"], state["handle"], topk_weights=state["recv_w"])[0]

    def ll_dispatch():
        out = ll.low_latency_dispatch(lx, lidx, args.tokens_ll, args.experts, use_fp8=False)
        state["ll_recv"], state["ll_handle"] = out[0], out[2]

    def ll_combine():
        state["ll_combined"] = ll.low_latency_combine(state["ll_recv"], lidx, lw, state["ll_handle"])[0]

    calls = (("ht_dispatch", ht_dispatch), ("ht_combine", ht_combine), ("ll_dispatch", ll_dispatch),
             ("ll_combine", ll_combine))  # fmt: skip
    for _ in range(args.warmup):
        for _, fn in calls:
            fn()
    api.sync()
    rows = []
    for call, fn in calls:
        sleep_us = args.gpu_sleep_us if backend == "gpu" else 0.0
        wall, host, gpu = _time(group, api, fn, args.iters, sleep_us)
        rows.append(dict(api=name, call=call, wall_us=wall, host_us=host, gpu_us=gpu))
    if args.trace and backend == "gpu":
        native = ht._buf if name == "deep_ep" else ht
        for call, fn in calls[:2]:  # the HT calls (replayed LL calls launch past the runtime's launch)
            _trace(group, api, fn, args.iters, args.gpu_sleep_us, native, f"{name} {call}")
    if args.profile:  # after the timing (the profiler slows the host): where each call's host time goes
        for call, fn in calls:
            _profile(group, api, fn, args.profile, f"{name} {call}")
    if backend == "gpu" and group.rank == 0:  # how the LL calls were served (rebind.py: DeepEP's new outputs)
        eng = (ll._buf if name == "deep_ep" else ll)._backend.ll
        print(f"{name}: LL calls replayed {eng.replays} (rebound {eng.rebound}), identity plans {len(eng.plans)}",
              flush=True)  # fmt: skip
    outputs = [api.host(state[k]) for k in ("recv_x", "combined", "ll_combined")]
    ht.destroy(), ll.destroy()
    return rows, outputs


def run(group, args):
    """Both APIs, ``--rounds`` times, the first one alternating (cupy first in odd rounds), so the spread between
    rounds of one API tells the noise; returns (rows, whether the outputs of both APIs are bitwise equal)."""
    rows, exact = [], True
    for rnd in range(1, args.rounds + 1):
        order = ("cupy", "deep_ep") if rnd % 2 else ("deep_ep", "cupy")
        outs = {}
        for name in order:
            got, outs[name] = _measure(group, args, name)
            rows += [dict(r, round=rnd) for r in got]
        exact = exact and all(np.array_equal(a, b) for a, b in zip(outs["cupy"], outs["deep_ep"], strict=True))
    return rows, exact


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="gpu", choices=("gpu", "cpu"))
    p.add_argument("--tokens-ht", type=int, default=4096)
    p.add_argument("--tokens-ll", type=int, default=128)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--nvl-mb", type=int, default=1024, help="HT Buffer size, MiB")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="both APIs this many times, the first alternating")
    p.add_argument("--inprocess", type=int, default=0, help="this many in-process ranks instead of MPI")
    p.add_argument("--profile", type=int, default=0, help="then profile this many calls of each (rank 0 prints)")
    p.add_argument(
        "--gpu-sleep-us", type=float, default=5000.0, help="device sleep the GPU-time runs queue each call behind"
    )
    p.add_argument("--trace", action="store_true", help="then each HT call's kernels placed in its GPU window")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.inprocess:
        results = run_in_process(lambda g: run(g, args), args.inprocess, timeout_s=600)
    else:
        group = as_group(None)
        results = [run(group, args)]  # every rank runs; rank 0 reports
        if group.rank != 0:
            return 0
    rows, exact = results[0]
    print(f"{'call':<12} {'api':<8} {'wall us':>10} {'host us':>10} {'gpu us':>10}   (rank 0; median of {args.iters})")
    for row in sorted(rows, key=lambda r: (r["api"] != "cupy", r["round"])):
        print(
            f"{row['call']:<12} {row['api']:<8} {row['wall_us']:>10.1f} {row['host_us']:>10.1f} {row['gpu_us']:>10.1f}"
            + (f"   round {row['round']}" if args.rounds > 1 else "")
        )
    print(f"outputs of both APIs bitwise equal: {exact}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows, exact=exact), f, indent=1)
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
