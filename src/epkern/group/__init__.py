"""Process groups: who the ranks are, where they live, and the few host collectives epkern needs.

Backends: mpi4py (:class:`MPIGroup`), torch.distributed (:class:`TorchGroup`), in-process threads
(:class:`ThreadGroup`, launched by :func:`run_in_process`), and :class:`SingleGroup` (one rank). mpi4py and
torch are imported only when their backend is used; ``import epkern.group`` needs neither.

:func:`as_group` turns what a user passes as ``group=`` into a :class:`Group`.

In-process ranks: ``run_in_process(fn, num_ranks, *args, devices=None, ranks_per_node=None, timeout_s=None,
**kwargs)`` calls ``fn(group, *args, **kwargs)`` on ``num_ranks`` threads (one rank each, its GPU current,
round-robin over the visible GPUs or over ``devices``) and returns the results as a list indexed by rank. It
works in Jupyter. Every collective has a deadline (``timeout_s``, default ``EPKERN_TIMEOUT_S``); if a rank
raises, the others are aborted and the first exception is re-raised with a note naming the rank. Example::

    import numpy as np
    import epkern
    from epkern.group import run_in_process

    def rank_main(group):                       # group.rank, group.size, group.device
        with epkern.Buffer(group, backend="cpu") as buf:   # or "gpu" / "auto"
            topk_idx = np.full((8, 1), 2 * group.rank, np.int64)   # 8 tokens, each to this rank's expert 0
            per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, 2 * group.size)
            return per_rank.tolist()

    print(run_in_process(rank_main, 2))         # [[8, 0], [0, 8]]

Under MPI or torch.distributed, pass the communicator or ProcessGroup itself (``epkern.Buffer(MPI.COMM_WORLD)``)
or ``None`` for :func:`world`; ``epkern-launch`` runs a function either way from the command line.
"""

from __future__ import annotations

from ..errors import ArgumentError
from .base import Group, SingleGroup
from .mpi import MPIGroup, is_mpi_comm, mpi_world
from .nodes import NodeMap, node_map
from .threads import ThreadGroup, make_thread_groups, run_in_process
from .torch_dist import TorchGroup, is_torch_group, torch_world

__all__ = [
    "Group",
    "MPIGroup",
    "NodeMap",
    "SingleGroup",
    "ThreadGroup",
    "TorchGroup",
    "as_group",
    "make_thread_groups",
    "node_map",
    "run_in_process",
    "world",
]


def world() -> Group:
    """The group of every rank of this job: mpi4py's COMM_WORLD when this process is one of several MPI
    ranks (mpiexec), else torch.distributed's default group when it is initialised with several ranks,
    else a one-rank :class:`SingleGroup`. What ``epkern.Buffer(None)`` uses.

    Example::

        group = epkern.group.world()            # under `mpiexec -n 4`: rank 0..3 of 4
        print(group.rank, group.size)
    """
    return mpi_world() or torch_world() or SingleGroup()


def as_group(group) -> Group:
    """A :class:`Group` from what a user passes as ``group=`` (``epkern.Buffer`` calls it).

    Args:
        group: an epkern :class:`Group` (returned as is; e.g. the one :func:`run_in_process` hands each rank),
            an mpi4py intra-communicator (wrapped in :class:`MPIGroup`: collective, every rank calls it), a
            torch.distributed ProcessGroup (:class:`TorchGroup`: collective), or None (:func:`world`).
    Returns:
        the :class:`Group`: ``rank``, ``size``, ``device``, ``node_of_rank`` and the host collectives epkern
        uses. Raises ``epkern.ArgumentError`` naming ``group`` for anything else.

    Example::

        from mpi4py import MPI
        group = epkern.group.as_group(MPI.COMM_WORLD)   # same as epkern.Buffer(MPI.COMM_WORLD) does
    """
    if isinstance(group, Group):
        return group
    if group is None:
        return world()
    if is_mpi_comm(group):
        return MPIGroup(group)
    if is_torch_group(group):
        return TorchGroup(group)
    raise ArgumentError(
        "group: expected an epkern Group, an mpi4py communicator, a torch.distributed ProcessGroup or None, "
        f"got {type(group).__module__}.{type(group).__qualname__}"
    )
