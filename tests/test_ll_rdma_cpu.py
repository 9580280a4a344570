"""The RDMA route's host side (issue #17, step 5) on the CPU, over the fake CuPy (tests/fake_cupy.py).

A GPU Buffer of in-process ranks on virtual nodes with ``transport="rdma"``: the routes and the device QP table in the
device state, the RDMA build of the kernels (``EPK_LL_NIC``), and then what the kernels post (ll_route.cuh's
``rdma_write`` / ``route_signal``, modelled below by :class:`DevicePoster` through the table's addresses only: slot
reservation on the device counters, WQEs written into the ring the table names, commit in order, one doorbell per
call and peer) executed by the real emulated NIC, which watches the doorbell words, into the peers' LL areas; the
completion poller advances the ``retired`` words. Failures (a NIC fault, committed WQEs never rung) are Buffer errors
naming the rank and the peer. Kernels do not run here: tests/test_ll_gpu.py and tests/ll_mpi_worker.py run them.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time

import ml_dtypes
import numpy as np
import pytest

import fake_cupy as F
from epkern.errors import ArgumentError, EpkernError
from epkern.gpu.ll import layout as L
from epkern.gpu.ll.layout import ROUTE_IPC, ROUTE_RDMA, min_num_rdma_bytes
from epkern.nic import wqe as W
from epkern.nic.completions import widen

H, E, NUM_MAX = 128, 8, 8


@pytest.fixture
def fake(monkeypatch):
    from epkern.gpu.ll import nic_link

    _BEFORE.clear()
    _BEFORE.update(t.ident for t in threading.enumerate())
    with F.installed(monkeypatch) as launches:
        import cupy

        monkeypatch.setattr(nic_link, "host_mapped", F.FakeHostMapped)
        monkeypatch.setitem(sys.modules, "cupy.cuda.runtime", cupy.cuda.runtime)
        yield launches


def _on_ranks(fn, n=4, ranks_per_node=2):
    from epkern.group.threads import run_in_process

    return run_in_process(fn, n, ranks_per_node=ranks_per_node, timeout_s=30)


def _buffer(group, **kw):
    import epkern

    kw.setdefault("num_rdma_bytes", min_num_rdma_bytes(NUM_MAX, H, E))
    kw.setdefault("timeout_s", 20)
    kw.setdefault("transport", "rdma")
    return epkern.Buffer(group, num_nvl_bytes=0, low_latency_mode=True, backend="gpu", **kw)


_BEFORE: set = set()


def _nic_threads():
    """NIC, poller and proxy threads alive now that were not before this test (another file's test may leave a
    daemon thread on purpose: a NIC that could not be stopped)."""
    return [
        t
        for t in threading.enumerate()
        if t.name.startswith(("epkern-rank", "epkern-emulated-rank")) and t.ident not in _BEFORE
    ]


def _u64(addr: int) -> int:
    return ctypes.c_uint64.from_address(addr).value


def _set_u64(addr: int, value: int) -> None:
    ctypes.c_uint64.from_address(addr).value = value


class DevicePoster:
    """What the kernels do to post on peer ``p``'s QP, from the device table entry alone (epk::RdmaQp)."""

    def __init__(self, entry: np.ndarray):
        sq, dbrec, db, retired, ctr, raddr, keys, qp = (int(x) for x in entry)
        self.sq, self.dbrec, self.db, self.retired, self.ctr, self.raddr = sq, dbrec, db, retired, ctr, raddr
        self.rkey, self.lkey = keys & 0xFFFFFFFF, keys >> 32
        self.qpn, self.wqe_cnt = qp & 0xFFFFFFFF, qp >> 32

    def write(self, dst_off: int, src: int, nbytes: int, last: bool) -> None:
        pi = _u64(self.ctr)  # reserve_wqes
        _set_u64(self.ctr, pi + 1)
        assert pi + 1 - _u64(self.retired) <= self.wqe_cnt  # wait_sq_space
        ring = np.ctypeslib.as_array((ctypes.c_uint8 * (self.wqe_cnt * 64)).from_address(self.sq))
        W.build_rdma_write(
            ring,
            pi,
            qpn=self.qpn,
            raddr=self.raddr + dst_off,
            rkey=self.rkey,
            laddr=src,
            lkey=self.lkey,
            length=nbytes,
            signaled=last,
        )
        assert _u64(self.ctr + 8) == pi  # commit in order (one poster per QP here)
        _set_u64(self.ctr + 8, pi + 1)
        if last:  # commit_in_order's post_doorbell: doorbell record, then the 8-byte doorbell word
            ctypes.memmove(self.dbrec + 4, ((pi + 1) & 0xFFFF).to_bytes(4, "big"), 4)
            _set_u64(self.db, W.doorbell_u64(pi + 1, self.qpn))


def post_one_call_and_check(group, rdma, rt, routes) -> None:
    """What one call's kernels post to every RDMA peer, through the device table alone: 3 data WRITEs of 48 bytes
    from this rank's LL offset 4096 (rank + 1) + 1024 p + 64 k to the peer's 65536 + 256 rank + 64 k, then the signal
    WRITE of 16 bytes to the peer's 16 rank (the batch: one doorbell); waits for the retired words; then checks what
    every sender reaching this rank over RDMA (``routes``: this rank's row) wrote here."""
    import cupy

    table, mine = cupy.asnumpy(rdma.table), rt.region.ptr + rt.ll_offset
    for p in rdma.qps:
        d = DevicePoster(table[p])
        for k in range(3):
            src = 4096 * (group.rank + 1) + 1024 * p + 64 * k
            ctypes.memmove(mine + src, _payload(group.rank, p, k), 48)
            d.write(65536 + 256 * group.rank + 64 * k, mine + src, 48, False)
        ctypes.memmove(mine + 32768 + 32 * p, _payload(group.rank, p, "sig"), 16)
        d.write(16 * group.rank, mine + 32768 + 32 * p, 16, True)
    for p in rdma.qps:
        _wait(lambda p=p: int(rdma.retired[p][0]) == 4, f"rank {group.rank}: retired word of peer {p}")
    group.barrier()
    for s in range(group.size):
        if routes[s] != ROUTE_RDMA:
            continue
        for k in range(3):
            assert ctypes.string_at(mine + 65536 + 256 * s + 64 * k, 48) == _payload(s, group.rank, k)
        assert ctypes.string_at(mine + 16 * s, 16) == _payload(s, group.rank, "sig")


def _payload(sender: int, peer: int, k) -> bytes:
    """What `sender` writes to `peer` in post k (0..2: 48 data bytes; "sig": 16 signal bytes)."""
    n = 16 if k == "sig" else 48
    seed = 1000 * sender + 10 * peer + (9 if k == "sig" else k)
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _wait(cond, what, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, what
        time.sleep(0.005)


def test_widen_reconstructs_the_producer_index_across_16_bit_wraps():
    assert widen(0, 0) == 1 and widen(5, 9) == 10
    assert widen(65530, 3) == 65540  # the counter wrapped
    assert widen(65535, 0xFFFF) == 65536 and widen(1 << 40, 0x7FFE) == (1 << 40) + 0x7FFF  # advances <= 2^15


@pytest.mark.parametrize("hybrid", [True, False])
def test_rdma_buffer_state_table_and_posted_writes_land(fake, hybrid):
    """Routes and the QP table in the device state, RDMA builds in push mode; then, per remote peer, three unsignaled
    data WRITEs and the call's signal WRITE (signaled, one doorbell) land exactly in the peer's LL area, with NIC
    counters of exactly that and the retired word advanced by the poller."""
    import cupy

    from epkern.gpu.ll import routes as R

    def body(group):
        buf = _buffer(group, allow_nvlink_for_low_latency_mode=hybrid)
        be = buf._backend
        eng, rdma, rt = be.ll, be.nic_routes, be.rt
        nics = [R.local_nic(group)] * group.size
        want = R.route_table(group.node_of_rank, hybrid, "rdma", nics)[group.rank]
        state = cupy.asnumpy(eng.state)
        assert tuple(state[L.STATE_ROUTE : L.STATE_ROUTE + group.size]) == want == eng.routes
        assert eng.nic_build == ROUTE_RDMA and eng.dispatch_pull == 0 and eng.combine_pull == 0
        assert int(state[L.STATE_RDMA_TABLE : L.STATE_RDMA_TABLE + 2].view(np.uint64)[0]) == rdma.table_ptr
        assert sorted(rdma.qps) == [p for p, k in enumerate(want) if k == ROUTE_RDMA]
        table = cupy.asnumpy(rdma.table)
        assert table.shape == (group.size, L.RDMA_QP_BYTES // 8)
        assert not table[[p for p in range(group.size) if p not in rdma.qps]].any()  # no QP: a zero entry
        for p, qp in rdma.qps.items():
            d = DevicePoster(table[p])
            assert (d.qpn, d.wqe_cnt, d.lkey) == (qp.qpn, qp.wqe_cnt, rdma.link.local_mr.lkey)
            assert (d.raddr, d.rkey) == rdma.link.peer_targets[p]
            assert d.sq == qp.sq.ctypes.data and d.db == qp.db_reg.ctypes.data and d.dbrec == qp.dbrec.ctypes.data

        x = cupy.asarray(np.ones((4, H), ml_dtypes.bfloat16))
        idx = cupy.asarray(np.tile(np.arange(2, dtype=np.int64), (4, 1)))
        _, _, handle, _, _ = buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False)
        ll = [launch for launch in fake if launch[1].startswith("epk_ll_") and launch[6] == rt.comm_stream.ptr]
        assert {launch[2]["EPK_LL_NIC"] for launch in ll} == {ROUTE_RDMA}
        assert {launch[2].get("EPK_LL_PULL", 0) for launch in ll} == {0}

        assert all(qp.counters.cqes == 0 for qp in rdma.qps.values())
        post_one_call_and_check(group, rdma, rt, want)
        for p, qp in rdma.qps.items():
            assert qp.counters.cqes == 1, f"rank {group.rank}: completions from peer {p}'s QP"
        buf.check()
        counts = rdma.counters()
        assert all(c == dict(wqes=4, doorbells=1, bytes=3 * 48 + 16, cqes=1, errors=0) for c in counts.values())
        buf.destroy()

    _on_ranks(body)
    assert not _nic_threads()


def test_rdma_writes_land_exactly_and_nothing_else_is_touched(fake):
    """Two ranks on two nodes: rank 0 posts two WRITEs to rank 1; rank 1's LL area holds exactly those bytes and
    its poison elsewhere; rank 1 posts nothing and its NIC counts nothing."""

    def body(group):
        buf = _buffer(group)
        be = buf._backend
        rdma, rt = be.nic_routes, be.rt
        mine = rt.region.ptr + rt.ll_offset
        ctypes.memset(mine, 0xA5, rt.ll_bytes)
        group.barrier()
        import cupy

        table = cupy.asnumpy(rdma.table)
        expect = None
        if group.rank == 0:
            d = DevicePoster(table[1])
            ctypes.memmove(mine + 4096, bytes(range(64)), 64)
            ctypes.memmove(mine + 8192, b"\x01\x02\x03\x04", 4)
            d.write(1024, mine + 4096, 64, False)
            d.write(40, mine + 8192, 4, True)
            _wait(lambda: int(rdma.retired[1][0]) == 2, "rank 0: retired")
        group.barrier()
        if group.rank == 1:
            got = ctypes.string_at(mine, rt.ll_bytes)
            expect = bytearray(b"\xa5" * rt.ll_bytes)
            expect[1024:1088] = bytes(range(64))
            expect[40:44] = b"\x01\x02\x03\x04"
            assert got == bytes(expect)
            assert rdma.counters()[0]["wqes"] == 0
        group.barrier()
        buf.destroy()

    _on_ranks(body, 2, 1)
    assert not _nic_threads()


def test_rdma_ring_must_hold_one_call_per_peer(fake):
    """num_max x min(top-k, local experts) + 1 WRITEs per call and peer must fit the send ring (no launch else)."""
    import cupy

    def body(group):
        buf = _buffer(group)
        rdma = buf._backend.nic_routes
        rdma.ring_wqes = 8  # a tiny ring: 8 tokens x min(2, 4) + 1 = 17 WRITEs do not fit
        x = cupy.asarray(np.ones((4, H), ml_dtypes.bfloat16))
        idx = cupy.asarray(np.tile(np.arange(2, dtype=np.int64), (4, 1)))
        n = len(fake)
        with pytest.raises(ArgumentError, match=r"num_max_dispatch_tokens_per_rank: up to 17 RDMA WRITEs .* 8 WQEs"):
            buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False)
        assert not [launch for launch in fake[n:] if launch[1].startswith("epk_ll_")]
        buf.destroy()

    _on_ranks(body, 2, 1)


def test_an_rdma_fault_is_a_buffer_error_naming_rank_and_peer(fake):
    """A WRITE past the peer's LL area: the NIC refuses it (error CQE), the poller records it, the Buffer raises
    naming the rank, the peer and the QP, and destroy raises it too."""
    import cupy

    def body(group):
        buf = _buffer(group)
        rdma = buf._backend.nic_routes
        if group.rank == 0:
            d = DevicePoster(cupy.asnumpy(rdma.table)[1])
            mine = buf._backend.rt.region.ptr + buf._backend.rt.ll_offset
            d.write(buf._backend.rt.ll_bytes, mine, 64, True)
            _wait(lambda: rdma.failed, "rank 0: the fault was not reported")
            with pytest.raises(EpkernError, match=r"rank 0: RDMA route failed: peer 1 qp 0x[0-9a-f]+: error CQE"):
                buf.check()
            with pytest.raises(EpkernError, match="RDMA route failed"):
                buf.low_latency_dispatch(None, None, NUM_MAX, E)
        group.barrier()
        if group.rank == 0:
            with pytest.raises(EpkernError, match="RDMA route failed"):
                buf.destroy()
        else:
            buf.destroy()

    _on_ranks(body, 2, 1)
    assert not _nic_threads()


def test_committed_but_unrung_wqes_fail_the_teardown_within_the_deadline(fake):
    """A WQE the kernels committed but never rang (a kernel that died mid-call): destroy's quiesce waits at most the
    deadline for the NIC, then raises naming the peer and what the NIC executed, and stops the NIC."""
    import cupy

    def body(group):
        buf = _buffer(group, timeout_s=1)
        rdma = buf._backend.nic_routes
        if group.rank == 0:
            d = DevicePoster(cupy.asnumpy(rdma.table)[1])
            mine = buf._backend.rt.region.ptr + buf._backend.rt.ll_offset
            d.write(0, mine, 16, False)  # committed, no doorbell
            t0 = time.monotonic()
            with pytest.raises(
                EpkernError, match=r"rank 0: RDMA route failed: peer 1 .*executed 0 of 1 WQEs within 1 s"
            ):
                buf.destroy()
            assert time.monotonic() - t0 < 10
        else:
            buf.destroy()

    _on_ranks(body, 2, 1)
    assert not _nic_threads()


def test_auto_is_rdma_with_gpu_writable_rings_else_proxy_and_rdma_needs_them(fake, monkeypatch):
    from epkern.errors import ConfigError
    from epkern.gpu.ll import routes as R

    def body(group):
        buf = _buffer(group, transport="auto")
        kinds = set(buf._backend.ll.routes)
        buf.destroy()
        return kinds

    assert all(k == {ROUTE_IPC, ROUTE_RDMA} for k in _on_ranks(body, 2, 1))  # the emulated NIC's rings
    # a NIC without GPU-writable rings (the emulated one told so: the real one would need an RDMA device)
    monkeypatch.setattr(R, "local_nic", lambda g: R.NicInfo("emulated", str(g.hostnames[g.rank]), gpu_rings=False))
    assert all(k == {ROUTE_IPC, L.ROUTE_PROXY} for k in _on_ranks(body, 2, 1))

    def refused(group):
        with pytest.raises(ConfigError, match="no GPU-writable send rings"):
            _buffer(group)
        return True

    assert all(_on_ranks(refused, 2, 1))


def test_in_process_ranks_meet_before_a_kernel_is_loaded(fake, monkeypatch):
    """A specialisation's first use by in-process ranks: no rank loads its code (kernel_loader.get_function) before
    every rank arrived, i.e. before every peer's previous kernel ended (on the H100 a load in one of 4 in-process
    ranks held up the NIC copies a peer's still-running RDMA dispatch waited for)."""
    from epkern import kernel_loader

    arrived, loads = [], []
    real = kernel_loader.get_function
    lock = threading.Lock()

    def get_function(source, name, defines=None):
        if str(name).startswith("epk_ll_"):
            with lock:
                loads.append((name, len(arrived)))
        return real(source, name, defines)

    monkeypatch.setattr(kernel_loader, "get_function", get_function)
    import cupy

    def body(group):
        buf = _buffer(group)
        x = cupy.asarray(np.ones((4, H), ml_dtypes.bfloat16))
        idx = cupy.asarray(np.tile(np.arange(2, dtype=np.int64), (4, 1)))
        buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False)  # the sizes' first use: collective anyway
        group.barrier()
        if group.rank == 1:
            time.sleep(0.3)  # the late rank: rank 0 must not load the FP8 build before it arrives
        with lock:
            arrived.append(group.rank)
        buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=True)
        buf.destroy()

    _on_ranks(body, 2, 1)
    fp8 = loads[len(loads) // 2 :]  # each rank loads through its own launch cache: BF16 twice, then FP8 twice
    assert len(loads) == 4 and all(n == 2 for _, n in fp8), loads


def test_a_dispatch_over_the_rdma_route_is_captured(fake):
    """Inside a CUDA graph capture a dispatch over the RDMA route is recorded (launched onto the captured streams),
    not refused, and the host does not wait for it (an eager NIC-route call does)."""
    import cupy

    def body(group):
        buf = _buffer(group)
        rt = buf._backend.rt
        x = cupy.asarray(np.ones((4, H), ml_dtypes.bfloat16))
        idx = cupy.asarray(np.tile(np.arange(2, dtype=np.int64), (4, 1)))
        buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False)  # eager first: warmed and agreed
        waits, sync_bounded = [], rt.sync_bounded
        rt.sync_bounded = lambda waitable, *a, **k: (waits.append(waitable), sync_bounded(waitable, *a, **k))[1]
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            stream.begin_capture()
            try:
                buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False)
            finally:
                stream.end_capture()
        rt.sync_bounded = sync_bounded
        sends = buf._backend.ll.sends
        buf.destroy()
        return sends, rt.comm_stream in waits

    assert _on_ranks(body, 2, 1) == [(2, False), (2, False)]


def test_drained_counters_waits_for_the_nic_or_raises_naming_the_rank():
    """What benchmarks and tests read: the counters once the NIC executed what was committed; a NIC that did not get
    there is a TimeoutError naming the rank and what is missing, not counters read too early."""
    from types import SimpleNamespace

    from epkern.errors import EpkernError, TimeoutError
    from epkern.gpu.ll.rdma import RdmaTransport

    def transport(problem=None, state=0):
        qp = SimpleNamespace(state=state, ERROR=9)
        counters = lambda: {5: {"bytes": 8}}  # noqa: E731
        drain = lambda: problem  # noqa: E731
        return SimpleNamespace(rank=3, drain=drain, check=lambda: None, remote=[5], qps={5: qp}, counters=counters)

    assert RdmaTransport.drained_counters(transport()) == {5: {"bytes": 8}}
    with pytest.raises(TimeoutError, match="rank 3: RDMA route: peer 5 .* 1 of 2 WQEs"):
        RdmaTransport.drained_counters(transport("peer 5 qp 0x1: the NIC executed 1 of 2 WQEs"))
    with pytest.raises(EpkernError, match=r"rank 3: RDMA route: the QPs to peers \[5\] are in error"):
        RdmaTransport.drained_counters(transport(state=9))  # drain stopped waiting: partial counters refused
