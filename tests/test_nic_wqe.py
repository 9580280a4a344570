"""The WQE encoder against rdma-core's own mlx5dv.h helpers (byte for byte), and encode -> decode round trips."""

from __future__ import annotations

import importlib.util
import os
import shutil
import struct
import sys
import sysconfig

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epkern.nic import wqe as W

HEADER = "/usr/include/infiniband/mlx5dv.h"

CDEF = """
void g_ctrl(uint8_t *buf, uint16_t pi, uint8_t opcode, uint8_t opmod, uint32_t qpn, uint8_t fm_ce_se, uint8_t ds,
            uint8_t signature, uint32_t imm);
void g_data(uint8_t *buf, uint32_t len, uint32_t lkey, uint64_t addr);
void g_raddr(uint8_t *buf, uint64_t raddr, uint32_t rkey);
void g_atomic(uint8_t *buf, uint64_t swap_add, uint64_t compare);
int g_inline(uint8_t *buf, const uint8_t *payload, uint32_t n);
void g_dbrec(uint8_t *dbrec, uint16_t pi);
size_t g_layout(int which);
"""

SOURCE = r"""
#include <string.h>
#include <endian.h>
#include <stddef.h>
#include <infiniband/mlx5dv.h>

void g_ctrl(uint8_t *buf, uint16_t pi, uint8_t opcode, uint8_t opmod, uint32_t qpn, uint8_t fm_ce_se, uint8_t ds,
            uint8_t signature, uint32_t imm) {
    /* mlx5dv_set_ctrl_seg stores imm as given; callers pass it big-endian (htobe32) for *_IMM opcodes */
    mlx5dv_set_ctrl_seg((struct mlx5_wqe_ctrl_seg *)buf, pi, opcode, opmod, qpn, fm_ce_se, ds, signature,
                        htobe32(imm));
}
void g_data(uint8_t *buf, uint32_t len, uint32_t lkey, uint64_t addr) {
    mlx5dv_set_data_seg((struct mlx5_wqe_data_seg *)buf, len, lkey, (uintptr_t)addr);
}
void g_raddr(uint8_t *buf, uint64_t raddr, uint32_t rkey) {
    struct mlx5_wqe_raddr_seg *s = (struct mlx5_wqe_raddr_seg *)buf;
    s->raddr = htobe64(raddr);
    s->rkey = htobe32(rkey);
    s->reserved = 0;
}
void g_atomic(uint8_t *buf, uint64_t swap_add, uint64_t compare) {
    struct mlx5_wqe_atomic_seg *s = (struct mlx5_wqe_atomic_seg *)buf;
    s->swap_add = htobe64(swap_add);
    s->compare = htobe64(compare);
}
int g_inline(uint8_t *buf, const uint8_t *payload, uint32_t n) {
    struct mlx5_wqe_inl_data_seg *s = (struct mlx5_wqe_inl_data_seg *)buf;
    s->byte_count = htobe32(n | MLX5_INLINE_SEG);
    memcpy(s + 1, payload, n);
    return (int)((sizeof(*s) + n + 15) & ~15u);
}
void g_dbrec(uint8_t *dbrec, uint16_t pi) {
    ((__be32 *)dbrec)[MLX5_SND_DBR] = htobe32(pi);
}
size_t g_layout(int which) {
    switch (which) {
    case 0: return sizeof(struct mlx5_wqe_ctrl_seg);
    case 1: return sizeof(struct mlx5_wqe_raddr_seg);
    case 2: return sizeof(struct mlx5_wqe_data_seg);
    case 3: return sizeof(struct mlx5_wqe_atomic_seg);
    case 4: return offsetof(struct mlx5_wqe_ctrl_seg, fm_ce_se);
    case 5: return offsetof(struct mlx5_wqe_ctrl_seg, imm);
    case 6: return sizeof(struct mlx5_cqe64);
    case 7: return offsetof(struct mlx5_cqe64, byte_cnt);
    case 8: return offsetof(struct mlx5_cqe64, sop_drop_qpn);
    case 9: return offsetof(struct mlx5_cqe64, wqe_counter);
    case 10: return offsetof(struct mlx5_cqe64, op_own);
    case 11: return offsetof(struct mlx5_err_cqe, syndrome);
    case 12: return MLX5_SEND_WQE_BB;
    case 13: return MLX5_WQE_CTRL_CQ_UPDATE;
    case 14: return MLX5_OPCODE_RDMA_WRITE;
    case 15: return MLX5_OPCODE_ATOMIC_FA;
    case 16: return MLX5_CQE_REQ_ERR;
    case 17: return MLX5_INLINE_SEG;
    }
    return (size_t)-1;
}
"""


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    cffi = pytest.importorskip("cffi")
    if not os.path.exists(HEADER):
        pytest.skip(f"{HEADER} not installed (rdma-core / libibverbs-dev)")
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    if shutil.which(cc.split()[0]) is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    tmp = tmp_path_factory.mktemp("mlx5golden")
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source("_epkern_mlx5_golden", SOURCE)
    so = ffi.compile(tmpdir=str(tmp), verbose=False)
    spec = importlib.util.spec_from_file_location("_epkern_mlx5_golden", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules.setdefault("_epkern_mlx5_golden", mod)
    return mod


def _cbuf(g, n):
    return g.ffi.new(f"uint8_t[{n}]")


def _bytes(g, cbuf):
    return bytes(g.ffi.buffer(cbuf))


def test_layout_matches_header(golden):
    lib = golden.lib
    expect = [
        16,
        16,
        16,
        16,
        11,
        12,
        64,
        44,
        56,
        60,
        63,
        55,
        W.MLX5_SEND_WQE_BB,
        W.MLX5_WQE_CTRL_CQ_UPDATE,
        W.MLX5_OPCODE_RDMA_WRITE,
        W.MLX5_OPCODE_ATOMIC_FA,
        W.MLX5_CQE_REQ_ERR,
        W.MLX5_INLINE_SEG,
    ]
    assert [lib.g_layout(i) for i in range(len(expect))] == expect


u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u24 = st.integers(0, 0xFFFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)


@settings(max_examples=200, deadline=None)
@given(pi=u16, opcode=u8, opmod=u8, qpn=u24, fm=u8, ds=u8, sig=u8, imm=u32)
def test_ctrl_seg_golden(golden, pi, opcode, opmod, qpn, fm, ds, sig, imm):
    c = _cbuf(golden, 16)
    golden.lib.g_ctrl(c, pi, opcode, opmod, qpn, fm, ds, sig, imm)
    p = np.zeros(16, np.uint8)
    assert (
        W.encode_ctrl(p, 0, pi=pi, opcode=opcode, opmod=opmod, qpn=qpn, fm_ce_se=fm, ds=ds, signature=sig, imm=imm)
        == 16
    )
    assert p.tobytes() == _bytes(golden, c)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 0x7FFFFFFF), lkey=u32, addr=u64, raddr=u64, rkey=u32, sa=u64, cmp=u64)
def test_data_raddr_atomic_golden(golden, n, lkey, addr, raddr, rkey, sa, cmp):
    c = _cbuf(golden, 48)
    golden.lib.g_raddr(c, raddr, rkey)
    golden.lib.g_data(c + 16, n, lkey, addr)
    golden.lib.g_atomic(c + 32, sa, cmp)
    p = np.zeros(48, np.uint8)
    W.encode_raddr(p, 0, raddr=raddr, rkey=rkey)
    W.encode_data(p, 16, byte_count=n, lkey=lkey, addr=addr)
    W.encode_atomic(p, 32, swap_add=sa, compare=cmp)
    assert p.tobytes() == _bytes(golden, c)


@settings(max_examples=100, deadline=None)
@given(payload=st.binary(min_size=0, max_size=100))
def test_inline_golden(golden, payload):
    c = _cbuf(golden, 128)
    n = golden.lib.g_inline(c, payload, len(payload))
    p = np.zeros(128, np.uint8)
    assert W.encode_inline(p, 0, payload) == n == W.inline_seg_size(len(payload))
    assert p.tobytes() == _bytes(golden, c)


@settings(max_examples=100, deadline=None)
@given(pi=st.integers(0, 1 << 20), qpn=u24, raddr=u64, rkey=u32, laddr=u64, lkey=u32, n=st.integers(0, 1 << 30))
def test_whole_write_wqe_golden(golden, pi, qpn, raddr, rkey, laddr, lkey, n):
    """A full RDMA WRITE as a real poster composes it from the mlx5dv helpers, in a 4-WQEBB ring."""
    c = _cbuf(golden, 64)
    golden.lib.g_ctrl(c, pi & 0xFFFF, W.MLX5_OPCODE_RDMA_WRITE, 0, qpn, W.MLX5_WQE_CTRL_CQ_UPDATE, 3, 0, 0)
    golden.lib.g_raddr(c + 16, raddr, rkey)
    golden.lib.g_data(c + 32, n, lkey, laddr)
    ring = np.zeros(4 * 64, np.uint8)
    nbb = W.build_rdma_write(ring, pi, qpn=qpn, raddr=raddr, rkey=rkey, laddr=laddr, lkey=lkey, length=n, signaled=True)
    assert nbb == 1
    slot = pi & 3
    assert ring[slot * 64 : slot * 64 + 64].tobytes() == _bytes(golden, c)


@settings(max_examples=50, deadline=None)
@given(pi=u16)
def test_dbrec_golden(golden, pi):
    c = _cbuf(golden, 8)
    golden.lib.g_dbrec(c, pi)
    p = np.zeros(8, np.uint8)
    W.encode_dbrec(p, pi)
    assert p.tobytes() == _bytes(golden, c)
    assert W.decode_dbrec(p) == pi


# --- round trips (no compiler needed) ----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    pi=st.integers(0, 1 << 20),
    qpn=u24,
    raddr=u64,
    rkey=u32,
    laddr=u64,
    lkey=u32,
    n=st.integers(0, 0x7FFFFFFF),
    sig=st.booleans(),
    log_cnt=st.integers(0, 4),
)
def test_roundtrip_write(pi, qpn, raddr, rkey, laddr, lkey, n, sig, log_cnt):
    ring = np.zeros((1 << log_cnt) * 64, np.uint8)
    W.build_rdma_write(ring, pi, qpn=qpn, raddr=raddr, rkey=rkey, laddr=laddr, lkey=lkey, length=n, signaled=sig)
    w = W.decode_wqe(ring, pi)
    assert (w.opcode, w.pi16, w.qpn, w.ds, w.signaled, w.raddr, w.rkey) == (
        W.MLX5_OPCODE_RDMA_WRITE,
        pi & 0xFFFF,
        qpn,
        3,
        sig,
        raddr,
        rkey,
    )
    assert w.data == (W.DataSeg(n, lkey, laddr),) and w.inline is None and w.nbb == 1


@settings(max_examples=200, deadline=None)
@given(
    pi=u16, qpn=u24, raddr=u64, rkey=u32, v32=u32, v64=u64, payload=st.binary(max_size=200), log_cnt=st.integers(3, 5)
)
def test_roundtrip_inline(pi, qpn, raddr, rkey, v32, v64, payload, log_cnt):
    ring = np.zeros((1 << log_cnt) * 64, np.uint8)
    assert W.build_inline_write_u32(ring, pi, qpn=qpn, raddr=raddr, rkey=rkey, value=v32) == 1
    w = W.decode_wqe(ring, pi)
    assert w.ds == 3 and w.inline == struct.pack("<I", v32) and (w.raddr, w.rkey) == (raddr, rkey)
    assert W.build_inline_write_u64(ring, pi + 1, qpn=qpn, raddr=raddr, rkey=rkey, value=v64, signaled=True) == 1
    w = W.decode_wqe(ring, pi + 1)
    assert w.ds == 3 and w.inline == struct.pack("<Q", v64) and w.signaled
    # a long payload wraps past the ring end when started in the last slot
    last = (1 << log_cnt) - 1
    nbb = W.build_inline_write(ring, last, qpn=qpn, raddr=raddr, rkey=rkey, payload=payload)
    w = W.decode_wqe(ring, last)
    assert w.inline == payload and w.nbb == nbb == -(-(32 + W.inline_seg_size(len(payload))) // 64)


@settings(max_examples=200, deadline=None)
@given(pi=u16, qpn=u24, raddr=u64, rkey=u32, add=u64, laddr=u64, lkey=u32)
def test_roundtrip_fetch_add(pi, qpn, raddr, rkey, add, laddr, lkey):
    ring = np.zeros(2 * 64, np.uint8)
    W.build_fetch_add(ring, pi, qpn=qpn, raddr=raddr, rkey=rkey, add=add, laddr=laddr, lkey=lkey, signaled=True)
    w = W.decode_wqe(ring, pi)
    assert (w.opcode, w.ds, w.swap_add, w.compare, w.raddr, w.rkey) == (W.MLX5_OPCODE_ATOMIC_FA, 4, add, 0, raddr, rkey)
    assert w.data == (W.DataSeg(8, lkey, laddr),)


@settings(max_examples=100, deadline=None)
@given(pi=u16, qpn=u24)
def test_doorbell_word(pi, qpn):
    v = W.doorbell_value(pi, qpn)
    assert v == struct.pack(">II", pi << 8, qpn << 8)
    assert W.decode_doorbell(v) == (pi, qpn, 0, 0)
    assert W.doorbell_u64(pi, qpn).to_bytes(8, "little") == v
    # equals the first 8 bytes of a ctrl segment with opcode/opmod/ds 0
    c = np.zeros(16, np.uint8)
    W.encode_ctrl(c, 0, pi=pi, opcode=0, qpn=qpn, ds=0)
    assert c[:8].tobytes() == v


@settings(max_examples=100, deadline=None)
@given(ci=st.integers(0, 1 << 20), qpn=u24, n=u32, err=st.booleans(), synd=u8)
def test_cqe_roundtrip(ci, qpn, n, err, synd):
    buf = np.zeros(64, np.uint8)
    op = W.MLX5_CQE_REQ_ERR if err else W.MLX5_CQE_REQ
    W.encode_cqe(
        buf,
        0,
        opcode=op,
        owner=ci & 1,
        qpn=qpn,
        wqe_counter=ci & 0xFFFF,
        byte_cnt=n,
        syndrome=synd,
        wqe_opcode=W.MLX5_OPCODE_RDMA_WRITE,
    )
    c = W.decode_cqe(buf)
    assert (c.opcode, c.owner, c.qpn, c.wqe_counter, c.byte_cnt) == (op, ci & 1, qpn, ci & 0xFFFF, n)
    assert buf[63] == (op << 4) | (ci & 1)
    if err:
        assert c.syndrome == synd and c.wqe_opcode == W.MLX5_OPCODE_RDMA_WRITE


def _ctrl_only(opcode, ds, cnt=4):
    ring = np.zeros(cnt * 64, np.uint8)
    W.encode_ctrl(ring, 0, pi=0, opcode=opcode, qpn=1, ds=ds)
    return ring


@pytest.mark.parametrize(
    "ring, match",
    [
        (_ctrl_only(0x7F, 3), "unknown opcode"),
        (_ctrl_only(W.MLX5_OPCODE_RDMA_WRITE, 0), "ds=0"),
        (_ctrl_only(W.MLX5_OPCODE_RDMA_WRITE, 2), "ds=2"),
        (_ctrl_only(W.MLX5_OPCODE_NOP, 2), "NOP with ds=2"),
        (_ctrl_only(W.MLX5_OPCODE_ATOMIC_FA, 3), "expected 4"),
        (_ctrl_only(W.MLX5_OPCODE_RDMA_WRITE, 64, cnt=4), "more than the ring"),
    ],
)
def test_decode_rejects(ring, match):
    with pytest.raises(W.WqeFormatError, match=match):
        W.decode_wqe(ring, 0)


def test_decode_rejects_inconsistent_inline_and_segments():
    ring = np.zeros(4 * 64, np.uint8)
    W.build_inline_write_u64(ring, 0, qpn=1, raddr=0, rkey=1, value=7)
    W.encode_ctrl(ring, 0, pi=0, opcode=W.MLX5_OPCODE_RDMA_WRITE, qpn=1, ds=4)  # ds says 2 segments, inline says 1
    with pytest.raises(W.WqeFormatError, match="inline segment of 8 bytes"):
        W.decode_wqe(ring, 0)
    W.build_fetch_add(ring, 1, qpn=1, raddr=0, rkey=1, add=1, laddr=0, lkey=2)
    W.encode_inline(ring, 64 + 48, b"12345678")  # the result segment of an atomic cannot be inline
    with pytest.raises(W.WqeFormatError, match="inline segment where"):
        W.decode_wqe(ring, 1)


def test_encoder_range_checks():
    b = np.zeros(16, np.uint8)
    with pytest.raises(W.WqeFormatError, match="qpn"):
        W.encode_ctrl(b, 0, pi=0, opcode=8, qpn=1 << 24, ds=3)
    with pytest.raises(W.WqeFormatError, match="outside"):
        W.encode_raddr(b, 8, raddr=0, rkey=0)
    with pytest.raises(W.WqeFormatError, match="power-of-two"):
        W.build_nop(np.zeros(3 * 64, np.uint8), 0, qpn=1)
