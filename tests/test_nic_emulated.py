"""The emulated mlx5 NIC executing CPU-written WQEs on host memory."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epkern.nic import Access, EmulatedNic, HostMemory, NicError, QueuePair
from epkern.nic import wqe as W
from thread_cpu import cpu_seconds

RW = Access.LOCAL_WRITE | Access.REMOTE_WRITE
ALL = RW | Access.REMOTE_ATOMIC


class Pair:
    """Two NICs (two 'nodes'), a QP on each, connected; a source buffer on A, a target buffer on B."""

    def __init__(self, wqe_cnt=8, cqe_cnt=64, target_access=ALL, poll=False):
        self.a = EmulatedNic(name="A", poll_doorbells=poll)
        self.b = EmulatedNic(name="B")
        self.src = np.arange(4096, dtype=np.uint8)
        self.dst = np.zeros(4096, dtype=np.uint8)
        self.res = np.zeros(16, dtype=np.uint64)
        self.src_mr = self.a.reg_mr(self.src, access=Access.LOCAL_WRITE)
        self.res_mr = self.a.reg_mr(self.res, access=Access.LOCAL_WRITE)
        self.dst_mr = self.b.reg_mr(self.dst, access=target_access)
        self.cq = self.a.create_cq(cqe_cnt)
        self.qp = self.a.create_qp(self.cq, wqe_cnt)
        peer = self.b.create_qp(self.b.create_cq(16), wqe_cnt)
        self.qp.connect(peer)
        peer.connect(self.qp)
        self.pi = 0

    def write(self, src_off, dst_off, n, signaled=False, **kw):
        self.pi += W.build_rdma_write(
            self.qp.sq,
            self.pi,
            qpn=self.qp.qpn,
            raddr=self.dst_mr.addr + dst_off,
            rkey=kw.get("rkey", self.dst_mr.rkey),
            laddr=self.src_mr.addr + src_off,
            lkey=kw.get("lkey", self.src_mr.lkey),
            length=n,
            signaled=signaled,
        )

    def fadd(self, dst_off, add, res_idx=0, signaled=True, **kw):
        self.pi += W.build_fetch_add(
            self.qp.sq,
            self.pi,
            qpn=self.qp.qpn,
            raddr=self.dst_mr.addr + dst_off,
            rkey=self.dst_mr.rkey,
            add=add,
            laddr=self.res_mr.addr + 8 * res_idx,
            lkey=kw.get("lkey", self.res_mr.lkey),
            signaled=signaled,
        )

    def ring(self):
        self.qp.ring_doorbell(self.pi)

    def settle(self):
        assert self.a.wait_idle(5.0)

    def close(self):
        self.a.close()
        self.b.close()


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


def test_rdma_write_and_cqe(pair):
    pair.write(10, 100, 50, signaled=True)
    pair.ring()
    (cqe,) = pair.cq.wait(1)
    assert not cqe.is_error and cqe.qpn == pair.qp.qpn and cqe.wqe_counter == 0 and cqe.byte_cnt == 50
    assert np.array_equal(pair.dst[100:150], pair.src[10:60])
    assert pair.dst[:100].sum() == 0 and pair.dst[150:].sum() == 0
    c = pair.qp.counters
    assert (c.wqes, c.doorbells, c.bytes, c.cqes, c.errors) == (1, 1, 50, 1, 0)
    pair.a.check()


def test_inline_writes(pair):
    qp, mr = pair.qp, pair.dst_mr
    pair.pi += W.build_inline_write_u32(qp.sq, pair.pi, qpn=qp.qpn, raddr=mr.addr + 4, rkey=mr.rkey, value=0xDEADBEEF)
    pair.pi += W.build_inline_write_u64(
        qp.sq, pair.pi, qpn=qp.qpn, raddr=mr.addr + 16, rkey=mr.rkey, value=0x0123456789ABCDEF, signaled=True
    )
    pair.ring()
    (cqe,) = pair.cq.wait(1)
    assert cqe.wqe_counter == 1 and cqe.byte_cnt == 8
    assert pair.dst[4:8].view(np.uint32)[0] == 0xDEADBEEF
    assert pair.dst[16:24].view(np.uint64)[0] == 0x0123456789ABCDEF
    assert pair.qp.counters.bytes == 12


def test_fetch_add(pair):
    pair.dst[8:16].view(np.uint64)[0] = 41
    pair.fadd(8, 1, res_idx=0)
    pair.fadd(8, 100, res_idx=1)
    pair.fadd(8, (1 << 64) - 142, res_idx=2)  # wraps modulo 2**64: -142
    pair.ring()
    cqes = pair.cq.wait(3)
    assert [c.wqe_counter for c in cqes] == [0, 1, 2] and all(c.byte_cnt == 8 for c in cqes)
    assert list(pair.res[:3]) == [41, 42, 142]
    assert pair.dst[8:16].view(np.uint64)[0] == 0
    pair.a.check()


def test_ring_wraps_over_many_doorbells():
    p = Pair(wqe_cnt=4, cqe_cnt=8)
    try:
        total = 0
        for batch in range(10):  # 30 WQEs through a 4-slot ring
            for i in range(3):
                k = batch * 3 + i
                p.write(k * 8, k * 8, 8, signaled=(i == 2))
            p.ring()
            (cqe,) = p.cq.wait(1)
            assert cqe.wqe_counter == p.pi - 1 and cqe.owner == (batch // 8) & 1
            total += 3
        assert np.array_equal(p.dst[: total * 8], p.src[: total * 8])
        c = p.qp.counters
        assert (c.wqes, c.doorbells, c.cqes, c.bytes) == (30, 10, 10, 240)
        p.a.check()
    finally:
        p.close()


def test_one_doorbell_many_wqes_and_unsignaled_then_signaled():
    p = Pair(wqe_cnt=16)
    try:
        for k in range(16):
            p.write(k, 1000 + k, 1, signaled=(k == 15))
        p.ring()
        (cqe,) = p.cq.wait(1)
        assert cqe.wqe_counter == 15
        p.settle()
        assert p.cq.poll() == []  # exactly one CQE
        assert np.array_equal(p.dst[1000:1016], p.src[:16])
        assert (p.qp.counters.doorbells, p.qp.counters.wqes) == (1, 16)
    finally:
        p.close()


def test_16bit_pi_wrap():
    """The dbrec and ctrl carry only 16 bits of the producer index; the NIC keeps going past 65535."""
    p = Pair(wqe_cnt=8)
    try:
        p.qp._ci = p.pi = 0xFFFE  # fast-forward both sides
        for k in range(4):
            p.write(k, k, 1, signaled=(k == 3))
        p.ring()
        (cqe,) = p.cq.wait(1)
        assert cqe.wqe_counter == 0x0001 and not cqe.is_error
        p.a.check()
    finally:
        p.close()


def test_poll_mode_sees_doorbell_word_written_directly():
    p = Pair(poll=True)
    try:
        p.write(0, 0, 32, signaled=True)
        W.encode_dbrec(p.qp.dbrec, p.pi)  # what device code does: dbrec, then the 8-byte doorbell store
        p.qp.db_reg[:] = np.frombuffer(W.doorbell_value(p.pi, p.qp.qpn), dtype=np.uint8)
        (cqe,) = p.cq.wait(1)
        assert not cqe.is_error and np.array_equal(p.dst[:32], p.src[:32])
        assert p.qp.counters.doorbells == 1
    finally:
        p.close()


def test_poll_mode_two_doorbells_between_scans_count_once_and_both_batches_run():
    """A polled doorbell word is memory: two doorbells stored while the NIC cannot scan (its condition lock
    held here) leave only the second word to see. It counts one doorbell and still runs both batches, since
    it executes every WQE up to the doorbell record (the behaviour tests/test_nic_mlx5.py allows for)."""
    p = Pair(poll=True)
    try:
        with p.a._cv:  # the progress thread scans only while holding it
            for first in (0, 64):
                p.write(first, first, 64, signaled=True)
                W.encode_dbrec(p.qp.dbrec, p.pi)
                p.qp.db_reg[:] = np.frombuffer(W.doorbell_value(p.pi, p.qp.qpn), dtype=np.uint8)
        cqes = p.cq.wait(2)
        assert len(cqes) == 2 and not any(c.is_error for c in cqes)
        assert np.array_equal(p.dst[:128], p.src[:128])
        assert p.qp.counters.doorbells == 1 and p.qp.counters.wqes == 2
    finally:
        p.close()


# --- rejections: error state, error CQE, recorded fault, target untouched ---------------------------------------


def _expect_fault(p: Pair, syndrome: int, match: str):
    p.ring()
    (cqe,) = p.cq.wait(1)
    assert cqe.is_error and cqe.opcode == W.MLX5_CQE_REQ_ERR and cqe.syndrome == syndrome
    assert p.qp.state == QueuePair.ERROR and p.qp.error is not None
    assert p.dst.sum() == 0, "a rejected WQE must not write anything"
    with pytest.raises(NicError, match=match):
        p.a.check()
    # later work on the errored QP is not executed
    p.write(0, 0, 8, signaled=True)
    p.ring()
    p.settle()
    assert p.cq.poll() == [] and p.dst.sum() == 0
    return cqe


def _raw(p: Pair, opcode: int, ds: int):
    W.encode_ctrl(
        p.qp.sq,
        (p.pi & (p.qp.wqe_cnt - 1)) * 64,
        pi=p.pi,
        opcode=opcode,
        qpn=p.qp.qpn,
        ds=ds,
        fm_ce_se=W.MLX5_WQE_CTRL_CQ_UPDATE,
    )
    p.pi += 1


REJECTIONS = {
    "bad_opcode": (lambda p: _raw(p, 0x7E, 3), W.MLX5_CQE_SYNDROME_LOCAL_QP_OP_ERR, "unknown opcode"),
    "unsupported_opcode": (lambda p: _raw(p, W.MLX5_OPCODE_SEND, 2), W.MLX5_CQE_SYNDROME_LOCAL_QP_OP_ERR, "SEND"),
    "wrong_ds": (lambda p: _raw(p, W.MLX5_OPCODE_ATOMIC_FA, 3), W.MLX5_CQE_SYNDROME_LOCAL_QP_OP_ERR, "expected 4"),
    "unknown_rkey": (lambda p: p.write(0, 0, 8, rkey=0xFFFF0000), W.MLX5_CQE_SYNDROME_REMOTE_ACCESS_ERR, "rkey"),
    "unknown_lkey": (lambda p: p.write(0, 0, 8, lkey=0xFFFF0001), W.MLX5_CQE_SYNDROME_LOCAL_PROT_ERR, "lkey"),
    "remote_oob": (lambda p: p.write(0, 4090, 8), W.MLX5_CQE_SYNDROME_REMOTE_ACCESS_ERR, "outside MR"),
    "local_oob": (lambda p: p.write(4095, 0, 2), W.MLX5_CQE_SYNDROME_LOCAL_PROT_ERR, "outside MR"),
    "misaligned_atomic": (lambda p: p.fadd(4, 1), W.MLX5_CQE_SYNDROME_REMOTE_INVAL_REQ_ERR, "aligned"),
    "atomic_oob": (lambda p: p.fadd(4096, 1), W.MLX5_CQE_SYNDROME_REMOTE_ACCESS_ERR, "outside MR"),
}


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_rejections(case):
    post, syndrome, match = REJECTIONS[case]
    p = Pair()
    try:
        p.write(0, 0, 0)  # a valid zero-byte unsignaled write first: the fault is at WQE 1
        post(p)
        cqe = _expect_fault(p, syndrome, match)
        assert cqe.wqe_counter == 1 and p.qp.counters.wqes == 1
    finally:
        p.close()


@pytest.mark.parametrize(
    "access, post, match",
    [
        (Access.LOCAL_WRITE | Access.REMOTE_ATOMIC, lambda p: p.write(0, 0, 8), "REMOTE_WRITE"),
        (RW, lambda p: p.fadd(0, 1), "REMOTE_ATOMIC"),
    ],
)
def test_missing_access_rights(access, post, match):
    p = Pair(target_access=access)
    try:
        post(p)
        _expect_fault(p, W.MLX5_CQE_SYNDROME_REMOTE_ACCESS_ERR, match)
    finally:
        p.close()


def test_key_of_another_nic_is_unknown():
    p = Pair()
    try:
        other = p.a.reg_mr(np.zeros(64, np.uint8), access=ALL)  # registered on A, not on the target NIC B
        p.pi += W.build_rdma_write(
            p.qp.sq,
            p.pi,
            qpn=p.qp.qpn,
            raddr=other.addr,
            rkey=other.rkey,
            laddr=p.src_mr.addr,
            lkey=p.src_mr.lkey,
            length=8,
        )
        _expect_fault(p, W.MLX5_CQE_SYNDROME_REMOTE_ACCESS_ERR, "unknown rkey")
    finally:
        p.close()


def test_wrong_pi_and_qpn_in_ctrl_and_overrun():
    p = Pair()
    try:
        W.build_rdma_write(
            p.qp.sq,
            0,
            qpn=p.qp.qpn,
            raddr=p.dst_mr.addr,
            rkey=p.dst_mr.rkey,
            laddr=p.src_mr.addr,
            lkey=p.src_mr.lkey,
            length=8,
        )
        p.qp.sq[1] = 0x08  # pi16 of the WQE in slot 0 now reads 0x0800, not 0
        p.pi = 1
        _expect_fault(p, W.MLX5_CQE_SYNDROME_LOCAL_QP_OP_ERR, "pi16")
    finally:
        p.close()
    p = Pair()
    try:
        W.build_rdma_write(
            p.qp.sq,
            0,
            qpn=p.qp.qpn ^ 1,
            raddr=p.dst_mr.addr,
            rkey=p.dst_mr.rkey,
            laddr=p.src_mr.addr,
            lkey=p.src_mr.lkey,
            length=8,
        )
        p.pi = 1
        _expect_fault(p, W.MLX5_CQE_SYNDROME_LOCAL_QP_OP_ERR, "ctrl qpn")
    finally:
        p.close()
    p = Pair(wqe_cnt=4)
    try:
        p.pi = 5  # more than the ring holds
        _expect_fault(p, W.MLX5_CQE_SYNDROME_LOCAL_QP_OP_ERR, "ahead")
    finally:
        p.close()


def test_unconnected_qp_and_closed_nic():
    nic = EmulatedNic()
    qp = nic.create_qp(nic.create_cq(4), 4)
    qp.ring_doorbell(0)
    (cqe,) = qp.cq.wait(1)
    assert cqe.is_error and "not connected" in nic.faults[0].message
    nic.close()
    nic.close()  # idempotent
    with pytest.raises(NicError, match="closed"):
        qp.ring_doorbell(1)
    with pytest.raises(NicError, match="closed"):
        nic.create_cq(4)


def test_memory_backend_refusal_is_a_fault_not_a_hang():
    p = Pair()
    try:
        ghost = p.b.reg_mr(0x1000, 64, access=ALL)  # an MR whose address the HostMemory does not serve
        p.pi += W.build_inline_write_u32(p.qp.sq, p.pi, qpn=p.qp.qpn, raddr=ghost.addr, rkey=ghost.rkey, value=1)
        _expect_fault(p, W.MLX5_CQE_SYNDROME_LOCAL_QP_OP_ERR, "internal error")
        assert p.a._thread.is_alive()
    finally:
        p.close()


def test_cq_overrun_is_a_fault():
    p = Pair(wqe_cnt=8, cqe_cnt=2)
    try:
        for k in range(3):
            p.write(k, k, 1, signaled=True)
        p.ring()
        p.settle()
        assert p.qp.state == QueuePair.ERROR and "CQ overrun" in p.qp.error.message
        assert len(p.cq.poll()) == 2
    finally:
        p.close()


def test_close_with_pending_work_drains_and_joins():
    p = Pair(wqe_cnt=64)
    for k in range(64):
        p.write(k * 16, k * 16, 16, signaled=(k == 63))
    p.ring()
    p.close()  # right away: what was rung before close still executes
    assert not p.a._thread.is_alive() and not p.b._thread.is_alive()
    assert np.array_equal(p.dst[:1024], p.src[:1024])
    assert len(p.cq.poll()) == 1 and p.qp.counters.wqes == 64
    p.close()


def test_abort_drops_the_backlog_and_touches_nothing_after():
    """abort() (a Buffer's teardown after a PROXY failure): the WQE being executed is the last, the rest of the
    rung work is dropped, and nothing is written once it returns True; close() then waits for nothing. Without it,
    close() executed the whole backlog — on the H200, after the teardown had freed the target memory."""
    p = Pair(wqe_cnt=64)
    writes = []
    real_write = p.b.memory.write

    def slow_write(addr, data):
        time.sleep(0.02)
        real_write(addr, data)
        writes.append(addr)

    p.b.memory.write = slow_write
    p.b.memory.copy_from = lambda *a: False  # every WRITE through the (slow) write above
    for k in range(64):
        p.write(k * 16, k * 16, 16, signaled=(k == 63))
    p.ring()
    while not writes:
        time.sleep(0.005)
    assert p.a.abort(5.0) and not p.a._thread.is_alive()
    done = len(writes)
    time.sleep(0.1)
    assert 1 <= done < 64 and len(writes) == done  # nothing after abort returned
    assert not p.dst[done * 16 + 16 :].any()  # the dropped WQEs' rows were never written
    t0 = time.monotonic()
    p.close()
    assert time.monotonic() - t0 < 1.0 and len(writes) == done


def test_host_memory_bounds_and_atomics():
    mem = HostMemory()
    a = np.zeros(4, np.uint64)
    base = mem.add(a)
    with pytest.raises(NicError, match="not inside"):
        mem.read(base + 30, 4)
    threads = [threading.Thread(target=lambda: [mem.atomic_fetch_add64(base + 8, 1) for _ in range(500)]) for _ in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert a[1] == 1000


@pytest.mark.parametrize("poll", [False, True])
def test_idle_nic_does_not_spin(poll):
    p = Pair(poll=poll)
    try:
        p.write(0, 0, 8, signaled=True)
        p.ring()
        p.cq.wait(1)
        time.sleep(0.05)
        threads = [p.a._thread, p.b._thread]  # only the NICs' own threads (see tests/thread_cpu.py)
        t0, c0 = time.monotonic(), cpu_seconds(threads)
        time.sleep(1.0)
        cpu = cpu_seconds(threads) - c0
        wall = time.monotonic() - t0
        # event-driven: ~0; poll mode backs off to 5 ms sleeps (a few % of a core at most)
        assert cpu < (0.15 if poll else 0.05) * wall, f"{cpu:.3f} s CPU over {wall:.2f} s idle"
    finally:
        p.close()


@settings(max_examples=25, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["write", "u32", "u64", "fadd"]),
            st.integers(0, 500),
            st.integers(0, 500),
            st.integers(0, 64),
            st.integers(0, (1 << 64) - 1),
            st.booleans(),
        ),
        min_size=1,
        max_size=40,
    ),
    batch=st.integers(1, 8),
)
def test_random_sequences_match_a_model(ops, batch):
    """Any mix of writes, inline writes and fetch-adds, rung in batches through an 8-slot ring, matches numpy."""
    p = Pair(wqe_cnt=8, cqe_cnt=64)
    try:
        model = p.dst.copy()
        mem = model.view(np.uint8)
        qp, mr = p.qp, p.dst_mr
        olds = []
        for i, (kind, src, dst, n, val, sig) in enumerate(ops):
            if kind == "write":
                p.write(src, dst, n, signaled=sig)
                mem[dst : dst + n] = p.src[src : src + n]
            elif kind == "u32":
                p.pi += W.build_inline_write_u32(
                    qp.sq, p.pi, qpn=qp.qpn, raddr=mr.addr + dst, rkey=mr.rkey, value=val & 0xFFFFFFFF, signaled=sig
                )
                mem[dst : dst + 4] = np.frombuffer((val & 0xFFFFFFFF).to_bytes(4, "little"), np.uint8)
            else:
                if kind == "u64":
                    p.pi += W.build_inline_write_u64(
                        qp.sq, p.pi, qpn=qp.qpn, raddr=mr.addr + dst, rkey=mr.rkey, value=val, signaled=sig
                    )
                    mem[dst : dst + 8] = np.frombuffer(val.to_bytes(8, "little"), np.uint8)
                else:
                    d = dst & ~7
                    p.fadd(d, val, res_idx=len(olds) % 16, signaled=sig)
                    old = int(mem[d : d + 8].view(np.uint64)[0])
                    olds.append(old)
                    mem[d : d + 8] = np.frombuffer(((old + val) % (1 << 64)).to_bytes(8, "little"), np.uint8)
            if (i + 1) % batch == 0 or i == len(ops) - 1:
                p.ring()
                p.settle()
                p.cq.poll()
                if kind == "fadd":
                    assert int(p.res[(len(olds) - 1) % 16]) == olds[-1]
        p.a.check()
        assert np.array_equal(p.dst, model)
        assert p.qp.counters.wqes == len(ops)
    finally:
        p.close()


class _DeferredCopies(HostMemory):
    """copy_from queues the copy and runs it at flush (as DeviceMemory's unsynchronised device copies land later);
    flush first waits for ``gate`` so a test can look while copies are still in flight."""

    def __init__(self):
        super().__init__()
        self.queued, self.flushes, self.gate = [], 0, threading.Event()
        self.gate.set()

    def copy_from(self, dst, source, src, n):
        if not isinstance(source, HostMemory):
            return False
        self.queued.append((dst, source.read(src, n)))
        return True

    def flush(self):
        self.gate.wait(5.0)
        self.flushes += 1
        while self.queued:
            self.write(*self.queued.pop(0))


def test_direct_copies_land_before_the_completion_and_the_consumer_index():
    """WRITEs from memory go through the target memory's copy_from (unsynchronised where the backend allows: one
    device-to-device copy each on the GPU); the NIC flushes them before it writes a CQE and before ``consumed``
    advances, so a host that sees either finds the bytes in place (the RDMA route frees or reuses memory on them)."""
    p = Pair(wqe_cnt=16)
    p.b.memory = deferred = _DeferredCopies()
    deferred.add(p.dst)
    deferred.gate.clear()
    try:
        for k in range(8):
            p.write(k * 32, k * 32, 32, signaled=(k == 7))
        p.ring()
        deadline = time.monotonic() + 5
        while len(deferred.queued) < 8 and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(0.05)
        assert len(deferred.queued) == 8 and not p.dst.any()  # issued, none landed yet
        assert p.qp.consumed == 0 and p.cq.poll() == []  # nothing says done while the copies are in flight
        deferred.gate.set()
        p.settle()
        assert (p.dst[:256] == p.src[:256]).all() and not p.dst[256:].any()
        (cqe,) = p.cq.poll()
        assert cqe.opcode == W.MLX5_CQE_REQ and p.qp.consumed == 8 and deferred.flushes >= 1
    finally:
        deferred.gate.set()
        p.close()


def test_a_write_between_memories_without_direct_copies_goes_through_the_host():
    """A target memory whose copy_from refuses the source (DeviceMemory: another device, direct copies off) gets
    the bytes by read + write, exact; nothing is left to flush."""
    p = Pair(wqe_cnt=16)
    refused = []

    def refuse(dst, source, src, n):
        refused.append(n)
        return False

    p.b.memory.copy_from = refuse
    try:
        p.write(100, 200, 300, signaled=True)
        p.ring()
        p.settle()
        assert refused == [300] and (p.dst[200:500] == p.src[100:400]).all() and not p.dst[:200].any()
        assert p.qp.consumed == 1 and len(p.cq.poll()) == 1
    finally:
        p.close()
