"""mpi4py backend: a group over an MPI intra-communicator (imported only when used).

Making an :class:`MPIGroup` is collective (it duplicates the communicator and gathers every rank's
hostname). Collectives run in the order the ranks call them, on the duplicate (the user's own messages on the
given communicator never mix with epkern's).

Deadlines: a blocking MPI collective cannot be interrupted, so epkern's collectives are built from
non-blocking point-to-point messages polled against a deadline (``timeout_s``, default ``EPKERN_TIMEOUT_S``):
a rank that never arrives, or died, makes the others raise :class:`GroupError` naming it, and the group is
unusable after that (every later collective raises the same error at once). Whether the survivors' processes
live on after a rank dies is the launcher's choice: Open MPI 4 keeps them with ``mpirun --enable-recovery``, Open
MPI 5 with ``mpirun --with-ft ulfm`` (tests/test_group_mpi.py runs the kill scenarios under Open MPI 4.1). MPICH's
hydra ends the job when a rank dies; ``mpiexec -disable-auto-cleanup`` is meant to keep it, but with the mpich
5.0.2 wheel the survivors were still killed in most runs (measured: 2 runs in 3, also with survivors that made no
MPI call), so do not rely on it there. The survivors then make a group of themselves with
:meth:`MPIGroup.subgroup`.
"""

from __future__ import annotations

import os
import sys

from ..errors import ArgumentError, GroupError
from .base import Group, as_bytes, describe_ranks
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

    def __init__(self, comm=None, timeout_s: float | None = None):
        from mpi4py import MPI

        from .. import _env

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
        self._timeout_s = _env.timeout_s() if timeout_s is None else _env.check_timeout(timeout_s, "timeout_s")
        self._p2p = self._dup_bounded(comm)  # epkern's messages only
        self._seq = 0
        self._failure: GroupError | None = None
        self._nodes = node_map_from_entries(self.allgather_object(local_entry()))

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

    def _dup_bounded(self, comm):
        """``comm.Dup()`` as the non-blocking Idup polled against the deadline (a rank that never makes its group
        must not hang the others here either)."""
        import time

        new, req = comm.Idup()
        deadline = time.monotonic() + self._timeout_s
        while not req.Test():
            if time.monotonic() > deadline:
                raise GroupError(
                    f"rank {self._rank}: making the group: not every rank of the communicator arrived within "
                    f"{self._timeout_s:g} s"
                )
            time.sleep(0.0005)
        return new

    @property
    def timeout_s(self) -> float:
        """Deadline of every collective of this group."""
        return self._timeout_s

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        return self._exchange("allgather_bytes", as_bytes(data))

    def barrier(self) -> None:
        self._exchange("barrier", b"")

    def subgroup(self, ranks) -> MPIGroup:
        """A group of ``ranks`` (of this group; ascending) only, made by those ranks alone (MPI_Comm_create_group):
        how the survivors of a failed rank carry on. Every rank in ``ranks`` calls it; ranks are renumbered."""
        ranks = sorted({int(r) for r in ranks})
        if not ranks or ranks[0] < 0 or ranks[-1] >= self._size or self._rank not in ranks:
            raise ArgumentError(
                f"ranks: expected ranks of this group of {self._size} including {self._rank}, got {ranks}"
            )
        comm = self._comm.Create_group(self._comm.Get_group().Incl(ranks))
        return MPIGroup(comm, timeout_s=self._timeout_s)

    def _exchange(self, op: str, data: bytes) -> list[bytes]:
        """Every rank's ``data``: a non-blocking send to each peer and probes for each peer's message until all
        arrived or the deadline; the tag cycles with the collective's sequence number (per-peer order is kept)."""
        import time

        MPI = self._MPI
        if self._failure is not None:
            raise GroupError(
                f"rank {self._rank}: {op} on a failed group ({self._failure})", silent_ranks=self._failure.silent_ranks
            )
        self._seq += 1
        seq, tag = self._seq, self._seq % 32000
        comm, rank = self._p2p, self._rank
        out: list = [None] * self._size
        out[rank] = data
        sends = [comm.Isend([data, MPI.BYTE], dest=r, tag=tag) for r in range(self._size) if r != rank]
        pending = [r for r in range(self._size) if r != rank]
        deadline = time.monotonic() + self._timeout_s
        status = MPI.Status()
        pause = 0.0
        while pending:
            for r in list(pending):
                if comm.Iprobe(source=r, tag=tag, status=status):
                    buf = bytearray(status.Get_count(MPI.BYTE))
                    comm.Recv([buf, MPI.BYTE], source=r, tag=tag)
                    out[r] = bytes(buf)
                    pending.remove(r)
                    pause = 0.0
            if pending:
                if time.monotonic() > deadline:
                    why = f"{describe_ranks(pending)} did not reach {op} #{seq} within {self._timeout_s:g} s"
                    self._fail(why, sends, pending)
                time.sleep(pause)
                pause = min(0.001, pause + 0.00002)
        while not MPI.Request.Testall(sends):  # a peer that took our message and died: ours may never complete
            if time.monotonic() > deadline:
                self._fail(f"{op} #{seq}: peers stopped receiving (rank(s) gone?)", sends)
            time.sleep(0.0001)
        return out

    def _fail(self, why: str, sends, silent=None) -> None:
        # The unfinished sends stay posted: cancelling a send to a dead process can end this one (MPICH).
        self._dead_sends = sends
        self._failure = GroupError(f"rank {self._rank}: {why}", silent_ranks=silent)
        raise self._failure


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
