"""The GPU runtime one Buffer's parts share: device, symmetric region, comm stream and its ordering with the
caller's stream, the host-mapped error record and every host-side wait's deadline, output allocation, and
kernel launches (with the collective first-use warm-up).

It knows nothing of HT or LL: the LL engine registers a handler for the errors it survives
(``recoverable_phases`` / ``on_recoverable``).
"""

from __future__ import annotations

import os
import weakref

import numpy as np

from .. import _cuda, _log, api_checks, kernel_loader
from .. import kernel_constants as K
from ..errors import ArgumentError, EpkernError, GroupError, TimeoutError
from ..events import EventHandle
from ..memory import Heap, HostMapped, SymmetricRegion
from ..memory.heap import packed_offsets
from .capture import capturing
from .ll.layout import ll_area_bytes
from .phases import PHASES

# Host waits for GPU work end this long after the device-side deadline (timeout_s) has passed.
HOST_MARGIN_S = 5.0
ERROR_RECORD_BYTES = 32
CTRL_BYTES = K.get("EPK_CTRL_BYTES")
ERR_TIMEOUT = K.get("EPK_ERR_CODE_TIMEOUT")  # ErrorRecord.code of a peer that did not answer


def _freer(region, rt):
    """The free function of a RegionLease: closes ``region`` and the runtime's host words (looked up when it runs:
    they are made after the lease). Holds no reference to the lease or its views."""

    def free():
        host = rt.host
        rt.host = None
        if host is not None:
            host.close()
        region.close()

    return free


class _CommStreamScope:
    """Runtime.on_comm_stream's context (a class: a generator-based context manager cost a few µs per call)."""

    __slots__ = ("rt", "device", "previous")

    def __init__(self, rt):
        self.rt = rt

    def __enter__(self):
        import cupy

        rt = self.rt
        self.device = cupy.cuda.Device(rt.device)
        self.device.__enter__()
        self.previous = cupy.cuda.get_current_stream()
        rt.join_direct()
        return rt.comm_stream.use()

    def __exit__(self, *exc):
        try:
            self.previous.use()
        finally:
            self.device.__exit__(*exc)
        return False


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists (another user's, or not signalable)
        return True
    return True


class RegionLease:
    """What every view into a Buffer's memory keeps alive (HT outputs and handles through their heap blocks, LL
    views directly): the region and the host words are freed when the runtime has let go of its lease (destroy)
    and the last such view is gone, so a view kept past destroy() never reads freed (reused) memory."""

    __slots__ = ("_finalizer", "__weakref__")

    def __init__(self, free):
        self._finalizer = weakref.finalize(self, free)
        self._finalizer.atexit = False  # at interpreter exit the process's memory goes with it: no CUDA calls then


class Runtime:
    """Per rank and Buffer. Region = control area (CTRL_BYTES) + HT heap (num_nvl_bytes) + LL area + HT RDMA area
    (groups across nodes)."""

    def __init__(
        self,
        group,
        num_nvl_bytes: int,
        num_rdma_bytes: int,
        low_latency_mode: bool,
        timeout_s: float,
        poison: bool,
        ht_area_bytes: int = 0,
    ):
        import cupy

        self.closed = True
        self.group = group
        self.rank, self.num_ranks = group.rank, group.size
        self.timeout_s = float(timeout_s)
        self.poison = poison
        self.in_process = bool(getattr(group, "is_in_process", False))
        self.device = group.device if group.device is not None else cupy.cuda.Device().id
        self.broken: str | None = None
        self.describe_peer = None  # fn(peer) -> what this rank's NIC did for it (appended to timeouts), or None
        self.recoverable_phases: frozenset = frozenset()
        self.on_recoverable = None  # fn(code, rank, phase, peer, seen, expected), set by the LL engine
        self.phases = dict(PHASES)
        self.calls = 0  # HT kernels launched: each gets the next number (diagnostics, notify's host word)
        self.graph_held: list = []  # what captured calls allocated: a graph replays into it (alloc_out)
        self._warmed: set = set()
        self._launch_cache: dict = {}  # (source, name, defines items) -> [kernel, warmed]
        self._last_defines: dict = {}  # source -> defines of its last launch (read_ht_probe)
        with cupy.cuda.Device(self.device):
            dev = cupy.cuda.Device(self.device)
            self.num_device_sms = dev.attributes["MultiProcessorCount"]
            # Ranks sharing this physical GPU (MPS processes or in-process ranks) must all fit at once.
            seen = group.allgather_object((group.hostnames[self.rank], dev.pci_bus_id, os.getpid()))
            ids = [s[:2] for s in seen]
            self.ranks_per_gpu = sum(1 for i in ids if i == ids[self.rank])
            # Processes of this host's peers (another process's pid; None for in-process ranks or other hosts).
            self.peer_pids = [
                s[2] if s[0] == group.hostnames[self.rank] and s[2] != os.getpid() else None for s in seen
            ]
            # LL area (num_rdma_bytes) after the control area and the HT heap; the heap is unchanged.
            self.ll_bytes = ll_area_bytes(num_rdma_bytes, low_latency_mode)
            self.ll_offset = CTRL_BYTES + -(-num_nvl_bytes // 256) * 256
            end = self.ll_offset + self.ll_bytes if self.ll_bytes else CTRL_BYTES + num_nvl_bytes
            # HT across nodes (issue #18): the HT RDMA area (ht_inter_layout.py) last.
            self.ht_area_bytes = -(-int(ht_area_bytes) // 256) * 256
            self.ht_area_offset = -(-end // 256) * 256 if self.ht_area_bytes else 0
            region_bytes = self.ht_area_offset + self.ht_area_bytes if self.ht_area_bytes else end
            self.region = SymmetricRegion(group, region_bytes, self.device)
            self.closed = False
            self.host = None
            self.lease = RegionLease(_freer(self.region, self))
            try:
                self.heap = Heap(self.region.ptr + CTRL_BYTES, num_nvl_bytes, keep=self.lease)
                self.host = HostMapped(ERROR_RECORD_BYTES + 4 * K.get("EPK_HT_NOTIFY_OUT_WORDS"))
                self.error_record = self.host.view(np.int32, 0, 8)
                self.notify_out = self.host.view(np.int32, ERROR_RECORD_BYTES)
                self.notify_out_ptr = self.host.device_ptr + ERROR_RECORD_BYTES
                self.timeout_ns = int(self.timeout_s * 1e9)
                self._deadline = {"err": self.host.device_ptr, "timeout_ns": self.timeout_ns}
                self.tickets = cupy.zeros(4, dtype=np.uint32)
                # In-process ranks reuse one comm stream per rank (see epkern.group.threads.rank_stream).
                stream_of = getattr(group, "stream", None) if self.in_process else None
                self.comm_stream = stream_of("comm") if stream_of else cupy.cuda.Stream(non_blocking=True)
                # Stream order of the Buffer's work (LL calls replayed straight onto the caller's stream): the last
                # such launch's stream, while nothing followed it on the comm stream; the stream after all of it.
                self.direct_stream = None
                self.joined_ptr = None
                self.peer_table = self.region.peer_table
            except BaseException:
                self.release()  # nothing ran on the region yet: no peer writes it
                raise
        # This rank's share of the device's SMs: what a kernel of every rank sharing the GPU may use at once.
        self.sm_share = max(1, self.num_device_sms // self.ranks_per_gpu)

    def register_phases(self, descriptions: dict, recoverable=frozenset(), handler=None) -> None:
        """Error-record phases another part's kernels report: their descriptions, and those the Buffer survives
        (``handler(code, rank, phase, peer, seen, expected)`` raises for them, after the record is cleared)."""
        self.phases.update(descriptions)
        if recoverable:
            self.recoverable_phases = frozenset(recoverable)
            self.on_recoverable = handler

    def launched_direct(self, stream) -> None:
        """A launch went straight onto ``stream`` (a caller's): the next comm-stream work waits for it."""
        self.direct_stream = stream

    def deadline(self) -> dict:
        """The deadline arguments every kernel takes: the error record and the timeout in ns (one dict, read-only)."""
        return self._deadline

    # ---- lifecycle ----
    def destroy(self, quiesce=None) -> None:
        """Frees everything (idempotent). Collective: every rank calls it. ``quiesce()`` runs once this rank's work
        has ended, before the barrier after which peers free their memory (the LL PROXY route's threads stop there)."""
        if self.closed:
            return
        import cupy

        self.closed = True
        with cupy.cuda.Device(self.device):
            if not self._comm_idle_bounded():
                # A kernel that never ends still runs on our memory: leave it allocated, say so, do not hang.
                raise TimeoutError(
                    f"rank {self.rank}: destroy: the Buffer's GPU work did not finish within "
                    f"{self.timeout_s + HOST_MARGIN_S:g} s (a kernel that never ends); its memory is left allocated"
                )
            if quiesce is not None:
                quiesce()
            try:
                self.group.barrier()  # no peer still reads or writes our region
            except GroupError as exc:
                # A peer that did not arrive may still be writing into this memory: freeing it would hand it to
                # the next allocation. It stays allocated (a leak, said here) and the failure is raised, unless every
                # peer that did not arrive is a process of this host that has ended (it writes nothing any more).
                if self._all_gone(exc.silent_ranks):
                    _log.get_logger().warning(
                        "rank %d: destroy: %s; ranks %s have ended, freeing the memory",
                        self.rank,
                        exc,
                        exc.silent_ranks,
                    )
                    self.release()
                    return
                raise GroupError(
                    f"rank {self.rank}: destroy: {exc}; the Buffer's memory is left allocated, since a peer that "
                    "did not reach destroy may still write into it"
                ) from None
            self.release()

    def _all_gone(self, ranks) -> bool:
        """Whether ``ranks`` (not None, not empty) are all processes of this host that no longer exist."""
        if not ranks:
            return False
        for r in ranks:
            pid = self.peer_pids[r] if 0 <= r < len(self.peer_pids) else None
            if pid is None or _process_exists(pid):
                return False
        return True

    def release(self) -> None:
        """Let go of the region and the host-mapped words, without asking the peers (construction failures;
        destroy() after its barrier): they are freed now, or when the last view into them is gone."""
        self.closed = True
        self.heap = None
        lease, self.lease = self.lease, None
        del lease  # the last reference unless views are alive: RegionLease frees it then

    def _comm_idle_bounded(self) -> bool:
        def idle() -> bool:
            try:
                return bool(self.comm_stream.done)
            except Exception:  # noqa: BLE001 - a failed kernel must not stop the cleanup
                return True

        return idle() or self.poll_until(idle, 50, False)

    # ---- errors ----
    def check_usable(self) -> None:
        if self.closed or self.broken or self.error_record[0]:  # one test on the hot path
            self._check_usable_slow()

    def _check_usable_slow(self) -> None:
        if self.closed:
            raise EpkernError("Buffer was destroyed")
        self.raise_recorded()
        if self.broken:
            raise EpkernError(f"Buffer unusable after an earlier failure ({self.broken}); destroy() it")

    def raise_recorded(self) -> None:
        if self.host is None:  # freed: destroy() waited for this Buffer's work first
            return
        rec = self.error_record
        if rec[0] == 0 or rec[1] == 0:  # code 0: claimed, fields still being written (the code is stored last)
            return
        code, rank, phase, peer, seen, expected = (int(v) for v in rec[1:7])
        if phase in self.recoverable_phases:
            self._let_launched_work_end()
            rec[1:7] = 0
            rec[0] = 0  # released last: a later kernel may claim it again
            self.on_recoverable(code, rank, phase, peer, seen, expected)  # raises; the Buffer stays usable
        what = self.phases.get(phase, f"phase {phase}")
        if code == ERR_TIMEOUT:
            msg = (
                f"rank {rank}: {what}: peer {peer} did not answer within {self.timeout_s:g} s "
                f"(flag {seen}, expected {expected})"
            )
            where = self.describe_peer(peer) if self.describe_peer is not None else ""
            msg += f" [{where}]" if where else ""
        else:
            msg = f"rank {rank}: {what}: error code {code} (peer {peer}, value {seen}, limit {expected})"
        self.broken = msg
        raise TimeoutError(msg) if code == ERR_TIMEOUT else EpkernError(msg)

    def _let_launched_work_end(self) -> None:
        """Before a recoverable error record is cleared: wait (bounded) for the work this Buffer launched. While the
        record stays claimed the recording kernel's other waits give up at once; cleared early, a later wait on the
        same silent peer ran its own deadline and recorded again: the next call raised a second time."""
        waitables = []
        for stream in (self.comm_stream, self.direct_stream):  # direct: the last launch onto a caller's stream
            if stream is not None and not capturing(stream):
                waitables.append(stream if stream is self.comm_stream else stream.record())
        for waitable in waitables:
            if not waitable.done:
                self.poll_until(lambda w=waitable: w.done, 50, False)

    def poll_until(self, ready, spins_before_sleep: int, check_record) -> bool:
        """Poll ``ready()`` until it holds (True) or the host deadline passes (False): ``timeout_s`` (every
        device-side wait ends by then) plus ``HOST_MARGIN_S`` (``_cuda.poll_until``). ``check_record``: raise a
        recorded device error while polling (or a function called after each poll instead)."""
        each = self.raise_recorded if check_record is True else check_record or None
        return _cuda.poll_until(ready, self.timeout_s + HOST_MARGIN_S, spins_before_sleep, each)

    def wait_event_bounded(self, event, phase: str) -> None:
        """The host waits for ``event`` (as :meth:`sync_bounded`, raising a recorded device failure while it
        waits), then raises a failure recorded by then."""
        self.sync_bounded(event, phase, True, "the event did not complete")
        self.raise_recorded()

    def sync_bounded(
        self, waitable, phase: str, check_record: bool = False, what: str = "the GPU work of this call did not finish"
    ) -> None:
        """``waitable.synchronize()`` (a stream or an event) bounded by the deadline: work still running
        ``HOST_MARGIN_S`` after every device-side wait has ended is a kernel that never ends: raise TimeoutError
        naming rank and phase and mark the Buffer unusable, rather than hang."""
        if waitable.done or self.poll_until(lambda: waitable.done, 50, check_record):
            return
        self.raise_recorded()  # a device-side error recorded meanwhile explains it better
        msg = (
            f"rank {self.rank}: {phase}: {what} within {self.timeout_s + HOST_MARGIN_S:g} s although every "
            f"device-side wait ends within {self.timeout_s:g} s (a kernel that never ends); the Buffer is unusable"
        )
        self.broken = msg
        raise TimeoutError(msg)

    def wait_host_word(self, word: np.ndarray, value: int, phase: str, check_record=True) -> None:
        """Host-side wait for a host-mapped word written by a kernel, bounded by the deadline (``poll_until``)."""
        if self.poll_until(lambda: int(word[0]) == value, 2000, check_record):
            return
        msg = f"rank {self.rank}: {phase}: no answer from the GPU within the deadline"
        started = int(self.error_record[7])
        if started != value:
            msg += (
                f"; this call's kernel never started (the last one that did was call {started}, this is "
                f"call {value}): other work held the GPU; with in-process ranks, streams sharing a "
                "hardware work queue do this (make the ranks before CUDA starts, which sets "
                "CUDA_DEVICE_MAX_CONNECTIONS=32, and use run_in_process's streams)"
            )
        self.broken = msg
        raise TimeoutError(msg)

    # ---- streams ----
    def begin(self, previous_event, async_finish=False, allocate_on_comm_stream=False):
        """Order the comm stream after the caller's stream (or ``previous_event``); returns the caller's stream."""
        import cupy

        api_checks.stream_args(previous_event, async_finish, allocate_on_comm_stream)
        compute = cupy.cuda.get_current_stream()
        if self.in_process and compute.ptr == 0 and self.num_ranks > 1:
            raise ArgumentError(
                "current stream: in-process ranks must each run on their own CUDA stream, not the shared "
                "legacy default stream (run_in_process sets one; or cupy.cuda.Stream(non_blocking=True).use()). "
                "Note: CuPy 14's ndarray.get()/cupy.asnumpy of a non-contiguous array leaves the legacy stream "
                "current in the calling thread; copy with cupy.ascontiguousarray first"
            )
        if previous_event is not None:
            if previous_event.event is not None:
                self.comm_stream.wait_event(previous_event.event)
        else:
            self.comm_stream.wait_event(compute.record())
        return compute

    def on_comm_stream(self):
        """Make this Buffer's device and comm stream current, restoring the caller's stream object exactly
        afterwards (CuPy's ``with stream`` does not always restore a non-default stream)."""
        return _CommStreamScope(self)

    def join_direct(self) -> None:
        """Before work on the comm stream: it waits for the last launch made straight onto a caller's stream
        (nothing orders the two otherwise); from here no stream is known to follow all of this Buffer's work."""
        direct = self.direct_stream
        if direct is not None:
            self.direct_stream = None
            self.comm_stream.wait_event(direct.record())
        self.joined_ptr = None

    def end(self, compute, async_finish: bool) -> EventHandle:
        import cupy

        event = self.comm_stream.record()
        # compute follows all of this Buffer's work from here. Only a stream of the Buffer's device qualifies
        # (CuPy's current stream is per device, so a match later also means the Buffer's device is current).
        joined = not async_finish and cupy.cuda.runtime.getDevice() == self.device
        self.joined_ptr = compute.ptr if joined else None
        if not async_finish:
            compute.wait_event(event)
            if self.in_process and self.num_ranks > 1 and not capturing(compute):
                # Measured on the H100: with in-process ranks, outputs read on the caller's stream right after a
                # call were sometimes not yet written although that stream waits for this event (MPS processes
                # never showed it; docs/architecture.md, Known problems). Waiting for the comm stream here made
                # 100 back-to-back iterations exact. Not while the caller's stream is captured into a CUDA graph.
                self.sync_bounded(self.comm_stream, "waiting for this call's kernels (in-process ranks)")
                self.raise_recorded()  # this call waited on the host: its own failure raises here
        return EventHandle(event, self)

    def next_call(self) -> int:
        """The next HT kernel's number (recorded as started; notify's host word). Epochs count on the device."""
        self.calls += 1
        return self.calls

    # ---- kernels ----
    def kernel(self, spec, defines: dict):
        """The loaded kernel of one specialisation (cached per call site's define order)."""
        entry = self._launch_cache.get(site := (spec.source, spec.name, tuple(defines.items())))
        if entry is None:
            entry = self._launch_cache[site] = [kernel_loader.get_function(spec.source, spec.name, defines), False]
        return entry

    def launch(self, spec, defines: dict, blocks: int, threads: int, args: tuple) -> None:
        """Launch a (possibly spin-waiting) kernel on the current (comm) stream; ``args`` packed by ``spec`` with
        dry_run 0. A specialisation's first use is a dry run on every rank, a sync and a group barrier: loading code
        can wait for running kernels, so no rank may load while a peer's kernel spins (one shared context)."""
        entry = self._launch_cache.get((spec.source, spec.name, tuple(defines.items())))
        if entry is None or not entry[1]:
            key = (spec.source, spec.name, tuple(sorted(defines.items())))
            if self.in_process and self.num_ranks > 1 and key not in self._warmed:
                self.group.barrier()  # before loading too: a peer's previous kernel may spin on its NIC's copies
            entry = self.kernel(spec, defines)
            if key not in self._warmed:
                if capturing(self.comm_stream):
                    raise ArgumentError(
                        f"{spec.name}: this specialisation ({defines}) is used for the first time inside a CUDA graph "
                        "capture; call it once before capturing (its first launch synchronises and is collective)"
                    )
                entry[0]((1,), (32,), (np.int32(1), *args[1:]))
                self.sync_bounded(self.comm_stream, "first use of a kernel")
                self.group.barrier()
                self._warmed.add(key)
            entry[1] = True
        self._last_defines[spec.source] = defines
        entry[0]((blocks,), (threads,), args)

    def is_warm(self, spec, defines: dict) -> bool:
        """Whether this specialisation had its first-use warm-up (``launch``) on this Buffer."""
        entry = self._launch_cache.get((spec.source, spec.name, tuple(defines.items())))
        if entry is not None and entry[1]:
            return True
        return (spec.source, spec.name, tuple(sorted(defines.items()))) in self._warmed

    def warm_once(self, key) -> bool:
        """First time ``key`` is seen: sync the comm stream and barrier (code loaded before any peer spins)."""
        if key in self._warmed:
            return False
        self.sync_bounded(self.comm_stream, "first use of a kernel")
        self.group.barrier()
        self._warmed.add(key)
        return True

    def last_defines(self, source: str) -> dict | None:
        return self._last_defines.get(source)

    def alloc_out(
        self, nbytes_list, compute, on_comm_stream: bool, shared: bool = True, captured: bool = False, typed=None
    ):
        """uint8 output arrays (``typed``: a (shape, dtype) per size instead). ``shared``: peers write them, so between
        processes they live in the shared heap; else from the rank's CuPy pool, on the current stream (the comm
        stream, or a direct replay's) or (DeepEP's default) ``compute``'s. ``captured`` (an HT call inside a
        capture): from the heap (no CUDA allocation there), held for the Buffer's life (replays write them)."""
        import cupy

        forms = typed if typed is not None else [((n,), np.uint8) for n in nbytes_list]
        keep = ()
        if (shared and not self.in_process) or captured:
            offsets, total = packed_offsets(nbytes_list)
            block = self.heap.alloc(total)
            arrays = [block.array(shape, dtype, off) for (shape, dtype), off in zip(forms, offsets, strict=True)]
            keep = (block,)
        elif on_comm_stream:
            arrays = [cupy.empty(shape, dtype=dtype) for shape, dtype in forms]
        else:
            compute.use()
            arrays = [cupy.empty(shape, dtype=dtype) for shape, dtype in forms]
            self.comm_stream.use()
            self.comm_stream.wait_event(compute.record())  # the memory is ours in stream order from here
        if captured:
            self.graph_held.append(keep)
        if self.poison:
            for a in arrays:
                self.fill_bytes(a, 0xFF)
        return arrays, keep

    def fill_bytes(self, arr, byte: int) -> None:
        """Every byte of the contiguous device array ``arr`` set to ``byte``, on the current stream (the comm stream's
        or a direct replay's), as a memset: no CuPy kernel, so no module load (which can wait for a spinning peer)."""
        import cupy

        if arr.nbytes:
            cupy.cuda.runtime.memsetAsync(arr.data.ptr, byte, arr.nbytes, cupy.cuda.get_current_stream().ptr)

    def raw_area(self, ll: bool):
        """uint8 CuPy view of this rank's HT heap (``ll=False``) or LL area, keeping the memory (deep_ep's raw view)."""
        import cupy

        self.check_usable()
        if ll:
            ptr, nbytes = self.region.ptr + self.ll_offset, self.ll_bytes
        else:
            ptr, nbytes = self.heap.base_ptr, self.heap.nbytes
        mem = cupy.cuda.UnownedMemory(ptr, nbytes, self.lease) if nbytes else None
        return cupy.ndarray((nbytes,), np.uint8, cupy.cuda.MemoryPointer(mem, 0) if mem else None)

    def in_region(self, arr):
        """``arr`` if it lies in this rank's region, else a copy staged into the heap (and the block to keep)."""
        base, end = self.region.ptr, self.region.ptr + self.region.nbytes
        if base <= arr.data.ptr and arr.data.ptr + arr.nbytes <= end:
            return arr, []
        block = self.heap.alloc(arr.nbytes)
        staged = block.array(arr.shape, arr.dtype)
        staged[...] = arr
        return staged, [block]
