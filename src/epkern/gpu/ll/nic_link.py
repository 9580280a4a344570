"""What both NIC routes of a Buffer (PROXY: ``proxy.py``, RDMA: ``rdma.py``) set up the same way for one rank: the
NIC, this rank's LL area registered on it, and one QP per remote peer with the peer's LL area as its target.

- NIC: an ``EmulatedNic`` over ``DeviceMemory`` per rank by default (``nic_factory`` makes another). A real NIC
  (``real_nic``: ``Mlx5Nic``, which executes at the responder) takes the other wiring, below ("Real NICs"): the
  same QPs, targets and transports above it; only this class's setup differs.
- Memory: this rank's LL area is registered with remote-write rights only (the source of its writes needs no
  right). The emulated NIC is the wire: it copies into the destination from this process, so each remote peer's LL
  area is mapped here (memory.wire: kept apart from the kernels' peer table, which stays 0 for other nodes) and
  registered on this NIC with remote-write rights only; the peer's QP is connected in loopback. (A real NIC
  executes at the responder; the bytes that land are the same.)
- QPs: one per remote peer, each with its own CQ: a destination's data and its count / flag go through one RC QP,
  which keeps their order without a fence between QPs.
- Real NICs: this rank's LL area registered as a GPU (dma-buf) MR; one QP per remote peer connected to that peer's
  QP for this rank through ``connect_mesh`` (one allgather of QP info); the peers' (LL base, rkey) by one more
  allgather, so each target is the peer's own address (a real NIC executes at the responder). No wire mappings, no
  DeviceMemory. Written against the fake verbs layer of the tests (tests/test_ll_real_nic_cpu.py); never run on
  a real NIC.
- Lifetime: the subclass stops its own posting first (``quiesce``); :meth:`close_link` closes the NIC, its memory and
  the wire mappings. In-process ranks share one CUDA context: the NIC's copies go on the rank's fixed "nic" stream
  (a queue of its own; group/threads.rank_stream), not a new stream per NIC thread.
"""

from __future__ import annotations

from ...errors import EpkernError


def host_mapped(nbytes: int):
    """A host-mapped allocation (FIFOs, send rings): what both transports put their host-side block in (tests swap
    this function for a fake)."""
    from ...memory import HostMapped

    return HostMapped(nbytes)


def wait_for_call(rt) -> None:
    """An eager call over a NIC route ends only once its kernels have (bounded, polling: the NIC / proxy threads keep
    running), so that neither the caller's stream nor the next call is queued behind a kernel that waits for the
    emulated NIC's copies, which are host CUDA calls (docs/architecture.md, Known problems); its own failure raises
    here. The LL NIC routes and HT across nodes both end this way."""
    rt.sync_bounded(rt.comm_stream, "waiting for this call's kernels (NIC route)", True)
    rt.raise_recorded()


class NicStillWriting(EpkernError):
    """A NIC route's NIC could not be stopped: memory it may write must stay allocated (no teardown barrier)."""


class NicLink:
    """The NIC, MRs and QPs of one rank's NIC routes. ``remote``: the peers whose route kind is ``kind``; each gets a
    QP of ``qp_slots`` WQEBBs with a CQ of ``cq_slots``."""

    def __init__(
        self,
        rt,
        routes,
        kind: int,
        *,
        qp_slots: int,
        cq_slots: int,
        poll_doorbells: bool,
        nic_factory=None,
        wire=None,
        real_nic=None,
        area=None,
    ):
        from ...memory.wire import WireMappings
        from ...nic.device_memory import DeviceMemory
        from ...nic.emulated import Access, EmulatedNic

        self.rank, self.timeout_s = rt.rank, rt.timeout_s
        self.remote = [p for p, k in enumerate(routes) if k == kind]
        self.nic = self.memory = self.wire = None
        self.qps: dict[int, object] = {}
        self.peer_targets: dict[int, tuple[int, int]] = {}  # peer -> (its LL area as this NIC addresses it, rkey)
        try:
            # The registered area: the LL area, or another part of the region at the same offset on every rank
            # (``area``: (offset, bytes); the HT RDMA area of a group across nodes, issue #18).
            self.area_offset, self.area_bytes = area if area is not None else (rt.ll_offset, rt.ll_bytes)
            self.ll_base = rt.region.ptr + self.area_offset
            if real_nic is not None:  # a zero-argument callable making this rank's real NIC (routes.real_nic)
                self.nic = real_nic()
                self._connect_real(rt, qp_slots, cq_slots)
                return
            # Collective (every rank builds its wire, also one without remote peers): the peers' regions, here.
            self.wire = (wire or WireMappings)(rt.region, rt.group, self.remote, rt.timeout_s)
            stream_of = getattr(rt.group, "stream", None) if rt.in_process else None
            self.memory = DeviceMemory(rt.device, stream=stream_of("nic") if stream_of is not None else None)
            make = nic_factory or (lambda m: EmulatedNic(m, poll_doorbells=poll_doorbells, name=f"rank{rt.rank}"))
            self.nic = make(self.memory)
            self.memory.add(self.ll_base, self.area_bytes)
            self.local_mr = self.nic.reg_mr(self.ll_base, self.area_bytes, access=Access.REMOTE_WRITE)
            for p in self.remote:
                peer_ll = self.wire.ptrs[p] + self.area_offset
                self.memory.add(peer_ll, self.area_bytes)
                mr = self.nic.reg_mr(peer_ll, self.area_bytes, access=Access.REMOTE_WRITE)
                qp = self.nic.create_qp(self.nic.create_cq(cq_slots), qp_slots)
                qp.connect(qp)  # loopback: this NIC writes the peer's mapped area (the wire)
                self.qps[p] = qp
                self.peer_targets[p] = (peer_ll, mr.rkey)
        except BaseException:
            try:
                self.close_link()
            except Exception:  # noqa: BLE001 - the construction's own failure is the one to raise
                pass
            raise

    def _connect_real(self, rt, qp_slots: int, cq_slots: int) -> None:
        """A real NIC (module doc, "Real NICs"). Collective: two allgathers, also on a rank without remote peers."""
        import struct

        from ...nic.emulated import Access  # the ibv_access_flags values

        # Peers write here (remote write needs local write in verbs); the default access would refuse them.
        access = int(Access.LOCAL_WRITE | Access.REMOTE_WRITE)
        self.local_mr = self.nic.reg_gpu_mr(self.ll_base, self.area_bytes, access)
        for p in self.remote:
            self.qps[p] = self.nic.create_qp(self.nic.create_cq(cq_slots), qp_slots)
        self.nic.connect_mesh(rt.group.allgather_bytes, rt.rank, [[self.qps[p]] if p in self.qps else [] for p in
                                                                   range(rt.num_ranks)])  # fmt: skip
        mine = struct.pack("<QI", self.ll_base, self.local_mr.rkey)
        theirs = rt.group.allgather_bytes(mine)
        for p in self.remote:
            self.peer_targets[p] = struct.unpack("<QI", theirs[p])

    def counters(self) -> dict:
        """NIC counters per remote peer (its one QP): wqes, doorbells, cqes, bytes, errors."""
        return {p: dict(vars(qp.counters)) for p, qp in self.qps.items()}

    def longest_pass(self) -> str:
        return f"the NIC thread's longest pass {getattr(self.nic, 'longest_pass_s', 0.0):.2f} s"

    def stop_nic(self, reason: str) -> None:
        """After a failure, before the teardown's barrier lets peers free the memory the posted WRITEs target: an
        emulated NIC drops what is still posted (on the H200, 8 in-process ranks after a PROXY timeout: the NIC
        executed its backlog during close, after the memory was freed, and the context died of an illegal address).
        :class:`NicStillWriting` when it cannot be stopped in time: the caller must then keep the memory."""
        abort = getattr(self.nic, "abort", None)
        if abort is not None and not abort(self.timeout_s):
            raise NicStillWriting(
                f"rank {self.rank}: {reason} and the NIC is still executing a WRITE after {self.timeout_s:g} s"
            )

    def close_link(self) -> None:
        """Close the NIC and its memory, then the wire mappings (idempotent)."""
        try:
            if self.nic is not None:
                self.nic.close()
            if self.memory is not None:
                self.memory.close()
        finally:
            self.nic = self.memory = None
            if self.wire is not None:
                self.wire.close()
                self.wire = None


class NicTransport:
    """What both transports (``ProxyTransport``, ``RdmaTransport``) share: their ``link`` (:class:`NicLink`), their
    ``host`` (one host-mapped block: FIFOs or send rings), the counters, and an idempotent :meth:`close` that stops
    the transport's own side first (``quiesce``), then closes the link and the host block, and raises the first
    failure after everything is closed."""

    link = host = None
    closed = False

    # The link's, read through it (set once the link is made).
    remote = property(lambda self: self.link.remote, doc="the peers reached over this transport")
    qps = property(lambda self: self.link.qps, doc="peer -> its QP")
    nic = property(lambda self: self.link.nic)
    timeout_s = property(lambda self: self.link.timeout_s)

    def counters(self) -> dict:
        """NIC counters per remote peer (its one QP): wqes, doorbells, cqes, bytes, errors."""
        return self.link.counters()

    def quiesce(self) -> None:  # the transport's own side
        raise NotImplementedError

    def _forget(self) -> None:
        """Drop the device-side tables (the transport's own)."""

    def close(self, raise_errors: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        errors = []
        for step in (self.quiesce, self._close_link, self._close_host):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - everything is closed; the first failure is raised after
                errors.append(exc)
        self._forget()
        if errors and raise_errors:
            raise errors[0]

    def _close_link(self) -> None:
        if self.link is not None:
            self.link.close_link()

    def _close_host(self) -> None:
        if self.host is not None:
            self.host.close()
            self.host = None
