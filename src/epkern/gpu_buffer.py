"""The GPU Buffer: lifecycle, streams, error records, and the intranode high-throughput operations.

One Buffer per rank. Its symmetric region (control area + output heap) is opened by every rank of the
node; kernels find peers through a device table of region bases. Operations run on a per-Buffer
communication stream ordered after the caller's stream (or ``previous_event``).
"""

from __future__ import annotations

import time

import numpy as np

from . import _env, ht_intranode, kernel_loader, ll_intranode, ll_masks, ll_prepared
from ._validate import check_int
from .buffer import Buffer, EventHandle
from .config import CTRL_BYTES, Config
from .errors import ArgumentError, EpkernError, GroupError, TimeoutError
from .group import as_group
from .memory import Heap, HostMapped, SymmetricRegion

# Host waits for GPU work end this long after the device-side deadline (timeout_s) has passed.
HOST_MARGIN_S = 5.0

PHASES = {
    1: "notify (waiting for a peer's counts)",
    2: "dispatch (waiting for a peer's output addresses)",
    3: "dispatch (waiting for a peer to finish sending)",
    4: "combine (waiting for a peer's input addresses)",
    5: "combine (waiting for a peer to finish reading)",
    6: "dispatch (a destination has fewer output rows than tokens sent: num_worst_tokens too small)",
}
PHASES.update(ll_intranode.LL_PHASES)  # 7.. : the low-latency kernels
ERROR_RECORD_BYTES = 32
MAX_LOCAL_EXPERTS = 1024


def _warm_key(source: str, name: str, full_defines: dict) -> tuple:
    """A specialisation's key in GpuBuffer._warmed (its defines in sorted order)."""
    return (source, name, tuple(sorted(full_defines.items())))


class _CommStreamScope:
    """GpuBuffer.on_comm_stream's context (a class: a generator-based context manager cost a few µs per call)."""

    __slots__ = ("buf", "device", "previous")

    def __init__(self, buf):
        self.buf = buf

    def __enter__(self):
        import cupy

        buf = self.buf
        self.device = cupy.cuda.Device(buf.device)
        self.device.__enter__()
        self.previous = cupy.cuda.get_current_stream()
        buf._join_direct()
        return buf.comm_stream.use()

    def __exit__(self, *exc):
        try:
            self.previous.use()
        finally:
            self.device.__exit__(*exc)
        return False


class GpuBuffer(Buffer):
    backend = "gpu"

    def __init__(
        self,
        group=None,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        *,
        backend: str | None = None,
        timeout_s: float | None = None,
        **_ignored,
    ):
        import cupy

        self._closed = True
        self.group = as_group(group)
        self.rank, self.num_ranks = self.group.rank, self.group.size
        self.num_nvl_bytes = check_int(num_nvl_bytes, "num_nvl_bytes", min_value=0)
        self.num_rdma_bytes = check_int(num_rdma_bytes, "num_rdma_bytes", min_value=0)
        self.low_latency_mode = bool(low_latency_mode)
        if timeout_s is None:
            timeout_s = _env.timeout_s()
        if not (isinstance(timeout_s, int | float) and timeout_s > 0):
            raise ArgumentError(f"timeout_s: expected a positive number of seconds, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self.poison = _env.poison_outputs()
        if self.group.num_nodes != 1:
            raise ArgumentError(
                "group: the GPU Buffer supports ranks on one node so far (got "
                f"{self.group.num_nodes} nodes); use backend='cpu'"
            )
        if self.num_ranks > 8:
            raise ArgumentError(f"group: intranode kernels support up to 8 ranks, got {self.num_ranks}")
        self.device = self.group.device if self.group.device is not None else cupy.cuda.Device().id
        with cupy.cuda.Device(self.device):
            dev = cupy.cuda.Device(self.device)
            self.num_device_sms = dev.attributes["MultiProcessorCount"]
            # Ranks sharing this physical GPU (MPS processes or in-process ranks) must all fit at once.
            ids = self.group.allgather_object((self.group.hostnames[self.rank], dev.pci_bus_id))
            self.ranks_per_gpu = sum(1 for i in ids if i == ids[self.rank])
            # LL area (num_rdma_bytes) after the control area and the HT heap; the heap is unchanged.
            self.ll_bytes = ll_intranode.ll_area_bytes(self.num_rdma_bytes, self.low_latency_mode)
            self.ll_offset = CTRL_BYTES + -(-self.num_nvl_bytes // 256) * 256
            region_bytes = self.ll_offset + self.ll_bytes if self.ll_bytes else CTRL_BYTES + self.num_nvl_bytes
            self.region = SymmetricRegion(self.group, region_bytes, self.device)
            self._closed = False
            self.heap = Heap(self.region.ptr + CTRL_BYTES, self.num_nvl_bytes)
            self.in_process = bool(getattr(self.group, "is_in_process", False))
            self.host = HostMapped(ERROR_RECORD_BYTES + 4 * (8 + 8 + MAX_LOCAL_EXPERTS))
            # (error record, timeout in ns) that every kernel takes: fixed for the Buffer's life
            self._deadline = (np.uintp(self.host.device_ptr), np.uint64(int(self.timeout_s * 1e9)))
            self.error_record = self.host.view(np.int32, 0, 8)
            self.notify_out = self.host.view(np.int32, ERROR_RECORD_BYTES)
            self.tickets = cupy.zeros(4, dtype=np.uint32)
            # In-process ranks reuse one comm stream per rank (see epkern.group.threads.rank_stream).
            stream_of = getattr(self.group, "stream", None) if self.in_process else None
            self.comm_stream = stream_of("comm") if stream_of else cupy.cuda.Stream(non_blocking=True)
            # Stream order of the Buffer's work (LL calls replayed straight onto the caller's stream,
            # ll_intranode._replay): the stream of the last such launch, while nothing came after it on the
            # comm stream; and the stream that is ordered after all of this Buffer's work (None: no stream).
            self._direct_stream = None
            self._joined_ptr = None
            self.peer_table = self.region.peer_table
            ll_intranode.init_low_latency(self)
        self.epoch = 0
        # SMs per HT kernel: 24 on a GPU of its own (DeepEP-like; the rest stays for compute); ranks sharing a GPU
        # (MPS processes or in-process ranks standing in for several GPUs) each take their share of all of it.
        # This rank's share of the device's SMs: what a kernel of every rank sharing the GPU may use at once.
        self.sm_share = max(1, self.num_device_sms // self.ranks_per_gpu)
        self.num_sms = min(24, self.sm_share) if self.ranks_per_gpu == 1 else self.sm_share
        self._broken: str | None = None
        self._warmed: set = set()
        # (source, name, defines items) -> [kernel, defines with EPK_CTRL_BYTES, warmed (in _warmed)]
        self._launch_cache: dict = {}
        # Launch shape of the HT copy kernels (tuned by bench/bench_ht.py; see docs/performance.md): threads
        # per block, blocks per SM of num_sms (the kernels are compiled to fit that many per SM), loads in
        # flight per lane, and whether combine issues every peer's loads before adding (loads_first).
        self.ht_threads, self.ht_blocks_per_sm = 512, 1
        self.ht_dispatch_unroll, self.ht_combine_unroll, self.ht_combine_loads_first = 4, 1, 1
        # Diagnostic build of the HT copy kernels recording phase timestamps (read_ht_probe); 0 in use.
        self.ht_probe = 0
        self._last_defines: dict = {}  # source -> defines of its last launch (for read_ht_probe)
        self.group.barrier()

    # ---- lifecycle ----
    def destroy(self) -> None:
        """Frees everything (idempotent). Collective: every rank calls it."""
        if self._closed:
            return
        import cupy

        self._closed = True
        plans = getattr(self, "_ll_plans", None)
        if plans is not None:
            plans.clear()  # the replay plans hold the caller's arrays
        with cupy.cuda.Device(self.device):
            if not self._comm_idle_bounded():
                # A kernel that never ends still runs on our memory: freeing it would hand it to whatever is
                # allocated next. Leave it allocated and say so rather than hang here.
                raise TimeoutError(
                    f"rank {self.rank}: destroy: the Buffer's GPU work did not finish within "
                    f"{self.timeout_s + HOST_MARGIN_S:g} s (a kernel that never ends); its memory is left allocated"
                )
            try:
                self.group.barrier()  # no peer still reads or writes our region
            except GroupError:
                pass
            self.region.close()
            self.host.close()

    def _comm_idle_bounded(self) -> bool:
        """True once the comm stream is idle (or failed: nothing runs on it any more), False when work still runs
        past the host deadline (destroy's bounded stand-in for ``comm_stream.synchronize()``)."""

        def idle() -> bool:
            try:
                return bool(self.comm_stream.done)
            except Exception:  # noqa: BLE001 - a failed kernel must not stop the cleanup
                return True

        return idle() or self._poll_until(idle, 50, False)

    def set_num_sms(self, num_sms: int) -> None:
        self.num_sms = check_int(num_sms, "num_sms", min_value=1, max_value=self.sm_share)

    def ht_grid(self, config) -> int:
        """Blocks of one HT copy kernel: num_sms (the config's or the Buffer's, at most this rank's share of the
        device's SMs) times ht_blocks_per_sm, so that every rank sharing the GPU is resident at once."""
        if config is not None:
            check_int(config.num_sms, "config.num_sms", min_value=1)
        sms = min(config.num_sms if config is not None else self.num_sms, self.sm_share)
        return max(1, sms) * self.ht_blocks_per_sm

    def get_dispatch_config(self, num_ranks: int | None = None) -> Config:
        return Config(num_sms=self.num_sms)

    get_combine_config = get_dispatch_config

    # ---- errors ----
    def _check_usable(self) -> None:
        if self._closed or self._broken or self.error_record[0]:  # one test on the hot path
            self._check_usable_slow()

    def _check_usable_slow(self) -> None:
        if self._closed:
            raise EpkernError("Buffer was destroyed")
        self._raise_recorded()
        if self._broken:
            raise EpkernError(f"Buffer unusable after an earlier failure ({self._broken}); destroy() it")

    def _raise_recorded(self) -> None:
        rec = self.error_record
        if rec[0] == 0:
            return
        if int(rec[3]) in ll_intranode.LL_RECOVERABLE_PHASES:
            ll_masks.raise_recoverable(self)  # a silent peer (masked) or bad indices: raise, stay usable
        code, rank, phase, peer, seen, expected = (int(v) for v in rec[1:7])
        what = PHASES.get(phase, f"phase {phase}")
        if code == 1:
            msg = (
                f"rank {rank}: {what}: peer {peer} did not answer within {self.timeout_s:g} s "
                f"(flag {seen}, expected {expected})"
            )
        else:
            msg = f"rank {rank}: {what}: error code {code} (peer {peer}, value {seen}, limit {expected})"
        self._broken = msg
        raise TimeoutError(msg) if code == 1 else EpkernError(msg)

    def _poll_until(self, ready, spins_before_sleep: int, check_record: bool) -> bool:
        """Poll ``ready()`` until it holds (True) or the host deadline passes (False): ``timeout_s`` (every
        device-side wait ends by then) plus ``HOST_MARGIN_S``. ``check_record``: raise a recorded device error
        while polling. After ``spins_before_sleep`` polls, sleep 20 µs between them (other in-process ranks need
        the GIL to launch what this rank may wait for; spares the CPU)."""
        deadline = time.monotonic() + self.timeout_s + HOST_MARGIN_S
        spins = 0
        while not ready():
            if check_record:
                self._raise_recorded()
            spins += 1
            if spins > spins_before_sleep:
                time.sleep(20e-6)
            if time.monotonic() > deadline:
                return False
        return True

    def _sync_bounded(self, stream, phase: str) -> None:
        """``stream.synchronize()`` bounded by the deadline: work still running ``HOST_MARGIN_S`` after every
        device-side wait has ended is a kernel that never ends (a bug, e.g. a warp deadlocked on itself): raise
        TimeoutError naming rank and phase and mark the Buffer unusable, rather than hang."""
        if stream.done or self._poll_until(lambda: stream.done, 50, False):
            return
        self._raise_recorded()  # a device-side error recorded meanwhile explains it better
        msg = (
            f"rank {self.rank}: {phase}: the GPU work of this call did not finish within "
            f"{self.timeout_s + HOST_MARGIN_S:g} s although every device-side wait ends within "
            f"{self.timeout_s:g} s (a kernel that never ends); the Buffer is unusable"
        )
        self._broken = msg
        raise TimeoutError(msg)

    def _wait_host_word(self, word: np.ndarray, value: int, phase: str) -> None:
        """Host-side wait for a host-mapped word written by a kernel, bounded by the deadline."""
        if self._poll_until(lambda: int(word[0]) == value, 2000, True):
            return
        msg = f"rank {self.rank}: {phase}: no answer from the GPU within the deadline"
        started = int(self.error_record[7])
        if started != value:
            msg += (
                f"; this call's kernel never started (the last one that did was call {started}, this is "
                f"call {value}): other work held the GPU; with in-process ranks, streams sharing a "
                "hardware work queue do this (import epkern before CUDA starts, which sets "
                "CUDA_DEVICE_MAX_CONNECTIONS=32, and use run_in_process's streams)"
            )
        self._broken = msg
        raise TimeoutError(msg)

    # ---- streams ----
    def _begin(self, previous_event, async_finish=False, allocate_on_comm_stream=False):
        import cupy

        if allocate_on_comm_stream and (previous_event is None or not async_finish):
            raise ArgumentError(
                "allocate_on_comm_stream: True needs previous_event and async_finish=True (as in DeepEP): "
                "outputs owned by the comm stream are only safe to use after waiting on the returned event"
            )
        compute = cupy.cuda.get_current_stream()
        if self.in_process and compute.ptr == 0 and self.num_ranks > 1:
            raise ArgumentError(
                "current stream: in-process ranks must each run on their own CUDA stream, not the shared "
                "legacy default stream (run_in_process sets one; or cupy.cuda.Stream(non_blocking=True).use()). "
                "Note: CuPy 14's ndarray.get()/cupy.asnumpy of a non-contiguous array leaves the legacy stream "
                "current in the calling thread; copy with cupy.ascontiguousarray first"
            )
        if previous_event is not None:
            if not isinstance(previous_event, EventHandle):
                raise ArgumentError("previous_event: expected an EventHandle returned by this library")
            if previous_event.event is not None:
                self.comm_stream.wait_event(previous_event.event)
        else:
            self.comm_stream.wait_event(compute.record())
        return compute

    def on_comm_stream(self):
        """Make this Buffer's device and comm stream current, restoring the caller's stream object
        exactly afterwards (CuPy's ``with stream`` does not always restore a non-default stream)."""
        return _CommStreamScope(self)

    def _join_direct(self) -> None:
        """Before work on the comm stream: it waits for the last launch made straight onto a caller's stream
        (nothing orders the two otherwise); from here no stream is known to follow all of this Buffer's work."""
        direct = self._direct_stream
        if direct is not None:
            self._direct_stream = None
            self.comm_stream.wait_event(direct.record())
        self._joined_ptr = None

    def _end(self, compute, async_finish: bool) -> EventHandle:
        import cupy

        event = self.comm_stream.record()
        # compute follows all of this Buffer's work from here. Only a stream of the Buffer's device qualifies
        # (CuPy's current stream is per device, so a match later also means the Buffer's device is current).
        joined = not async_finish and cupy.cuda.runtime.getDevice() == self.device
        self._joined_ptr = compute.ptr if joined else None
        if not async_finish:
            compute.wait_event(event)
            if self.in_process and self.num_ranks > 1 and not ll_intranode.capturing(compute):
                # Measured on the H100: with in-process ranks, outputs read on the caller's stream right
                # after a call were sometimes not yet written although that stream waits for this event
                # (MPS processes never showed it; cause not found yet, docs/architecture.md). Waiting for the
                # comm stream here made 100 back-to-back iterations exact. Costs the host/device overlap
                # of in-process ranks only; async_finish=True keeps it asynchronous. Not while the caller's
                # stream is captured into a CUDA graph (a sync there would invalidate the capture).
                self._sync_bounded(self.comm_stream, "waiting for this call's kernels (in-process ranks)")
        return EventHandle(event)

    def _next_epoch(self) -> int:
        self.epoch += 1
        return self.epoch

    def _deadline_args(self):
        return self._deadline

    def _launch(self, source: str, name: str, defines: dict, blocks: int, threads: int, args: tuple) -> None:
        """Launch a (possibly spin-waiting) kernel on the comm stream. The first use of a specialisation
        is a dry run on every rank, a sync and a group barrier: with CUDA's lazy loading, loading a
        kernel's code can wait for running kernels, so a rank must never load code while a peer's kernel
        spins waiting for it (in-process ranks share one context)."""
        import cupy

        # Call sites build their defines in a fixed order, so the unsorted items find this specialisation's
        # kernel without re-sorting and re-resolving it on every call.
        site = (source, name, tuple(defines.items()))
        entry = self._launch_cache.get(site)
        if entry is None:
            full = {**defines, "EPK_CTRL_BYTES": CTRL_BYTES}
            entry = self._launch_cache[site] = [kernel_loader.get_function(source, name, full), full, False]
        func, full, warmed = entry
        self._last_defines[source] = full
        if not warmed:
            key = _warm_key(source, name, full)
            if key not in self._warmed:
                func((1,), (32,), (np.int32(1), *args))
                for dtype, value in ((np.int64, -1), (np.int32, -1), (np.float32, 0), (np.uint8, 0xFF)):
                    cupy.full(4, value, dtype=dtype)  # CuPy's fill kernels used on the comm path (uint8: poisoning)
                self.comm_stream.synchronize()
                self.group.barrier()
                self._warmed.add(key)
            entry[2] = True
        func((blocks,), (threads,), (np.int32(0), *args))

    def _is_warm(self, source: str, name: str, defines: dict) -> bool:
        """Whether this specialisation had its first-use warm-up (``_launch``) on this Buffer."""
        entry = self._launch_cache.get((source, name, tuple(defines.items())))
        if entry is not None and entry[2]:
            return True
        return _warm_key(source, name, {**defines, "EPK_CTRL_BYTES": CTRL_BYTES}) in self._warmed

    def read_ht_probe(self, source: str):
        """Phase timestamps (ns, the GPU's global timer) of the last launch of HT kernel ``source``
        ("ht_dispatch.cu" / "ht_combine.cu") built with ``ht_probe = 1``: int64 [blocks, 4] of start, peers'
        entries received, copies done, every peer done (the last block's; 0 elsewhere). Syncs the comm stream."""
        import cupy

        defines = self._last_defines.get(source)
        if defines is None or not defines.get("EPK_PROBE"):
            raise ArgumentError(f"source: no launch of {source} with ht_probe = 1 on this Buffer")
        self.comm_stream.synchronize()
        ptr = kernel_loader.get_module(source, defines).get_global("epk_probe")
        blocks = self.ht_grid(None)
        raw = cupy.ndarray((1024, 4), dtype=np.uint64, memptr=ptr)[:blocks].get().astype(np.int64)
        return raw

    def _alloc_out(self, nbytes_list, compute, on_comm_stream: bool, shared: bool = True):
        """uint8 output arrays. ``shared``: peers write them, so between processes they live in the shared
        heap; inside one process every rank can address every allocation, so they come from the rank's
        CuPy pool like local outputs, allocated on the comm stream or (DeepEP's default) the caller's."""
        import cupy

        keep = ()
        if shared and not self.in_process:
            aligned = [-(-n // 256) * 256 for n in nbytes_list]
            block = self.heap.alloc(sum(aligned))
            arrays, off = [], 0
            for n, a in zip(nbytes_list, aligned, strict=True):
                arrays.append(block.array((n,), np.uint8, off))
                off += a
            keep = (block,)
        elif on_comm_stream:
            arrays = [cupy.empty(n, dtype=np.uint8) for n in nbytes_list]
        else:
            compute.use()
            arrays = [cupy.empty(n, dtype=np.uint8) for n in nbytes_list]
            self.comm_stream.use()
            self.comm_stream.wait_event(compute.record())  # the memory is ours in stream order from here
        if self.poison:
            for a in arrays:
                a.fill(0xFF)
        return arrays, keep

    dispatch = ht_intranode.dispatch
    combine = ht_intranode.combine
    get_dispatch_layout = ht_intranode.get_dispatch_layout
    low_latency_dispatch = ll_intranode.low_latency_dispatch
    low_latency_combine = ll_intranode.low_latency_combine
    get_next_low_latency_combine_buffer = ll_intranode.get_next_low_latency_combine_buffer
    clean_low_latency_buffer = ll_masks.clean_low_latency_buffer
    low_latency_update_mask_buffer = ll_masks.low_latency_update_mask_buffer
    low_latency_query_mask_buffer = ll_masks.low_latency_query_mask_buffer
    low_latency_clean_mask_buffer = ll_masks.low_latency_clean_mask_buffer
    prepare_low_latency_dispatch = ll_prepared.prepare_low_latency_dispatch
    prepare_low_latency_combine = ll_prepared.prepare_low_latency_combine

    def get_low_latency_rdma_size_hint(self, num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts):
        from . import reference

        return reference.get_low_latency_rdma_size_hint(
            num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts
        )
