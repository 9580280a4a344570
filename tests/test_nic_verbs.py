"""The standard-verbs NIC (epkern.nic.verbs) and the proxy posting through it, on a machine without an RDMA device.

A fake ``_verbs_cffi`` (passed as ``verbs=``) plays a provider: ``post_send`` executes each chained request at once
on host memory (keys, rights and bounds checked as a NIC does; a failure puts the QP in error and flushes the rest),
and ``poll_cq`` hands out the completions it queued. The same proxy code ran against a real provider (soft-RoCE in a
QEMU guest: tests/softroce_proxy_check.py, tests/test_softroce.py)."""

from __future__ import annotations

import collections
import ctypes
import itertools
import threading
import types

import numpy as np
import pytest

from epkern import _verbs_cffi as V
from epkern._verbs_cffi._cdef import CONSTANTS
from epkern.errors import ArgumentError
from epkern.nic import FifoProducer, PeerRoute, ProxyError, ProxyService, TriggerFifo
from epkern.nic import verbs as NV
from epkern.nic.observation import NicError
from nic_test_support import LoggedHandles, close_services_and_nics
from thread_allgather import threaded_allgathers

C = CONSTANTS
ALL = V.DEFAULT_ACCESS
U64 = (1 << 64) - 1


class FakeProvider(LoggedHandles):
    """The subset of ``epkern._verbs_cffi`` that VerbsNic uses; one "fabric" shared by every fake device."""

    def __init__(self, *, max_inline_data=32, max_msg_sz=1 << 23, port_state=4):
        self.max_inline_data, self.max_msg_sz, self.port_state = max_inline_data, max_msg_sz, port_state
        self.log: list[str] = []
        self.mrs: dict[int, tuple[int, int, int]] = {}  # key -> (addr, length, access); lkey = rkey here
        self.qps: dict[int, types.SimpleNamespace] = {}
        self.posts: list[tuple[int, list[V.SendRequest]]] = []  # (qpn, chain) per post_send
        self._keys = itertools.count(0x500)
        self._qpns = itertools.count(0x11)
        self._lock = threading.Lock()
        self.PortAttr, self.PeerInfo, self.VerbsError = V.PortAttr, V.PeerInfo, V.VerbsError

    def open_device(self, name=None):
        if name not in (None, "rxe0"):
            raise V.RdmaUnavailableError(f"no RDMA device named {name!r}; devices: rxe0")
        return self._handle("ctx", name="rxe0")

    def query_port(self, ctx, port):
        return V.PortAttr(self.port_state, 5, 3, 0, 2, 4, 0, self.max_msg_sz, 1, 1, 5)

    def query_gid(self, ctx, port, index):
        gids = [bytes.fromhex("fe80000000000000" + "0211223344556677"), bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1])]
        if index >= 3:
            raise V.VerbsError("ibv_query_gid", 22)
        return gids[index] if index < 2 else bytes(16)

    def alloc_pd(self, ctx):
        return self._handle("pd", ctx=ctx)

    def reg_mr(self, pd, addr, length, access):
        key = next(self._keys)
        self.mrs[key] = (addr, length, access)
        return self._handle("mr", lambda: self.mrs.pop(key), addr=addr, length=length, lkey=key, rkey=key)

    def create_cq(self, ctx, cqe):
        return self._handle("cq", cqe=(1 << cqe.bit_length()) - 1, done=collections.deque())  # as rxe rounds

    def create_rc_qp(self, pd, send_cq, recv_cq=None, *, max_send_wr=64, max_send_sge=1, max_inline_data=0):
        qpn = next(self._qpns)
        h = self._handle(
            "qp",
            qp_num=qpn,
            max_send_wr=max_send_wr,
            max_inline_data=max(max_inline_data, self.max_inline_data) if max_inline_data else 0,
            cq=send_cq,
            peer=None,
            failed=False,
        )
        self.qps[qpn] = h
        return h

    def local_peer_info(self, qp, port_num=1, gid_index=0, psn=0):
        return V.PeerInfo(lid=0, gid=self.query_gid(None, port_num, gid_index), qpn=qp.qp_num, psn=psn, mtu=3)

    def connect_rc_qp(self, qp, local, peer, port_num=1, sgid_index=0, **kw):
        assert sgid_index == 1  # the IPv4-mapped GID was chosen
        qp.peer = self.qps[peer.qpn]

    def _check(self, key, addr, n, right):
        mr = self.mrs.get(key)
        if mr is None or not (mr[2] & right) or not (mr[0] <= addr and addr + n <= mr[0] + mr[1]):
            return False
        return True

    def post_send(self, qp, requests):
        assert not qp.closed and qp.peer is not None
        assert all(isinstance(r, V.SendRequest) for r in requests)
        if any(r.inline and r.length > qp.max_inline_data for r in requests):
            raise V.VerbsError("ibv_post_send", 22, "inline too long")
        with self._lock:
            self.posts.append((qp.qp_num, list(requests)))
            for r in requests:
                status = C["IBV_WC_WR_FLUSH_ERR"] if qp.failed else C["IBV_WC_SUCCESS"]
                if not qp.failed:
                    write = r.opcode == C["IBV_WR_RDMA_WRITE"]
                    right = C["IBV_ACCESS_REMOTE_WRITE"] if write else C["IBV_ACCESS_REMOTE_ATOMIC"]
                    local_ok = r.length == 0 or (r.inline and write) or self._check(r.lkey, r.local_addr, r.length, 1)
                    if not local_ok:
                        status = C["IBV_WC_LOC_PROT_ERR"]
                    elif not self._check(r.rkey, r.remote_addr, r.length, right):
                        status = C["IBV_WC_REM_ACCESS_ERR"]
                    elif write:
                        ctypes.memmove(r.remote_addr, r.local_addr, r.length)
                    else:
                        word = ctypes.c_uint64.from_address(r.remote_addr)
                        ctypes.c_uint64.from_address(r.local_addr).value = word.value
                        word.value = (word.value + r.add) & U64
                if status != C["IBV_WC_SUCCESS"]:
                    qp.failed = True
                if r.signaled or status != C["IBV_WC_SUCCESS"]:
                    qp.cq.done.append(V.WorkCompletion(r.wr_id, status, 1 if r.opcode == 0 else 4, qp.qp_num, 0, 0))

    def poll_cq(self, cq, max_entries=16):
        with self._lock:
            return [cq.done.popleft() for _ in range(min(max_entries, len(cq.done)))]


def _mesh(fake, n, nqps, size, max_send_wr=16):
    nics = [NV.VerbsNic("rxe0", name=f"rank{r}", verbs=fake) for r in range(n)]
    bufs = [np.zeros(2 * size, dtype=np.uint8) for _ in range(n)]
    mrs = [nic.reg_mr(b, access=ALL) for nic, b in zip(nics, bufs, strict=True)]
    qps = [
        [[nics[r].create_qp(nics[r].create_cq(32), max_send_wr) for _ in range(nqps)] for _ in range(n)]
        for r in range(n)
    ]
    gathers = threaded_allgathers(n)
    threads = [threading.Thread(target=nics[r].connect_mesh, args=(gathers[r], r, qps[r])) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return nics, bufs, mrs, qps


def test_no_device_here_is_explained():
    ok, why = V.rdma_available()
    if ok:
        pytest.skip(f"an RDMA device is present: {why}")
    with pytest.raises(V.RdmaUnavailableError):
        NV.VerbsNic("rxe0")


def test_open_choose_gid_validate_and_close_in_order():
    fake = FakeProvider()
    nic = NV.VerbsNic("rxe0", verbs=fake)
    assert nic.gid_index == 1 and nic.max_message_bytes == 1 << 23 and nic.device_name == "rxe0"
    cq = nic.create_cq(20)
    assert cq.cqe_cnt == 31
    qp = nic.create_qp(cq, 8, max_inline_data=16)
    assert (qp.slots, qp.max_batches, qp.max_inline_data, qp.state) == (8, 31, 32, "RESET")
    nic.reg_mr(np.zeros(64, np.uint8))
    for call, match in [
        (lambda: nic.create_cq(0), "cqe_cnt"),
        (lambda: nic.create_qp(object()), "cq: expected a CQ created by this NIC"),
        (lambda: nic.create_qp(cq, 0), "max_send_wr"),
        (lambda: nic.create_qp(cq, 8, max_inline_data=-1), "max_inline_data"),
        (lambda: nic.reg_mr(np.zeros((4, 4), np.uint8)[:, 0]), "C-contiguous"),
        (lambda: nic.reg_mr(np.zeros(8, np.uint8), 9), "length"),
        (lambda: nic.reg_mr(0x1000), "length"),
        (lambda: nic.reg_mr("buf"), "target"),
        (lambda: nic.reg_mr(np.zeros(8, np.uint8), access=-1), "access"),
        (lambda: nic.dereg_mr(object()), "mr: expected a memory region registered by this NIC"),
        (lambda: qp.connect(b"peer"), "peer: expected a PeerInfo"),
        (lambda: nic.connect_mesh(None, 0, [[qp]]), "allgather_bytes"),
        (lambda: nic.connect_mesh(lambda b: [b], 1, [[qp]]), "rank"),
        (lambda: NV.VerbsNic(7, verbs=fake), "device_name"),
        (lambda: NV.VerbsNic("rxe0", port=0, verbs=fake), "port"),
        (lambda: NV.VerbsNic("rxe0", gid_index=-1, verbs=fake), "gid_index"),
    ]:
        with pytest.raises(ArgumentError, match=match):
            call()
    nic.close()
    assert fake.log == ["qp", "cq", "mr", "pd", "ctx"] and fake.mrs == {}
    nic.close()
    assert fake.log == ["qp", "cq", "mr", "pd", "ctx"] and qp.state == "CLOSED"
    with pytest.raises(NicError, match="closed"):
        nic.create_cq(8)
    with pytest.raises(V.RdmaUnavailableError, match="not ACTIVE"):
        NV.VerbsNic("rxe0", verbs=FakeProvider(port_state=1))
    with pytest.raises(V.RdmaUnavailableError, match="no RDMA device named 'mlx5_9'"):
        NV.VerbsNic("mlx5_9", verbs=fake)


def test_proxy_posts_one_chain_per_batch_through_verbs_queue_pairs():
    """Two ranks, 2 QPs per peer (loopback included), 2 proxy threads per rank: writes of 0 B .. 3 KiB (inline up to
    64 B) and fetch-adds, then flushes; memory exact; every post_send is one batch with one signaled request, its
    last, whose wr_id is the batch end; small send queues cut big groups into queue-sized batches."""
    fake = FakeProvider()
    n, nqps, size = 2, 2, 1 << 19
    rng = np.random.default_rng(11)
    nics, bufs, mrs, qps = _mesh(fake, n, nqps, size, max_send_wr=8)
    for r in range(n):
        for p in range(n):
            for i in range(nqps):
                assert qps[r][p][i].state == "RTS" and fake.qps[qps[r][p][i].qpn].peer.qp_num == qps[p][r][i].qpn
    services = []
    try:
        expect = [b.copy() for b in bufs]
        for r in range(n):
            bufs[r][:size] = rng.integers(0, 256, size, dtype=np.uint8)
            expect[r][:size] = bufs[r][:size]
        fifos = [[TriggerFifo(64, name=f"r{r}f{j}") for j in range(2)] for r in range(n)]
        for r in range(n):
            routes = [PeerRoute(qps[r][p], mrs[p].addr, mrs[p].rkey) for p in range(n)]
            services.append(ProxyService(fifos[r], local=mrs[r], peers=routes, num_threads=2, timeout_s=10))
        sizes = [0, 1, 7, 8, 31, 32, 33, 64, 100, 1000, 3072]
        tickets = []
        for r in range(n):
            for j, f in enumerate(fifos[r]):
                prod = FifoProducer(f, timeout_s=10)
                for k in range(30):
                    p, length = (k + j) % n, sizes[k % len(sizes)]
                    lo = int(rng.integers(0, size - length))
                    dst = size + ((r * 2 + j) * 30 + k) * 3200
                    prod.write(p, k % nqps, lo, dst, length)
                    expect[p][dst : dst + length] = bufs[r][lo : lo + length]
                prod.atomic_add(1 - r, 1, 2 * size - 8, (3 + r) | (1 << 63))
                tickets.append((prod, prod.flush()))
        for prod, t in tickets:
            prod.wait_flushed(t, timeout_s=10)
        for p in range(n):
            counter = int(bufs[p][2 * size - 8 :].view(np.uint64)[0])
            assert counter == (2 * ((3 + (1 - p)) | (1 << 63))) & U64
            expect[p][2 * size - 8 :] = bufs[p][2 * size - 8 :]
            assert bufs[p].tobytes() == expect[p].tobytes()
        for s in services:
            s.close()
        by_qp = collections.defaultdict(list)
        for qpn, chain in fake.posts:
            by_qp[qpn].append(chain)
        for r in range(n):
            st = services[r].stats()
            mine = [q for row in qps[r] for q in row]
            assert st.doorbells == sum(q.counters.doorbells for q in mine) == sum(len(by_qp[q.qpn]) for q in mine)
            assert st.wqes == sum(q.counters.wqes for q in mine) == st.writes + st.atomics == 2 * 31
            for q in mine:
                assert q.counters.cqes == q.counters.doorbells and q.counters.errors == 0  # one completion per batch
                end = 0
                assert q.max_inline_data == 64
                for chain in by_qp[q.qpn]:
                    assert 1 <= len(chain) <= q.slots
                    assert [x.signaled for x in chain] == [False] * (len(chain) - 1) + [True]
                    assert [x.wr_id for x in chain] == list(range(end + 1, end + len(chain) + 1))
                    end += len(chain)
                    for x in chain:
                        assert x.inline == (x.opcode == C["IBV_WR_RDMA_WRITE"] and 0 < x.length <= 64)
        assert max(len(c) for _, c in fake.posts) == 8  # a group larger than the send queue was cut
        for nic in nics:
            nic.check()
    finally:
        close_services_and_nics(services, nics)


def test_a_bad_rkey_ends_as_a_proxy_error_naming_qp_and_status():
    fake = FakeProvider()
    nics, bufs, mrs, qps = _mesh(fake, 2, 1, 4096)
    try:
        f = TriggerFifo(16)
        routes = [PeerRoute(qps[0][p], mrs[p].addr, mrs[p].rkey + (1000 if p == 1 else 0)) for p in range(2)]
        svc = ProxyService([f], local=mrs[0], peers=routes, num_threads=1, timeout_s=5)
        prod = FifoProducer(f, timeout_s=5)
        prod.write(0, 0, 0, 4096, 16)  # fine (loopback)
        prod.write(1, 0, 0, 0, 100)  # bad rkey
        prod.write(1, 0, 0, 200, 100)
        t = prod.flush()
        with pytest.raises(ProxyError):
            prod.wait_flushed(t, timeout_s=5)
        q = qps[0][1][0]
        want = (
            rf"peer 1 qp 0 \(qpn {q.qpn}\): NIC error completion: work request 1 on qpn {q.qpn} completed with "
            r"IBV_WC_REM_ACCESS_ERR \(remote access error\)"
        )
        with pytest.raises(ProxyError, match=want):
            svc.close()
        assert q.state == "ERROR" and q.error.syndrome == C["IBV_WC_REM_ACCESS_ERR"] and q.error.wqe_counter == 1
        assert q.counters.errors == 2 and len(nics[0].faults) == 1  # the flushed last request is no new fault
        assert bufs[0][4096 : 4096 + 16].tobytes() == bufs[0][:16].tobytes() and not bufs[1].any()
        with pytest.raises(NicError, match="REM_ACCESS_ERR"):
            nics[0].check()
    finally:
        for nic in nics:
            nic.close()


def test_a_write_past_the_ports_largest_message_is_refused_by_name():
    fake = FakeProvider(max_msg_sz=4096)
    nics, bufs, mrs, qps = _mesh(fake, 2, 1, 8192)
    try:
        f = TriggerFifo(8)
        routes = [PeerRoute(qps[0][p], mrs[p].addr, mrs[p].rkey) for p in range(2)]
        svc = ProxyService([f], local=mrs[0], peers=routes, num_threads=1, timeout_s=5)
        FifoProducer(f, timeout_s=5).write(1, 0, 0, 0, 4097)
        with pytest.raises(ProxyError, match=r"peer 1 qp 0 .*4097 bytes exceeds the port's largest message \(4096"):
            svc.close()
        assert not fake.posts
    finally:
        for nic in nics:
            nic.close()


def test_a_misaligned_atomic_result_is_refused_naming_the_qp():
    fake = FakeProvider()
    nics, bufs, mrs, qps = _mesh(fake, 2, 1, 4096)
    try:
        f = TriggerFifo(8)
        routes = [PeerRoute(qps[0][p], mrs[p].addr, mrs[p].rkey) for p in range(2)]
        svc = ProxyService([f], local=mrs[0], peers=routes, atomic_result=(mrs[0].addr + 4, mrs[0].lkey), timeout_s=5)
        FifoProducer(f, timeout_s=5).atomic_add(1, 0, 8, 1)
        with pytest.raises(ProxyError, match=r"peer 1 qp 0 .*request 0 of the batch refused: result_addr: .* aligned"):
            svc.close()
        assert not fake.posts
    finally:
        for nic in nics:
            nic.close()
