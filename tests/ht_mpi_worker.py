"""Run by tests/test_ht_mps.py (and scripts/gpu_check.sh) under `mpiexec -n R`, one process per rank,
all on one GPU through MPS: the HT scenarios with CUDA IPC between processes."""

import os
import sys
from pathlib import Path

os.environ.setdefault("EPKERN_POISON_OUTPUTS", "1")  # unwritten output rows fail the exact comparison

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ht_scenarios  # noqa: E402
from epkern import Buffer, Config  # noqa: E402
from epkern.gpu.tuning import HtTuning, Tuning  # noqa: E402
from epkern.group import as_group  # noqa: E402


def main():
    from mpi4py import MPI

    group = as_group(MPI.COMM_WORLD)
    R = group.size
    nvl = Config.get_nvl_buffer_size_hint(7168 * 2, R, num_max_tokens_per_rank=512, topk=8)
    cases = [
        dict(num_tokens=300, hidden=2048, num_experts=8 * R, topk=4, routing=routing)
        for routing in ("random", "skewed", "empty_rank", "none")
    ] + [
        dict(num_tokens=257, hidden=7168, num_experts=64, topk=8),
        dict(num_tokens=1, hidden=4096, num_experts=32, topk=4),
        dict(num_tokens=0, hidden=4096, num_experts=32, topk=4),
        dict(num_tokens=300, hidden=2048, num_experts=32, topk=8, fp8=True),
        dict(num_tokens=100, hidden=2048, num_experts=32, topk=4, num_worst_tokens=400),
        dict(num_tokens=100, hidden=2048, num_experts=32, topk=4, expert_alignment=16),
    ]
    if "--absent" in sys.argv:
        buf = Buffer(group, num_nvl_bytes=nvl, backend="gpu", timeout_s=3)
        took = ht_scenarios.run_absent_peer(buf, group, absent_rank=R - 1)
        assert took is None or took < 3 + 5, f"raised after {took:.1f} s"
        group.barrier()
        print(f"OK rank {group.rank} of {R} absent-peer raised after {took}", flush=True)
        return
    # --replay-graph (MPS_STEPS "ht:8:replay-graph"): replays launched as one-kernel graphs (HtTuning.replay_graph)
    tuning = Tuning(ht=HtTuning(replay_graph=True)) if "--replay-graph" in sys.argv else None
    with Buffer(group, num_nvl_bytes=nvl, backend="gpu", timeout_s=20, _tuning=tuning) as buf:
        ht_scenarios.run_bad_inputs(buf, group)
        ht_scenarios.run_refused_after_early_copy(buf, group)
        if group.rank == 0:
            print("ok refused after the early copy", flush=True)
        for case in cases:
            ht_scenarios.run_ht_case(buf, group, **case)
            if group.rank == 0:
                print("ok", case, flush=True)
        ht_scenarios.run_fresh_iterations(buf, group, 100)
        replays = ht_scenarios.run_ht_graph(buf, group)
        if group.rank == 0:
            print(f"ok graph capture: {replays} replays exact", flush=True)
        leaked = buf._backend.rt.heap.in_use
        if tuning is not None:
            graphs = sum("graph" in plan.__dict__ for plan in buf._backend.ht.plans._plans.values())
            assert graphs, "no replay went through a graph"
            if group.rank == 0:
                print(f"ok replays as graphs ({graphs} plans)", flush=True)
    print(f"OK rank {group.rank} of {R} heap_in_use_after={leaked}", flush=True)


if __name__ == "__main__":
    main()
