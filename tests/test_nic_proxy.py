"""The PROXY transport on the CPU: trigger FIFO bytes and protocol, and proxy threads posting to emulated NICs."""

from __future__ import annotations

import re
import secrets
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from epkern import _env
from epkern.errors import ConfigError
from epkern.errors import TimeoutError as EpkTimeout
from epkern.nic import (
    Access,
    EmulatedNic,
    FifoProducer,
    HostMemory,
    LocalRegion,
    PeerRoute,
    ProxyError,
    ProxyService,
    ProxyTimeoutError,
    Trigger,
    TriggerFifo,
    TriggerOp,
)
from epkern.nic import fifo as F
from epkern.nic import wqe as W
from thread_cpu import cpu_seconds

ALL = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_ATOMIC
KERNELS = Path(__file__).resolve().parents[1] / "kernels"


@pytest.fixture
def rng(request):
    seed = secrets.randbits(32)
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return np.random.default_rng(seed)


# --- the record -------------------------------------------------------------------------------------------------------


def test_record_layout_is_the_documented_one():
    t = Trigger(
        TriggerOp.WRITE, peer=0x1234, qp=0x56, local_offset=0x0102030405060708, remote_offset=9, value=77, seq=5
    )
    raw = F.encode_trigger(t)
    assert len(raw) == F.TRIGGER_BYTES == 32
    assert raw[0:8] == (0x0102030405060708).to_bytes(8, "little")
    assert raw[8:16] == (9).to_bytes(8, "little") and raw[16:24] == (77).to_bytes(8, "little")
    assert raw[24:26] == b"\x34\x12" and raw[26] == 0x56 and raw[27] == TriggerOp.WRITE
    assert raw[28:32] == (5).to_bytes(4, "little")
    assert F.decode_trigger(raw) == t
    # a negative addend is stored two's complement and decodes as u64
    a = F.decode_trigger(F.encode_trigger(Trigger(TriggerOp.ATOMIC_ADD, value=-3)))
    assert a.value == (1 << 64) - 3


def test_record_round_trip_random(rng):
    for _ in range(500):
        t = Trigger(
            op=int(rng.choice([1, 2, 3])),
            peer=int(rng.integers(0, 1 << 16)),
            qp=int(rng.integers(0, 256)),
            local_offset=int(rng.integers(0, 1 << 63)) * 2 + int(rng.integers(0, 2)),
            remote_offset=int(rng.integers(0, 1 << 63)),
            value=int(rng.integers(0, 1 << 63)),
            seq=int(rng.integers(0, 1 << 32)),
        )
        assert F.decode_trigger(F.encode_trigger(t)) == t


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(peer=1 << 16), "peer"),
        (dict(qp=256), "qp"),
        (dict(local_offset=1 << 64), "local_offset"),
        (dict(remote_offset=-1), "remote_offset"),
        (dict(value=-1), "value"),
    ],
)
def test_record_fields_are_range_checked(kw, match):
    with pytest.raises(ProxyError, match=match):
        F.encode_trigger(Trigger(TriggerOp.WRITE, **kw))


def test_fifo_construction_checks():
    with pytest.raises(ProxyError, match="power of two"):
        TriggerFifo(6)
    with pytest.raises(ProxyError, match="smaller"):
        TriggerFifo(8, np.zeros(F.fifo_nbytes(4), dtype=np.uint8))
    with pytest.raises(ProxyError, match="uint8"):
        TriggerFifo(8, np.zeros(F.fifo_nbytes(8) // 8, dtype=np.uint64))
    f = TriggerFifo(8)
    assert f.address % 64 == 0 and f.buffer.nbytes == 256 + 8 * 32
    assert (f.head, f.tail, f.flushed, f.error) == (0, 0, 0, 0)


def test_fifo_in_caller_memory_and_control_word_offsets():
    mem = np.zeros(F.fifo_nbytes(4) + 128, dtype=np.uint8)
    off = -mem.ctypes.data % 64
    f = TriggerFifo(4, mem[off:])
    p = FifoProducer(f, timeout_s=1)
    p.write(3, 1, 10, 20, 30)
    f.release(1)
    f.set_flushed(7)
    f.set_error(2)
    words = mem[off : off + 256].view(np.uint64)
    assert words[0] == 1 and words[8] == 1 and words[16] == 7 and mem[off + 136 : off + 140].view(np.uint32)[0] == 2
    rec = mem[off + 256 : off + 288]
    assert F.decode_trigger(rec) == Trigger(TriggerOp.WRITE, 3, 1, 10, 20, 30, seq=1)


def test_order_wrap_and_stale_records(rng):
    """3.5 laps through an 8-slot ring with a manual consumer: in order, exact, stale slots never read as new."""
    f = TriggerFifo(8)
    p = FifoProducer(f, timeout_s=2)
    sent = []
    got = []
    t = 0
    for lap in range(28):
        trig = Trigger(
            TriggerOp.WRITE, int(rng.integers(0, 100)), int(rng.integers(0, 4)), *map(int, rng.integers(0, 1 << 40, 3))
        )
        assert p.push(trig) == lap
        sent.append(trig)
        if lap % 3 == 2:  # consume in bursts
            while (r := f.peek(t)) is not None:
                got.append(Trigger(r.op, r.peer, r.qp, r.local_offset, r.remote_offset, r.value))
                assert r.seq == (t + 1) & 0xFFFFFFFF
                t += 1
                f.release(t)
            assert f.peek(t) is None and f.peek(t + 8) is None  # slot t % 8 holds ticket t - 8: stale
    while (r := f.peek(t)) is not None:
        got.append(Trigger(r.op, r.peer, r.qp, r.local_offset, r.remote_offset, r.value))
        t += 1
    assert got == sent and f.head == 28


def test_seq_wraps_at_2_pow_32():
    f = TriggerFifo(4)
    base = (1 << 32) - 2
    f._words[0] = base  # head
    f.release(base)
    p = FifoProducer(f, timeout_s=1)
    for i in range(4):
        assert p.write(0, 0, i, i, i) == base + i
    seqs = [f.peek(base + i).seq for i in range(4)]
    assert seqs == [(1 << 32) - 1, 0, 1, 2]
    assert f.peek(base + 4) is None


def test_back_pressure_blocks_until_the_consumer_drains():
    f = TriggerFifo(4)
    p = FifoProducer(f, timeout_s=5)
    for i in range(4):
        p.write(0, 0, i, i, 1)

    def consume_later():
        time.sleep(0.2)
        f.release(2)

    th = threading.Thread(target=consume_later)
    th.start()
    t0 = time.monotonic()
    assert p.write(0, 0, 4, 4, 1) == 4
    assert p.write(0, 0, 5, 5, 1) == 5
    waited = time.monotonic() - t0
    th.join()
    assert waited >= 0.15, waited
    assert f.peek(4).local_offset == 4 and f.peek(5).local_offset == 5 and f.peek(2).local_offset == 2


def test_full_fifo_with_stopped_consumer_raises_after_the_deadline():
    f = TriggerFifo(2)
    p = FifoProducer(f, timeout_s=0.2)
    p.write(0, 0, 0, 0, 1)
    p.write(0, 0, 0, 0, 1)
    t0 = time.monotonic()
    with pytest.raises(ProxyTimeoutError, match="ticket 2") as ei:
        p.write(0, 0, 0, 0, 1)
    assert isinstance(ei.value, EpkTimeout)
    assert 0.2 <= time.monotonic() - t0 < 2.0
    with pytest.raises(ProxyTimeoutError, match="flush ticket 9"):
        p.wait_flushed(9, timeout_s=0.05)


def test_producer_stops_at_once_when_the_service_failed():
    f = TriggerFifo(2)
    p = FifoProducer(f, timeout_s=30)
    p.write(0, 0, 0, 0, 1)
    p.write(0, 0, 0, 0, 1)
    threading.Timer(0.1, f.set_error, args=(1,)).start()
    t0 = time.monotonic()
    with pytest.raises(ProxyError, match="failed"):
        p.write(0, 0, 0, 0, 1)
    assert time.monotonic() - t0 < 5
    with pytest.raises(ProxyError, match="failed"):
        p.flush()


# --- emulated ranks ---------------------------------------------------------------------------------------------------


class World:
    """``n`` ranks, one emulated NIC each; rank r's symmetric buffer is [send area | receive area] of ``size``
    bytes each, registered with every right; ``nqps`` RC QPs (own CQs) from every rank to every rank (itself
    included: a loopback QP); a proxy service per rank over its FIFOs."""

    def __init__(self, n=2, size=1 << 16, nqps=1, wqe_cnt=64, cqe_cnt=64, memory=None):
        self.n, self.size = n, size
        self.nics = [EmulatedNic(memory=(memory(r) if memory else None), name=f"rank{r}") for r in range(n)]
        self.bufs = [np.zeros(2 * size, dtype=np.uint8) for _ in range(n)]
        self.mrs = [nic.reg_mr(b, access=ALL) for nic, b in zip(self.nics, self.bufs, strict=True)]
        self.qps = [[[] for _ in range(n)] for _ in range(n)]
        for r in range(n):
            for p in range(n):
                for _ in range(nqps):
                    qa = self.nics[r].create_qp(self.nics[r].create_cq(cqe_cnt), wqe_cnt)
                    qb = self.nics[p].create_qp(self.nics[p].create_cq(16), wqe_cnt)
                    qa.connect(qb)
                    qb.connect(qa)
                    self.qps[r][p].append(qa)
        self.services: list[ProxyService] = []

    def routes(self, r, rkey_delta=0):
        return [PeerRoute(self.qps[r][p], self.mrs[p].addr, self.mrs[p].rkey + rkey_delta) for p in range(self.n)]

    def service(self, r, fifos, **kw):
        kw.setdefault("timeout_s", 10)
        s = ProxyService(fifos, local=self.mrs[r], peers=kw.pop("peers", None) or self.routes(r), **kw)
        self.services.append(s)
        return s

    def send(self, r):
        return self.bufs[r][: self.size]

    def recv(self, r):
        return self.bufs[r][self.size :]

    def close(self):
        errs = []
        for s in self.services:
            try:
                s.close()
            except ProxyError as e:
                errs.append(e)
        for nic in self.nics:
            nic.close()
        return errs


@pytest.fixture
def world():
    w = World()
    yield w
    w.close()


def _proxy_threads():
    return [t for t in threading.enumerate() if t.name.startswith("epkern-proxy") and t.is_alive()]


@pytest.mark.parametrize("nthreads,nfifos,nqps", [(1, 1, 1), (4, 8, 4), (3, 5, 2), (4, 2, 1)])
def test_threads_by_fifos_move_data_between_ranks_exactly(rng, nthreads, nfifos, nqps):
    """Two ranks; every FIFO has its own producer thread writing random chunks (random QP) from its send area into
    disjoint places of both ranks' receive areas; after a flush everything matches, byte for byte."""
    w = World(n=2, nqps=nqps, wqe_cnt=16)
    try:
        for r in range(2):
            w.send(r)[:] = rng.integers(0, 256, w.size, dtype=np.uint8)
        fifos = [[TriggerFifo(16, name=f"r{r}f{i}") for i in range(nfifos)] for r in range(2)]
        services = [w.service(r, fifos[r], num_threads=nthreads) for r in range(2)]
        assert all(s.num_threads == min(nthreads, nfifos) for s in services)
        # each (rank, fifo) owns a slice of every destination's receive area
        slice_bytes = w.size // (2 * nfifos)
        expect = [np.zeros(w.size, dtype=np.uint8) for _ in range(2)]
        plans = {}
        for r in range(2):
            for i in range(nfifos):
                ops = []
                for dst in range(2):
                    base = (r * nfifos + i) * slice_bytes
                    pos = 0
                    while True:
                        n = int(rng.integers(0, 200))
                        if pos + n > slice_bytes:
                            break
                        src_off = int(rng.integers(0, w.size - n + 1))
                        ops.append((dst, int(rng.integers(0, nqps)), src_off, w.size + base + pos, n))
                        expect[dst][base + pos : base + pos + n] = w.send(r)[src_off : src_off + n]
                        pos += n + int(rng.integers(0, 8))
                rng.shuffle(ops)
                plans[r, i] = ops

        def produce(r, i):
            p = FifoProducer(fifos[r][i], timeout_s=10)
            for dst, qp, src_off, dst_off, n in plans[r, i]:
                p.write(dst, qp, src_off, dst_off, n)
            p.wait_flushed(p.flush())

        ths = [threading.Thread(target=produce, args=key) for key in plans]
        for t in ths:
            t.start()
        for t in ths:
            t.join(30)
        assert not any(t.is_alive() for t in ths)
        for r in range(2):
            assert np.array_equal(w.recv(r), expect[r]), f"rank {r} receive area differs"
        total = sum(len(v) for v in plans.values())
        assert sum(s.stats().writes for s in services) == total
        assert sum(nic.counters().wqes for nic in w.nics) == total
        for s in services:
            s.check()
    finally:
        assert not w.close()
    assert not _proxy_threads()


def test_atomics_sum_exactly_under_concurrency(rng):
    """8 producer threads on 4 FIFOs (2 proxy threads, 2 QPs per peer) add random signed values to 5 counters on
    each of two ranks; the counters end at their initial values plus the sums, modulo 2**64."""
    w = World(n=2, nqps=2, wqe_cnt=8, cqe_cnt=16)
    try:
        counters = [w.recv(r)[:40].view(np.uint64) for r in range(2)]
        init = [rng.integers(0, 1 << 63, 5, dtype=np.uint64) for _ in range(2)]
        for r in range(2):
            counters[r][:] = init[r]
        fifos = [TriggerFifo(8, name=f"f{i}") for i in range(4)]
        w.service(0, fifos, num_threads=2)
        adds = rng.integers(-(1 << 40), 1 << 40, size=(8, 300))
        dst = rng.integers(0, 2, size=(8, 300))
        idx = rng.integers(0, 5, size=(8, 300))
        qps = rng.integers(0, 2, size=(8, 300))

        def produce(k):
            p = FifoProducer(fifos[k % 4], timeout_s=10)
            for j in range(300):
                p.atomic_add(int(dst[k, j]), int(qps[k, j]), w.size + 8 * int(idx[k, j]), int(adds[k, j]))
            p.wait_flushed(p.flush())

        ths = [threading.Thread(target=produce, args=(k,)) for k in range(8)]
        for t in ths:
            t.start()
        for t in ths:
            t.join(60)
        for r in range(2):
            for c in range(5):
                total = int(adds[(dst == r) & (idx == c)].sum())
                assert int(counters[r][c]) == (int(init[r][c]) + total) % (1 << 64), (r, c)
        assert w.services[0].stats().atomics == 8 * 300
    finally:
        assert not w.close()


def test_one_doorbell_per_peer_per_burst(rng):
    """Triggers for two peers (and two QPs of one peer), interleaved in two FIFOs of one thread, pre-filled before the
    thread starts: one burst, so each QP gets exactly one doorbell, one signaled WQE and one CQE."""
    w = World(n=3, nqps=2, wqe_cnt=64)
    try:
        fifos = [TriggerFifo(64, name=f"f{i}") for i in range(2)]
        svc = w.service(0, fifos, num_threads=1, start=False)
        prods = [FifoProducer(f, timeout_s=5) for f in fifos]
        w.send(0)[:] = rng.integers(0, 256, w.size, dtype=np.uint8)
        counts = {(1, 0): 0, (2, 0): 0, (2, 1): 0}
        keys = list(counts)
        for k in range(60):
            peer, qp = keys[int(rng.integers(0, 3))]
            if k % 7 == 3:
                prods[k % 2].atomic_add(peer, qp, 8 * int(rng.integers(0, 16)), 1)
            else:
                prods[k % 2].write(peer, qp, 64 * k, w.size + 64 * k, 64)
            counts[peer, qp] += 1
        svc.start()
        for p in prods:
            p.wait_flushed(p.flush(), timeout_s=10)
        for (peer, qp), n in counts.items():
            c = w.qps[0][peer][qp].counters
            assert (c.doorbells, c.wqes, c.cqes, c.errors) == (1, n, 1, 0), (peer, qp, c)
        assert w.qps[0][1][1].counters.doorbells == 0 and w.qps[0][0][0].counters.doorbells == 0
        st = svc.stats()
        assert (st.bursts, st.doorbells, st.wqes, st.flushes) == (1, 3, 60, 2)
        for k in range(60):  # every write landed at its place
            peer = next((p for p in (1, 2) if w.recv(p)[64 * k : 64 * k + 64].any()), None)
            if peer is not None:
                assert np.array_equal(w.recv(peer)[64 * k : 64 * k + 64], w.send(0)[64 * k : 64 * k + 64])
    finally:
        assert not w.close()


def test_batch_larger_than_the_ring_is_cut_into_ring_sized_doorbells(rng):
    w = World(n=2, wqe_cnt=8)
    try:
        f = TriggerFifo(64)
        svc = w.service(0, [f], num_threads=1, start=False)
        p = FifoProducer(f, timeout_s=5)
        w.send(0)[:] = rng.integers(0, 256, w.size, dtype=np.uint8)
        for k in range(30):
            p.write(1, 0, 16 * k, w.size + 16 * k, 16)
        svc.start()
        p.wait_flushed(p.flush())
        c = w.qps[0][1][0].counters
        assert (c.doorbells, c.wqes, c.cqes) == (4, 30, 4)  # 8 + 8 + 8 + 6
        assert np.array_equal(w.recv(1)[: 16 * 30], w.send(0)[: 16 * 30])
    finally:
        assert not w.close()


class SlowMemory(HostMemory):
    """Target memory whose writes take a while: a flush must wait for them."""

    def write(self, addr, data):
        time.sleep(0.02)
        super().write(addr, data)


def test_flush_completes_only_after_prior_work_landed(rng):
    w = World(n=2, memory=lambda r: SlowMemory() if r == 1 else None)
    try:
        fifos = [TriggerFifo(32, name=f"f{i}") for i in range(2)]
        w.service(0, fifos, num_threads=2)
        w.send(0)[:] = rng.integers(0, 256, w.size, dtype=np.uint8)
        p0, p1 = (FifoProducer(f, timeout_s=10) for f in fifos)
        assert p1.flush() == 0
        p1.wait_flushed(0, timeout_s=5)  # a flush with nothing before it completes at once
        for k in range(10):
            p0.write(1, 0, 100 * k, w.size + 100 * k, 100)
        p0.atomic_add(1, 0, w.size + 4096, 5)
        t = p0.flush()
        assert t == 11
        p0.wait_flushed(t)
        assert fifos[0].flushed == 12
        assert np.array_equal(w.recv(1)[:1000], w.send(0)[:1000])  # landed before flushed moved
        assert w.recv(1)[4096:4104].view(np.uint64)[0] == 5
        # successive flushes resolve in order
        tickets = []
        for k in range(3):
            p0.write(1, 0, 0, w.size + 8192 + 8 * k, 8)
            tickets.append(p0.flush())
        p0.wait_flushed(tickets[-1])
        assert fifos[0].flushed == tickets[-1] + 1 and w.services[0].stats().flushes == 5
    finally:
        assert not w.close()


# --- errors -----------------------------------------------------------------------------------------------------------


def test_bad_rkey_is_reported_naming_the_peer_and_qp():
    w = World(n=3)
    try:
        routes = w.routes(0)
        routes[2] = PeerRoute(w.qps[0][2], w.mrs[2].addr, w.mrs[2].rkey + 1000)
        f = TriggerFifo(8)
        svc = w.service(0, [f], num_threads=1, peers=routes)
        p = FifoProducer(f, timeout_s=5)
        p.write(1, 0, 0, w.size, 8)  # fine
        p.write(2, 0, 0, w.size, 8)  # unknown rkey on rank 2
        with pytest.raises(ProxyError) as ei:
            p.wait_flushed(p.flush())
        assert "failed" in str(ei.value)
        deadline = time.monotonic() + 5
        while not svc.failed and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(ProxyError, match=r"peer 2 qp 0 \(qpn \d+\).*unknown rkey"):
            svc.check()
        assert f.error != 0
        with pytest.raises(ProxyError, match="failed"):
            p.write(1, 0, 0, 0, 8)
    finally:
        errs = w.close()
    assert len(errs) == 1 and "peer 2 qp 0" in str(errs[0])
    assert not _proxy_threads()


def test_out_of_range_remote_write_is_reported_naming_the_peer(world):
    f = TriggerFifo(8)
    svc = world.service(0, [f], num_threads=1)
    p = FifoProducer(f, timeout_s=5)
    p.write(1, 0, 0, 2 * world.size - 4, 8)  # runs 4 bytes past rank 1's region
    with pytest.raises(ProxyError):
        p.wait_flushed(p.flush())
    with pytest.raises(ProxyError, match=r"peer 1 qp 0 .*remote range .* outside MR"):
        svc.close()
    assert not world.recv(1).any()


@pytest.mark.parametrize(
    "trig,match",
    [
        (Trigger(TriggerOp.WRITE, peer=7), "no route to peer 7"),
        (Trigger(TriggerOp.ATOMIC_ADD, peer=1, qp=3), "peer 1 has 1 QP"),
        (Trigger(9, peer=1), "unknown trigger op 9"),
        (Trigger(TriggerOp.WRITE, peer=1, value=1 << 31), r"write of 2147483648 bytes to peer 1 qp 0 .* exceeds"),
    ],
)
def test_bad_triggers_are_reported(world, trig, match):
    f = TriggerFifo(8, name="fifoX")
    svc = world.service(0, [f], num_threads=1)
    f.write_record(f.reserve(), trig)
    p = FifoProducer(f, timeout_s=5)
    with pytest.raises(ProxyError):
        p.wait_flushed(p.flush())
    with pytest.raises(ProxyError, match=f"fifoX ticket 0: {match}"):
        svc.close()


def test_after_a_failure_producers_are_never_stuck(world):
    """A failed service keeps draining (and dropping) triggers, so producers that race the failure finish."""
    f = TriggerFifo(4)
    svc = world.service(0, [f], num_threads=1)
    f.write_record(f.reserve(), Trigger(TriggerOp.WRITE, peer=9))
    deadline = time.monotonic() + 5
    while not svc.failed and time.monotonic() < deadline:
        time.sleep(0.005)
    for _ in range(20):  # write_record directly: bypasses the producer's error check
        t = f.reserve()
        while not f.has_space(t):
            assert time.monotonic() < deadline
            time.sleep(0.001)
        f.write_record(t, Trigger(TriggerOp.WRITE, peer=1, value=8))
    while f.tail < 21 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert f.tail == 21
    assert world.qps[0][1][0].counters.wqes == 0
    with pytest.raises(ProxyError, match="no route to peer 9"):
        svc.close()


def test_config_errors(world, monkeypatch):
    f = TriggerFifo(4)
    with pytest.raises(ConfigError, match="at least one FIFO"):
        ProxyService([], local=world.mrs[0], peers=world.routes(0))
    with pytest.raises(ConfigError, match="num_threads"):
        ProxyService([f], local=world.mrs[0], peers=world.routes(0), num_threads=0)
    shared = world.nics[0].create_cq(16)
    q1, q2 = world.nics[0].create_qp(shared), world.nics[0].create_qp(shared)
    with pytest.raises(ConfigError, match="own CQ"):
        ProxyService([f], local=world.mrs[0], peers={1: PeerRoute([q1, q2], 0, 0)})
    monkeypatch.setenv("EPKERN_NUM_PROXY_THREADS", "many")
    with pytest.raises(ConfigError, match="EPKERN_NUM_PROXY_THREADS"):
        ProxyService([f], local=world.mrs[0], peers=world.routes(0))


def test_thread_count_from_environment(world, monkeypatch):
    monkeypatch.delenv("EPKERN_NUM_PROXY_THREADS", raising=False)
    assert _env.num_proxy_threads() == 4
    fifos = [TriggerFifo(4) for _ in range(8)]
    s = world.service(0, fifos, start=False)
    assert s.num_threads == 4
    monkeypatch.setenv("EPKERN_NUM_PROXY_THREADS", "3")
    s = world.service(0, fifos)
    assert s.num_threads == 3 and len(s.threads) == 3
    s = world.service(0, fifos[:2], num_threads=6)  # never more threads than FIFOs
    assert s.num_threads == 2


# --- lifecycle --------------------------------------------------------------------------------------------------------


def test_close_drains_joins_and_leaves_no_threads(rng):
    before = set(threading.enumerate())
    w = World(n=2, wqe_cnt=8)
    try:
        fifos = [TriggerFifo(64, name=f"f{i}") for i in range(4)]
        svc = w.service(0, fifos)  # default thread count
        assert len(svc.threads) == 4 and all(t.is_alive() for t in svc.threads)
        w.send(0)[:] = rng.integers(0, 256, w.size, dtype=np.uint8)
        for i, f in enumerate(fifos):
            p = FifoProducer(f)
            for k in range(50):
                off = (i * 50 + k) * 32
                p.write(1, 0, off, w.size + off, 32)
        svc.close()  # no flush: close itself lets the threads finish the FIFOs' contents and completions
        assert np.array_equal(w.recv(1)[: 200 * 32], w.send(0)[: 200 * 32])
        assert not any(t.is_alive() for t in svc.threads)
        svc.close()  # idempotent
        assert all(f.tail == 50 for f in fifos)
    finally:
        assert not w.close()
    time.sleep(0.05)
    assert set(threading.enumerate()) <= before | set()


def test_idle_service_does_not_spin(world):
    fifos = [TriggerFifo(8) for _ in range(4)]
    svc = world.service(0, fifos, num_threads=4)
    time.sleep(0.1)
    threads = svc.threads + [nic._thread for nic in world.nics]  # only the threads under test (tests/thread_cpu.py)
    t0, c0 = time.monotonic(), cpu_seconds(threads)
    time.sleep(1.0)
    cpu = cpu_seconds(threads) - c0
    wall = time.monotonic() - t0
    assert cpu < 0.25 * wall, f"{cpu:.3f} s CPU over {wall:.2f} s idle"


def test_local_region_object_and_explicit_atomic_result(world):
    res = np.zeros(1, dtype=np.uint64)
    res_mr = world.nics[0].reg_mr(res, access=Access.LOCAL_WRITE)
    f = TriggerFifo(8)
    svc = ProxyService(
        [f],
        local=LocalRegion(world.mrs[0].addr, world.mrs[0].lkey),
        peers={1: world.routes(0)[1]},
        atomic_result=(res_mr.addr, res_mr.lkey),
        num_threads=1,
        timeout_s=5,
    )
    try:
        world.recv(1)[:8].view(np.uint64)[0] = 40
        p = FifoProducer(f, timeout_s=5)
        p.atomic_add(1, 0, world.size, 2)
        p.wait_flushed(p.flush())
        assert world.recv(1)[:8].view(np.uint64)[0] == 42 and res[0] == 40  # the old value landed in atomic_result
    finally:
        svc.close()


# --- the device headers agree with the Python layouts -----------------------------------------------------------------


def _constants(path: Path) -> dict[str, int]:
    text = path.read_text()
    return {m[0]: int(m[1], 0) for m in re.findall(r"constexpr\s+\w+\s+(\w+)\s*=\s*(0x[0-9a-fA-F]+|\d+)u?l*;", text)}


def test_device_headers_use_the_python_constants():
    fifo = _constants(KERNELS / "proxy_fifo.cuh")
    assert fifo["kFifoHeaderBytes"] == F.FIFO_HEADER_BYTES
    assert fifo["kTriggerBytes"] == F.TRIGGER_BYTES
    assert (fifo["kFifoHeadOffset"], fifo["kFifoTailOffset"]) == (F.HEAD_OFFSET, F.TAIL_OFFSET)
    assert (fifo["kFifoFlushedOffset"], fifo["kFifoErrorOffset"]) == (F.FLUSHED_OFFSET, F.ERROR_OFFSET)
    assert (fifo["kTriggerWrite"], fifo["kTriggerAtomicAdd"], fifo["kTriggerFlush"]) == (1, 2, 3)
    mlx5 = _constants(KERNELS / "mlx5_wqe.cuh")
    for name in (
        "MLX5_SEND_WQE_BB",
        "MLX5_SEND_WQE_DS",
        "MLX5_INLINE_SEG",
        "MLX5_SND_DBR",
        "MLX5_OPCODE_NOP",
        "MLX5_OPCODE_RDMA_WRITE",
        "MLX5_OPCODE_ATOMIC_FA",
        "MLX5_WQE_CTRL_CQ_UPDATE",
    ):
        assert mlx5["k" + "".join(p.title() for p in name.split("_"))] == getattr(W, name), name
    assert struct.calcsize("<QQQQ") == F.TRIGGER_BYTES
