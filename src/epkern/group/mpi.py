"""mpi4py backend: a group over an MPI intra-communicator (imported only when used).

Making an :class:`MPIGroup` is collective (it gathers every rank's hostname). Collectives run on the given
communicator itself, in the order the ranks call them.

Deadlines: MPI collectives cannot be interrupted from Python, so a rank that never arrives blocks the
others; ``EPKERN_TIMEOUT_S`` does not apply here. A rank that *dies* makes ``mpiexec`` end the job; a rank
whose Python code raises should call ``MPI_Abort``: run scripts as ``mpiexec -n N python -m mpi4py
script.py`` (mpi4py then aborts the whole job on an uncaught exception instead of leaving the other ranks
waiting), and use ``mpiexec``'s own timeout (``MPIEXEC_TIMEOUT`` for MPICH's hydra) or ``timeout(1)``.
"""

from __future__ import annotations

import os
import sys

from ..errors import ArgumentError, GroupError
from .base import Group, as_bytes
from .nodes import local_entry, node_map_from_entries

# Set by launchers for each rank: MPICH/hydra and Intel MPI (PMI_*), Open MPI (OMPI_*), PMIx (Slurm, ...).
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")
_RANK_VARS = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")


def launched_by_mpiexec() -> bool:
    """Whether this process looks like one rank of an MPI job (any size)."""
    return any(v in os.environ for v in _SIZE_VARS + _RANK_VARS)


def mpiexec_size() -> int | None:
    """World size announced by the MPI launcher, if it announces one."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        raw = os.environ.get(var, "").strip()
        if raw.isdigit():
            return int(raw)
    return None


def is_mpi_comm(obj) -> bool:
    """Whether ``obj`` is an mpi4py communicator (without importing mpi4py if nobody has)."""
    mod = sys.modules.get("mpi4py.MPI")
    return mod is not None and isinstance(obj, mod.Comm)


class MPIGroup(Group):
    kind = "mpi"
    is_in_process = False

    def __init__(self, comm=None):
        from mpi4py import MPI

        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Comm) or comm == MPI.COMM_NULL:
            raise ArgumentError(f"group: expected a valid mpi4py communicator, got {comm!r}")
        if comm.Is_inter():
            raise ArgumentError("group: expected an intra-communicator, got an mpi4py Intercomm")
        self._comm = comm
        self._MPI = MPI
        self._rank = comm.Get_rank()
        self._size = comm.Get_size()
        self._nodes = node_map_from_entries(comm.allgather(local_entry()))

    @property
    def comm(self):
        """The mpi4py communicator."""
        return self._comm

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    @property
    def device(self) -> int | None:
        """Host-local rank modulo the number of visible GPUs (hostname-based, so virtual nodes on one
        machine still spread over all of its GPUs); None without a GPU."""
        return self._device_by_host_local_rank()

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        import numpy as np

        data = as_bytes(data)
        sizes = self._comm.allgather(len(data))
        offsets = [0]
        for n in sizes:
            offsets.append(offsets[-1] + n)
        recv = np.empty(offsets[-1], np.uint8)
        send = np.frombuffer(data, np.uint8) if data else np.empty(0, np.uint8)
        self._comm.Allgatherv(send, [recv, sizes, offsets[:-1], self._MPI.BYTE])
        raw = recv.tobytes()
        return [raw[offsets[r] : offsets[r + 1]] for r in range(self._size)]

    def allgather_object(self, obj) -> list:
        return self._comm.allgather(obj)

    def broadcast_object(self, obj, root: int = 0):
        return self._comm.bcast(obj, root=self._check_root(root))

    def barrier(self) -> None:
        self._comm.Barrier()


def mpi_world() -> Group | None:
    """COMM_WORLD as a group when this process is one of several MPI ranks, else None."""
    size = mpiexec_size()
    if size is not None and size <= 1:
        return None
    if size is None and not launched_by_mpiexec():
        mod = sys.modules.get("mpi4py.MPI")  # someone else started MPI
        if mod is None or not mod.Is_initialized() or mod.COMM_WORLD.Get_size() <= 1:
            return None
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise GroupError(
            f"this process was started by an MPI launcher (size {size or '?'}) but mpi4py cannot be imported "
            f"({exc}); install it (pip install 'epkern[mpi]') or pass a group explicitly"
        ) from None
    if MPI.COMM_WORLD.Get_size() <= 1:
        return None
    return MPIGroup(MPI.COMM_WORLD)
