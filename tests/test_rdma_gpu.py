"""GPU side of the RDMA and PROXY paths, with kernels/rdma_selftest.cu on pinned host-mapped memory.

- device-written WQEs decode to exactly the Python encoder's fields and bytes; doorbell record and word values;
- the emulated NIC (poll mode) executes device-written WQEs, one doorbell per batch by its counters;
- device-pushed proxy triggers have the Python record bytes and are executed exactly by the proxy threads;
- device waits (FIFO space, flush) end with an error record at their deadline or when the proxy failed.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import numpy as np
import pytest

from epkern.nic import (
    Access,
    EmulatedNic,
    PeerRoute,
    ProxyService,
    Trigger,
    TriggerFifo,
    TriggerOp,
)
from epkern.nic import fifo as F
from epkern.nic import wqe as W

SRC = Path(__file__).resolve().parent / "kernels" / "rdma_selftest.cu"
RDMA_WRITE, INLINE_U32, INLINE_U64, FETCH_ADD, NOP = range(5)
ALL = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_ATOMIC


@pytest.fixture
def rng():
    seed = secrets.randbits(32)
    print(f"seed={seed}")
    return np.random.default_rng(seed)


def _cupy():
    import cupy

    return cupy


def _fn(name):
    from epkern import kernel_loader

    return kernel_loader.get_function(SRC, name)


def _hm(nbytes):
    from epkern.memory import HostMapped

    return HostMapped(nbytes)


def _ptr(x) -> np.uint64:
    return np.uint64(x)


class Err:
    """An ErrorRecord (8 ints) in host-mapped memory."""

    def __init__(self):
        self.mem = _hm(32)
        self.v = self.mem.view(np.int32)

    @property
    def ptr(self):
        return _ptr(self.mem.device_ptr)

    def fields(self):
        return dict(
            zip(("claimed", "code", "rank", "phase", "peer", "seen", "expected"), map(int, self.v[:7]), strict=True)
        )


def _random_ops(rng, n, kinds=None):
    rows = np.zeros((n, 6), dtype=np.uint64)
    for i in range(n):
        kind = int(rng.integers(0, 5)) if kinds is None else kinds[i % len(kinds)]
        value = {RDMA_WRITE: rng.integers(0, 1 << 31), INLINE_U32: rng.integers(0, 1 << 32)}.get(
            kind, rng.integers(0, 1 << 63)
        )
        raddr, laddr = (int(x) for x in rng.integers(0, 1 << 63, 2))
        rkey, lkey = (int(x) for x in rng.integers(0, 1 << 32, 2))
        rows[i] = [kind, raddr, rkey, laddr, lkey, int(value)]
    return rows


def _python_wqe(ring, pi, qpn, row, signaled):
    kind, raddr, rkey, laddr, lkey, value = (int(x) for x in row)
    kw = dict(qpn=qpn, signaled=signaled)
    if kind == RDMA_WRITE:
        return W.build_rdma_write(ring, pi, raddr=raddr, rkey=rkey, laddr=laddr, lkey=lkey, length=value, **kw)
    if kind == INLINE_U32:
        return W.build_inline_write_u32(ring, pi, raddr=raddr, rkey=rkey, value=value, **kw)
    if kind == INLINE_U64:
        return W.build_inline_write_u64(ring, pi, raddr=raddr, rkey=rkey, value=value, **kw)
    if kind == FETCH_ADD:
        return W.build_fetch_add(ring, pi, raddr=raddr, rkey=rkey, add=value, laddr=laddr, lkey=lkey, **kw)
    return W.build_nop(ring, pi, **kw)


class SendQueue:
    """A send ring, doorbell record and doorbell word in host-mapped memory; producer counter and `ready` in device
    memory; the retired index in host-mapped memory (the host advances it)."""

    def __init__(self, wqe_cnt, start=0):
        cp = _cupy()
        self.wqe_cnt = wqe_cnt
        self.mem = _hm(wqe_cnt * 64 + 256)
        self.sq = self.mem.host[: wqe_cnt * 64]
        self.dbrec = self.mem.host[wqe_cnt * 64 : wqe_cnt * 64 + 8]
        self.db_reg = self.mem.host[wqe_cnt * 64 + 64 : wqe_cnt * 64 + 72]
        self.retired = self.mem.view(np.uint64, wqe_cnt * 64 + 128, 1)
        self.retired[0] = start
        self.counters = cp.array([start, start], dtype=cp.uint64)  # pi_counter, ready

    def launch(self, qpn, rows, per_batch, err, timeout_s=10.0):
        cp = _cupy()
        ops = cp.asarray(rows.reshape(-1))
        nb = rows.shape[0] // per_batch
        base = self.mem.device_ptr
        _fn("epk_selftest_write_wqes")(
            (nb,),
            (32,),
            (
                _ptr(base),
                np.uint32(self.wqe_cnt),
                _ptr(self.counters.data.ptr),
                _ptr(self.counters.data.ptr + 8),
                _ptr(base + self.wqe_cnt * 64 + 128),
                _ptr(base + self.wqe_cnt * 64),
                _ptr(base + self.wqe_cnt * 64 + 64),
                np.uint32(qpn),
                ops,
                np.int32(per_batch),
                err.ptr,
                np.uint64(int(timeout_s * 1e9)),
            ),
        )
        cp.cuda.runtime.deviceSynchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("start", [0, 13, 65530])  # 13: wraps the 16-slot ring; 65530: wraps the 16-bit pi
def test_device_wqes_equal_the_python_encoder(rng, start):
    q = SendQueue(16, start)
    err = Err()
    per = 10
    rows = _random_ops(rng, per, kinds=[RDMA_WRITE, INLINE_U32, INLINE_U64, FETCH_ADD, NOP])
    qpn = int(rng.integers(0, 1 << 24))
    q.launch(qpn, rows, per, err)
    assert err.fields()["claimed"] == 0, err.fields()
    want = np.zeros_like(q.sq)
    for i in range(per):
        _python_wqe(want, start + i, qpn, rows[i], signaled=i == per - 1)
    assert q.sq.tobytes() == want.tobytes()
    for i in range(per):
        got, exp = W.decode_wqe(q.sq, start + i), W.decode_wqe(want, start + i)
        assert got == exp and got.signaled == (i == per - 1)
    end = start + per
    rec = np.zeros(8, dtype=np.uint8)
    W.encode_dbrec(rec, end)
    assert q.dbrec.tobytes() == rec.tobytes() and W.decode_dbrec(q.dbrec) == end & 0xFFFF
    assert q.db_reg.tobytes() == W.doorbell_value(end, qpn)
    assert [int(x) for x in q.counters.get()] == [end, end]


@pytest.mark.gpu
def test_concurrent_batches_ring_in_reservation_order(rng):
    q = SendQueue(64)
    err = Err()
    per, nb = 5, 12
    rows = _random_ops(rng, per * nb, kinds=[RDMA_WRITE, INLINE_U64, FETCH_ADD])
    qpn = int(rng.integers(0, 1 << 24))
    q.launch(qpn, rows, per, err)
    assert err.fields()["claimed"] == 0
    starts = set()
    for pi in range(0, per * nb, per):
        first = W.decode_wqe(q.sq, pi)
        # find which batch sits here by its first WQE, then every WQE of the batch must follow in order
        b = next(b for b in range(nb) if _python_decoded(rows[b * per], pi, qpn, False) == first)
        starts.add(b)
        for i in range(per):
            assert W.decode_wqe(q.sq, pi + i) == _python_decoded(rows[b * per + i], pi + i, qpn, i == per - 1)
    assert starts == set(range(nb))
    assert W.decode_dbrec(q.dbrec) == per * nb and q.db_reg.tobytes() == W.doorbell_value(per * nb, qpn)


def _python_decoded(row, pi, qpn, signaled):
    ring = np.zeros(64 * 64, dtype=np.uint8)
    _python_wqe(ring, pi, qpn, row, signaled)
    return W.decode_wqe(ring, pi)


@pytest.mark.gpu
def test_emulated_nic_executes_device_wqes_one_doorbell_per_batch(rng):
    """The QP's ring and doorbells are host-mapped; the kernel posts; the poll-mode NIC executes exactly."""
    a, b = EmulatedNic(name="A", poll_doorbells=True), EmulatedNic(name="B")
    try:
        src = rng.integers(0, 256, 4096, dtype=np.uint8)
        dst = np.zeros(4096, dtype=np.uint8)
        res = np.zeros(8, dtype=np.uint64)
        smr, rmr = a.reg_mr(src, access=Access.LOCAL_WRITE), a.reg_mr(res, access=Access.LOCAL_WRITE)
        dmr = b.reg_mr(dst, access=ALL)
        qp = a.create_qp(a.create_cq(16), 16)
        qp.connect(b.create_qp(b.create_cq(16), 16))
        sq = SendQueue(16)
        qp.sq, qp.dbrec, qp.db_reg = sq.sq, sq.dbrec, sq.db_reg  # before anything is posted
        err = Err()
        expect = np.zeros_like(dst)
        counter = 7
        dst[4000:4008].view(np.uint64)[0] = counter
        for batch in range(3):
            rows = []
            for k in range(6):
                off = 512 * batch + 64 * k
                if k == 3:
                    v = int(rng.integers(0, 1 << 32))
                    rows.append([INLINE_U32, dmr.addr + off, dmr.rkey, 0, 0, v])
                    expect[off : off + 4] = np.frombuffer(v.to_bytes(4, "little"), np.uint8)
                elif k == 4:
                    v = int(rng.integers(0, 1 << 63))
                    rows.append([INLINE_U64, dmr.addr + off, dmr.rkey, 0, 0, v])
                    expect[off : off + 8] = np.frombuffer(v.to_bytes(8, "little"), np.uint8)
                elif k == 5:
                    add = int(rng.integers(0, 1 << 40))
                    rows.append([FETCH_ADD, dmr.addr + 4000, dmr.rkey, rmr.addr + 8 * batch, rmr.lkey, add])
                    counter += add
                else:
                    n = int(rng.integers(1, 64))
                    so = int(rng.integers(0, 4096 - n))
                    rows.append([RDMA_WRITE, dmr.addr + off, dmr.rkey, smr.addr + so, smr.lkey, n])
                    expect[off : off + n] = src[so : so + n]
            sq.launch(qp.qpn, np.array(rows, dtype=np.uint64), 6, err)
            (cqe,) = qp.cq.wait(1, timeout=10)
            assert not cqe.is_error and cqe.wqe_counter == 6 * batch + 5
            sq.retired[0] = 6 * (batch + 1)
            c = qp.counters
            assert (c.doorbells, c.wqes, c.cqes, c.errors) == (batch + 1, 6 * (batch + 1), batch + 1, 0)
        expect[4000:4008] = np.frombuffer(counter.to_bytes(8, "little"), np.uint8)
        assert np.array_equal(dst, expect)
        a.check()
        assert err.fields()["claimed"] == 0
    finally:
        a.close()
        b.close()


# --- proxy triggers ---------------------------------------------------------------------------------------------------


class DeviceFifos:
    def __init__(self, count, capacity, head_in_device=True):
        cp = _cupy()
        self.mems = [_hm(F.fifo_nbytes(capacity)) for _ in range(count)]
        self.fifos = [
            TriggerFifo(capacity, m.host[: F.fifo_nbytes(capacity)], name=f"gpu{i}") for i, m in enumerate(self.mems)
        ]
        self.heads = cp.zeros(count, dtype=cp.uint64)
        self.bases = cp.array([m.device_ptr for m in self.mems], dtype=cp.uint64)
        if head_in_device:
            self.head_ptrs = cp.array([self.heads.data.ptr + 8 * i for i in range(count)], dtype=cp.uint64)
        else:
            self.head_ptrs = cp.zeros(count, dtype=cp.uint64)  # 0: the head word inside each FIFO block
        self.capacity = capacity

    def push(self, rows, warp_aggregated, err, timeout_s=20.0, threads=128):
        cp = _cupy()
        n = rows.shape[0]
        tickets = cp.zeros(n, dtype=cp.uint64)
        _fn("epk_selftest_push_triggers")(
            ((n + threads - 1) // threads,),
            (threads,),
            (
                self.bases,
                self.head_ptrs,
                np.int32(len(self.fifos)),
                np.uint32(self.capacity),
                cp.asarray(rows.reshape(-1)),
                np.int32(n),
                np.int32(warp_aggregated),
                tickets,
                err.ptr,
                np.uint64(int(timeout_s * 1e9)),
            ),
        )
        cp.cuda.runtime.deviceSynchronize()
        return tickets.get()

    def flush(self, err, timeout_s=20.0):
        cp = _cupy()
        out = cp.zeros(len(self.fifos), dtype=cp.uint64)
        _fn("epk_selftest_flush")(
            (1,),
            (32,),
            (
                self.bases,
                self.head_ptrs,
                np.int32(len(self.fifos)),
                np.uint32(self.capacity),
                out,
                err.ptr,
                np.uint64(int(timeout_s * 1e9)),
            ),
        )
        cp.cuda.runtime.deviceSynchronize()
        return [int(x) for x in out.get()]


def _trigger_rows(trigs):
    return np.array(
        [[t.op | t.peer << 8 | t.qp << 24, t.local_offset, t.remote_offset, t.value] for t in trigs], dtype=np.uint64
    )


@pytest.mark.gpu
@pytest.mark.parametrize("warp_aggregated", [0, 1])
@pytest.mark.parametrize("head_in_device", [True, False])
def test_device_trigger_records_equal_the_python_encoder(rng, warp_aggregated, head_in_device):
    d = DeviceFifos(1, 128, head_in_device)
    trigs = [
        Trigger(
            int(rng.integers(1, 4)),
            int(rng.integers(0, 1 << 16)),
            int(rng.integers(0, 256)),
            *map(int, rng.integers(0, 1 << 62, 3)),
        )
        for _ in range(100)
    ]
    err = Err()
    tickets = d.push(_trigger_rows(trigs), warp_aggregated, err)
    assert err.fields()["claimed"] == 0
    assert sorted(int(t) for t in tickets) == list(range(100))
    f = d.fifos[0]
    for t, ticket in zip(trigs, tickets, strict=True):
        ticket = int(ticket)
        raw = f.buffer[256 + 32 * ticket : 256 + 32 * ticket + 32].tobytes()
        assert raw == F.encode_trigger(
            Trigger(t.op, t.peer, t.qp, t.local_offset, t.remote_offset, t.value, ticket + 1)
        )
    if head_in_device:
        assert int(d.heads.get()[0]) == 100 and f.head == 0
    else:
        assert f.head == 100
    if warp_aggregated:  # one atomicAdd per warp: a warp's tickets are consecutive in lane order
        for w in range(0, 96, 32):
            assert [int(x) for x in tickets[w : w + 32]] == list(range(int(tickets[w]), int(tickets[w]) + 32))


@pytest.mark.gpu
@pytest.mark.parametrize("warp_aggregated", [0, 1])
def test_gpu_kernel_drives_the_proxy_end_to_end(rng, warp_aggregated):
    """1024 device threads push writes and atomic adds through 4 16-slot FIFOs (back-pressure) to two peers; 4
    proxy threads post them; a device flush returns; the peers' memory is exact."""
    nics = [EmulatedNic(name=f"rank{r}") for r in range(3)]
    svc = None
    try:
        bufs = [np.zeros(1 << 17, dtype=np.uint8) for _ in range(3)]
        bufs[0][:] = rng.integers(0, 256, bufs[0].size, dtype=np.uint8)
        mrs = [nic.reg_mr(buf, access=ALL) for nic, buf in zip(nics, bufs, strict=True)]
        routes = {}
        for p in (1, 2):
            qps = []
            for _ in range(2):
                q = nics[0].create_qp(nics[0].create_cq(64), 32)
                q.connect(nics[p].create_qp(nics[p].create_cq(16), 32))
                qps.append(q)
            routes[p] = PeerRoute(qps, mrs[p].addr, mrs[p].rkey)
        d = DeviceFifos(4, 16)
        svc = ProxyService(d.fifos, local=mrs[0], peers=routes, num_threads=4, timeout_s=20)
        trigs, expect = [], [np.zeros_like(b) for b in bufs]
        for k in range(1024):
            peer, qp = 1 + k % 2, (k // 2) % 2
            if k % 5 == 4:
                c, v = int(rng.integers(0, 16)), int(rng.integers(-(1 << 40), 1 << 40))
                trigs.append(Trigger(TriggerOp.ATOMIC_ADD, peer, qp, 0, 8 * c, v & ((1 << 64) - 1)))
                cur = int(expect[peer][8 * c : 8 * c + 8].view(np.uint64)[0])
                expect[peer][8 * c : 8 * c + 8] = np.frombuffer(((cur + v) % (1 << 64)).to_bytes(8, "little"), np.uint8)
            else:
                n = int(rng.integers(1, 100))
                so = int(rng.integers(0, bufs[0].size - n))
                trigs.append(Trigger(TriggerOp.WRITE, peer, qp, so, 1024 + 120 * k, n))
                expect[peer][1024 + 120 * k : 1024 + 120 * k + n] = bufs[0][so : so + n]
        err = Err()
        t0 = time.monotonic()
        d.push(_trigger_rows(trigs), warp_aggregated, err)
        assert err.fields()["claimed"] == 0, err.fields()
        flushed = d.flush(err)
        assert err.fields()["claimed"] == 0, err.fields()
        assert flushed == [257] * 4 and time.monotonic() - t0 < 20  # 256 triggers + the flush per FIFO
        for p in (1, 2):
            assert np.array_equal(bufs[p], expect[p]), f"peer {p}"
        st = svc.stats()
        assert (st.writes + st.atomics, st.flushes) == (1024, 4)
        svc.close()
        svc = None
    finally:
        if svc is not None:
            try:
                svc.close()
            except Exception:  # noqa: BLE001
                pass
        for nic in nics:
            nic.close()


@pytest.mark.gpu
def test_device_waits_end_at_the_deadline_or_on_proxy_failure():
    d = DeviceFifos(1, 4)
    err = Err()
    t0 = time.monotonic()
    assert d.flush(err, timeout_s=0.3) == [0]  # no proxy: the flush never completes
    assert 0.3 <= time.monotonic() - t0 < 10
    assert {k: err.fields()[k] for k in ("claimed", "code", "phase")} == {"claimed": 1, "code": 1, "phase": 0x502}
    d.fifos[0].set_error(1)
    err2 = Err()
    t0 = time.monotonic()
    assert d.flush(err2, timeout_s=30) == [0]
    assert time.monotonic() - t0 < 10
    assert (err2.fields()["code"], err2.fields()["phase"]) == (4, 0x502)
    # a full FIFO with no consumer: the push gives up at its deadline
    e = DeviceFifos(1, 4)
    err3 = Err()
    rows = _trigger_rows([Trigger(TriggerOp.WRITE, 0, 0, 0, 0, 8)] * 6)
    e.push(rows, 0, err3, timeout_s=0.3, threads=32)
    assert (err3.fields()["code"], err3.fields()["phase"]) == (1, 0x501)
