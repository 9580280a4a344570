"""Process groups: who the ranks are, where they live, and the few host collectives epkern needs.

Backends: mpi4py (:class:`MPIGroup`), torch.distributed (:class:`TorchGroup`), in-process threads
(:class:`ThreadGroup`, launched by :func:`run_in_process`), and :class:`SingleGroup` (one rank). mpi4py and
torch are imported only when their backend is used; ``import epkern.group`` needs neither.

:func:`as_group` turns what a user passes as ``group=`` into a :class:`Group`.
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
    else a one-rank :class:`SingleGroup`."""
    return mpi_world() or torch_world() or SingleGroup()


def as_group(group) -> Group:
    """A :class:`Group` from an epkern group (returned as is), an mpi4py communicator, a torch.distributed
    ProcessGroup, or None (:func:`world`)."""
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
