"""The real mlx5 backend (epkern.nic.mlx5) on a machine without an RDMA NIC.

Pure parts are tested with synthetic data (CQEs in the real mlx5_cqe64 / mlx5_err_cqe layout, owner-bit and
consumer-index arithmetic, page-alignment math, doorbell qword selection, the PeerInfo exchange, page
registration bookkeeping). A fake ``_verbs_cffi`` layer (its functions monkeypatched) hands out rings, doorbell
records and "BlueFlame registers" that belong to an emulated NIC in doorbell-polling mode, which plays the hardware:
the proxy service posts through ``Mlx5QueuePair`` and the emulated NIC executes the very bytes written. Tests that
need a real mlx5 NIC are skipped unless one is present.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import struct
import subprocess
import sys
import threading
import types

import numpy as np
import pytest

from epkern import _verbs_cffi as V
from epkern.nic import Access, EmulatedNic, FifoProducer, PeerRoute, ProxyError, ProxyService, TriggerFifo
from epkern.nic import mlx5 as M
from epkern.nic import wqe as W
from epkern.nic.emulated import NicError
from epkern.nic.mlx5_cuda import CudaCalls
from epkern.nic.mlx5_host_io import CpuFences
from nic_test_support import LoggedHandles, close_services_and_nics
from thread_allgather import threaded_allgathers

RDMA_OK, RDMA_WHY = V.rdma_available()
ALL = int(Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_ATOMIC)
SRC = os.path.join(os.path.dirname(__file__), "..", "src")


# --- no device here -----------------------------------------------------------------------------------------------


def _libibverbs_error() -> str | None:
    """Why libibverbs.so.1 cannot be loaded (rdma-core not installed), or None when it can."""
    try:
        V.verbs_lib()
    except V.RdmaUnavailableError as e:
        return str(e)
    return None


@pytest.mark.skipif(RDMA_OK, reason="an RDMA device is present")
def test_no_device_raises_rdma_unavailable_with_reason():
    with pytest.raises(M.RdmaUnavailableError) as first:
        M.Mlx5Nic()
    with pytest.raises(M.RdmaUnavailableError) as named:
        M.Mlx5Nic("mlx5_7")
    msg, named_msg = str(first.value), str(named.value)
    if _libibverbs_error() is not None:
        # No rdma-core: both say which library is missing and which package provides it.
        for m in (msg, named_msg):
            assert "libibverbs.so.1 could not be loaded" in m and "install rdma-core" in m, m
    else:
        # rdma-core but no device: the kernel exposes none (ENOSYS; the named device is named), or none is listed.
        assert "ENOSYS" in msg or "no RDMA device" in msg, msg
        assert "mlx5_7" in named_msg or "returned an empty list" in named_msg, named_msg


def test_importing_epkern_nic_does_not_import_mlx5_or_rdma_core():
    code = (
        "import sys, epkern.nic as n\n"
        "assert 'epkern.nic.mlx5' not in sys.modules\n"
        "maps = open('/proc/self/maps').read()\n"
        "assert 'libibverbs' not in maps and 'libmlx5' not in maps\n"
        "n.Mlx5Nic; assert 'epkern.nic.mlx5' in sys.modules\n"
        "assert 'libibverbs' not in open('/proc/self/maps').read()\n"
    )
    env = dict(os.environ, PYTHONPATH=SRC)
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# --- pure helpers -----------------------------------------------------------------------------------------------------


def test_page_range_and_dmabuf_range():
    assert M.page_range(0x1000, 1, 4096) == (0x1000, 0x1000)
    assert M.page_range(0x1FFF, 2, 4096) == (0x1000, 0x2000)
    assert M.page_range(0x1234, 0x1000, 4096) == (0x1000, 0x2000)
    assert M.page_range(0x10000, 0x10000, 65536) == (0x10000, 0x10000)
    with pytest.raises(NicError, match="power of two"):
        M.page_range(0, 1, 3000)
    with pytest.raises(NicError, match="non-empty"):
        M.page_range(0x1000, 0, 4096)
    # a region in the middle of a 2 MiB allocation: export whole pages, offset keeps the page offset
    base = 0x7F0000000000
    start, size, off = M.dmabuf_range(base + 0x1234, 0x3000, base, 2 << 20, 4096)
    assert (start, size, off) == (base + 0x1000, 0x4000, 0x234)
    assert (base + 0x1234) % 4096 == off % 4096  # iova and offset share the page offset
    assert M.dmabuf_range(base, 4096, base, 4096, 4096) == (base, 4096, 0)
    with pytest.raises(NicError, match="not inside its allocation"):
        M.dmabuf_range(base + 4000, 200, base, 4096, 4096)
    with pytest.raises(NicError, match="rounds out"):
        M.dmabuf_range(base + 0x100, 0x10, base + 0x80, 0x1000, 4096)  # allocation not page aligned


def _ring(cnt=8):
    return np.zeros(cnt * 64, dtype=np.uint8)


def test_last_wqe_and_doorbell_qword_selection_across_the_wrap():
    sq = _ring(8)
    qpn = 0x1234
    pi = 6
    pi += W.build_nop(sq, pi, qpn=qpn)  # 6
    pi += W.build_inline_write(sq, pi, qpn=qpn, raddr=64, rkey=5, payload=bytes(range(40)))  # 7..8: ds=5, wraps
    assert pi == 9
    last = pi
    pi += W.build_rdma_write(sq, pi, qpn=qpn, raddr=0, rkey=1, laddr=0, lkey=2, length=8, signaled=True)  # 9
    assert M.last_wqe_index(sq, 6, 10) == last
    assert M.last_wqe_index(sq, 6, 9) == 7
    q = M.doorbell_qword(sq, last)
    slot = last & 7
    assert q.to_bytes(8, "little") == sq[slot * 64 : slot * 64 + 8].tobytes()
    pi16, dqpn, opcode, ds = W.decode_doorbell(q.to_bytes(8, "little"))
    assert (pi16, dqpn, opcode, ds) == (9, qpn, W.MLX5_OPCODE_RDMA_WRITE, 3)
    with pytest.raises(NicError, match="not at the doorbell"):
        M.last_wqe_index(sq, 6, 8)  # ends inside the 2-WQEBB inline write
    with pytest.raises(NicError, match="stale"):
        M.last_wqe_index(sq, 14, 15)  # slot 6 holds index 6, not 14
    with pytest.raises(NicError, match="ds=0"):
        M.last_wqe_index(_ring(8), 0, 1)
    with pytest.raises(NicError, match="on a ring of 8"):
        M.last_wqe_index(sq, 0, 9)
    assert M.be32_store_value(0x01020304).to_bytes(4, "little") == b"\x01\x02\x03\x04"


def _real_cqe(*, qpn, wqe_counter, owner, byte_cnt=0, opcode=W.MLX5_CQE_REQ, syndrome=0, vendor=0, wqe_op=0):
    """A CQE laid out from rdma-core's struct mlx5_cqe64 / mlx5_err_cqe (independently of wqe.encode_cqe)."""
    b = bytearray(64)
    if opcode == W.MLX5_CQE_REQ_ERR:
        b[54], b[55] = vendor, syndrome  # vendor_err_synd, syndrome
        struct.pack_into(">I", b, 56, (wqe_op << 24) | qpn)  # s_wqe_opcode_qpn
    else:
        struct.pack_into(">I", b, 44, byte_cnt)
        struct.pack_into(">I", b, 56, (0x40 << 24) | qpn)  # sop_drop_qpn: flag bits above the QPN
        b[62] = 0x5A  # signature
    struct.pack_into(">H", b, 60, wqe_counter)
    b[63] = (opcode << 4) | owner
    return bytes(b)


def _stub_nic():
    return types.SimpleNamespace(_host_fences=True, faults=[], _pages=None, _mapped=[])


@pytest.mark.parametrize("cqe_size", [64, 128])
def test_cq_poll_owner_bit_consumer_index_and_errors(cqe_size):
    cnt = 4
    ring = np.zeros(cnt * cqe_size, dtype=np.uint8)
    ring[cqe_size - 1 :: cqe_size] = W.MLX5_CQE_INVALID << 4  # rdma-core initialises op_own = INVALID << 4
    dbrec = np.zeros(8, dtype=np.uint8)
    info = V.Mlx5CqInfo(cqn=7, buf=ring.ctypes.data, cqe_cnt=cnt, cqe_size=cqe_size, dbrec=dbrec.ctypes.data)
    nic = _stub_nic()
    cq = M.Mlx5CompletionQueue(nic, None, info)
    qp = types.SimpleNamespace(state="RTS", error=None, counters=M.QpCounters())
    cq._qps[0x42] = qp

    def put(n, **kw):  # the hardware writes CQE n at slot n % cnt with owner (n // cnt) & 1
        off = (n % cnt) * cqe_size + cqe_size - 64
        if cqe_size == 128:
            ring[off - 64 : off] = 0xEE  # the first half of a 128-byte CQE is not the 64-byte CQE
        ring[off : off + 64] = np.frombuffer(_real_cqe(owner=(n // cnt) & 1, **kw), dtype=np.uint8)

    assert cq.poll() == [] and dbrec.tobytes() == bytes(8)
    n = 0
    for lap in range(3):
        for _ in range(3 if lap < 2 else 2):
            put(n, qpn=0x42, wqe_counter=(0xFFFE + n) & 0xFFFF, byte_cnt=100 + n)
            n += 1
        got = cq.poll()
        assert [c.wqe_counter for c in got] == [(0xFFFE + k) & 0xFFFF for k in range(n - len(got), n)]
        assert all(c.qpn == 0x42 and c.opcode == W.MLX5_CQE_REQ and not c.is_error for c in got)
        assert [c.byte_cnt for c in got] == [100 + k for k in range(n - len(got), n)]
        assert struct.unpack(">I", dbrec[:4].tobytes())[0] == n  # dbrec[MLX5_CQ_SET_CI]
        assert dbrec[4:].tobytes() == bytes(4)  # the arm word is untouched
        assert cq.poll() == []  # older entries of the previous lap carry the other owner bit
    # max_entries, then an error CQE: recorded with its syndrome name, the QP goes to ERROR
    put(n, qpn=0x42, wqe_counter=1)
    put(n + 1, qpn=0x42, wqe_counter=2, opcode=W.MLX5_CQE_REQ_ERR, syndrome=0x13, vendor=0x88, wqe_op=0x08)
    assert [c.wqe_counter for c in cq.poll(1)] == [1]
    (err,) = cq.poll()
    assert err.is_error and err.syndrome == 0x13 and err.vendor_syndrome == 0x88 and err.wqe_opcode == 8
    assert qp.state == M.Mlx5QueuePair.ERROR and "REMOTE_ACCESS_ERR" in qp.error.message
    assert "RDMA_WRITE" in qp.error.message and nic.faults == [qp.error]
    # a responder CQE on a send CQ is refused, not taken for a completion
    put(n + 2, qpn=0x42, wqe_counter=3, opcode=2)
    with pytest.raises(NicError, match="unexpected CQE opcode 2"):
        cq.poll()


def test_cq_info_is_validated():
    buf = np.zeros(64 * 4, dtype=np.uint8)
    kw = dict(cqn=1, buf=buf.ctypes.data, dbrec=buf.ctypes.data)
    with pytest.raises(NicError, match="power of two"):
        M.Mlx5CompletionQueue(_stub_nic(), None, V.Mlx5CqInfo(cqe_cnt=3, cqe_size=64, **kw))
    with pytest.raises(NicError, match="CQE size"):
        M.Mlx5CompletionQueue(_stub_nic(), None, V.Mlx5CqInfo(cqe_cnt=4, cqe_size=32, **kw))


def _info(qpn, psn=0):
    return V.PeerInfo(lid=qpn & 0xFFFF, gid=bytes([qpn & 0xFF]) * 16, qpn=qpn, psn=psn, mtu=5)


def test_peer_table_round_trip_and_exchange():
    n, k = 3, 2
    # rank r's QP i towards peer p has qpn r*100 + p*10 + i; rank 1 has no QPs towards rank 2 (and vice versa)
    tables = [
        [[None] * k if {r, p} == {1, 2} else [_info(r * 100 + p * 10 + i, i) for i in range(k)] for p in range(n)]
        for r in range(n)
    ]
    blob = M.encode_peer_table(tables[0])
    assert M.decode_peer_table(blob) == tables[0]
    blobs = [M.encode_peer_table(t) for t in tables]
    for r in range(n):

        def allgather(data, r=r):
            assert data == blobs[r]
            return blobs

        remote = M.exchange_peer_info(allgather, r, tables[r])
        for p in range(n):
            for i in range(k):
                if {r, p} == {1, 2}:
                    assert remote[p][i] is None
                else:
                    assert remote[p][i].qpn == p * 100 + r * 10 + i and remote[p][i].psn == i
    bad = [row[:] for row in tables[2]]
    bad[1] = [_info(999), None]
    with pytest.raises(NicError, match="only one side"):
        M.exchange_peer_info(lambda d: [blobs[0], M.encode_peer_table(bad), blobs[2]], 2, tables[2])
    with pytest.raises(NicError, match="does not hold"):
        M.decode_peer_table(blob[:-1])
    with pytest.raises(NicError, match="for 3 ranks, the group has 2"):
        M.exchange_peer_info(lambda d: blobs[:2], 0, tables[0][:2])


class FakeCuda:
    def __init__(self, fail_on=None):
        self.log = []
        self.fail_on = fail_on

    def register(self, addr, size, flags):
        if addr == self.fail_on:
            raise RuntimeError("cudaErrorHostMemoryAlreadyRegistered")
        self.log.append(("reg", addr, size, flags))

    def unregister(self, addr):
        self.log.append(("unreg", addr))

    def device_pointer(self, addr):
        return addr + (1 << 48)


def test_host_page_registry_refcounts_and_flags():
    fc = FakeCuda()
    reg = M.HostPageRegistry(fc.register, fc.unregister, fc.device_pointer, page=4096)
    base = 0x10000
    assert reg.acquire(base + 8, 8, 3) == base + 8 + (1 << 48)  # dbrec of QP 1
    assert reg.acquire(base + 72, 8, 3) == base + 72 + (1 << 48)  # dbrec of QP 2, same page
    assert fc.log == [("reg", base, 4096, 3)]
    reg.acquire(base + 4000, 200, 3)  # straddles into the next page
    assert fc.log[-1] == ("reg", base + 4096, 4096, 3) and reg.registered_pages[base] == (3, 3)
    with pytest.raises(NicError, match="already registered with flags 0x3, not 0x7"):
        reg.acquire(base + 16, 8, 7)
    reg.release(base + 8, 8)
    reg.release(base + 72, 8)
    assert ("unreg", base) not in fc.log
    reg.release(base + 4000, 200)
    assert fc.log[-2:] == [("unreg", base), ("unreg", base + 4096)] and reg.registered_pages == {}
    # a failed registration rolls back what this call registered
    fc2 = FakeCuda(fail_on=0x21000)
    reg2 = M.HostPageRegistry(fc2.register, fc2.unregister, fc2.device_pointer, page=4096)
    with pytest.raises(RuntimeError, match="AlreadyRegistered"):
        reg2.acquire(0x20000, 0x2000, 3)
    assert fc2.log == [("reg", 0x20000, 4096, 3), ("unreg", 0x20000)] and reg2.registered_pages == {}


def test_cuda_glue_answers_through_the_driver_binding_and_raises_nic_errors(monkeypatch):
    """_Cuda's driver calls go through epkern._cuda_driver (a stand-in libcuda here); a refused call is a
    NicError named by cuGetErrorName."""
    from epkern import _cuda_driver

    class Driver:
        def cuMemHostGetDevicePointer_v2(self, out, addr, flags):  # noqa: N802 - the driver's names
            out._obj.value = addr + (1 << 48)
            return 0

        def cuMemGetAddressRange_v2(self, base, size, ptr):  # noqa: N802
            return 1  # CUDA_ERROR_INVALID_VALUE

        def cuGetErrorName(self, status, name):  # noqa: N802
            name._obj.value = b"CUDA_ERROR_INVALID_VALUE"
            return 0

    monkeypatch.setattr(_cuda_driver, "_lib", Driver())
    cuda = object.__new__(CudaCalls)  # without CuPy's runtime (the one call needing it is stood in for)
    cuda.rt = types.SimpleNamespace(pointerGetAttributes=lambda ptr: None)
    assert cuda.device_pointer(0x1000) == 0x1000 + (1 << 48)
    with pytest.raises(NicError, match=r"cuMemGetAddressRange failed: CUDA_ERROR_INVALID_VALUE .*0x2000"):
        cuda.address_range(0x2000)


def _executable_anonymous_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if len(line.split()) == 5 and "x" in line.split()[1])


def test_cpu_fences_run_without_executable_memory():
    """The fences are membarrier(2) calls (issue #20, finding 5): no machine code written into an executable page."""
    before = _executable_anonymous_mappings()
    CpuFences._inst = None
    f = CpuFences.get()
    f.sfence()
    f.lfence()
    assert CpuFences.get() is f
    assert _executable_anonymous_mappings() == before


# --- the fake _verbs_cffi layer: an emulated NIC plays the hardware --------------------------------------------------

_atomic_lock = threading.Lock()


class RawMemory:
    """MemoryAccess over raw process addresses (the emulated NIC only touches MR-checked ranges)."""

    def read(self, addr, n):
        return ctypes.string_at(addr, n)

    def write(self, addr, data):
        ctypes.memmove(addr, bytes(data), len(data))

    def atomic_fetch_add64(self, addr, value):
        with _atomic_lock:
            c = ctypes.c_uint64.from_address(addr)
            old = c.value
            c.value = (old + value) & ((1 << 64) - 1)
            return old


class FakeVerbs(LoggedHandles):
    """The subset of ``epkern._verbs_cffi`` that Mlx5Nic uses, backed by EmulatedNic objects."""

    names = [
        "open_device",
        "query_port",
        "alloc_pd",
        "reg_mr",
        "reg_dmabuf_mr",
        "create_cq",
        "mlx5_cq_info",
        "create_rc_qp",
        "mlx5_qp_info",
        "local_peer_info",
        "connect_rc_qp",
    ]

    def __init__(self, *, is_mlx5=True, port_state=4):
        self.is_mlx5, self.port_state = is_mlx5, port_state
        self.log: list[str] = []
        self.qps: dict[int, object] = {}
        self.emus: list[EmulatedNic] = []
        self.connects: list[tuple] = []
        self._devs = itertools.count()

    def open_device(self, name=None):
        emu = EmulatedNic(memory=RawMemory(), poll_doorbells=True, name=f"fake{next(self._devs)}")
        self.emus.append(emu)
        return self._handle("ctx", emu.close, name=name or "mlx5_0", is_mlx5=self.is_mlx5, emu=emu)

    def query_port(self, ctx, port):
        return V.PortAttr(self.port_state, 5, 5, 1, 1, 128, 0, 1 << 30, 2, 64, 5)

    def alloc_pd(self, ctx):
        return self._handle("pd", ctx=ctx)

    def reg_mr(self, pd, addr, length, access):
        emu = pd.ctx.emu
        mr = emu.reg_mr(addr, length, Access(access))
        return self._handle("mr", lambda: emu.dereg_mr(mr), addr=addr, length=length, lkey=mr.lkey, rkey=mr.rkey)

    def reg_dmabuf_mr(self, *a, **k):  # pragma: no cover - GPU memory is not reachable here
        raise AssertionError("not used on the CPU")

    def create_cq(self, ctx, cqe):
        cnt = 1 << max(cqe - 1, 1).bit_length()
        return self._handle("cq", emu_cq=ctx.emu.create_cq(cnt), ctx=ctx)

    def mlx5_cq_info(self, cq):
        c = cq.emu_cq
        return V.Mlx5CqInfo(cqn=0, buf=c.ring.ctypes.data, cqe_cnt=c.cqe_cnt, cqe_size=64, dbrec=c.dbrec.ctypes.data)

    def create_rc_qp(self, pd, send_cq, recv_cq=None, *, max_send_wr=1024, **kw):
        cnt = 1 << max(max_send_wr - 1, 1).bit_length()
        q = pd.ctx.emu.create_qp(send_cq.emu_cq, cnt)
        # the doorbell register lives in its own "UAR page" (MMIO on hardware), at the BlueFlame offset 0x800
        page = M.page_size()
        raw = np.zeros(2 * page, dtype=np.uint8)
        uar = raw[-raw.ctypes.data % page :][:page]
        q.db_reg = uar[0x800:0x808]  # the emulated NIC watches this word
        h = self._handle("qp", qp_num=q.qpn, emu_qp=q, pd=pd, uar=raw)
        self.qps[q.qpn] = h
        return h

    def mlx5_qp_info(self, qp):
        q = qp.emu_qp
        return V.Mlx5QpInfo(
            qpn=q.qpn,
            sq_buf=q.sq.ctypes.data,
            sq_wqe_cnt=q.wqe_cnt,
            sq_stride=64,
            dbrec=q.dbrec.ctypes.data,
            bf_reg=q.db_reg.ctypes.data,
            bf_size=256,
            rq_buf=0,
            rq_wqe_cnt=0,
            rq_stride=0,
        )

    def local_peer_info(self, qp, port_num=1, gid_index=0, psn=0):
        return V.PeerInfo(lid=7, gid=bytes(16), qpn=qp.qp_num, psn=psn, mtu=5)

    def connect_rc_qp(self, qp, local, peer, port_num=1, sgid_index=0, **kw):
        self.connects.append((qp.qp_num, local.qpn, peer.qpn, local.psn))
        qp.emu_qp.connect(self.qps[peer.qpn].emu_qp)


@pytest.fixture
def fake(monkeypatch):
    f = FakeVerbs()
    for name in FakeVerbs.names:
        monkeypatch.setattr(V, name, getattr(f, name))
    yield f
    for emu in f.emus:
        emu.close()


def test_construction_failures_close_what_was_opened(monkeypatch):
    for kw, match in [(dict(is_mlx5=False), "not an mlx5 device"), (dict(port_state=1), "not ACTIVE")]:
        f = FakeVerbs(**kw)
        for name in FakeVerbs.names:
            monkeypatch.setattr(V, name, getattr(f, name))
        with pytest.raises(M.RdmaUnavailableError, match=match):
            M.Mlx5Nic()
        assert f.log == ["ctx"]


def test_queue_pair_ring_doorbell_stores(fake):
    with M.Mlx5Nic() as nic:
        cq = nic.create_cq(16)
        qp = nic.create_qp(cq, 8)
        assert qp.wqe_cnt == 8 and qp.sq.shape == (512,) and qp.dbrec.shape == (8,)
        assert qp.sq.ctypes.data == qp.info.sq_buf  # a view of the real ring, not a copy
        with pytest.raises(NicError, match="RESET"):
            qp.ring_doorbell(1)
        qp.connect(qp.local_info())  # loopback
        assert fake.connects == [(qp.qpn, qp.qpn, qp.qpn, qp.psn)]
        buf = np.zeros(64, dtype=np.uint8)
        mr = nic.reg_mr(buf, access=ALL)
        buf[:8] = np.arange(1, 9)
        pi = W.build_rdma_write(
            qp.sq, 0, qpn=qp.qpn, raddr=mr.addr + 32, rkey=mr.rkey, laddr=mr.addr, lkey=mr.lkey, length=8
        )
        pi += W.build_nop(qp.sq, pi, qpn=qp.qpn, signaled=True)
        # hold the fake hardware's view: read the stores before the emulated NIC can act on them
        emu_qp = fake.qps[qp.qpn].emu_qp
        qp.ring_doorbell(pi)
        assert W.decode_dbrec(qp.dbrec) == 2 and qp.dbrec[:4].tobytes() == bytes(4)
        assert emu_qp.db_reg.tobytes() == qp.sq[64:72].tobytes()  # first qword of the last WQE's ctrl
        (c,) = cq.wait(1)
        assert not c.is_error and c.wqe_counter == 1 and c.qpn == qp.qpn
        assert bytes(buf[32:40]) == bytes(range(1, 9))
        assert qp.counters.doorbells == 1 and qp.counters.wqes == 2
        with pytest.raises(NicError, match="ds=0"):
            qp.ring_doorbell(6)  # slots 2..5 were never written
        with pytest.raises(NicError, match="connect\\(\\) needs a fresh QP"):
            qp.connect(qp.local_info())
        nic.check()


def test_close_order_idempotence_and_gpu_mapping_bookkeeping(fake):
    fc = FakeCuda()
    reg = M.HostPageRegistry(fc.register, fc.unregister, fc.device_pointer)
    nic = M.Mlx5Nic(page_registry=reg)
    cq1, cq2 = nic.create_cq(8), nic.create_cq(8)
    q1, q2 = nic.create_qp(cq1, 8), nic.create_qp(cq2, 8)
    nic.reg_mr(np.zeros(16, dtype=np.uint8))
    g = q1.map_for_gpu()
    assert q1.map_for_gpu() is g
    assert (g.sq, g.dbrec, g.db_reg) == tuple(a + (1 << 48) for a in (q1.info.sq_buf, q1.info.dbrec, q1.info.bf_reg))
    assert (g.qpn, g.wqe_cnt) == (q1.qpn, 8)
    flags = {page: f for _, page, _, f in (e for e in fc.log if e[0] == "reg")}
    assert flags[q1.info.bf_reg & ~(M.page_size() - 1)] == 0x7  # PORTABLE | MAPPED | IOMEMORY
    assert flags[q1.info.sq_buf & ~(M.page_size() - 1)] == 0x3
    q1.state = M.Mlx5QueuePair.RTS
    with pytest.raises(NicError, match="mapped for the GPU"):
        q1.ring_doorbell(1)
    cq2.map_for_gpu()
    registered = set(reg.registered_pages)
    nic.close()
    unregistered = {e[1] for e in fc.log if e[0] == "unreg"}
    assert unregistered == registered and reg.registered_pages == {}
    assert fake.log == ["qp", "qp", "cq", "cq", "mr", "pd", "ctx"]
    nic.close()
    assert fake.log == ["qp", "qp", "cq", "cq", "mr", "pd", "ctx"]
    assert q2.state == M.Mlx5QueuePair.CLOSED
    with pytest.raises(NicError, match="closed"):
        nic.create_cq(8)
    with pytest.raises(NicError, match="CLOSED"):
        q2.ring_doorbell(1)


def _mesh(n, nqps, size, wqe_cnt=16):
    nics = [M.Mlx5Nic(name=f"rank{r}") for r in range(n)]
    bufs = [np.zeros(2 * size, dtype=np.uint8) for _ in range(n)]
    mrs = [nic.reg_mr(b, access=ALL) for nic, b in zip(nics, bufs, strict=True)]
    qps = [
        [[nics[r].create_qp(nics[r].create_cq(64), wqe_cnt) for _ in range(nqps)] for _ in range(n)] for r in range(n)
    ]
    gathers = threaded_allgathers(n)
    errors = []

    def connect(r):
        try:
            nics[r].connect_mesh(gathers[r], r, qps[r])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=connect, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return nics, bufs, mrs, qps


def test_proxy_service_end_to_end_through_mlx5_queue_pairs(fake):
    """Two ranks, 2 QPs per peer (loopback included), the proxy posting writes and atomics through Mlx5QueuePair;
    the bytes in the real-layout rings are decoded with epkern.nic.wqe and executed by the emulated NIC."""
    n, nqps, size = 2, 2, 1 << 14
    rng = np.random.default_rng(5)
    nics, bufs, mrs, qps = _mesh(n, nqps, size, wqe_cnt=8)  # ~10 WQEs per QP: the rings wrap, batches are cut
    for r in range(n):
        for p in range(n):
            for i in range(nqps):
                assert qps[r][p][i].state == "RTS"
                assert fake.qps[qps[r][p][i].qpn].emu_qp.remote.qpn == qps[p][r][i].qpn
    services = []
    try:
        expect = [b.copy() for b in bufs]
        for r in range(n):
            bufs[r][:size] = rng.integers(0, 256, size, dtype=np.uint8)
            expect[r][:size] = bufs[r][:size]
        rung: dict[int, set[int]] = {}  # qpn -> producer indices the doorbells carried
        for q in (q for rank in qps for row in rank for q in row):

            def record(pi, q=q, orig=q.ring_doorbell):
                rung.setdefault(q.qpn, set()).add(pi)
                orig(pi)

            q.ring_doorbell = record
        fifos = [[TriggerFifo(64, name=f"r{r}f{j}") for j in range(2)] for r in range(n)]
        for r in range(n):
            routes = [PeerRoute(qps[r][p], mrs[p].addr, mrs[p].rkey) for p in range(n)]
            services.append(ProxyService(fifos[r], local=mrs[r], peers=routes, num_threads=2, timeout_s=10))
        # each (rank, FIFO) writes its own disjoint chunks of the receive areas, and adds to a counter at the end
        chunk = 128
        tickets = []
        for r in range(n):
            for j, f in enumerate(fifos[r]):
                prod = FifoProducer(f, timeout_s=10)
                for k in range(20):
                    p = (k + j) % n
                    lo = int(rng.integers(0, size - chunk))
                    dst = size + ((r * 2 + j) * 20 + k) * 64
                    length = 64
                    prod.write(p, k % nqps, lo, dst, length)
                    expect[p][dst : dst + length] = bufs[r][lo : lo + length]
                prod.atomic_add(1 - r, 0, 2 * size - 8, 3 + r)
                tickets.append((prod, prod.flush()))
        for prod, t in tickets:
            prod.wait_flushed(t, timeout_s=10)
        for p in range(n):
            counter = int(bufs[p][2 * size - 8 :].view(np.uint64)[0])
            assert counter == 2 * (3 + (1 - p))  # two FIFOs of the other rank added 3 + r each
            expect[p][2 * size - 8 :] = bufs[p][2 * size - 8 :]
            assert bufs[p].tobytes() == expect[p].tobytes()
        for s in services:
            s.close()
        stats = [s.stats() for s in services]
        # the rings hold exactly what the proxy posted: decode every WQE written
        for r in range(n):
            posted = 0
            for row in qps[r]:
                for q in row:
                    assert q._rung > q.wqe_cnt  # wrapped at least once
                    for pi in range(q._rung - q.wqe_cnt, q._rung):  # what the ring still holds
                        w = W.decode_wqe(q.sq, pi)
                        assert w.qpn == q.qpn and w.pi16 == pi & 0xFFFF
                        assert w.opcode in (W.MLX5_OPCODE_RDMA_WRITE, W.MLX5_OPCODE_ATOMIC_FA)
                        if w.opcode == W.MLX5_OPCODE_RDMA_WRITE:
                            assert w.data[0].lkey == mrs[r].lkey and w.data[0].byte_count == 64
                        assert w.signaled == (pi + 1 in rung[q.qpn])  # only the last WQE of a batch
                    posted += q._rung
                    assert W.decode_dbrec(q.dbrec) == q._rung & 0xFFFF
                    assert q.cq.ci == q.counters.doorbells  # one CQE per batch, all consumed
                    assert struct.unpack(">I", q.cq.dbrec[:4].tobytes())[0] == q.cq.ci
            assert posted == stats[r].wqes == nics[r].counters().wqes
            assert nics[r].counters().doorbells == stats[r].doorbells
            fake.emus[r].close()  # its final scan of the doorbell words is done: the counters are final
            emu = fake.emus[r].counters()
            assert emu.wqes == posted and emu.cqes == stats[r].doorbells and emu.errors == 0  # every batch ran
            # A polling NIC sees doorbell-word changes: doorbells rung back to back between two of its scans
            # (pipelined batches, two threads on one QP) count once, so only the last word is sure to be seen.
            assert 0 < emu.doorbells <= stats[r].doorbells
            for row in qps[r]:
                for q in row:
                    last = M.doorbell_qword(q.sq, q._rung - 1).to_bytes(8, "little")  # one WQEBB per WQE
                    assert fake.qps[q.qpn].emu_qp._last_db == last
        for nic in nics:
            nic.check()
    finally:
        close_services_and_nics(services, nics)


def test_proxy_reports_a_real_format_error_cqe(fake):
    nics, bufs, mrs, qps = _mesh(2, 1, 4096)
    try:
        f = TriggerFifo(16)
        routes = [PeerRoute(qps[0][p], mrs[p].addr, mrs[p].rkey + (1000 if p == 1 else 0)) for p in range(2)]
        svc = ProxyService([f], local=mrs[0], peers=routes, num_threads=1, timeout_s=5)
        prod = FifoProducer(f, timeout_s=5)
        prod.write(1, 0, 0, 0, 16)
        t = prod.flush()
        with pytest.raises(ProxyError):
            prod.wait_flushed(t, timeout_s=5)
        with pytest.raises(ProxyError, match=r"peer 1 qp 0 .*syndrome 0x13.*REMOTE_ACCESS_ERR"):
            svc.close()
        q = qps[0][1][0]
        assert q.state == "ERROR" and q.error.syndrome == 0x13
        with pytest.raises(NicError, match="REMOTE_ACCESS_ERR"):
            nics[0].check()
    finally:
        for nic in nics:
            nic.close()


# --- real hardware (never run here) ------------------------------------------------------------------------------


@pytest.mark.skipif(not RDMA_OK, reason=f"needs an RDMA NIC: {RDMA_WHY}")
def test_real_nic_loopback_rdma_write_and_atomic():
    with M.Mlx5Nic() as nic:
        cq = nic.create_cq(64)
        qp = nic.create_qp(cq, 64)
        qp.connect(qp.local_info())
        src = np.arange(4096, dtype=np.uint8)
        dst = np.zeros(4096, dtype=np.uint8)
        ctr = np.zeros(2, dtype=np.uint64)
        ms = nic.reg_mr(src)  # local rights only (the default): the source of the write
        md = nic.reg_mr(dst, access=ALL)
        mc = nic.reg_mr(ctr, access=ALL)
        pi = W.build_rdma_write(
            qp.sq, 0, qpn=qp.qpn, raddr=md.addr, rkey=md.rkey, laddr=ms.addr, lkey=ms.lkey, length=4096
        )
        pi += W.build_fetch_add(
            qp.sq, pi, qpn=qp.qpn, raddr=mc.addr, rkey=mc.rkey, add=5, laddr=mc.addr + 8, lkey=mc.lkey, signaled=True
        )
        qp.ring_doorbell(pi)
        (c,) = cq.wait(1, timeout=5)
        assert not c.is_error, qp.error
        assert dst.tobytes() == src.tobytes() and int(ctr[0]) == 5 and int(ctr[1]) == 0
