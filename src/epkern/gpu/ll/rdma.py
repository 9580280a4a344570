"""The RDMA route's host side for one Buffer (issue #17, step 5): the LL kernels write mlx5 WQEs into each remote
peer's QP send ring themselves and ring its doorbell (kernels/ll_route.cuh); the host sets the QPs up and polls
their completions. CPU-tested over a fake CuPy; exact on the H100 (session K: 8 MPS processes on virtual nodes of
4 with hybrid IPC and of 2 without, a silent remote rank, 2 and 4 in-process ranks).

- NIC, MRs, one QP per remote peer: ``nic_link.NicLink``, with an emulated NIC that watches the QPs' doorbell words
  (``poll_doorbells=True``: the kernels write them, nobody calls ``ring_doorbell``).
- Rings: each QP's send ring, doorbell record, doorbell word and ``retired`` word lie in one host-mapped allocation:
  the GPU writes WQEs and doorbells over PCIe and the emulated NIC's thread reads them in host memory. A real mlx5
  QP keeps its own ring, doorbell record and UAR page, registered for the GPU instead (``map_for_gpu``,
  nic/mlx5_cuda.py; only the ``retired`` words are then in the host-mapped block).
- Ring size :data:`RING_WQES`: the kernels ring once per call and peer, after the call's last WQE to that peer, so
  every WQE of one call to one peer must fit the ring unrung: at most ``num_max * min(top-k, local experts) + 1``
  (checked per call, :meth:`check_batch`). Beyond one call, the kernels wait for ``retired`` (bounded).
- Device table (``table_ptr``, state words ``EPK_STATE_RDMA_TABLE``): one ``epk::RdmaQp`` of ``RDMA_QP_BYTES`` per
  rank (zero for ranks without a QP); each QP's counters (producer index, committed index, batch counter) in device
  memory.
- Completions: a ``CompletionPoller`` thread advances ``retired`` and records error CQEs and NIC faults;
  :meth:`check` raises them naming this rank, the peer and the QP.
- Lifetime: :meth:`quiesce` (after this rank's kernels ended, before the destroy barrier): waits, bounded, until the
  NIC has executed every WQE the kernels committed, then stops the poller; after a failure the NIC is stopped
  (``NicStillWriting`` if it cannot be). :meth:`close`: NIC, memory, wire mappings, rings.
"""

from __future__ import annotations

import time

import numpy as np

from ...errors import ArgumentError, EpkernError, TimeoutError
from . import nic_link
from .layout import RDMA_QP_BYTES, ROUTE_RDMA, STATE_RDMA_TABLE
from .nic_link import NicLink, NicTransport

RING_WQES = 16384  # WQEBBs per QP send ring (1 MiB host-mapped per remote peer)
CQ_SLOTS = 1024  # one CQE per call and peer at most; the poller consumes them
_QP_EXTRA = 3 * 64  # per QP after its ring: doorbell record, doorbell word, retired word (64-byte apart)

# Error-record phases of mlx5_wqe.cuh's waits (registered with the runtime).
RDMA_PHASES = {
    0x601: "RDMA route (waiting for send-ring space: the NIC has not completed earlier WQEs)",
    0x602: "RDMA route (waiting for an earlier WQE of the same QP to be written)",
}


def pack_qp(sq, dbrec, db, retired, ctr, raddr, rkey, lkey, qpn, wqe_cnt) -> np.ndarray:
    """One ``epk::RdmaQp`` (ll_route.cuh) as 8 little-endian u64 words."""
    return np.array([sq, dbrec, db, retired, ctr, raddr, rkey | lkey << 32, qpn | wqe_cnt << 32], dtype=np.uint64)


class RdmaTransport(NicTransport):
    """RDMA routes of one rank: ``routes`` is its row of the agreed table; the peers whose kind is RDMA get a QP."""

    def __init__(
        self,
        rt,
        routes,
        *,
        ring_wqes=RING_WQES,
        cq_slots=CQ_SLOTS,
        nic_factory=None,
        wire=None,
        real_nic=None,
        area=None,
    ):
        import cupy

        from ...nic.completions import CompletionPoller, PolledQp

        self.host = self.link = self.poller = None
        self.closed = False
        self.rank, self.ring_wqes = rt.rank, int(ring_wqes)
        self.retired: dict[int, np.ndarray] = {}
        try:
            self.link = link = NicLink(
                rt,
                routes,
                ROUTE_RDMA,
                qp_slots=self.ring_wqes,
                cq_slots=cq_slots,
                poll_doorbells=True,
                nic_factory=nic_factory,
                wire=wire,
                real_nic=real_nic,
                area=area,
            )
            # A real NIC's QPs keep their own rings (map_for_gpu): the block then holds only the doorbell-side words.
            real = any(hasattr(qp, "map_for_gpu") for qp in link.qps.values())
            host_ring = 0 if real else self.ring_wqes
            per_qp = host_ring * 64 + _QP_EXTRA
            self.host = nic_link.host_mapped(per_qp * max(1, len(self.remote)) + 64)
            start = -self.host.device_ptr % 64
            self.counters_dev = cupy.zeros((rt.num_ranks, 4), dtype=np.uint64)
            table = np.zeros((rt.num_ranks, RDMA_QP_BYTES // 8), dtype=np.uint64)
            polled = []
            dev, smallest = self.host.device_ptr, self.ring_wqes
            for i, p in enumerate(self.remote):
                at = start + i * per_qp
                ring, extra = at, at + host_ring * 64
                qp = link.qps[p]
                self.retired[p] = self.host.view(np.uint64, extra + 128, 1)
                polled.append(PolledQp(p, qp, self.retired[p]))
                if real:  # its own ring, doorbell record and register, mapped for the GPU
                    gpu = qp.map_for_gpu()
                    sq, dbrec, db, wqe_cnt = gpu.sq, gpu.dbrec, gpu.db_reg, gpu.wqe_cnt
                else:  # the emulated QP's ring and doorbells become host-mapped ones (before anything is posted)
                    qp.sq = self.host.host[ring : ring + host_ring * 64]
                    qp.dbrec = self.host.host[extra : extra + 8]
                    qp.db_reg = self.host.host[extra + 64 : extra + 72]
                    sq, dbrec, db, wqe_cnt = dev + ring, dev + extra, dev + extra + 64, host_ring
                raddr, rkey = link.peer_targets[p]
                table[p] = pack_qp(sq, dbrec, db, dev + extra + 128, self.counters_dev.data.ptr + 32 * p, raddr,
                                   rkey, link.local_mr.lkey, qp.qpn, wqe_cnt)  # fmt: skip
                smallest = min(smallest, wqe_cnt)
            self.ring_wqes = smallest  # check_batch: one call's WRITEs must fit the smallest ring
            self.table = cupy.asarray(table)
            self.table_ptr = int(self.table.data.ptr)
            self.poller = CompletionPoller(polled, link.nic, name=f"rank{rt.rank}-rdma-cq")
        except BaseException:
            self.close(raise_errors=False)
            raise

    def fill_state(self, words: np.ndarray) -> None:
        """The LL device state words this transport owns: the QP table's address."""
        words[STATE_RDMA_TABLE : STATE_RDMA_TABLE + 2] = np.array([self.table_ptr], np.uint64).view(np.int32)

    def check_batch(self, num_max: int, topk: int, e_loc: int, what: str) -> None:
        """ArgumentError unless one call's WQEs to one peer (each token's selections on that peer, plus the signals'
        one WRITE) fit a send ring: the kernels ring once, after the last of them."""
        most = num_max * min(topk, e_loc) + 1
        if most > self.ring_wqes:
            raise ArgumentError(
                f"{what}: up to {most} RDMA WRITEs per call to one peer (num_max_dispatch_tokens_per_rank "
                f"{num_max} x min(top-k {topk}, {e_loc} local experts) + 1) exceed the RDMA route's send ring of "
                f"{self.ring_wqes} WQEs; use fewer tokens per call or transport='proxy'"
            )

    @property
    def failed(self) -> bool:
        return self.poller is not None and self.poller.failed

    def check(self) -> None:
        """Raise the route's failure (EpkernError naming this rank, the peer and the QP) if it failed."""
        if self.failed:
            raise EpkernError(f"rank {self.rank}: RDMA route failed: " + "; ".join(self.poller.errors))

    def describe(self, peer: int) -> str:
        """What the NIC side did for ``peer`` (a timeout naming it tells the story): WQEs executed, doorbells and
        completions seen, the retired index, the NIC thread's longest pass, failures."""
        qp = self.qps.get(peer) if self.link is not None else None
        if qp is None:
            return ""
        c = qp.counters
        text = (
            f"RDMA route to peer {peer}: QP 0x{qp.qpn:x}: the NIC executed {c.wqes} WQEs after {c.doorbells} "
            f"doorbells, {c.cqes} completions, retired index {int(self.retired[peer][0])}; {self.link.longest_pass()}"
        )
        errors = self.poller.errors if self.poller is not None else []
        return text + (f"; errors: {'; '.join(errors)}" if errors else "")

    def quiesce(self) -> None:
        """After this rank's kernels ended: wait (bounded) until the NIC has executed every WQE they committed, then
        stop the poller (idempotent). Raises the route's failure; after one the NIC is stopped first (before the
        teardown's barrier lets peers free the memory its WRITEs target; ``NicStillWriting`` if it cannot be)."""
        poller = self.poller
        if poller is None:
            return
        try:
            problem = self.drain()
        finally:
            poller.close()
            self.poller = None
        errors = poller.errors + ([problem] if problem else [])
        if errors:
            text = "; ".join(errors)
            self.link.stop_nic(f"RDMA route failed ({text})")
            raise EpkernError(f"rank {self.rank}: RDMA route failed: {text}")

    def drain(self) -> str | None:
        """Wait (bounded by the timeout) until the NIC has executed every WQE the kernels committed (after they
        ended: the comm stream is idle); what is missing, or None. Tests read the NIC counters after it."""
        committed = self.counters_dev.get()[:, 1] if self.remote else []  # whole: a strided get() leaves
        # the legacy stream current in CuPy 14 (in-process ranks then refuse their next call)
        deadline = time.monotonic() + self.timeout_s
        for p in self.remote:
            qp = self.qps[p]
            while self._executed(p) < int(committed[p]) and not self.failed and qp.state != qp.ERROR:
                if time.monotonic() > deadline:
                    return (
                        f"peer {p} qp 0x{qp.qpn:x}: the NIC executed {self._executed(p)} of {int(committed[p])} "
                        f"WQEs within {self.timeout_s:g} s"
                    )
                time.sleep(1e-4)
        return None

    def drained_counters(self) -> dict:
        """The NIC counters per remote peer (``counters()``) once the NIC has executed what the ended kernels
        committed (a call's last credit may still be queued when its kernel ends): what benchmarks and tests read.
        TimeoutError when the NIC did not get there within the timeout; EpkernError when the route failed or a QP
        is in error (drain stops waiting then: the counters would be partial)."""
        problem = self.drain()
        if problem is not None:
            raise TimeoutError(f"rank {self.rank}: RDMA route: {problem}")
        self.check()
        broken = [p for p in self.remote if self.qps[p].state == self.qps[p].ERROR]
        if broken:
            raise EpkernError(f"rank {self.rank}: RDMA route: the QPs to peers {broken} are in error")
        return self.counters()

    def _executed(self, p: int) -> int:
        """WQEs of peer ``p``'s QP the NIC is done with: the emulated NIC's consumer index; for a real NIC (whose
        index the host cannot read) what its completions retired (every call's last WQE is signaled)."""
        consumed = getattr(self.qps[p], "consumed", None)
        return int(self.retired[p][0]) if consumed is None else consumed

    def _forget(self) -> None:
        self.table = self.counters_dev = None
