"""The PROXY route's host side for one Buffer (issue #17, step 4): trigger FIFOs in host-mapped memory and the proxy
threads, over the NIC, MRs and one QP per remote peer that ``nic_link.NicLink`` sets up. CPU-tested over a fake CuPy;
on the H200 (2026-12-07) exact as 8 MPS processes and 2 or 4 in-process ranks (8 in-process ranks stalled:
docs/architecture.md, Known problems).

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
from . import nic_link
from .layout import PROXY_MAX_FIFOS, ROUTE_PROXY, STATE_PROXY_CAPACITY, STATE_PROXY_FIFOS, STATE_PROXY_TABLE
from .nic_link import NicLink, NicTransport
from .nic_link import NicStillWriting as NicStillWriting

DEFAULT_CAPACITY = 4096  # records per FIFO (128 KiB): back-pressure, with the deadline, beyond that
QP_SLOTS = 256  # WQEs per QP send ring (and CQEs per CQ)

# Error-record phases of proxy_fifo.cuh's waits (registered with the runtime).
PROXY_PHASES = {
    0x501: "PROXY route (waiting for a free trigger FIFO slot: the proxy threads are behind or failed)",
    0x502: "PROXY route (waiting for a FIFO flush)",
}


class ProxyTransport(NicTransport):
    """PROXY routes of one rank: ``routes`` is its row of the agreed table; the peers whose kind is PROXY get a QP."""

    def __init__(
        self, rt, routes, *, num_threads=None, capacity=DEFAULT_CAPACITY, nic_factory=None, wire=None, real_nic=None
    ):
        import cupy

        from ...nic.fifo import TriggerFifo, fifo_nbytes
        from ...nic.proxy import PeerRoute, ProxyService

        self.service = self.host = self.link = None
        self.fifos: list = []
        self.closed = False
        self.rank = rt.rank
        try:
            self.link = link = NicLink(
                rt,
                routes,
                ROUTE_PROXY,
                qp_slots=QP_SLOTS,
                cq_slots=QP_SLOTS,
                poll_doorbells=False,
                nic_factory=nic_factory,
                wire=wire,
                real_nic=real_nic,
            )
            threads = _env.num_proxy_threads() if num_threads is None else int(num_threads)
            self.num_fifos = max(1, min(threads, len(self.remote), PROXY_MAX_FIFOS))
            self.capacity = int(capacity)
            peers = {p: PeerRoute([link.qps[p]], *link.peer_targets[p]) for p in self.remote}
            block = fifo_nbytes(self.capacity)
            self.host = nic_link.host_mapped(block * self.num_fifos + 64)
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
                local=link.local_mr,
                peers=peers,
                num_threads=threads,
                atomic_result=(link.ll_base, link.local_mr.lkey),
                timeout_s=rt.timeout_s,
                name=f"rank{rt.rank}-ll",
            )
        except BaseException:
            self.close(raise_errors=False)
            raise

    def fill_state(self, words: np.ndarray) -> None:
        """The LL device state words this transport owns: FIFO count, capacity and the FIFO table's address."""
        if self.num_fifos > PROXY_MAX_FIFOS:
            raise AssertionError(f"{self.num_fifos} FIFOs, the device table holds {PROXY_MAX_FIFOS}")
        words[STATE_PROXY_FIFOS] = self.num_fifos
        words[STATE_PROXY_CAPACITY] = self.capacity
        words[STATE_PROXY_TABLE : STATE_PROXY_TABLE + 2] = np.array([self.table_ptr], np.uint64).view(np.int32)

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
            f"WQEs posted, {qp.counters.wqes} executed by the NIC, {retired} retired; {self.link.longest_pass()}"
        )
        errors = self.service.errors
        return text + (f"; proxy errors: {'; '.join(errors)}" if errors else "")

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
            self.link.stop_nic(f"PROXY route failed ({exc})")
            raise EpkernError(f"rank {self.rank}: PROXY route failed: {exc}") from None

    def _forget(self) -> None:
        self.fifos = []
        self.table = self.heads = None
