"""GPU-to-GPU copy bandwidth, the roofline of the multi-GPU benchmarks (issue #6): one process, every visible GPU.

    python3 bench/bench_p2p.py [--mib 256] [--iters 20] [--json out.json]

Measured, each as the median of ``--iters`` timed rounds after a warm-up, with peer access enabled:

- ``pair_ce``: GPU 0 -> GPU 1 with the copy engine (``cudaMemcpyPeerAsync``), one direction;
- ``pair_sm``: the same bytes copied by a kernel on GPU 1 reading GPU 0's memory (SM copy, 16-byte loads);
- ``all_ce``: every GPU sends ``--mib`` to every other GPU at once, copy engines, one stream per (src, dst);
- ``all_sm``: the same all-to-all with a kernel per destination GPU pulling from every source.

Bandwidth is bytes moved / host wall time of a round, from the first enqueue until every stream is done (the
launch cost is small beside copies of hundreds of MiB); for ``all_*`` the figure per GPU is the bytes one GPU
receives / time, the number to hold HT dispatch's logical GB/s per GPU against. Afterwards every destination of
both all-to-all variants is poisoned, copied once more and checked exactly. Not yet run (written while no
multi-GPU machine was lent).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

KERNEL = Path(__file__).resolve().parent / "kernels" / "bench_p2p.cu"


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def _round(fn, streams, iters: int) -> float:
    """Median wall seconds of fn() until every stream in ``streams`` is done."""
    times = []
    for i in range(iters + 2):
        for s in streams:
            s.synchronize()
        t0 = time.perf_counter()
        fn()
        for s in streams:
            s.synchronize()
        if i >= 2:  # warm-up rounds
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=256, help="MiB per (source, destination) pair")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", type=str, default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _timing import need

    need("bench_p2p.py")

    import cupy

    from epkern import kernel_loader

    n = cupy.cuda.runtime.getDeviceCount()
    if n < 2:
        raise SystemExit(f"bench_p2p: needs at least 2 GPUs, found {n}")
    nbytes = args.mib << 20
    for a in range(n):
        with cupy.cuda.Device(a):
            for b in range(n):
                if a != b and cupy.cuda.runtime.deviceCanAccessPeer(a, b):
                    try:
                        cupy.cuda.runtime.deviceEnablePeerAccess(b)
                    except cupy.cuda.runtime.CUDARuntimeError:
                        pass  # already enabled
    src, dst, streams, kernels = {}, {}, {}, {}
    for g in range(n):
        with cupy.cuda.Device(g):
            src[g] = cupy.arange(nbytes // 4, dtype=cupy.int32)
            dst[g] = {s: cupy.zeros(nbytes // 4, dtype=cupy.int32) for s in range(n) if s != g}
            streams[g] = {s: cupy.cuda.Stream(non_blocking=True) for s in range(n) if s != g}
            kernels[g] = kernel_loader.get_function(KERNEL, "epk_bench_pull")
    vecs = nbytes // 16
    sms = {g: cupy.cuda.runtime.getDeviceProperties(g)["multiProcessorCount"] for g in range(n)}

    def ce(s, d):
        with cupy.cuda.Device(d):
            cupy.cuda.runtime.memcpyPeerAsync(dst[d][s].data.ptr, d, src[s].data.ptr, s, nbytes, streams[d][s].ptr)

    def sm(s, d, blocks):
        # raw pointers: the source lives on another device, which CuPy's array arguments would refuse
        with cupy.cuda.Device(d), streams[d][s]:
            kernels[d]((blocks,), (512,), (np.uint64(src[s].data.ptr), np.uint64(dst[d][s].data.ptr), np.int64(vecs)))

    all_streams = [st for g in range(n) for st in streams[g].values()]
    res = {"gpus": n, "bytes_per_pair": nbytes, "device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()}
    res["pair_ce_GBps"] = gbps(nbytes, _round(lambda: ce(0, 1), all_streams, args.iters))
    res["pair_sm_GBps"] = gbps(nbytes, _round(lambda: sm(0, 1, 2 * sms[1]), all_streams, args.iters))

    def all_ce():
        for d in range(n):
            for s in range(n):
                if s != d:
                    ce(s, d)

    def all_sm():
        for d in range(n):
            for s in range(n):
                if s != d:
                    sm(s, d, max(1, 2 * sms[d] // (n - 1)))

    recv_per_gpu = (n - 1) * nbytes
    res["all_ce_GBps_per_gpu"] = gbps(recv_per_gpu, _round(all_ce, all_streams, args.iters))
    res["all_sm_GBps_per_gpu"] = gbps(recv_per_gpu, _round(all_sm, all_streams, args.iters))
    for name, run in (("all_ce", all_ce), ("all_sm", all_sm)):  # each moved every byte of every pair
        for d in range(n):
            with cupy.cuda.Device(d):
                for a in dst[d].values():
                    a.fill(-1)
                cupy.cuda.Device(d).synchronize()  # the fills ran on the legacy stream, the copies do not
        run()
        for st in all_streams:
            st.synchronize()
        for d in range(n):
            with cupy.cuda.Device(d):
                want = cupy.arange(nbytes // 4, dtype=cupy.int32)
                for s_, a in dst[d].items():
                    if not bool((a == want).all()):
                        raise AssertionError(f"{name}: GPU {d} did not receive GPU {s_}'s bytes exactly")
    res["validated"] = True
    print(
        f"{n} x {res['device']}, {args.mib} MiB per pair: pair CE {res['pair_ce_GBps']:.0f} GB/s, "
        f"pair SM {res['pair_sm_GBps']:.0f} GB/s, all-to-all CE {res['all_ce_GBps_per_gpu']:.0f} GB/s per GPU, "
        f"all-to-all SM {res['all_sm_GBps_per_gpu']:.0f} GB/s per GPU (received)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
