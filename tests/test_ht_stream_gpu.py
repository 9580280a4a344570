"""GPU side of kernels/ht_stream.cuh (issue #18's network primitive), with tests/kernels/ht_stream_selftest.cu: one
warp streams messages to another over an emulated NIC's QP (send rings and doorbells in host-mapped memory, as the
RDMA route has them), the receiver checks every word and returns credit over a QP back. Exact delivery with ring
wrap-around and credit reuse, the NIC's counters (one WRITE per chunk, two where it wraps, plus the inline tail; one
credit WRITE per chunk back), and a receiver that never returns credit ends the sender at its deadline with an error
record naming the phase. Written in session L; passed on an H100 in session O
(tests/test_ht_internode_ring_cpu.py runs the same protocol in Python through the same emulated NIC)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from epkern.nic import Access, EmulatedNic
from epkern.nic.completions import CompletionPoller, PolledQp
from test_rdma_gpu import Err, SendQueue, _hm

SRC = Path(__file__).resolve().parent / "kernels" / "ht_stream_selftest.cu"
RW = Access.LOCAL_WRITE | Access.REMOTE_WRITE


def _fn(name):
    from epkern import kernel_loader

    return kernel_loader.get_function(SRC, name)


def _qp_args(sq: SendQueue, qp, lkey: int, rkey: int) -> tuple:
    base = sq.mem.device_ptr
    return (
        np.uint64(base),
        np.uint64(base + sq.wqe_cnt * 64),
        np.uint64(base + sq.wqe_cnt * 64 + 64),
        np.uint64(base + sq.wqe_cnt * 64 + 128),
        np.uint64(sq.counters.data.ptr),
        np.uint32(qp.qpn),
        np.uint32(sq.wqe_cnt),
        np.uint32(lkey),
        np.uint32(rkey),
    )


def _run(n, ring, msg, chunk, *, silent_receiver=False, timeout_s=10.0):
    """Sender on NIC A, receiver on NIC B. Returns (mismatched words, A's QP counters, B's QP counters, sender's
    error record, receiver's)."""
    import cupy

    a, b = EmulatedNic(name="A", poll_doorbells=True), EmulatedNic(name="B", poll_doorbells=True)
    a_area, b_area = _hm(ring * msg + 64), _hm(ring * msg + 64)  # A: staging + credit; B: ring + tail
    for area in (a_area, b_area):
        area.host[:] = 0
    poller = None
    try:
        a_mr = a.reg_mr(a_area.host, access=RW)
        b_mr = b.reg_mr(b_area.host, access=RW)
        assert a_mr.addr == a_area.device_ptr and b_mr.addr == b_area.device_ptr  # one address for NIC and kernel
        send_qp, back_qp = a.create_qp(a.create_cq(64), 16), b.create_qp(b.create_cq(64), 16)
        send_qp.connect(b.create_qp(b.create_cq(64), 16))
        back_qp.connect(a.create_qp(a.create_cq(64), 16))
        sqa, sqb = SendQueue(16), SendQueue(16)
        for qp, sq in ((send_qp, sqa), (back_qp, sqb)):
            qp.sq, qp.dbrec, qp.db_reg = sq.sq, sq.dbrec, sq.db_reg  # before anything is posted
        poller = CompletionPoller([PolledQp(1, send_qp, sqa.retired), PolledQp(0, back_qp, sqb.retired)], name="t")
        err_s, err_r = Err(), Err()
        bad = cupy.zeros(1, dtype=cupy.uint64)
        tmo = np.uint64(int(timeout_s * 1e9))
        ring_at, tail_at, credit_at = b_area.device_ptr, b_area.device_ptr + ring * msg, a_area.device_ptr + ring * msg
        s_send, s_recv = cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)
        with s_send:
            _fn("epk_selftest_stream_send")(
                (1,), (32,),
                (*_qp_args(sqa, send_qp, a_mr.lkey, b_mr.rkey), np.uint64(a_area.device_ptr), np.uint64(ring_at),
                 np.uint64(tail_at), np.uint64(credit_at), np.uint32(ring), np.uint32(msg), np.uint64(n),
                 np.uint32(chunk), err_s.ptr, tmo),
            )  # fmt: skip
        if not silent_receiver:
            with s_recv:
                _fn("epk_selftest_stream_recv")(
                    (1,), (32,),
                    (*_qp_args(sqb, back_qp, b_mr.lkey, a_mr.rkey), np.uint64(ring_at), np.uint64(tail_at),
                     np.uint64(credit_at), np.uint32(ring), np.uint32(msg), np.uint64(n), np.uint32(chunk),
                     np.uint64(bad.data.ptr), err_r.ptr, tmo),
                )  # fmt: skip
        deadline = time.monotonic() + timeout_s + 10
        while not (s_send.done and s_recv.done):
            assert time.monotonic() < deadline, "the stream kernels did not end after their deadline"
            time.sleep(1e-3)
        a.check()
        b.check()
        assert a.wait_idle(5.0) and b.wait_idle(5.0)
        return int(bad.get()[0]), vars(send_qp.counters), vars(back_qp.counters), err_s.fields(), err_r.fields()
    finally:
        if poller is not None:
            poller.close()
        a.close()
        b.close()


@pytest.mark.gpu
@pytest.mark.parametrize("n,ring,msg,chunk", [(100, 8, 64, 3), (60, 5, 4112 // 8 * 8, 5), (7, 16, 8, 4)])
def test_stream_delivers_every_message_exactly_with_one_tail_per_chunk(n, ring, msg, chunk):
    bad, sent, back, err_s, err_r = _run(n, ring, msg, chunk)
    assert err_s["claimed"] == 0 and err_r["claimed"] == 0, (err_s, err_r)
    assert bad == 0
    chunks = -(-n // chunk)
    wraps = sum(1 for f in range(0, n, chunk) if f % ring + min(chunk, n - f) > ring)
    assert sent == dict(wqes=2 * chunks + wraps, doorbells=sent["doorbells"], cqes=chunks, bytes=n * msg + 8 * chunks,
                        errors=0) and 1 <= sent["doorbells"] <= chunks  # fmt: skip
    assert back["wqes"] == back["cqes"] == chunks and back["bytes"] == 8 * chunks and back["errors"] == 0


@pytest.mark.gpu
def test_a_receiver_that_never_returns_credit_ends_the_sender_at_its_deadline():
    _, sent, _, err_s, _ = _run(20, 4, 64, 2, silent_receiver=True, timeout_s=2.0)
    assert err_s["claimed"] == 1 and err_s["phase"] == 0x701 and err_s["peer"] == 1, err_s  # kPhaseStreamSpace
    assert sent["cqes"] == 2  # the two chunks the ring held were sent
