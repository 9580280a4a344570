"""In-process ranks: one thread per rank, sharing a coordinator.

:func:`run_in_process` is the launcher (works in Jupyter: no signals, no subprocesses)::

    results = run_in_process(fn, 4, *args, ranks_per_node=2, timeout_s=10)   # fn(group, *args)

Failure behaviour — nothing hangs:

- Every collective has a deadline (``timeout_s``, default ``EPKERN_TIMEOUT_S``). A rank that waits longer
  raises :class:`GroupError` naming the ranks that did not arrive and the operation
  ("rank 2 did not reach allgather_bytes #5 within 30.0 s").
- Once any rank fails — its function raised, a deadline passed, a rank returned while others wait for it in
  a collective, or ranks called different collectives at the same step — the group is *aborted*: every rank
  blocked in a collective, and every later collective, raises GroupError at once, naming the cause.
- The launcher then waits for the remaining threads for at most ``timeout_s`` more, abandons any still
  running (they are daemon threads; Python cannot kill a thread), and raises: the first rank's original
  exception (with a note saying which rank), or the GroupError that describes the timeout.

Collectives are matched by their position in each rank's sequence of calls, like MPI; a group object
belongs to one rank (one thread).
"""

from __future__ import annotations

import atexit
import contextlib
import sys
import threading
import time
from collections.abc import Callable, Sequence

from .. import _env
from ..errors import ArgumentError, GroupError
from . import wire
from .base import Group, as_bytes, describe_ranks, gpu_count
from .nodes import check_ranks_per_node, local_hostname, node_map

__all__ = ["ThreadGroup", "make_thread_groups", "run_in_process"]


class _Round:
    __slots__ = ("ops", "values", "arrived", "taken", "done")

    def __init__(self, size: int):
        self.ops: list[str | None] = [None] * size
        self.values: list = [None] * size
        self.arrived = 0
        self.taken = 0
        self.done = False


class _Coordinator:
    """Shared state of the ranks of one in-process group."""

    def __init__(self, size: int, timeout_s: float):
        self.size = size
        self.timeout_s = timeout_s
        self.cond = threading.Condition()
        self.rounds: dict[int, _Round] = {}
        self.exited: set[int] = set()  # ranks whose function has returned (launcher only)
        self.failure: BaseException | None = None  # the first cause
        self.failed_rank: int | None = None
        self.errors: dict[int, BaseException] = {}  # every rank's own (primary) exception

    # ---- failure ----
    def fail(self, exc: BaseException, rank: int | None = None) -> None:
        with self.cond:
            if rank is not None and not getattr(exc, "_epkern_secondary", False):
                self.errors.setdefault(rank, exc)
            if self.failure is None:
                self.failure = exc
                self.failed_rank = rank
            self.cond.notify_all()

    def _describe_failure(self) -> str:
        exc = self.failure
        if isinstance(exc, GroupError):
            return str(exc)
        who = f"rank {self.failed_rank}" if self.failed_rank is not None else "the launcher"
        return f"{who} raised {type(exc).__name__}: {exc}"

    def _abandoned(self, rank: int, op: str, seq: int) -> GroupError:
        err = GroupError(f"rank {rank}: {op} #{seq} abandoned because {self._describe_failure()}")
        err._epkern_secondary = True
        return err

    def mark_exited(self, rank: int) -> None:
        with self.cond:
            self.exited.add(rank)
            self.cond.notify_all()

    # ---- the one primitive: everyone deposits a value, everyone gets the list ----
    def exchange(self, rank: int, seq: int, op: str, value) -> list:
        with self.cond:
            if self.failure is not None:
                raise self._abandoned(rank, op, seq)
            rnd = self.rounds.get(seq)
            if rnd is None:
                rnd = self.rounds[seq] = _Round(self.size)
            rnd.ops[rank] = op
            rnd.values[rank] = value
            rnd.arrived += 1
            if rnd.arrived == self.size:
                if len(set(rnd.ops)) > 1:
                    calls = ", ".join(f"rank {r}: {o}" for r, o in enumerate(rnd.ops))
                    err = GroupError(f"ranks called different collectives at step #{seq} ({calls})")
                    self.fail(err)
                    raise err
                rnd.done = True
                self.cond.notify_all()
            deadline = time.monotonic() + self.timeout_s
            while not rnd.done:
                if self.failure is not None:
                    raise self._abandoned(rank, op, seq)
                missing = [r for r in range(self.size) if rnd.ops[r] is None]
                gone = [r for r in missing if r in self.exited]
                if gone:
                    err = GroupError(
                        f"{describe_ranks(gone)} returned without reaching {op} #{seq} (rank {rank} was waiting in it)",
                        silent_ranks=gone,
                    )
                    self.fail(err)
                    raise err
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    err = GroupError(
                        f"{describe_ranks(missing)} did not reach {op} #{seq} within {self.timeout_s} s "
                        f"(rank {rank} was waiting in it)",
                        silent_ranks=missing,
                    )
                    self.fail(err)
                    raise err
                self.cond.wait(remaining)
            result = list(rnd.values)
            rnd.taken += 1
            if rnd.taken == self.size:
                del self.rounds[seq]
            return result


class ThreadGroup(Group):
    """One rank of an in-process group (made by :func:`make_thread_groups` or :func:`run_in_process`)."""

    kind = "threads"
    is_in_process = True

    def __init__(self, coordinator: _Coordinator, rank: int, device: int | None, nodes):
        self._coord = coordinator
        self._rank = rank
        self._device = device
        self._nodes = nodes
        self._seq = 0

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._coord.size

    @property
    def device(self) -> int | None:
        return self._device

    def stream(self, role: str):
        """This rank's persistent stream for ``role`` (see :func:`rank_stream`)."""
        return rank_stream(self._device, self._rank, role)

    @property
    def timeout_s(self) -> float:
        """Deadline of every collective of this group."""
        return self._coord.timeout_s

    def _exchange(self, op: str, value) -> list:
        self._seq += 1
        return self._coord.exchange(self._rank, self._seq, op, value)

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        return self._exchange("allgather_bytes", as_bytes(data))

    def allgather_object(self, obj) -> list:
        payload = wire.encode(obj)
        return [wire.decode(b, r) for r, b in enumerate(self._exchange("allgather_object", payload))]

    def broadcast_object(self, obj, root: int = 0):
        root = self._check_root(root)
        payload = wire.encode(obj) if self._rank == root else None
        got = self._exchange(f"broadcast_object(root={root})", payload)[root]
        return obj if self._rank == root else wire.decode(got, root)

    def exchange_object(self, obj) -> list:
        """Every rank's ``obj`` itself (no copy), indexed by rank: for sharing device arrays and pointers
        between in-process ranks. The caller owns any synchronisation of what the objects refer to."""
        return self._exchange("exchange_object", obj)

    def barrier(self) -> None:
        self._exchange("barrier", None)

    def abort(self, reason: BaseException | str) -> None:
        """Make every rank's current and later collectives raise GroupError (e.g. from a watchdog)."""
        exc = reason if isinstance(reason, BaseException) else GroupError(str(reason))
        self._coord.fail(exc, self._rank)


def _resolve_devices(num_ranks: int, devices) -> list[int | None]:
    ndev = gpu_count()
    if devices is None:
        return [r % ndev if ndev else None for r in range(num_ranks)]
    if isinstance(devices, int | str | bytes) or not isinstance(devices, Sequence) or len(devices) == 0:
        raise ArgumentError(f"devices: expected a non-empty list of CUDA device ordinals, got {devices!r}")
    for d in devices:
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < ndev:
            have = f"[0, {ndev})" if ndev else "none (no CUDA GPU is visible)"
            raise ArgumentError(f"devices: {d!r} is not a visible CUDA device ordinal; visible: {have}")
    return [devices[r % len(devices)] for r in range(num_ranks)]


def make_thread_groups(
    num_ranks: int,
    *,
    devices: Sequence[int] | None = None,
    ranks_per_node: int | None = None,
    timeout_s: float | None = None,
) -> list[ThreadGroup]:
    """The ``num_ranks`` ThreadGroup objects of one in-process group (index = rank); hand one to each thread.
    :func:`run_in_process` does this and more (failure propagation, device selection per thread)."""
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, int) or num_ranks <= 0:
        raise ArgumentError(f"num_ranks: expected a positive integer, got {num_ranks!r}")
    _env.prepare_cuda_for_in_process_ranks()  # before _resolve_devices starts CUDA
    explicit = check_ranks_per_node(ranks_per_node)
    rpn = explicit if explicit is not None else _env.ranks_per_node()
    timeout = _env.timeout_s() if timeout_s is None else _env.check_timeout(timeout_s, "timeout_s")
    nodes = node_map(
        [local_hostname()] * num_ranks,
        rpn,
        "ranks_per_node" if explicit is not None else "EPKERN_RANKS_PER_NODE",
    )
    devs = _resolve_devices(num_ranks, devices)
    coord = _Coordinator(num_ranks, timeout)
    return [ThreadGroup(coord, r, devs[r], nodes) for r in range(num_ranks)]


_streams: dict = {}  # (device, rank, role) -> cupy Stream, made once per process
_per_rank_lock = threading.Lock()  # guards _streams and _pools


RANK_STREAM_ROLES = ("compute", "comm", "nic")


def rank_stream(device: int, rank: int, role: str):
    """The non-blocking CUDA stream of in-process rank ``rank`` for ``role`` ("compute", "comm", or "nic": the
    copies of the rank's emulated NIC), made once per process and reused by every later run and Buffer; a rank's
    roles are made together, so they take consecutive queues.

    Why reused: in one CUDA context every new stream takes the next of the device's hardware work queues
    (CUDA_DEVICE_MAX_CONNECTIONS of them, round-robin). Two ranks' streams on one queue make a wait on one
    (e.g. the caller's stream waiting for the comm stream's spinning kernel) hold back the other rank's
    next kernel, which that spinning kernel waits for: a deadlock until the device deadline. A fixed set of
    3 streams per rank, made first, keeps them on distinct queues (epkern raises the queue count to 32). The
    emulated NIC's copies had a new stream per NIC thread (per Buffer) before: on the H200, 8 in-process ranks
    over the PROXY route stalled with the NIC's copies waiting (suspected: behind a spinning kernel on a shared
    queue)."""
    import cupy

    if role not in RANK_STREAM_ROLES:
        raise ValueError(f"role: expected one of {RANK_STREAM_ROLES}, got {role!r}")
    key = (device, rank, role)
    with _per_rank_lock:
        stream = _streams.get(key)
        if stream is None:
            with cupy.cuda.Device(device):
                for r in RANK_STREAM_ROLES:
                    if (device, rank, r) not in _streams:
                        _streams[(device, rank, r)] = cupy.cuda.Stream(non_blocking=True)
            stream = _streams[key]
        return stream


@contextlib.contextmanager
def rank_device(device: int | None, rank: int):
    """For the body of an in-process rank's thread: its device current, its own stream current, and a
    memory pool of its own as CuPy's allocator in this thread (see _rank_memory_pool). Streams and pools
    are made once per process and rank; at the end the pool hands its unused memory back to CUDA."""
    if device is None:
        yield
        return
    import cupy
    from cupy.cuda import runtime

    with cupy.cuda.Device(device):
        stream = rank_stream(device, rank, "compute")
        pool, handle = _rank_memory_pool(device, rank)
        previous = cupy.cuda.get_current_stream()
        stream.use()
        try:
            with cupy.cuda.using_allocator(pool.malloc), _torch_on(stream, device):
                yield
        finally:
            try:
                stream.synchronize()
                runtime.memPoolTrimTo(handle, 0)
            except Exception:  # noqa: BLE001 - a failed kernel already raised; cleanup must not mask it
                pass
            previous.use()


@contextlib.contextmanager
def _torch_on(stream, device: int):
    """Where the process has imported torch: the rank's stream as torch's current stream in this thread too
    (torch's current stream is per thread), so a rank given torch tensors runs on its own stream (calls given
    tensors follow torch's current stream) and not on the legacy default stream all ranks would share."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        yield
        return
    with torch.cuda.stream(torch.cuda.ExternalStream(stream.ptr, device=device)):
        yield


_pools: dict = {}  # (device, rank) -> (cupy MemoryAsyncPool, cudaMemPool_t)


@atexit.register
def _release_at_exit() -> None:
    """At interpreter exit, before the modules are torn down: drop the cached rank streams while CuPy can still
    destroy them. Left to module teardown, each stream's destructor failed and printed "Error in sys.excepthook" (24
    times after an 8-rank in-process GPU test file: 8 ranks x 3 roles; not yet run on a GPU). Streams only:
    ``cudaStreamDestroy`` returns at once even with work queued, where freeing memory (a pool's, a workspace's)
    waits for the device, and a kernel that never ends would then hang the exit."""
    with _per_rank_lock:
        _streams.clear()


def _rank_memory_pool(device: int, rank: int):
    """A stream-ordered memory pool (cudaMallocAsync) of this rank alone, made once per process.

    In-process ranks share one CUDA context, and two of CuPy's defaults would couple their streams:
    - a plain cudaMalloc/cudaFree (CuPy's MemoryPool growing or trimming) waits for the whole device, so
      the rank's host thread stops while a peer's kernel spins waiting for a kernel this rank has yet to
      launch;
    - a shared pool may hand this rank memory another rank freed on its stream and make this rank's
      stream wait for that stream (``cudaMemPoolReuseAllowInternalDependencies``), which again makes one
      rank's next kernel wait for a peer's spinning one.
    Either deadlocks the ranks until the device-side deadline. A pool per rank with internal dependencies
    off shares nothing; the release threshold keeps freed memory in the pool instead of trimming it at
    every synchronisation (rank_device trims it when the rank's work ends). Pools are never destroyed:
    arrays from them may outlive the run (returned results) and be freed on any stream later."""
    import cupy
    from cupy.cuda import runtime

    with _per_rank_lock:
        made = _pools.get((device, rank))
        if made is None:
            props = runtime.MemPoolProps(
                runtime.cudaMemAllocationTypePinned,
                runtime.cudaMemHandleTypeNone,
                runtime.cudaMemLocationTypeDevice,
                device,
            )
            handle = runtime.memPoolCreate(props)
            runtime.memPoolSetAttribute(handle, runtime.cudaMemPoolReuseAllowInternalDependencies, 0)
            runtime.memPoolSetAttribute(handle, runtime.cudaMemPoolAttrReleaseThreshold, (1 << 64) - 1)
            handles = ["current"] * runtime.getDeviceCount()
            handles[device] = handle
            made = _pools[(device, rank)] = (cupy.cuda.MemoryAsyncPool(handles), handle)
        return made


def run_in_process(
    fn: Callable,
    num_ranks: int,
    *args,
    devices: Sequence[int] | None = None,
    ranks_per_node: int | None = None,
    timeout_s: float | None = None,
    **kwargs,
) -> list:
    """Run ``fn(group, *args, **kwargs)`` on ``num_ranks`` in-process ranks (one thread each) and return
    the results by rank.

    Each rank's thread makes its device current first (round-robin over the visible GPUs, or over
    ``devices``). ``ranks_per_node`` splits the ranks into virtual nodes (default ``EPKERN_RANKS_PER_NODE``).
    ``timeout_s`` (default ``EPKERN_TIMEOUT_S``) is the deadline of every collective, and how long the
    launcher waits for the other ranks once one has failed. If any rank raises, the first rank's exception is
    re-raised here (with a note naming the rank) after every thread has ended or been abandoned.
    """
    if not callable(fn):
        raise ArgumentError(f"fn: expected a callable taking (group, ...), got {type(fn).__name__}")
    groups = make_thread_groups(num_ranks, devices=devices, ranks_per_node=ranks_per_node, timeout_s=timeout_s)
    coord = groups[0]._coord
    results: list = [None] * num_ranks
    finished: set[int] = set()

    def body(group: ThreadGroup) -> None:
        rank = group.rank
        try:
            with rank_device(group.device, rank):
                results[rank] = fn(group, *args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - reported to the launcher, which re-raises
            coord.fail(exc, rank)
        finally:
            with coord.cond:
                finished.add(rank)
                coord.exited.add(rank)
                coord.cond.notify_all()

    threads = [threading.Thread(target=body, args=(g,), name=f"epkern-rank-{g.rank}", daemon=True) for g in groups]
    try:
        for t in threads:
            t.start()
        with coord.cond:
            grace_end = None
            while len(finished) < num_ranks:
                if coord.failure is not None and grace_end is None:
                    grace_end = time.monotonic() + coord.timeout_s
                if grace_end is not None:
                    remaining = grace_end - time.monotonic()
                    if remaining <= 0:
                        break
                    coord.cond.wait(min(remaining, 1.0))
                else:
                    coord.cond.wait(1.0)  # short waits keep Ctrl-C responsive in the main thread
            abandoned = sorted(set(range(num_ranks)) - finished)
    except BaseException as exc:  # KeyboardInterrupt in Jupyter: stop the ranks' collectives, then re-raise
        coord.fail(exc)
        raise

    if coord.failure is None:
        for t in threads:
            t.join()
        return results
    _raise_failure(coord, num_ranks, abandoned)


def _raise_failure(coord: _Coordinator, num_ranks: int, abandoned: list[int]):
    first = coord.failure
    rank = coord.failed_rank
    if rank is None:  # a collective-level failure (timeout, a rank returned early, mismatch): a GroupError
        exc = first
        note = "epkern.run_in_process: the group was aborted"
    else:
        exc = first
        note = f"epkern.run_in_process: raised on rank {rank} of {num_ranks}"
    others = {r: e for r, e in coord.errors.items() if e is not first}
    if others:  # group identical errors: often every rank fails the same way
        by_text: dict[str, list[int]] = {}
        for r, e in sorted(others.items()):
            by_text.setdefault(f"{type(e).__name__}: {e}", []).append(r)
        first_text = f"{type(first).__name__}: {first}"
        note += "; " + "; ".join(
            f"{describe_ranks(rs)} raised {'the same' if text == first_text else text}" for text, rs in by_text.items()
        )
    if abandoned:
        note += f"; {describe_ranks(abandoned)} still running after {coord.timeout_s} s, abandoned (daemon threads)"
    exc.add_note(note)
    raise exc
