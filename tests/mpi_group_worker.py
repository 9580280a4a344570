"""One rank of tests/test_group_mpi.py: ``mpiexec -n 4 python tests/mpi_group_worker.py MODE``.

Modes: ``plain`` (one host), ``virtual`` (EPKERN_RANKS_PER_NODE=2 set by the test), ``hosts``
(EPKERN_HOSTNAME set per rank with mpiexec's MPMD syntax: ranks 0-1 "hostA", 2-3 "hostB"), ``bad-rpn``
(EPKERN_RANKS_PER_NODE=3: every rank must raise the same ConfigError, none may hang).
Prints "OK rank <r>" when every check passed.
"""

from __future__ import annotations

import sys

import numpy as np


def payload(rank: int, step: int) -> bytes:
    sizes = [0, 1, 1000, 1 << 20]
    return np.random.default_rng(100 * step + rank).bytes(sizes[rank % 4] + step)


def main(mode: str) -> None:
    from epkern.errors import ConfigError
    from epkern.group import MPIGroup, as_group

    if mode == "silent":
        silent_rank_mode()
        return
    if mode == "late":
        late_rank_mode()
        return
    if mode == "bad-rpn":
        from mpi4py import MPI

        try:
            as_group(MPI.COMM_WORLD)
        except ConfigError as exc:
            assert "EPKERN_RANKS_PER_NODE=3" in str(exc), exc
            print(f"OK rank {MPI.COMM_WORLD.Get_rank()}", flush=True)
            return
        raise AssertionError("expected ConfigError for EPKERN_RANKS_PER_NODE=3 with 4 ranks")

    assert "mpi4py" not in sys.modules
    group = as_group(None)  # must pick COMM_WORLD under mpiexec
    from mpi4py import MPI

    assert isinstance(group, MPIGroup) and group.kind == "mpi" and not group.is_in_process, group
    assert group.comm == MPI.COMM_WORLD
    r, n = group.rank, group.size
    assert (r, n) == (MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()) and n == 4

    expect_nodes = {"plain": (0, 0, 0, 0), "virtual": (0, 0, 1, 1), "hosts": (0, 0, 1, 1)}[mode]
    expect_local = {"plain": (0, 1, 2, 3), "virtual": (0, 1, 0, 1), "hosts": (0, 1, 0, 1)}[mode]
    assert group.node_of_rank == expect_nodes, group.node_of_rank
    assert group.local_rank_of_rank == expect_local, group.local_rank_of_rank
    assert group.node == expect_nodes[r] and group.local_rank == expect_local[r]
    assert group.num_nodes == max(expect_nodes) + 1
    assert group.local_size == expect_nodes.count(expect_nodes[r])
    assert group.ranks_on_node(group.node) == tuple(i for i in range(n) if expect_nodes[i] == group.node)
    if mode == "hosts":
        assert group.hostnames == ("hostA", "hostA", "hostB", "hostB"), group.hostnames
    assert group.device is None or isinstance(group.device, int)

    for step in range(3):
        got = group.allgather_bytes(payload(r, step))
        assert got == [payload(i, step) for i in range(n)], f"allgather_bytes step {step}"
    assert group.allgather_bytes(b"") == [b""] * n
    assert group.allgather_object({"rank": r, "arr": np.arange(r)}) is not None
    objs = group.allgather_object(("x", r))
    assert objs == [("x", i) for i in range(n)], objs
    assert group.broadcast_object(f"from {r}", root=1) == "from 1"
    group.barrier()

    # A sub-communicator: ranks are relative to it; as_group(comm) wraps it.
    sub = as_group(MPI.COMM_WORLD.Split(color=r % 2, key=r))
    assert sub.size == 2 and sub.rank == r // 2, (sub.rank, sub.size)
    assert sub.allgather_object(r) == [r % 2, r % 2 + 2]
    sub.barrier()
    group.barrier()
    print(f"OK rank {r}", flush=True)


def late_rank_mode() -> None:
    """Rank 3 makes its group 2x the deadline late: the others raise GroupError within the deadline + 2 s instead of
    waiting for it (the group's communicator duplicate is non-blocking and bounded too)."""
    import time

    from mpi4py import MPI

    from epkern import _env
    from epkern.errors import GroupError
    from epkern.group import MPIGroup

    rank, timeout = MPI.COMM_WORLD.Get_rank(), _env.timeout_s()
    if rank == 3:
        time.sleep(2 * timeout)
    start = time.monotonic()
    try:
        MPIGroup()
    except GroupError as exc:
        took = time.monotonic() - start
        assert took < timeout + 2, took
        print(f"rank {rank}: raised after {took:.2f} s: {exc}", flush=True)
        print(f"OK rank {rank}", flush=True)
        return
    raise AssertionError(f"rank {rank}: made a group although rank 3 came {2 * timeout} s late")


def silent_rank_mode() -> None:
    """Rank 2 stops answering (it sleeps past twice the deadline, as a hung or dead rank would): the others raise
    GroupError naming it within the deadline (EPKERN_TIMEOUT_S, set by the test), every later collective raises at
    once, and the survivors make a group of themselves (MPIGroup.subgroup) and run collectives on it. (A SIGKILLed
    rank: MPICH 5.0.2's hydra ended the whole job even with -disable-auto-cleanup, so it is not run here.)"""
    import time

    from epkern.errors import GroupError
    from epkern.group import MPIGroup

    group = MPIGroup()
    assert group.allgather_object(group.rank) == list(range(group.size))
    if group.rank == 2:
        time.sleep(2 * group.timeout_s + 1)
        print("OK rank 2 (silent)", flush=True)
        return
    start = time.monotonic()
    try:
        group.barrier()
    except GroupError as exc:
        took = time.monotonic() - start
        assert "rank 2 did not reach barrier" in str(exc), exc
        assert took < group.timeout_s + 2, took
        print(f"rank {group.rank}: raised after {took:.2f} s: {exc}", flush=True)
    else:
        raise AssertionError("barrier with a dead rank returned")
    try:
        group.allgather_bytes(b"x")
    except GroupError as exc:
        assert "failed group" in str(exc), exc
    else:
        raise AssertionError("a collective on a failed group returned")
    survivors = group.subgroup([0, 1, 3])
    assert survivors.size == 3 and survivors.rank == [0, 1, None, 2][group.rank]
    got = survivors.allgather_bytes(payload(group.rank, 1))
    assert got == [payload(r, 1) for r in (0, 1, 3)]
    survivors.barrier()
    print(f"OK rank {group.rank}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "plain")
