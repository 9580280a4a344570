"""HT across virtual nodes (issue #18) as MPS processes: `mpiexec -n 8 python -m mpi4py tests/ht_inter_mpi_worker.py
--rpn=4` (ranks per node; scripts/gpu_check.sh mpsraw step "ht_inter:8:rpn=4"). The scenarios of
tests/ht_inter_scenarios.py, exact, with the NIC counters checked. Exact on an H100 as 4, 8 and 16 MPS processes
(session O)."""

import os
import sys
from pathlib import Path

os.environ.setdefault("EPKERN_POISON_OUTPUTS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ht_inter_scenarios as S  # noqa: E402
import ht_scenarios  # noqa: E402
from epkern import Buffer  # noqa: E402
from epkern.gpu import ht_inter_layout as lay  # noqa: E402
from epkern.group import as_group  # noqa: E402


def main():
    from mpi4py import MPI

    rpn = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--rpn=")]
    os.environ["EPKERN_RANKS_PER_NODE"] = rpn[0] if rpn else "4"  # before the group reads it
    group = as_group(MPI.COMM_WORLD)
    R, N = group.size, group.num_nodes
    area = lay.area_bytes_hint(7168, 8, N, ring=128)
    cases = [
        dict(num_tokens=300, hidden=2048, num_experts=8 * R, topk=4, routing=r)
        for r in ("random", "skewed", "empty_rank", "none")
    ]
    cases += [
        dict(num_tokens=257, hidden=7168, num_experts=64, topk=8),
        dict(num_tokens=1, hidden=4096, num_experts=32, topk=4),
        dict(num_tokens=0, hidden=4096, num_experts=32, topk=4),
        dict(num_tokens=300, hidden=2048, num_experts=32, topk=8, fp8=True),
        dict(num_tokens=100, hidden=2048, num_experts=32, topk=4, num_worst_tokens=400, count=False),
    ]
    alt = [a for a in sys.argv[1:] if a.startswith("--alt")]  # --alt / --alt-drain: only the alternating pairs
    if "--graph" in sys.argv[1:]:  # only HT in a CUDA graph across nodes (session O: not run on a GPU yet)
        with Buffer(group, num_nvl_bytes=256 << 20, num_rdma_bytes=area, backend="gpu", timeout_s=10) as buf:
            replays = ht_scenarios.run_ht_graph(buf, group)
        print(f"OK rank {group.rank} of {R} on {N} nodes (--graph, {replays} replays)", flush=True)
        return
    with Buffer(group, num_nvl_bytes=256 << 20, num_rdma_bytes=area, backend="gpu", timeout_s=10 if alt else 30) as buf:
        if alt:
            hidden = [int(a.split("=", 1)[1]) for a in sys.argv[1:] if a.startswith("--hidden=")]
            S.run_alternating(buf, group, 40, hidden=hidden[0] if hidden else 1024, drain=alt[0] == "--alt-drain")
            print(f"OK rank {group.rank} of {R} on {N} nodes ({alt[0]})", flush=True)
            return
        for case in cases:
            S.run_inter_case(buf, group, **case)
            if group.rank == 0:
                print("ok", case, flush=True)
        S.run_alternating(buf, group, 100)
        S.run_mismatched(buf, group)  # last: its num_worst_tokens case leaves the Buffer failed
    print(f"OK rank {group.rank} of {R} on {N} nodes", flush=True)


if __name__ == "__main__":
    main()
