"""One rank of tests/test_group_torch.py: ``python tests/torch_group_worker.py RANK WORLD INIT_FILE``.

Initialises torch.distributed (gloo, file:// rendezvous), checks the TorchGroup backend, prints "OK rank r".
"""

from __future__ import annotations

import datetime
import sys

import numpy as np


def main(rank: int, world: int, init_file: str) -> None:
    import torch.distributed as dist

    from epkern.errors import ArgumentError
    from epkern.group import TorchGroup, as_group

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        group = as_group(None)  # torch.distributed initialised, no mpiexec: the default group
        assert isinstance(group, TorchGroup) and group.kind == "torch" and not group.is_in_process, group
        explicit = as_group(dist.group.WORLD)
        assert isinstance(explicit, TorchGroup)
        assert (group.rank, group.size) == (rank, world)
        assert group.node_of_rank == (0,) * world and group.local_rank_of_rank == tuple(range(world))
        assert group.device is None or isinstance(group.device, int)

        for step in range(3):
            mine = np.random.default_rng(10 * step + rank).bytes([0, 1, 5000][(rank + step) % 3])
            want = [np.random.default_rng(10 * step + r).bytes([0, 1, 5000][(r + step) % 3]) for r in range(world)]
            assert group.allgather_bytes(mine) == want, step
        assert group.allgather_object({"r": rank}) == [{"r": r} for r in range(world)]
        assert group.broadcast_object(f"from {rank}", root=world - 1) == f"from {world - 1}"
        try:
            group.broadcast_object(1, root=world)
        except ArgumentError:
            pass
        else:
            raise AssertionError("root out of range accepted")
        group.barrier()

        # A subgroup of one rank per member: ranks are relative to it.
        subs = [dist.new_group([r]) for r in range(world)]
        sub = as_group(subs[rank])
        assert (sub.rank, sub.size) == (0, 1) and sub.allgather_object(rank) == [rank]
        group.barrier()
    finally:
        dist.destroy_process_group()
    print(f"OK rank {rank}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
