"""Baseline for the multi-GPU benchmarks (issue #6): the same rows as bench/bench_ht.py moved with
``torch.distributed.all_to_all_single`` over NCCL, one process per GPU — what a user would pick instead of epkern.

    torchrun --nproc-per-node 8 bench/bench_a2a_nccl.py --tokens 4096 --hidden 7168 --topk 8 --experts 256
    mpiexec -n 8 python3 bench/bench_a2a_nccl.py ...        # Open MPI / MPICH rank variables are understood

Inputs come from bench/_workload.py as for bench_ht.py (same seeds), so both move the same rows:
dispatch sends each token once to every rank holding one of its experts (rows grouped by destination, token
order within a group); combine sends the received rows back and sums them per token. Reported per op (CUDA
events, median over iterations after warm-up, a collective before each, the maximum over ranks):

- ``dispatch_a2a``: the all-to-all alone (send rows already grouped by destination);
- ``dispatch``: gathering the rows into destination order (``index_select``) + the all-to-all;
- ``combine_a2a``: the reverse all-to-all alone;
- ``combine``: the reverse all-to-all + the per-token sum (``index_add_`` in float32, then BF16).

Logical GB/s as in bench_ht.py (DeepEP's convention): received rows × row bytes per rank / time. NVLink
multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1, forced).
The received rows are checked byte for byte against every source's rows before anything is timed. Needs
PyTorch with CUDA and one GPU per process: NCCL refuses two ranks on one GPU. Not yet run (written while no
multi-GPU machine was lent); its pure-Python parts are tested by tests/test_bench_a2a_cpu.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import need  # noqa: E402
from _workload import add_workload_args, ht_rank_inputs  # noqa: E402

# Before torch or NCCL start: multicast objects can take a shared host's GPUs out of service.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NO_MULTICAST)

OPS = ("dispatch_a2a", "dispatch", "combine_a2a", "combine")
_RANK_VARS = (  # (rank, world size, local rank) as launchers name them
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
)


def a2a_plan(topk_idx: np.ndarray, num_experts: int, num_ranks: int):
    """Rows one rank sends: (send_index int64 [n], send_counts int64 [R]). Token t goes once to every rank d
    that owns one of its selected experts (as ``is_token_in_rank``); the rows are grouped by d ascending,
    tokens ascending within a group, and ``send_index`` lists the source token of each row."""
    e_loc = num_experts // num_ranks
    in_rank = np.zeros((topk_idx.shape[0], num_ranks), dtype=bool)
    t, k = np.nonzero(topk_idx >= 0)
    in_rank[t, topk_idx[t, k] // e_loc] = True
    groups = [np.nonzero(in_rank[:, d])[0] for d in range(num_ranks)]
    return np.concatenate(groups).astype(np.int64), np.array([g.size for g in groups], dtype=np.int64)


def rows_of(x: np.ndarray, fp8: bool) -> np.ndarray:
    """The bytes each dispatched row carries: BF16 rows as int16 bit patterns (torch takes int16 from numpy
    everywhere), or e4m3 bytes followed by float32 scales."""
    if not fp8:
        return x.view(np.int16)
    from epkern import reference as ref

    data, scales = ref.per_token_cast_to_fp8(x)
    return np.ascontiguousarray(np.concatenate([data.view(np.uint8), scales.astype(np.float32).view(np.uint8)], 1))


def expected_recv(rank: int, world: int, tokens: int, hidden: int, experts: int, topk: int, fp8: bool):
    """What ``rank`` must receive: every source's rows for it, sources ascending (all_to_all_single's order)."""
    parts = []
    for s in range(world):
        x, idx, _ = ht_rank_inputs(s, tokens, hidden, experts, topk)
        index, counts = a2a_plan(idx, experts, world)
        begin = int(counts[:rank].sum())
        parts.append(rows_of(x, fp8)[index[begin : begin + int(counts[rank])]])
    return np.concatenate(parts)


def row_bytes(hidden: int, fp8: bool) -> int:
    """Bytes of one dispatched row: BF16, or e4m3 data + float32 scales per 128 channels."""
    return hidden + hidden // 128 * 4 if fp8 else 2 * hidden


def summarize(per_rank: list[dict], hidden: int, fp8: bool) -> dict:
    R = len(per_rank)
    recv = sum(p["recv_rows"] for p in per_rank)
    out = {k: per_rank[0][k] for k in ("tokens", "device", "world")}
    out.update(ranks=R, hidden=hidden, fp8=fp8, recv_rows_total=recv)
    for op in OPS:
        out[f"{op}_us"] = max(p[f"{op}_us"] for p in per_rank)
        # Combine moves BF16 rows whatever the dispatch dtype, as in bench_ht.py.
        rb = 2 * hidden if op.startswith("combine") else row_bytes(hidden, fp8)
        out[f"{op}_logical_GBps"] = recv / R * rb / (out[f"{op}_us"] * 1e-6) / 1e9
    return out


def _rank_env() -> tuple[int, int, int]:
    for r, w, lr in _RANK_VARS:
        if r in os.environ and w in os.environ:
            return int(os.environ[r]), int(os.environ[w]), int(os.environ.get(lr, os.environ[r]))
    return 0, 1, 0


def rank_main(args, tokens: int) -> dict:
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device())
    x_np, idx_np, w_np = ht_rank_inputs(rank, tokens, args.hidden, args.experts, args.topk)
    send_index, send_counts = a2a_plan(idx_np, args.experts, world)
    counts = torch.from_numpy(send_counts).to(dev)
    every = torch.empty((world, world), dtype=torch.int64, device=dev)
    dist.all_gather_into_tensor(every, counts)
    recv_counts = every[:, rank].tolist()  # rows each source sends here
    send_splits = send_counts.tolist()
    H = args.hidden
    x = torch.from_numpy(rows_of(x_np, args.fp8)).to(dev)
    if not args.fp8:
        x = x.view(torch.bfloat16)
    sidx = torch.from_numpy(send_index).to(dev)
    send = x.index_select(0, sidx)
    recv = torch.empty((sum(recv_counts), x.shape[1]), dtype=x.dtype, device=dev)
    # Combine: BF16 rows back, summed per token.
    ys = torch.zeros((recv.shape[0], H), dtype=torch.bfloat16, device=dev)
    back = torch.empty((send.shape[0], H), dtype=torch.bfloat16, device=dev)
    acc = torch.empty((tokens, H), dtype=torch.float32, device=dev)

    def dispatch_a2a():
        dist.all_to_all_single(recv, send, output_split_sizes=recv_counts, input_split_sizes=send_splits)

    def dispatch():
        torch.index_select(x, 0, sidx, out=send)
        dispatch_a2a()

    def combine_a2a():
        dist.all_to_all_single(back, ys, output_split_sizes=send_splits, input_split_sizes=recv_counts)

    def combine():
        combine_a2a()
        acc.zero_()
        acc.index_add_(0, sidx, back.float())
        return acc.to(torch.bfloat16)

    # Exact before timing: the received rows are every source's rows for this rank, byte for byte.
    dispatch()
    torch.cuda.synchronize()
    got = recv.view(torch.int16 if not args.fp8 else torch.uint8).cpu().numpy()
    want = expected_recv(rank, world, tokens, H, args.experts, args.topk, args.fp8)
    if not np.array_equal(got.view(want.dtype), want):
        raise AssertionError(f"rank {rank}: all_to_all_single delivered other rows than expected")
    fence = torch.zeros(1, device=dev)
    res = {"tokens": tokens, "recv_rows": int(recv.shape[0]), "world": world, "validated": True}
    res["device"] = torch.cuda.get_device_name(dev)
    for op, fn in zip(OPS, (dispatch_a2a, dispatch, combine_a2a, combine), strict=True):
        for _ in range(args.warmup):
            fn()
        times = []
        for _ in range(args.iters):
            dist.all_reduce(fence)  # ranks start together
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) * 1e3)
        res[f"{op}_us"] = statistics.median(times)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p, tokens="4096")
    p.add_argument("--fp8", action="store_true", help="dispatch e4m3 rows with their scales")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", type=str, default=None)
    args = p.parse_args(argv)
    need("bench_a2a_nccl.py", modules=("torch",))

    import torch
    import torch.distributed as dist

    rank, world, local = _rank_env()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    torch.cuda.set_device(local % torch.cuda.device_count())
    dist.init_process_group("nccl", rank=rank, world_size=world)
    results = []
    try:
        for tokens in (int(t) for t in args.tokens.split(",")):
            mine = rank_main(args, tokens)
            every = [None] * world
            dist.all_gather_object(every, mine)
            if rank == 0:
                results.append(summarize(every, args.hidden, args.fp8))
    finally:
        dist.destroy_process_group()
    if rank == 0:
        r0 = results[0]
        print(
            f"NCCL all_to_all_single baseline, {r0['ranks']} processes, {r0['device']}, H={args.hidden} "
            f"top-{args.topk} E={args.experts} {'FP8' if args.fp8 else 'BF16'} dispatch"
        )
        print(f"{'tokens':>7} {'op':>14} {'us':>9} {'GB/s logical':>12}")
        for r in results:
            for op in OPS:
                print(f"{r['tokens']:>7} {op:>14} {r[f'{op}_us']:>9.1f} {r[f'{op}_logical_GBps']:>12.1f}")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
