"""The device RDMA writers and proxy FIFO producer, without a GPU.

1. ``tests/kernels/rdma_selftest.cu`` (with the library's ``mlx5_wqe.cuh`` and ``proxy_fifo.cuh``) compiles to an
   sm_90 cubin with NVRTC.
2. The headers' portable parts (WQE bytes, doorbell values, the FIFO push protocol on C++ atomics) are built with
   the host C++ compiler and run here: WQEs must equal the Python encoder's bytes, and C++ producer threads must
   drive the Python proxy service exactly. The device-only parts (PTX ordering, warp aggregation, doorbell
   stores) are what tests/test_rdma_gpu.py covers on a GPU.
"""

from __future__ import annotations

import ctypes
import secrets
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from epkern import kernel_loader
from epkern.nic import Access, EmulatedNic, PeerRoute, ProxyService, Trigger, TriggerFifo, TriggerOp
from epkern.nic import fifo as F
from epkern.nic import wqe as W

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
SELFTEST = Path(__file__).resolve().parent / "kernels" / "rdma_selftest.cu"


def test_selftest_compiles_to_sm90_cubin():
    cubin = kernel_loader.compile_cubin(SELFTEST, {}, arch="sm_90")
    assert cubin[:4] == b"\x7fELF" and len(cubin) > 1000
    names = {p.name for p in kernel_loader.included_files(SELFTEST)}
    assert {"mlx5_wqe.cuh", "proxy_fifo.cuh", "epk_common.cuh"} <= names


def test_headers_compile_alone():
    """Each header is self-contained (NVRTC, sm_90)."""
    nvrtc = kernel_loader._nvrtc()
    for header in ("mlx5_wqe.cuh", "proxy_fifo.cuh"):
        src = f'#include "{header}"\nextern "C" __global__ void k() {{}}\n'
        prog = nvrtc.createProgram(src, "only.cu", [], [])
        try:
            nvrtc.compileProgram(prog, kernel_loader.compile_options("sm_90", {}))
        finally:
            nvrtc.destroyProgram(prog)


# --- host build of the portable parts ---------------------------------------------------------------------------------

HARNESS = r"""
#include "mlx5_wqe.cuh"
#include "proxy_fifo.cuh"
#include <thread>
#include <vector>

using namespace epk;

extern "C" uint32_t h_build(int kind, uint8_t *sq, uint32_t wqe_cnt, uint64_t pi, uint32_t qpn, uint64_t raddr,
                            uint32_t rkey, uint64_t laddr, uint32_t lkey, uint64_t value, int signaled) {
  switch (kind) {
    case 0: return mlx5::write_rdma_write(sq, wqe_cnt, pi, qpn, raddr, rkey, laddr, lkey, (uint32_t)value, signaled);
    case 1: return mlx5::write_inline_u32(sq, wqe_cnt, pi, qpn, raddr, rkey, (uint32_t)value, signaled);
    case 2: return mlx5::write_inline_u64(sq, wqe_cnt, pi, qpn, raddr, rkey, value, signaled);
    case 3: return mlx5::write_fetch_add(sq, wqe_cnt, pi, qpn, raddr, rkey, value, laddr, lkey, signaled);
    default: return mlx5::write_nop(sq, wqe_cnt, pi, qpn, signaled);
  }
}
extern "C" uint32_t h_dbrec(uint64_t pi) { return mlx5::dbrec_value(pi); }
extern "C" uint64_t h_doorbell(uint64_t pi, uint32_t qpn) { return mlx5::doorbell_value(pi, qpn); }

// nthreads producers; thread k pushes rows k, k + nthreads, ... (row: op | peer << 8 | qp << 24, local, remote,
// value) into FIFO row % nfifos. Returns the number of failed pushes.
extern "C" int h_push(uint8_t **bases, int nfifos, uint32_t capacity, const uint64_t *rows, int n, int nthreads,
                      uint64_t *tickets, uint64_t timeout_ns, ErrorRecord *err) {
  std::vector<std::thread> th;
  std::vector<int> fails(nthreads, 0);
  for (int k = 0; k < nthreads; ++k) {
    th.emplace_back([=, &fails] {
      const Deadline d{err, 0, timeout_ns};
      for (int i = k; i < n; i += nthreads) {
        const proxy::Fifo f = proxy::make_fifo(bases[i % nfifos], nullptr, capacity);
        const uint64_t *r = rows + 4 * i;
        uint64_t t = ~0ull;
        if (!proxy::push(f, r[0] & 0xff, (r[0] >> 8) & 0xffff, (r[0] >> 24) & 0xff, r[1], r[2], r[3], d, &t))
          fails[k]++;
        tickets[i] = t;
      }
    });
  }
  for (auto &t : th) t.join();
  int total = 0;
  for (int f : fails) total += f;
  return total;
}

extern "C" int h_flush(uint8_t *base, uint32_t capacity, uint64_t timeout_ns, ErrorRecord *err) {
  const Deadline d{err, 0, timeout_ns};
  return proxy::flush(proxy::make_fifo(base, nullptr, capacity), d) ? 1 : 0;
}
"""


class ErrorRecord(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("claimed", "code", "rank", "phase", "peer", "seen", "expected", "started")]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    d = tmp_path_factory.mktemp("hostbuild")
    (d / "harness.cpp").write_text(HARNESS)
    so = d / "harness.so"
    cmd = [cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter", "-pthread", "-shared"]
    cmd += ["-fPIC", f"-I{KERNELS}", str(d / "harness.cpp"), "-o", str(so)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lib = ctypes.CDLL(str(so))
    u8p, u64 = ctypes.c_void_p, ctypes.c_uint64
    lib.h_build.argtypes = [ctypes.c_int, u8p, ctypes.c_uint32, u64, ctypes.c_uint32, u64, ctypes.c_uint32, u64]
    lib.h_build.argtypes += [ctypes.c_uint32, u64, ctypes.c_int]
    lib.h_build.restype = ctypes.c_uint32
    lib.h_dbrec.argtypes, lib.h_dbrec.restype = [u64], ctypes.c_uint32
    lib.h_doorbell.argtypes, lib.h_doorbell.restype = [u64, ctypes.c_uint32], u64
    lib.h_push.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, u8p, ctypes.c_int, ctypes.c_int, u8p, u64]
    lib.h_push.argtypes += [ctypes.POINTER(ErrorRecord)]
    lib.h_push.restype = ctypes.c_int
    lib.h_flush.argtypes = [u8p, ctypes.c_uint32, u64, ctypes.POINTER(ErrorRecord)]
    lib.h_flush.restype = ctypes.c_int
    return lib


@pytest.fixture
def rng():
    seed = secrets.randbits(32)
    print(f"seed={seed}")
    return np.random.default_rng(seed)


def _python_build(kind, ring, pi, qpn, raddr, rkey, laddr, lkey, value, signaled):
    kw = dict(qpn=qpn, signaled=signaled)
    if kind == 0:
        return W.build_rdma_write(ring, pi, raddr=raddr, rkey=rkey, laddr=laddr, lkey=lkey, length=value, **kw)
    if kind == 1:
        return W.build_inline_write_u32(ring, pi, raddr=raddr, rkey=rkey, value=value, **kw)
    if kind == 2:
        return W.build_inline_write_u64(ring, pi, raddr=raddr, rkey=rkey, value=value, **kw)
    if kind == 3:
        return W.build_fetch_add(ring, pi, raddr=raddr, rkey=rkey, add=value, laddr=laddr, lkey=lkey, **kw)
    return W.build_nop(ring, pi, **kw)


def test_host_built_wqes_equal_the_python_encoder(lib, rng):
    """Random WQEs of every kind at random producer indices (wrapping a 16-slot ring): same bytes, same fields."""
    cnt = 16
    for _ in range(400):
        ring_c = np.full(cnt * 64, 0xA5, dtype=np.uint8)
        ring_p = ring_c.copy()
        kind = int(rng.integers(0, 5))
        pi = int(rng.integers(0, 1 << 40))
        qpn = int(rng.integers(0, 1 << 24))
        raddr, laddr = (int(x) for x in rng.integers(0, 1 << 63, 2, dtype=np.uint64) * 2 + rng.integers(0, 2, 2))
        rkey, lkey = (int(x) for x in rng.integers(0, 1 << 32, 2))
        value = {0: int(rng.integers(0, 1 << 31)), 1: int(rng.integers(0, 1 << 32))}.get(
            kind, int(rng.integers(0, 1 << 63)) * 2 + 1
        )
        sig = bool(rng.integers(0, 2))
        n_c = lib.h_build(kind, ring_c.ctypes.data, cnt, pi, qpn, raddr, rkey, laddr, lkey, value, int(sig))
        n_p = _python_build(kind, ring_p, pi, qpn, raddr, rkey, laddr, lkey, value, sig)
        assert n_c == n_p == 1
        assert ring_c.tobytes() == ring_p.tobytes(), (kind, pi)
        wqe = W.decode_wqe(ring_c, pi)
        assert (wqe.pi16, wqe.qpn, wqe.signaled) == (pi & 0xFFFF, qpn, sig)
        if kind == 0:
            assert (wqe.raddr, wqe.rkey, wqe.data) == (raddr, rkey, (W.DataSeg(value, lkey, laddr),))
        elif kind in (1, 2):
            assert wqe.inline == value.to_bytes(4 if kind == 1 else 8, "little") and wqe.raddr == raddr
        elif kind == 3:
            assert (wqe.swap_add, wqe.compare, wqe.data) == (value, 0, (W.DataSeg(8, lkey, laddr),))


def test_host_doorbell_values_equal_the_python_encoder(lib, rng):
    for _ in range(200):
        pi = int(rng.integers(0, 1 << 62))
        qpn = int(rng.integers(0, 1 << 24))
        rec = np.zeros(8, dtype=np.uint8)
        W.encode_dbrec(rec, pi)
        assert int(lib.h_dbrec(pi)) == int(rec[4:8].view(np.uint32)[0])
        assert int(lib.h_doorbell(pi, qpn)) == W.doorbell_u64(pi, qpn)
        assert W.decode_doorbell(np.array([lib.h_doorbell(pi, qpn)], dtype=np.uint64).view(np.uint8))[:2] == (
            pi & 0xFFFF,
            qpn,
        )


def _push(lib, fifos, rows, nthreads, timeout_s, err):
    bases = (ctypes.c_void_p * len(fifos))(*[f.address for f in fifos])
    tickets = np.zeros(len(rows), dtype=np.uint64)
    fails = lib.h_push(
        bases,
        len(fifos),
        fifos[0].capacity,
        rows.ctypes.data,
        len(rows),
        nthreads,
        tickets.ctypes.data,
        int(timeout_s * 1e9),
        ctypes.byref(err),
    )
    return fails, tickets


def test_host_built_records_equal_the_python_encoder(lib, rng):
    f = TriggerFifo(64)
    rows = np.zeros((40, 4), dtype=np.uint64)
    trigs = []
    for i in range(40):
        t = Trigger(
            int(rng.integers(1, 4)),
            int(rng.integers(0, 1 << 16)),
            int(rng.integers(0, 256)),
            *map(int, rng.integers(0, 1 << 62, 3)),
        )
        trigs.append(t)
        rows[i] = [t.op | t.peer << 8 | t.qp << 24, t.local_offset, t.remote_offset, t.value]
    err = ErrorRecord()
    fails, tickets = _push(lib, [f], rows, 1, 1.0, err)
    assert fails == 0 and list(tickets) == list(range(40)) and f.head == 40
    for i, t in enumerate(trigs):
        raw = f.buffer[256 + 32 * i : 288 + 32 * i].tobytes()
        want = Trigger(t.op, t.peer, t.qp, t.local_offset, t.remote_offset, t.value, seq=i + 1)
        assert raw == F.encode_trigger(want)


def test_host_producer_threads_drive_the_proxy_end_to_end(lib, rng):
    """4 C++ producer threads push writes and atomic adds through 3 small FIFOs (back-pressure), 2 proxy threads
    post them to an emulated peer; C++ flushes; the peer's memory matches exactly."""
    a, b = EmulatedNic(name="A"), EmulatedNic(name="B")
    try:
        all_rights = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_ATOMIC
        src = rng.integers(0, 256, 1 << 16, dtype=np.uint8)
        dst = np.zeros(1 << 16, dtype=np.uint8)
        smr, dmr = a.reg_mr(src, access=all_rights), b.reg_mr(dst, access=all_rights)
        qps = []
        for _ in range(2):
            q = a.create_qp(a.create_cq(64), 16)
            q.connect(b.create_qp(b.create_cq(16), 16))
            qps.append(q)
        fifos = [TriggerFifo(8, name=f"f{i}") for i in range(3)]
        svc = ProxyService(fifos, local=smr, peers={5: PeerRoute(qps, dmr.addr, dmr.rkey)}, num_threads=2, timeout_s=10)
        rows, expect = [], np.zeros_like(dst)
        counters = np.zeros(8, dtype=np.uint64)
        for k in range(600):
            if k % 4 == 3:
                c, v = int(rng.integers(0, 8)), int(rng.integers(0, 1 << 32))
                rows.append([TriggerOp.ATOMIC_ADD | 5 << 8 | (k % 2) << 24, 0, 8 * c, v])
                counters[c] += np.uint64(v)
            else:
                n = int(rng.integers(1, 64))
                so = int(rng.integers(0, len(src) - n))
                rows.append([TriggerOp.WRITE | 5 << 8 | (k % 2) << 24, so, 1024 + 96 * k, n])
                expect[1024 + 96 * k : 1024 + 96 * k + n] = src[so : so + n]
        rows = np.array(rows, dtype=np.uint64)
        err = ErrorRecord()
        fails, tickets = _push(lib, fifos, rows, 4, 10.0, err)
        assert fails == 0 and err.claimed == 0
        for f in fifos:
            assert lib.h_flush(f.address, f.capacity, int(10e9), ctypes.byref(err)) == 1
        assert np.array_equal(dst[1024:], expect[1024:])
        assert np.array_equal(dst[:64].view(np.uint64), counters)
        assert sorted(int(f.head) for f in fifos) == [201, 201, 201]
        svc.close()
    finally:
        a.close()
        b.close()


def test_host_producer_deadline_and_proxy_failure(lib):
    f = TriggerFifo(2)
    rows = np.array([[TriggerOp.WRITE, 0, 0, 1]] * 3, dtype=np.uint64)
    err = ErrorRecord()
    t0 = time.monotonic()
    fails, tickets = _push(lib, [f], rows, 1, 0.2, err)  # nobody consumes: the third push times out
    assert fails == 1 and 0.2 <= time.monotonic() - t0 < 5
    assert (err.claimed, err.code, err.phase, err.seen, err.expected) == (1, 1, 0x501, 2, 2)
    # a failed proxy (error word set) stops a waiting producer long before its deadline
    g = TriggerFifo(2)
    err2 = ErrorRecord()
    timer = threading.Timer(0.1, g.set_error, args=(1,))
    timer.start()
    t0 = time.monotonic()
    fails, _ = _push(lib, [g], rows, 1, 30.0, err2)
    assert fails == 1 and time.monotonic() - t0 < 5
    assert (err2.code, err2.phase) == (4, 0x501)
    err3 = ErrorRecord()
    assert lib.h_flush(g.address, g.capacity, int(0.2e9), ctypes.byref(err3)) == 0  # flush sees the error word too
