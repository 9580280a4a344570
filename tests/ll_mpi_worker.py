"""LL scenarios across processes (CUDA IPC) on one GPU through MPS, one process per rank:

    mpiexec -n 4 python tests/ll_mpi_worker.py            # the cases below, exact
    mpiexec -n 4 python tests/ll_mpi_worker.py --absent   # the last rank stops; the others raise once, go on
    mpiexec -n 8 python tests/ll_mpi_worker.py --proxy=4  # virtual nodes of 4 ranks, PROXY route (hybrid on)
    mpiexec -n 8 python tests/ll_mpi_worker.py --proxy-nohybrid=2   # ... every other rank over the PROXY route
    mpiexec -n 8 python tests/ll_mpi_worker.py --rdma=4  # ... the RDMA route (GPU-written WQEs; --rdma-nohybrid=2)
    mpiexec -n 4 python tests/ll_mpi_worker.py --absent-rdma=2  # rank 3 goes silent behind the RDMA route

The --proxy cases (issue #17): --proxy=4 and --proxy-nohybrid=2 exact on the H200 (2026-12-07).

MPS must run first (bash scripts/mps.sh start; export CUDA_MPS_PIPE_DIRECTORY), as for tests/ht_mpi_worker.py.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("EPKERN_POISON_OUTPUTS", "1")  # unwritten output rows fail the exact comparison

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ll_scenarios  # noqa: E402
from epkern import Buffer  # noqa: E402
from epkern.group import as_group  # noqa: E402


def main():
    from mpi4py import MPI

    proxy = [a for a in sys.argv[1:] if a.startswith(("--proxy", "--rdma", "--absent-"))]
    if proxy:  # virtual nodes: set before the group reads the node map
        os.environ["EPKERN_RANKS_PER_NODE"] = proxy[0].split("=", 1)[1]
    group = as_group(MPI.COMM_WORLD)
    R = group.size
    H, num_max = 2048, 128
    nbytes = ll_scenarios.ll_buffer_bytes(num_max, 7168, R, 8 * R)
    absent = [a for a in sys.argv[1:] if a == "--absent" or a.startswith("--absent-")]
    if absent:
        # --absent: every peer over IPC; --absent-proxy=RPN / --absent-rdma=RPN: the last rank, on another virtual
        # node than rank 0, goes silent behind a NIC route (issue #17: a silent remote rank is masked).
        kw = {}
        if absent[0] != "--absent":
            kw["transport"] = absent[0].split("=", 1)[0].removeprefix("--absent-")
        with Buffer(group, num_rdma_bytes=nbytes, low_latency_mode=True, backend="gpu", timeout_s=3, **kw) as buf:
            took = ll_scenarios.run_absent_rank(buf, group, absent_rank=R - 1, hidden=H, num_max=64)
            assert took is None or took < 3 + 10, f"raised after {took:.1f} s"
        print(f"OK rank {group.rank} of {R} absent-rank raised after {took}", flush=True)
        return
    if proxy:
        import ll_proxy_scenarios
        from epkern.gpu.ll.layout import ROUTE_PROXY, ROUTE_RDMA

        transport = "rdma" if proxy[0].startswith("--rdma") else "proxy"
        kind = ROUTE_RDMA if transport == "rdma" else ROUTE_PROXY
        hybrid = "-nohybrid" not in proxy[0]
        kw = dict(num_rdma_bytes=nbytes, low_latency_mode=True, backend="gpu", timeout_s=20, transport=transport)
        with Buffer(group, allow_nvlink_for_low_latency_mode=hybrid, **kw) as buf:
            ll_proxy_scenarios.run_proxy_cases(buf, group, hybrid, kind=kind)
            ll_proxy_scenarios.run_proxy_counters(buf, group, hybrid, kind=kind)
            ll_proxy_scenarios.run_proxy_back_to_back(buf, group)  # eager pairs back to back, then graph replays
        print(f"OK rank {group.rank} of {R} {transport} {proxy[0]}", flush=True)
        return
    if "--graph-zero-copy-recv" in sys.argv:  # the zero_copy_recv graph replays alone (diagnostics)
        with Buffer(group, num_rdma_bytes=nbytes, low_latency_mode=True, backend="gpu", timeout_s=20) as buf:
            ll_scenarios.run_ll_case(buf, group, 100, H, 8 * R, 8, num_max=num_max, zero_copy_recv=True)
            ll_scenarios.run_graph_replays(buf, group, 30, zero_copy_recv=True, zero_copy=True)
            ll_scenarios.run_graph_replays(buf, group, 30, zero_copy_recv=True)
        print(f"OK rank {group.rank} of {R}", flush=True)
        return
    cases = [dict(routing=routing) for routing in ("random", "skewed", "none")] + [
        dict(use_fp8=True),
        dict(use_fp8=True, round_scale=True),
        dict(use_fp8=True, round_scale=True, use_ue8m0=True),
        dict(hook=True, zero_copy=True, prealloc=True),
        dict(hook=True, use_fp8=True, prealloc=True, stats=True),
        dict(async_finish=True, stats=True),
        dict(zero_copy_recv=True),
        dict(zero_copy_recv=True, use_fp8=True, round_scale=True, use_ue8m0=True, hook=True, zero_copy=True),
        dict(zero_copy_recv=True, use_fp8=True, routing="skewed"),
    ]
    with Buffer(group, num_rdma_bytes=nbytes, low_latency_mode=True, backend="gpu", timeout_s=20) as buf:
        ll_scenarios.run_ll_bad_inputs(buf, group)
        for case in cases:
            ll_scenarios.run_ll_case(buf, group, 100, H, 8 * R, 8, num_max=num_max, **case)
            if group.rank == 0:
                print("ok", case, flush=True)
        ll_scenarios.run_ll_case(buf, group, [0, 1, 5, num_max][:R] + [3] * max(0, R - 4), H, 8 * R, 4)
        ll_scenarios.run_ll_case(buf, group, 96, 7168, 8 * R, 8, use_fp8=True)
        ll_scenarios.run_double_batch(buf, group)
        ll_scenarios.run_graph_replays(buf, group, 100)
        ll_scenarios.run_double_batch(buf, group, zero_copy_recv=True)
        ll_scenarios.run_graph_replays(buf, group, 30, zero_copy_recv=True, zero_copy=True)
    print(f"OK rank {group.rank} of {R}", flush=True)


if __name__ == "__main__":
    main()
