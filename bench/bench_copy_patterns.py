"""What the HT copy loops alone can reach on one GPU: the data movement of dispatch (scatter) and combine
(gather) for all ranks sharing the GPU, in one launch and without any synchronisation between ranks,
against the HBM floor (rows read + rows written over the measured copy bandwidth). Sweeps the loop shape.

    python3 bench/bench_copy_patterns.py --ranks 8 --tokens 4096 --hidden 7168 --topk 8 --experts 256

Two modes separate what the real HT calls add to the copy loops: ``--split S`` runs the same work as S
concurrent launches on S streams (S kernels of 1/S of the tokens and of the blocks, as S ranks would), and
``--mpi`` (under mpiexec with MPS) has every process copy its own rank's share on its own allocations, with
no IPC and no synchronisation inside the kernels; the time is the wall time between two barriers.
``--mpi --ipc legacy|vmm`` does the same into the next process's memory, mapped by cudaIpcOpenMemHandle or
by the VMM API (epkern.memory.vmm).
``--shape threads:unroll:blocks_per_sm:store_cs:loads_first`` (repeatable) limits the sweep.

Every variant's output is checked (integer-valued data, exact) before it is timed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import copy_bandwidth_gbs, event_median_us, need  # noqa: E402

KERNEL = Path(__file__).resolve().parent / "kernels" / "bench_copy_patterns.cu"


def routing(ranks, tokens, experts, topk, seed=7):
    """slot[t, d] over all ranks' tokens (rank-major): the row of token t in region d, as dispatch lays
    them out (source rank, then token order), or -1."""
    rng = np.random.default_rng(seed)
    idx = np.argsort(rng.random((ranks * tokens, experts)), axis=1)[:, :topk]
    in_rank = np.zeros((ranks * tokens, ranks), bool)
    np.put_along_axis(in_rank, idx // (experts // ranks), True, axis=1)
    slot = np.where(in_rank, np.cumsum(in_rank, axis=0) - 1, -1).astype(np.int32)
    return slot, in_rank.sum(0)


def main(argv=None):
    import cupy

    from epkern import kernel_loader

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--split", type=int, default=1, help="the work as this many concurrent launches (streams)")
    p.add_argument("--mpi", action="store_true", help="each MPI process copies its own rank's share")
    p.add_argument(
        "--ipc",
        choices=("legacy", "vmm"),
        default=None,
        help="with --mpi: into the next process's memory, opened by cudaIpcOpenMemHandle (legacy) or cuMemMap (vmm)",
    )
    p.add_argument("--shape", action="append", default=[], help="threads:unroll:blocks_per_sm:store_cs:loads_first")
    p.add_argument("--json", type=str, default=None)
    args = p.parse_args(argv)
    need("bench_copy_patterns.py")
    R, row_bytes = args.ranks, args.hidden * 2
    slot_full, per_region = routing(R, args.tokens, args.experts, args.topk)
    T_all = R * args.tokens
    region_rows = int(per_region.max())
    recv = int(per_region.sum())
    sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
    comm, me, procs = None, 0, 1
    if args.ipc and not args.mpi:
        raise SystemExit("--ipc needs --mpi")
    if args.mpi:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        me, procs = comm.Get_rank(), comm.Get_size()
        if R % procs:
            raise SystemExit(f"--ranks {R} must be a multiple of the {procs} MPI processes")
    # This process's tokens (all of them unless --mpi) and its share of the SMs.
    mine = slice(me * T_all // procs, (me + 1) * T_all // procs)
    slot_np = slot_full[mine]
    T = slot_np.shape[0]
    sms_mine = max(1, sms // procs)
    bw = copy_bandwidth_gbs(1 << 30) if me == 0 else 0.0  # alone on the GPU: the others wait here
    if comm is not None:
        bw = comm.bcast(bw)

    rng = np.random.default_rng(1)
    x = cupy.asarray(rng.integers(-8, 9, size=(T, args.hidden)).astype(np.float32)).astype(cupy.float32)
    x_bf16 = (x.view(cupy.uint32) >> 16).astype(cupy.uint16)  # exact: small integers
    slot = cupy.asarray(slot_np)
    regions = cupy.empty((R * region_rows, args.hidden), dtype=cupy.uint16)
    if args.ipc:
        # Every process writes and reads the next process's regions through a CUDA IPC mapping instead of its
        # own (same sizes, same access pattern): what the HT kernels do to peers sharing the GPU.
        rt = cupy.cuda.runtime
        nbytes = regions.nbytes
        nxt, prv = (me + 1) % procs, (me - 1) % procs
        if args.ipc == "legacy":
            own = rt.malloc(nbytes)  # raw cudaMalloc: the handle then covers exactly this allocation
            handles = comm.allgather(bytes(rt.ipcGetMemHandle(own)))
            peer_ptr = rt.ipcOpenMemHandle(handles[nxt], rt.cudaIpcMemLazyEnablePeerAccess)
        else:  # vmm: cuMemCreate, the descriptor passed over a Unix socket, cuMemMap in the importer
            from epkern.memory import vmm

            dev = cupy.cuda.Device().id
            own_map = vmm.Mapping(nbytes, dev)
            fd = own_map.export_fd()
            fds = vmm.share_fds(comm.allgather, me, fd, sorted({nxt, prv} - {me}))
            peer_map = vmm.Mapping(nbytes, dev, fd=fds[nxt])
            peer_ptr = peer_map.ptr
        mem = cupy.cuda.UnownedMemory(peer_ptr, nbytes, owner=None)
        regions = cupy.ndarray(regions.shape, dtype=cupy.uint16, memptr=cupy.cuda.MemoryPointer(mem, 0))
    out = cupy.empty((T, args.hidden), dtype=cupy.uint16)
    # expected gather output: each token's rows summed = x * number of regions it went to
    fan = cupy.asarray((slot_np >= 0).sum(1).astype(np.float32))[:, None]
    want_gather = ((x * fan).view(cupy.uint32) >> 16).astype(cupy.uint16)
    rows_d = [cupy.asarray(np.nonzero(slot_np[:, d] >= 0)[0]) for d in range(R)]
    first_row = [int(slot_np[:, d][slot_np[:, d] >= 0].min(initial=region_rows)) % region_rows for d in range(R)]

    def check_scatter():
        for d in range(R):
            lo = d * region_rows + first_row[d]
            got = regions[lo : lo + len(rows_d[d])]
            assert bool((got == x_bf16[rows_d[d]]).all()), f"scatter region {d} wrong"

    split = max(1, args.split)
    streams = [cupy.cuda.Stream(non_blocking=True) for _ in range(split)] if split > 1 else []
    parts = [slice(i * T // split, (i + 1) * T // split) for i in range(split)]

    def launch(fn, kind, grid, threads, src, dst):
        """One launch over this process's tokens, or `split` launches of a part each on their own streams."""
        if split == 1:
            fn((grid,), (threads,), (np.int32(T), src, slot, dst, np.int64(region_rows)))
            return
        main = cupy.cuda.get_current_stream()
        ready = main.record()
        for stream, part in zip(streams, parts, strict=True):
            stream.wait_event(ready)
            a, b = (src[part], dst) if kind == "scatter" else (src, dst[part])
            n = np.int32(part.stop - part.start)
            with stream:
                fn((max(1, grid // split),), (threads,), (n, a, slot[part], b, np.int64(region_rows)))
            main.wait_event(stream.record())

    def timed_us(call):
        if comm is None:
            return event_median_us(call, iters=10, warmup=2)
        times = []
        for _ in range(12):
            comm.Barrier()
            t0 = time.perf_counter()
            call()
            cupy.cuda.get_current_stream().synchronize()
            comm.Barrier()
            times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times[2:])

    def defines_of(threads, unroll, cs, first):
        return dict(
            EPK_NUM_RANKS=R,
            EPK_ROW_BYTES=row_bytes,
            EPK_THREADS=threads,
            EPK_UNROLL=unroll,
            EPK_STORE_CS=cs,
            EPK_LOADS_FIRST=first,
        )

    fill = kernel_loader.get_function(KERNEL, "epk_bench_scatter", defines_of(512, 4, 0, 0))
    results = []
    floor = {"scatter": int((slot_full >= 0).any(1).sum()) + recv, "gather": recv + T_all}
    shapes = [tuple(int(v) for v in sh.split(":")) for sh in args.shape] or list(
        itertools.product((512, 1024), (2, 4, 8), (1, 2), (0, 1), (0, 1))
    )
    for kind, (threads, unroll, blocks_per_sm, cs, first) in itertools.product(("scatter", "gather"), shapes):
        if kind == "scatter" and first:
            continue
        if threads * blocks_per_sm > 2048 or (kind == "gather" and first and unroll > 4):
            continue
        defines = defines_of(threads, unroll, cs, first)
        fn = kernel_loader.get_function(KERNEL, f"epk_bench_{kind}", defines)
        grid = sms_mine * blocks_per_sm
        if kind == "scatter":
            regions.fill(0xFFFF)

            def call(fn=fn, grid=grid, threads=threads):
                launch(fn, "scatter", grid, threads, x_bf16, regions)

            call()
            check_scatter()
        else:
            # the gather reads the rows this process's scatter wrote (every process has its own regions)
            launch(fill, "scatter", sms_mine, 512, x_bf16, regions)
            out.fill(0xFFFF)

            def call(fn=fn, grid=grid, threads=threads):
                launch(fn, "gather", grid, threads, regions, out)

            call()
            assert bool((out == want_gather).all()), f"gather wrong {defines}"
        us = timed_us(call)
        floor_us = floor[kind] * row_bytes / (bw * 1e9) * 1e6
        res = dict(
            kind=kind,
            threads=threads,
            unroll=unroll,
            blocks_per_sm=blocks_per_sm,
            store_cs=cs,
            loads_first=first,
            us=us,
            floor_us=floor_us,
            ratio=floor_us / us,
            split=split,
            procs=procs,
        )
        results.append(res)
        if me == 0:
            print(json.dumps(res), flush=True)
    if me != 0:
        return
    print(f"copy bandwidth {bw:.0f} GB/s; rows read+written: scatter {floor['scatter']}, gather {floor['gather']}")
    for kind in ("scatter", "gather"):
        best = max((r for r in results if r["kind"] == kind), key=lambda r: r["ratio"])
        print(f"best {kind}: {best}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(copy_bandwidth_GBps=bw, results=results), indent=1))


if __name__ == "__main__":
    main()
