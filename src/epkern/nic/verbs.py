"""A NIC driven with standard verbs only (no mlx5dv): any RDMA provider — an mlx5 NIC, soft-RoCE (``rdma_rxe``), ...

:class:`VerbsNic` opens a device by name, allocates a PD, registers host memory with the rights asked for, and
creates CQs and RC QPs; :meth:`VerbsNic.connect_mesh` connects them across ranks through an allgather (as
:meth:`~epkern.nic.mlx5.Mlx5Nic.connect_mesh` does). :class:`VerbsQueuePair` is a
:class:`~epkern.nic.posting.BatchPoster`, so :class:`~epkern.nic.proxy.ProxyService` posts to it with its usual
batching: each batch is a chain of work requests (RDMA WRITE, inline when small enough; FETCH_AND_ADD) handed to
ONE ``ibv_post_send`` (counted as the batch's doorbell), only the last signaled, with ``wr_id`` = the slot index
after the request, so the batch's completion carries the batch end. The host posts here; GPU-initiated WQEs need
the mlx5 rings of :mod:`epkern.nic.mlx5`.

Ran for real against soft-RoCE in a QEMU guest (tests/softroce_proxy_check.py; docs/rdma.md).
"""

from __future__ import annotations

import pathlib
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .. import _verbs_cffi as V
from .._verbs_cffi._cdef import CONSTANTS
from ..errors import ArgumentError
from .fifo import TriggerOp
from .observation import NicFault, QpCounters
from .posting import BatchDone, PostFailed, WorkItem
from .qp_exchange import exchange_peer_info
from .verbs_objects import RcConnection, RegisteredRegion, VerbsBackedNic

__all__ = ["VerbsCompletionQueue", "VerbsMemoryRegion", "VerbsNic", "VerbsQueuePair", "choose_gid_index"]

IBV_LINK_LAYER_ETHERNET = 2
_POLL_BATCH = 64  # completions read per ibv_poll_cq
_WR_FLUSH_ERR = CONSTANTS["IBV_WC_WR_FLUSH_ERR"]


class VerbsMemoryRegion(RegisteredRegion):
    """A registered host region: ``addr`` (what remote requests name), ``length``, ``lkey``, ``rkey``, ``access``."""


def _ipv4_mapped(gid: bytes) -> bool:
    return gid[:10] == bytes(10) and gid[10:12] == b"\xff\xff"


def choose_gid_index(verbs: Any, ctx: Any, port: int, port_attr: V.PortAttr) -> int:
    """The GID index to use on ``port``: 0 on InfiniBand; on RoCE the first IPv4-mapped GID whose sysfs type is
    "RoCE v2" (routable), else the first IPv4-mapped one, else 0."""
    if port_attr.link_layer != IBV_LINK_LAYER_ETHERNET:
        return 0
    types = pathlib.Path(f"/sys/class/infiniband/{ctx.name}/ports/{port}/gid_attrs/types")
    mapped = []
    for i in range(min(port_attr.gid_tbl_len, 16)):
        try:
            gid = verbs.query_gid(ctx, port, i)
        except V.VerbsError:
            continue  # an empty slot of the table on some providers
        if _ipv4_mapped(gid):
            mapped.append(i)
    for i in mapped:
        try:
            if (types / str(i)).read_text().strip().lower() == "roce v2":
                return i
        except OSError:
            break  # no sysfs types (old kernel): take the first mapped one
    return mapped[0] if mapped else 0


class VerbsCompletionQueue:
    """A CQ polled with ``ibv_poll_cq``; ``cqe_cnt`` is what the provider granted."""

    def __init__(self, nic: VerbsNic, handle: Any):
        self.nic = nic
        self.handle = handle
        self.cqe_cnt = int(handle.cqe)


class VerbsQueuePair(RcConnection):
    """An RC QP posted with standard verbs; a :class:`~epkern.nic.posting.BatchPoster` for the proxy.

    ``slots`` (= the granted ``max_send_wr``) and ``max_batches`` (= its CQ's entries) bound what is in flight;
    ``max_inline_data`` (granted) decides which writes go inline; ``counters``: ``doorbells`` = ``ibv_post_send``
    calls, ``wqes`` = work requests, ``cqes`` = completions read, ``errors`` = failed completions (flushed ones
    included). ``error`` is the :class:`~epkern.nic.observation.NicFault` of the first failed completion (the QP is
    then in ERROR); the NIC's ``faults`` list every failure but the flushes that follow one."""

    RESET, RTS, ERROR, CLOSED = "RESET", "RTS", "ERROR", "CLOSED"

    def __init__(self, nic: VerbsNic, cq: VerbsCompletionQueue, handle: Any):
        self.nic = nic
        self.cq = cq
        self.handle = handle
        self.qpn = int(handle.qp_num)
        self.slots = int(handle.max_send_wr)
        self.max_batches = cq.cqe_cnt
        self.max_inline_data = int(handle.max_inline_data)
        self.state = self.RESET
        self.error: NicFault | None = None
        self.counters = QpCounters()
        self.psn = secrets.randbits(24)
        self.remote: V.PeerInfo | None = None

    # --- BatchPoster ---
    def post_batch(self, items: Sequence[WorkItem], start: int) -> int:
        """Post ``items`` as one chain with one ``ibv_post_send``: only the last signaled; request ``k`` carries
        ``wr_id = start + k + 1``. Writes of at most ``max_inline_data`` bytes go inline."""
        if self.state != self.RTS:
            raise PostFailed(f"QP {self.qpn} is {self.state}: cannot post")
        limit = self.nic.max_message_bytes
        last = len(items) - 1
        requests = []
        nbytes = 0
        for k, (op, laddr, lkey, raddr, rkey, value) in enumerate(items):
            try:
                if op == TriggerOp.WRITE:
                    if value > limit:
                        raise PostFailed(f"a write of {value} bytes exceeds the port's largest message ({limit} bytes)")
                    inline = 0 < value <= self.max_inline_data
                    requests.append(
                        V.rdma_write(start + k + 1, laddr, lkey, value, raddr, rkey, signaled=k == last, inline=inline)
                    )
                    nbytes += value
                else:
                    requests.append(V.fetch_add(start + k + 1, laddr, lkey, raddr, rkey, value, signaled=k == last))
                    nbytes += 8
            except ArgumentError as e:  # e.g. a misaligned atomic: refused before anything of the batch is posted
                raise PostFailed(f"request {k} of the batch refused: {e}") from e
        try:
            self.nic._verbs.post_send(self.handle, requests)
        except V.VerbsError as e:
            raise PostFailed(str(e)) from e
        self.counters.doorbells += 1
        self.counters.wqes += len(requests)
        self.counters.bytes += nbytes
        return start + len(requests)

    def batch_token(self, end: int) -> int:
        return end  # the wr_id of a batch's signaled request

    def completions(self) -> list[BatchDone]:
        out = []
        for wc in self.nic._verbs.poll_cq(self.cq.handle, _POLL_BATCH):
            self.counters.cqes += 1
            if not wc.ok:
                out.append(BatchDone(wc.wr_id, f"NIC error completion: {self._record_error(wc)}"))
            elif wc.qp_num != self.qpn:
                shared = f"completion for qpn {wc.qp_num} on this QP's CQ (CQs must not be shared)"
                out.append(BatchDone(wc.wr_id, shared))
            else:
                out.append(BatchDone(wc.wr_id))
        return out

    def fault(self) -> str | None:
        return None  # every failure here arrives as a completion

    def _record_error(self, wc: V.WorkCompletion) -> str:
        try:
            wc.check()
            message = f"work request {wc.wr_id} failed"  # pragma: no cover - only failed completions come here
        except V.WorkCompletionError as e:
            message = str(e)
        self.counters.errors += 1
        if self.error is not None and wc.status == _WR_FLUSH_ERR:
            return message  # a request flushed after the QP's first failure: a consequence, not a new fault
        fault = NicFault(self.qpn, wc.wr_id, wc.status, message)
        self.nic.faults.append(fault)
        if self.error is None:
            self.state, self.error = self.ERROR, fault
        return message


class VerbsNic(VerbsBackedNic):
    """One opened RDMA device used through standard verbs: PD, MRs, CQs, RC QPs. Close with :meth:`close`
    (idempotent) or a ``with`` block.

    ``device_name``: e.g. ``"rxe0"`` (None: the first device). ``gid_index``: None chooses one
    (:func:`choose_gid_index`). ``verbs`` is the ``_verbs_cffi``-like module used (tests pass a fake)."""

    kind = "verbs NIC"

    def __init__(
        self,
        device_name: str | None = None,
        port: int = 1,
        gid_index: int | None = None,
        *,
        name: str | None = None,
        verbs: Any = None,
    ):
        if device_name is not None and not isinstance(device_name, str):
            raise ArgumentError(f"device_name: expected a device name or None, got {device_name!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 255:
            raise ArgumentError(f"port: expected a port number 1..255, got {port!r}")
        if gid_index is not None and (isinstance(gid_index, bool) or not isinstance(gid_index, int) or gid_index < 0):
            raise ArgumentError(f"gid_index: expected a non-negative integer or None, got {gid_index!r}")
        self._verbs = V if verbs is None else verbs
        self.port = port
        self._open(device_name, name)
        try:
            self.gid_index = (
                choose_gid_index(self._verbs, self._ctx, port, self.port_attr) if gid_index is None else gid_index
            )
            self.max_message_bytes = min(self.port_attr.max_msg_sz or V.MAX_MESSAGE_BYTES, V.MAX_MESSAGE_BYTES)
        except BaseException:
            self._close_quietly()
            raise

    # --- memory ---
    def reg_mr(self, target: np.ndarray | int, length: int | None = None, access: int = V.MR_ACCESS):
        """Register host memory — a C-contiguous numpy array (kept alive by the MR) or an address with ``length`` —
        with exactly the rights ``access`` names (default: local writes only)."""
        self._check_open()
        keep = None
        if isinstance(target, np.ndarray):
            if not target.flags.c_contiguous:
                raise ArgumentError("target: reg_mr needs a C-contiguous numpy array")
            addr = int(target.ctypes.data)
            length = target.nbytes if length is None else int(length)
            if not 0 < length <= target.nbytes:
                raise ArgumentError(f"length: {length} is not within the array's {target.nbytes} bytes")
            keep = target
        elif isinstance(target, int) and not isinstance(target, bool) and target > 0:
            addr = target
            if length is None or int(length) <= 0:
                raise ArgumentError(f"length: reg_mr(addr) needs a positive length, got {length!r}")
        else:
            raise ArgumentError(f"target: expected a numpy array or an address, got {type(target).__name__}")
        if isinstance(access, bool) or not isinstance(access, int) or access < 0:
            raise ArgumentError(f"access: expected IBV_ACCESS_* flags, got {access!r}")
        h = self._verbs.reg_mr(self._pd, addr, int(length), access)
        mr = VerbsMemoryRegion(self, h.addr, h.length, h.lkey, h.rkey, access, h, keep)
        return self._track(self._mrs, mr)

    def dereg_mr(self, mr: VerbsMemoryRegion) -> None:
        if not isinstance(mr, VerbsMemoryRegion) or mr.nic is not self:
            raise ArgumentError("mr: expected a memory region registered by this NIC")
        self._forget_mr(mr)

    # --- queues ---
    def create_cq(self, cqe_cnt: int = 256) -> VerbsCompletionQueue:
        """A CQ of at least ``cqe_cnt`` entries (``cq.cqe_cnt``: what the provider granted)."""
        self._check_open()
        if isinstance(cqe_cnt, bool) or not isinstance(cqe_cnt, int) or cqe_cnt <= 0:
            raise ArgumentError(f"cqe_cnt: expected a positive integer, got {cqe_cnt!r}")
        cq = VerbsCompletionQueue(self, self._verbs.create_cq(self._ctx, cqe_cnt))
        return self._track(self._cqs, cq)

    def create_qp(self, cq: VerbsCompletionQueue, max_send_wr: int = 64, *, max_inline_data: int = 64):
        """An RC QP (RESET) whose send queue holds at least ``max_send_wr`` requests; ``cq`` serves as its send and
        receive CQ (give every QP its own: the proxy requires it). ``max_inline_data``: the largest write posted
        inline (0: none); the provider may grant more (``qp.max_inline_data``) or refuse."""
        self._check_open()
        if not isinstance(cq, VerbsCompletionQueue) or cq.nic is not self:
            raise ArgumentError("cq: expected a CQ created by this NIC")
        for arg, value, low in (("max_send_wr", max_send_wr, 1), ("max_inline_data", max_inline_data, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ArgumentError(f"{arg}: expected an integer >= {low}, got {value!r}")
        h = self._verbs.create_rc_qp(
            self._pd, cq.handle, max_send_wr=max_send_wr, max_send_sge=1, max_inline_data=max_inline_data
        )
        qp = VerbsQueuePair(self, cq, h)
        return self._track(self._qps, qp)

    def connect_mesh(
        self, allgather_bytes: Callable[[bytes], list[bytes]], rank: int, qps: Sequence[Sequence[VerbsQueuePair]]
    ) -> None:
        """Connect ``qps[peer][i]`` of every rank to ``peer``'s ``qps[rank][i]`` with one ``allgather_bytes`` (the
        group's); every rank calls it collectively. ``qps[rank]`` are loopback QPs (connected to each other)."""
        if not callable(allgather_bytes):
            raise ArgumentError("allgather_bytes: expected a callable (bytes) -> list[bytes]")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < len(qps):
            raise ArgumentError(f"rank: expected 0..{len(qps) - 1}, got {rank!r}")
        table = [[q.local_info() for q in row] for row in qps]
        remote = exchange_peer_info(allgather_bytes, rank, table)
        for p, row in enumerate(qps):
            for i, q in enumerate(row):
                q.connect(remote[p][i])
