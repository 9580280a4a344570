"""The PROXY route's host side for one Buffer (issue #17, step 4): NIC, memory registration, one QP per remote peer,
trigger FIFOs in host-mapped memory and the proxy threads. CPU-tested over a fake CuPy; on the H200 (2026-12-07) exact
as 8 MPS processes and 2 or 4 in-process ranks (8 in-process ranks stalled: docs/architecture.md, Known problems).

- NIC: an ``EmulatedNic`` over ``DeviceMemory`` per rank by default (``nic_factory`` makes another; a real mlx5 NIC
  is meant to slot in behind the same interface, untested: it would register the LL area as a dma-buf MR and
  exchange (LL base, rkey, QP info) with ``connect_mesh``'s allgather instead of the wire below).
- Memory: this rank's LL area is registered with remote-write rights only (the source of its writes needs no
  right). The emulated NIC is the wire: it copies into the destination from this process, so each remote peer's LL
  area is mapped here (memory.wire: kept apart from the kernels' peer table, which stays 0 for other nodes) and
  registered on this NIC with remote-write rights only; the peer's QP is connected in loopback. (A real NIC
  executes at the responder; the bytes that land are the same.)
- QPs: one per remote peer, each with its own CQ (the proxy retires batches per CQ): a destination's data and its
  count / flag go through one RC QP, which keeps their order without a fence between QPs.
- FIFOs: ``num_fifos = min(threads, remote peers)`` blocks of ``capacity`` records in one host-mapped allocation;
  the kernels push every trigger for peer p into FIFO ``p % num_fifos`` (ll_route.cuh), FIFO i is drained by
  proxy thread ``i % threads``, so a peer's triggers are posted by one thread on one QP in ticket order. Each FIFO's
  head word lives in device memory (faster for the kernels' atomics; only the kernels produce). The device table
  (``table_ptr``): FIFO i's block at [i], its head at [PROXY_MAX_FIFOS + i].
- Every wait has the Buffer's deadline (the proxy's ``timeout_s``, the kernels' FIFO waits). A failure of the
  proxy (bad trigger, NIC fault, deadline) sets every FIFO's error word, so kernels stop waiting and record it, and
  :meth:`check` raises it naming this rank and the peer.
- Lifetime: :meth:`quiesce` (the proxy drains and stops: before the destroy barrier, after this rank's kernels
  ended, so no write of this rank's NIC reaches a peer that frees its memory after the barrier), then
  :meth:`close` (NIC, memory, wire mappings, FIFOs); a failed construction closes what it made.
"""

from __future__ import annotations

import numpy as np

from ... import _env
from ...errors import EpkernError
from .layout import PROXY_MAX_FIFOS, ROUTE_PROXY

DEFAULT_CAPACITY = 4096  # records per FIFO (128 KiB): back-pressure, with the deadline, beyond that
QP_SLOTS = 256  # WQEs per QP send ring (and CQEs per CQ)

# Error-record phases of proxy_fifo.cuh's waits (registered with the runtime).
PROXY_PHASES = {
    0x501: "PROXY route (waiting for a free trigger FIFO slot: the proxy threads are behind or failed)",
    0x502: "PROXY route (waiting for a FIFO flush)",
}


def _host_mapped(nbytes: int):
    from ...memory import HostMapped

    return HostMapped(nbytes)


class NicStillWriting(EpkernError):
    """The PROXY route's NIC could not be stopped: memory it may write must stay allocated (no teardown barrier)."""


class ProxyTransport:
    """PROXY routes of one rank: ``routes`` is its row of the agreed table; the peers whose kind is PROXY get a QP."""

    def __init__(self, rt, routes, *, num_threads=None, capacity=DEFAULT_CAPACITY, nic_factory=None, wire=None):
        import cupy

        from ...memory.wire import WireMappings
        from ...nic.device_memory import DeviceMemory
        from ...nic.emulated import Access, EmulatedNic
        from ...nic.fifo import TriggerFifo, fifo_nbytes
        from ...nic.proxy import PeerRoute, ProxyService

        self.rank, self.timeout_s = rt.rank, rt.timeout_s
        self.remote = [p for p, k in enumerate(routes) if k == ROUTE_PROXY]
        threads = _env.num_proxy_threads() if num_threads is None else int(num_threads)
        self.num_fifos = max(1, min(threads, len(self.remote), PROXY_MAX_FIFOS))
        self.capacity = int(capacity)
        self.service = self.nic = self.memory = self.wire = self.host = None
        self.fifos: list = []
        self.qps: dict[int, object] = {}
        self.closed = False
        try:
            # Collective (every rank builds its wire, also one without remote peers): the peers' regions, here.
            self.wire = (wire or WireMappings)(rt.region, rt.group, self.remote, rt.timeout_s)
            # In-process ranks share one context: the NIC's copies go on the rank's fixed "nic" stream (a queue of
            # its own; group/threads.rank_stream), not a new stream per NIC thread.
            stream_of = getattr(rt.group, "stream", None) if rt.in_process else None
            self.memory = DeviceMemory(rt.device, stream=stream_of("nic") if stream_of is not None else None)
            self.nic = (nic_factory or (lambda m: EmulatedNic(m, name=f"rank{rt.rank}")))(self.memory)
            ll_base = rt.region.ptr + rt.ll_offset
            self.memory.add(ll_base, rt.ll_bytes)
            self.local_mr = self.nic.reg_mr(ll_base, rt.ll_bytes, access=Access.REMOTE_WRITE)
            peers = {}
            for p in self.remote:
                peer_ll = self.wire.ptrs[p] + rt.ll_offset
                self.memory.add(peer_ll, rt.ll_bytes)
                mr = self.nic.reg_mr(peer_ll, rt.ll_bytes, access=Access.REMOTE_WRITE)
                qp = self.nic.create_qp(self.nic.create_cq(QP_SLOTS), QP_SLOTS)
                qp.connect(qp)  # loopback: this NIC writes the peer's mapped area (the wire)
                self.qps[p] = qp
                peers[p] = PeerRoute([qp], peer_ll, mr.rkey)
            block = fifo_nbytes(self.capacity)
            self.host = _host_mapped(block * self.num_fifos + 64)
            start = -self.host.device_ptr % 64  # FIFO blocks 64-byte aligned (page-aligned from cudaHostAlloc)
            for i in range(self.num_fifos):
                at = start + i * block
                self.fifos.append(TriggerFifo(self.capacity, self.host.host[at : at + block], name=f"fifo{i}"))
            self.heads = cupy.zeros(self.num_fifos, dtype=np.uint64)
            table = np.zeros(2 * PROXY_MAX_FIFOS, dtype=np.uint64)
            table[: self.num_fifos] = [self.host.device_ptr + start + i * block for i in range(self.num_fifos)]
            table[PROXY_MAX_FIFOS : PROXY_MAX_FIFOS + self.num_fifos] = [
                self.heads.data.ptr + 8 * i for i in range(self.num_fifos)
            ]
            self.table = cupy.asarray(table)
            self.table_ptr = int(self.table.data.ptr)
            # No atomics are pushed by the LL kernels; the proxy still wants a place for fetch-add results.
            self.service = ProxyService(
                self.fifos,
                local=self.local_mr,
                peers=peers,
                num_threads=threads,
                atomic_result=(ll_base, self.local_mr.lkey),
                timeout_s=rt.timeout_s,
                name=f"rank{rt.rank}-ll",
            )
        except BaseException:
            self.close(raise_errors=False)
            raise

    def fifo_of_peer(self, p: int) -> int:
        """The FIFO the kernels push peer ``p``'s triggers into (ll_route.cuh's rule)."""
        return p % self.num_fifos

    @property
    def failed(self) -> bool:
        return self.service is not None and self.service.failed

    def check(self) -> None:
        """Raise the proxy's failure (EpkernError naming this rank and the peer / QP) if it failed."""
        if self.service is not None and self.service.failed:
            raise EpkernError(f"rank {self.rank}: PROXY route failed: " + "; ".join(self.service.errors))

    def describe(self, peer: int) -> str:
        """What the host side did for ``peer`` (a timeout naming it tells the story): its FIFO's consumed
        triggers, its QP's WQEs posted / executed by the NIC / retired, the NIC thread's longest pass (a copy
        that cannot run while the kernel waits for it shows as a pass of about the deadline), proxy errors."""
        qp = self.qps.get(peer)
        if qp is None or self.service is None:
            return ""
        fifo = self.fifo_of_peer(peer)
        posted, retired = self.service.posted(peer)[0]
        text = (
            f"PROXY route to peer {peer}: FIFO {fifo} consumed {self.fifos[fifo].consumed} triggers; QP {posted} "
            f"WQEs posted, {qp.counters.wqes} executed by the NIC, {retired} retired; the NIC thread's longest "
            f"pass {getattr(self.nic, 'longest_pass_s', 0.0):.2f} s"
        )
        errors = self.service.errors
        return text + (f"; proxy errors: {'; '.join(errors)}" if errors else "")

    def counters(self) -> dict:
        """NIC counters per remote peer (its one QP): wqes, doorbells, cqes, bytes, errors."""
        return {p: dict(vars(qp.counters)) for p, qp in self.qps.items()}

    def quiesce(self) -> None:
        """Let the proxy threads post what the FIFOs hold, wait for its completions, and stop (idempotent). Raises
        the proxy's failure, if any, as :meth:`check`. After a failure the NIC is stopped here too, before the
        teardown's barrier lets peers free the memory its posted WRITEs target: an emulated NIC drops what is still
        posted (on the H200, 8 in-process ranks after a PROXY timeout: the NIC executed its backlog during close,
        after the memory was freed, and the context died of an illegal address). :class:`NicStillWriting` when
        it cannot be stopped in time: the caller must then keep the memory."""
        service = self.service
        if service is None:
            return
        try:
            service.close()
        except EpkernError as exc:
            abort = getattr(self.nic, "abort", None)
            if abort is not None and not abort(self.timeout_s):
                raise NicStillWriting(
                    f"rank {self.rank}: PROXY route failed ({exc}) and the NIC is still executing a WRITE after "
                    f"{self.timeout_s:g} s"
                ) from None
            raise EpkernError(f"rank {self.rank}: PROXY route failed: {exc}") from None

    def close(self, raise_errors: bool = True) -> None:
        """Stop the proxy, then close the NIC, its memory, the wire mappings and the FIFOs (idempotent)."""
        if self.closed:
            return
        self.closed = True
        errors = []
        for step in (self.quiesce, self._close_nic, self._close_memory):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - everything is closed; the first failure is raised after
                errors.append(exc)
        self.table = self.heads = None
        if errors and raise_errors:
            raise errors[0]

    def _close_nic(self) -> None:
        if self.nic is not None:
            self.nic.close()
        if self.memory is not None:
            self.memory.close()

    def _close_memory(self) -> None:
        if self.wire is not None:
            self.wire.close()
        self.fifos = []
        if self.host is not None:
            self.host.close()
            self.host = None
