"""The mlx5 send-WQE, CQE and doorbell byte formats, in one place.

Every layout here follows ``shared/reference/mlx5_wqe.md`` (rdma-core's ``infiniband/mlx5dv.h``): multi-byte
fields are big-endian, inline payloads are in memory order. Encoders write into a numpy ``uint8`` buffer at a
byte offset and return the bytes (segments) or WQEBBs (whole WQEs) they used; WQE builders take the send ring and
a producer index and wrap around the ring end like the hardware does. ``decode_wqe`` parses a WQE at a ring slot
and raises :class:`WqeFormatError` on anything malformed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from ..errors import EpkernError

# --- constants (names as in mlx5dv.h) -----------------------------------------------------------------------------

MLX5_SEND_WQE_BB = 64
MLX5_SEND_WQE_DS = 16
MLX5_INLINE_SEG = 0x80000000
MLX5_SND_DBR = 1
MLX5_RCV_DBR = 0
CQE_SIZE = 64

MLX5_OPCODE_NOP = 0x00
MLX5_OPCODE_RDMA_WRITE = 0x08
MLX5_OPCODE_RDMA_WRITE_IMM = 0x09
MLX5_OPCODE_SEND = 0x0A
MLX5_OPCODE_RDMA_READ = 0x10
MLX5_OPCODE_ATOMIC_CS = 0x11
MLX5_OPCODE_ATOMIC_FA = 0x12

OPCODE_NAMES = {
    MLX5_OPCODE_NOP: "NOP",
    MLX5_OPCODE_RDMA_WRITE: "RDMA_WRITE",
    MLX5_OPCODE_RDMA_WRITE_IMM: "RDMA_WRITE_IMM",
    MLX5_OPCODE_SEND: "SEND",
    MLX5_OPCODE_RDMA_READ: "RDMA_READ",
    MLX5_OPCODE_ATOMIC_CS: "ATOMIC_CS",
    MLX5_OPCODE_ATOMIC_FA: "ATOMIC_FA",
}

# fm_ce_se byte of the ctrl segment
MLX5_WQE_CTRL_CQ_UPDATE = 0x08  # signaled: write a CQE
MLX5_WQE_CTRL_SOLICITED = 0x02
MLX5_WQE_CTRL_FENCE = 0x80
MLX5_WQE_CTRL_INITIATOR_SMALL_FENCE = 0x20

# CQE opcodes (high nibble of op_own) and error syndromes (byte 55 of an error CQE)
MLX5_CQE_REQ = 0
MLX5_CQE_REQ_ERR = 13
MLX5_CQE_INVALID = 15
MLX5_CQE_SYNDROME_LOCAL_LENGTH_ERR = 0x01
MLX5_CQE_SYNDROME_LOCAL_QP_OP_ERR = 0x02
MLX5_CQE_SYNDROME_LOCAL_PROT_ERR = 0x04
MLX5_CQE_SYNDROME_WR_FLUSH_ERR = 0x05
MLX5_CQE_SYNDROME_LOCAL_ACCESS_ERR = 0x11
MLX5_CQE_SYNDROME_REMOTE_INVAL_REQ_ERR = 0x12
MLX5_CQE_SYNDROME_REMOTE_ACCESS_ERR = 0x13
MLX5_CQE_SYNDROME_REMOTE_OP_ERR = 0x14

CTRL_SEG_SIZE = RADDR_SEG_SIZE = DATA_SEG_SIZE = ATOMIC_SEG_SIZE = 16

_CTRL = struct.Struct(">IIBHBI")  # opmod_idx_opcode, qpn_ds, signature, dci_stream_channel_id, fm_ce_se, imm
_RADDR = struct.Struct(">QII")  # raddr, rkey, reserved
_DATA = struct.Struct(">IIQ")  # byte_count, lkey, addr
_ATOMIC = struct.Struct(">QQ")  # swap_add, compare
_U32 = struct.Struct(">I")
_DB = struct.Struct(">II")
assert _CTRL.size == _RADDR.size == _DATA.size == _ATOMIC.size == 16


class WqeFormatError(EpkernError, ValueError):
    """A WQE (or CQE / doorbell word) does not follow the mlx5 layout, or a field does not fit."""


def _check(name: str, value: int, bits: int) -> int:
    value = int(value)
    if not 0 <= value < (1 << bits):
        raise WqeFormatError(f"{name}={value} does not fit in {bits} bits")
    return value


def _put(buf: np.ndarray, offset: int, data: bytes) -> None:
    if offset < 0 or offset + len(data) > buf.shape[0]:
        raise WqeFormatError(f"segment at offset {offset} (+{len(data)} bytes) is outside a {buf.shape[0]}-byte buffer")
    buf[offset : offset + len(data)] = np.frombuffer(data, dtype=np.uint8)


# --- segment encoders ----------------------------------------------------------------------------------------------


def encode_ctrl(
    buf: np.ndarray,
    offset: int,
    *,
    pi: int,
    opcode: int,
    qpn: int,
    ds: int,
    fm_ce_se: int = 0,
    opmod: int = 0,
    signature: int = 0,
    imm: int = 0,
) -> int:
    """``struct mlx5_wqe_ctrl_seg`` (what ``mlx5dv_set_ctrl_seg`` writes, with ``imm`` stored big-endian).

    ``pi`` is the WQEBB producer index of this WQE; only its low 16 bits are stored. Returns 16."""
    word0 = (_check("opmod", opmod, 8) << 24) | ((int(pi) & 0xFFFF) << 8) | _check("opcode", opcode, 8)
    word1 = (_check("qpn", qpn, 24) << 8) | _check("ds", ds, 8)
    data = _CTRL.pack(
        word0, word1, _check("signature", signature, 8), 0, _check("fm_ce_se", fm_ce_se, 8), _check("imm", imm, 32)
    )
    _put(buf, offset, data)
    return CTRL_SEG_SIZE


def encode_raddr(buf: np.ndarray, offset: int, *, raddr: int, rkey: int) -> int:
    """``struct mlx5_wqe_raddr_seg``. Returns 16."""
    _put(buf, offset, _RADDR.pack(_check("raddr", raddr, 64), _check("rkey", rkey, 32), 0))
    return RADDR_SEG_SIZE


def encode_data(buf: np.ndarray, offset: int, *, byte_count: int, lkey: int, addr: int) -> int:
    """``struct mlx5_wqe_data_seg`` (``mlx5dv_set_data_seg``). Returns 16."""
    byte_count = _check("byte_count", byte_count, 31)  # bit 31 would read back as an inline header
    _put(buf, offset, _DATA.pack(byte_count, _check("lkey", lkey, 32), _check("addr", addr, 64)))
    return DATA_SEG_SIZE


def inline_seg_size(nbytes: int) -> int:
    """Bytes an inline segment of ``nbytes`` payload occupies (header + payload, padded to 16)."""
    return (4 + int(nbytes) + 15) & ~15


def encode_inline(buf: np.ndarray, offset: int, payload: bytes | np.ndarray) -> int:
    """Inline data segment: BE32 ``len | MLX5_INLINE_SEG`` then the payload as-is, zero-padded to 16 bytes.

    Returns the padded segment size."""
    payload = bytes(np.asarray(payload, dtype=np.uint8).tobytes() if isinstance(payload, np.ndarray) else payload)
    n = _check("inline byte_count", len(payload), 31)
    size = inline_seg_size(n)
    _put(buf, offset, _U32.pack(n | MLX5_INLINE_SEG) + payload + bytes(size - 4 - n))
    return size


def encode_atomic(buf: np.ndarray, offset: int, *, swap_add: int, compare: int = 0) -> int:
    """``struct mlx5_wqe_atomic_seg``. Returns 16."""
    _put(buf, offset, _ATOMIC.pack(_check("swap_add", swap_add, 64), _check("compare", compare, 64)))
    return ATOMIC_SEG_SIZE


# --- whole WQEs in a send ring ---------------------------------------------------------------------------------------


def _ring_wqe_cnt(ring: np.ndarray) -> int:
    if ring.dtype != np.uint8 or ring.ndim != 1:
        raise WqeFormatError(f"send ring must be a 1-D uint8 array, got {ring.dtype} with shape {ring.shape}")
    n = ring.shape[0] // MLX5_SEND_WQE_BB
    if n == 0 or n & (n - 1) or ring.shape[0] != n * MLX5_SEND_WQE_BB:
        raise WqeFormatError(f"send ring of {ring.shape[0]} bytes is not a power-of-two count of 64-byte WQEBBs")
    return n


def _store_wqe(ring: np.ndarray, pi: int, wqe: np.ndarray) -> int:
    """Copy a WQE (a multiple of 64 bytes) into ``ring`` at producer index ``pi``, wrapping. Returns WQEBBs."""
    cnt = _ring_wqe_cnt(ring)
    nbb = wqe.shape[0] // MLX5_SEND_WQE_BB
    if nbb > cnt:
        raise WqeFormatError(f"a {nbb}-WQEBB WQE does not fit in a ring of {cnt}")
    for i in range(nbb):
        slot = (pi + i) & (cnt - 1)
        ring[slot * 64 : slot * 64 + 64] = wqe[i * 64 : i * 64 + 64]
    return nbb


def _scratch(nbytes: int) -> np.ndarray:
    return np.zeros((nbytes + MLX5_SEND_WQE_BB - 1) // MLX5_SEND_WQE_BB * MLX5_SEND_WQE_BB, dtype=np.uint8)


def build_rdma_write(
    ring: np.ndarray,
    pi: int,
    *,
    qpn: int,
    raddr: int,
    rkey: int,
    laddr: int,
    lkey: int,
    length: int,
    signaled: bool = False,
    fm_ce_se: int = 0,
) -> int:
    """RDMA WRITE of ``length`` bytes from ``laddr`` (lkey) to ``raddr`` (rkey): ctrl + raddr + data, ds=3.

    Returns the WQEBBs used (1); the next WQE goes at ``pi + 1``."""
    w = _scratch(48)
    flags = fm_ce_se | (MLX5_WQE_CTRL_CQ_UPDATE if signaled else 0)
    encode_ctrl(w, 0, pi=pi, opcode=MLX5_OPCODE_RDMA_WRITE, qpn=qpn, ds=3, fm_ce_se=flags)
    encode_raddr(w, 16, raddr=raddr, rkey=rkey)
    encode_data(w, 32, byte_count=length, lkey=lkey, addr=laddr)
    return _store_wqe(ring, pi, w)


def build_inline_write(
    ring: np.ndarray,
    pi: int,
    *,
    qpn: int,
    raddr: int,
    rkey: int,
    payload: bytes | np.ndarray,
    signaled: bool = False,
    fm_ce_se: int = 0,
) -> int:
    """RDMA WRITE with the payload inline: ctrl + raddr + inline (4- and 8-byte payloads give ds=3, one WQEBB).

    Returns the WQEBBs used."""
    payload = bytes(np.asarray(payload, dtype=np.uint8).tobytes() if isinstance(payload, np.ndarray) else payload)
    seg = inline_seg_size(len(payload))
    ds = (32 + seg) // MLX5_SEND_WQE_DS
    w = _scratch(32 + seg)
    flags = fm_ce_se | (MLX5_WQE_CTRL_CQ_UPDATE if signaled else 0)
    encode_ctrl(w, 0, pi=pi, opcode=MLX5_OPCODE_RDMA_WRITE, qpn=qpn, ds=ds, fm_ce_se=flags)
    encode_raddr(w, 16, raddr=raddr, rkey=rkey)
    encode_inline(w, 32, payload)
    return _store_wqe(ring, pi, w)


def build_inline_write_u32(ring: np.ndarray, pi: int, *, value: int, **kw) -> int:
    """4-byte inline RDMA WRITE of ``value`` (stored little-endian, i.e. as a host/GPU ``uint32``)."""
    return build_inline_write(ring, pi, payload=struct.pack("<I", _check("value", value, 32)), **kw)


def build_inline_write_u64(ring: np.ndarray, pi: int, *, value: int, **kw) -> int:
    """8-byte inline RDMA WRITE of ``value`` (stored little-endian, i.e. as a host/GPU ``uint64``)."""
    return build_inline_write(ring, pi, payload=struct.pack("<Q", _check("value", value, 64)), **kw)


def build_fetch_add(
    ring: np.ndarray,
    pi: int,
    *,
    qpn: int,
    raddr: int,
    rkey: int,
    add: int,
    laddr: int,
    lkey: int,
    signaled: bool = False,
    fm_ce_se: int = 0,
) -> int:
    """64-bit fetch-and-add of ``add`` at ``raddr``; the old value lands at ``laddr`` (8 bytes, lkey).

    ctrl + raddr + atomic + data, ds=4, one WQEBB. Returns 1."""
    w = _scratch(64)
    flags = fm_ce_se | (MLX5_WQE_CTRL_CQ_UPDATE if signaled else 0)
    encode_ctrl(w, 0, pi=pi, opcode=MLX5_OPCODE_ATOMIC_FA, qpn=qpn, ds=4, fm_ce_se=flags)
    encode_raddr(w, 16, raddr=raddr, rkey=rkey)
    encode_atomic(w, 32, swap_add=add & 0xFFFFFFFFFFFFFFFF, compare=0)
    encode_data(w, 48, byte_count=8, lkey=lkey, addr=laddr)
    return _store_wqe(ring, pi, w)


def build_nop(ring: np.ndarray, pi: int, *, qpn: int, signaled: bool = False) -> int:
    """A NOP (ctrl only, ds=1). Returns 1."""
    w = _scratch(16)
    flags = MLX5_WQE_CTRL_CQ_UPDATE if signaled else 0
    encode_ctrl(w, 0, pi=pi, opcode=MLX5_OPCODE_NOP, qpn=qpn, ds=1, fm_ce_se=flags)
    return _store_wqe(ring, pi, w)


# --- decoder -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSeg:
    byte_count: int
    lkey: int
    addr: int


@dataclass(frozen=True)
class Wqe:
    """One decoded send WQE. ``nbb`` is the number of WQEBBs it spans (ceil(ds * 16 / 64))."""

    opcode: int
    opmod: int
    pi16: int
    qpn: int
    ds: int
    fm_ce_se: int
    signature: int
    imm: int
    raddr: int | None = None
    rkey: int | None = None
    data: tuple[DataSeg, ...] = ()
    inline: bytes | None = None
    swap_add: int | None = None
    compare: int | None = None
    nbb: int = field(default=1)

    @property
    def signaled(self) -> bool:
        return bool(self.fm_ce_se & MLX5_WQE_CTRL_CQ_UPDATE)

    @property
    def opcode_name(self) -> str:
        return OPCODE_NAMES.get(self.opcode, f"0x{self.opcode:02x}")


def _gather(ring: np.ndarray, pi: int, nbb: int) -> bytes:
    cnt = _ring_wqe_cnt(ring)
    slot = pi & (cnt - 1)
    if slot + nbb <= cnt:
        return ring[slot * 64 : (slot + nbb) * 64].tobytes()
    head = ring[slot * 64 :].tobytes()
    return head + ring[: (slot + nbb - cnt) * 64].tobytes()


def _decode_payload_segs(
    b: bytes, off: int, end: int, *, allow_inline: bool
) -> tuple[tuple[DataSeg, ...], bytes | None]:
    """Data segments (or one inline segment) filling ``b[off:end]`` exactly."""
    if off >= end:
        raise WqeFormatError("WQE has no data or inline segment (ds too small)")
    (hdr,) = _U32.unpack_from(b, off)
    if hdr & MLX5_INLINE_SEG:
        if not allow_inline:
            raise WqeFormatError("inline segment where only data segments are allowed")
        n = hdr & ~MLX5_INLINE_SEG
        if off + inline_seg_size(n) != end:
            raise WqeFormatError(f"inline segment of {n} bytes does not match ds ({end - off} bytes of segment space)")
        return (), b[off + 4 : off + 4 + n]
    segs = []
    while off < end:
        bc, lkey, addr = _DATA.unpack_from(b, off)
        if bc & MLX5_INLINE_SEG:
            raise WqeFormatError("inline segment after a data segment")
        segs.append(DataSeg(bc, lkey, addr))
        off += DATA_SEG_SIZE
    return tuple(segs), None


def decode_wqe(ring: np.ndarray, pi: int) -> Wqe:
    """Parse the WQE at producer index ``pi`` of ``ring`` (wrapping past the ring end).

    Raises :class:`WqeFormatError` for ds 0 or larger than the ring, an unknown opcode, or segments that do not
    match the opcode's layout and the ds count."""
    cnt = _ring_wqe_cnt(ring)
    first = _gather(ring, pi, 1)
    word0, word1, signature, _dci, fm_ce_se, imm = _CTRL.unpack_from(first, 0)
    opcode, pi16, opmod = word0 & 0xFF, (word0 >> 8) & 0xFFFF, word0 >> 24
    ds, qpn = word1 & 0xFF, word1 >> 8
    if opcode not in OPCODE_NAMES:
        raise WqeFormatError(f"unknown opcode 0x{opcode:02x} at pi {pi}")
    if ds == 0:
        raise WqeFormatError(f"ds=0 at pi {pi}")
    nbb = (ds * MLX5_SEND_WQE_DS + MLX5_SEND_WQE_BB - 1) // MLX5_SEND_WQE_BB
    if nbb > cnt:
        raise WqeFormatError(f"ds={ds} spans {nbb} WQEBBs, more than the ring's {cnt}")
    b = _gather(ring, pi, nbb)
    end = ds * MLX5_SEND_WQE_DS
    common = dict(
        opcode=opcode, opmod=opmod, pi16=pi16, qpn=qpn, ds=ds, fm_ce_se=fm_ce_se, signature=signature, imm=imm, nbb=nbb
    )
    if opcode == MLX5_OPCODE_NOP:
        if ds != 1:
            raise WqeFormatError(f"NOP with ds={ds} (expected 1)")
        return Wqe(**common)
    if opcode == MLX5_OPCODE_SEND:
        data, inline = _decode_payload_segs(b, 16, end, allow_inline=True)
        return Wqe(**common, data=data, inline=inline)
    if ds < 3:
        raise WqeFormatError(f"{OPCODE_NAMES[opcode]} with ds={ds} (needs ctrl + raddr + at least one segment)")
    raddr, rkey, _ = _RADDR.unpack_from(b, 16)
    if opcode in (MLX5_OPCODE_RDMA_WRITE, MLX5_OPCODE_RDMA_WRITE_IMM, MLX5_OPCODE_RDMA_READ):
        allow_inline = opcode != MLX5_OPCODE_RDMA_READ
        data, inline = _decode_payload_segs(b, 32, end, allow_inline=allow_inline)
        return Wqe(**common, raddr=raddr, rkey=rkey, data=data, inline=inline)
    # atomics: ctrl + raddr + atomic + one data segment
    if ds != 4:
        raise WqeFormatError(f"{OPCODE_NAMES[opcode]} with ds={ds} (expected 4: ctrl + raddr + atomic + data)")
    swap_add, compare = _ATOMIC.unpack_from(b, 32)
    data, inline = _decode_payload_segs(b, 48, end, allow_inline=False)
    return Wqe(**common, raddr=raddr, rkey=rkey, data=data, swap_add=swap_add, compare=compare)


# --- doorbells -----------------------------------------------------------------------------------------------------


def encode_dbrec(dbrec: np.ndarray, pi: int) -> None:
    """Store the send producer index (low 16 bits, BE32) into ``dbrec[MLX5_SND_DBR]`` (``dbrec``: 8+ bytes)."""
    off = 4 * MLX5_SND_DBR
    dbrec[off : off + 4] = np.frombuffer(_U32.pack(int(pi) & 0xFFFF), dtype=np.uint8)


def decode_dbrec(dbrec: np.ndarray) -> int:
    """The 16-bit send producer index in a doorbell record."""
    off = 4 * MLX5_SND_DBR
    return _U32.unpack(dbrec[off : off + 4].tobytes())[0] & 0xFFFF


def doorbell_value(pi: int, qpn: int) -> bytes:
    """The 8 bytes written to the doorbell (BlueFlame) register: ``{BE32(pi << 8), BE32(qpn << 8)}``.

    (Equal to the first 8 bytes of a ctrl segment with opcode 0, opmod 0, ds 0.)"""
    return _DB.pack((int(pi) & 0xFFFF) << 8, _check("qpn", qpn, 24) << 8)


def doorbell_u64(pi: int, qpn: int) -> int:
    """``doorbell_value`` as the little-endian u64 a single 8-byte store writes."""
    return int.from_bytes(doorbell_value(pi, qpn), "little")


def decode_doorbell(value: bytes | np.ndarray) -> tuple[int, int, int, int]:
    """Parse a doorbell register word: ``(pi16, qpn, opcode, ds)`` (opcode/ds are 0 in the short convention)."""
    raw = value.tobytes() if isinstance(value, np.ndarray) else bytes(value)
    if len(raw) != 8:
        raise WqeFormatError(f"doorbell word must be 8 bytes, got {len(raw)}")
    w0, w1 = _DB.unpack(raw)
    return (w0 >> 8) & 0xFFFF, w1 >> 8, w0 & 0xFF, w1 & 0xFF


# --- CQEs ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cqe:
    opcode: int  # MLX5_CQE_REQ or MLX5_CQE_REQ_ERR
    owner: int
    qpn: int
    wqe_counter: int
    byte_cnt: int
    syndrome: int = 0
    vendor_syndrome: int = 0
    wqe_opcode: int = 0  # error CQEs: the failed WQE's opcode

    @property
    def is_error(self) -> bool:
        return self.opcode == MLX5_CQE_REQ_ERR


def encode_cqe(
    buf: np.ndarray,
    offset: int,
    *,
    opcode: int,
    owner: int,
    qpn: int,
    wqe_counter: int,
    byte_cnt: int = 0,
    syndrome: int = 0,
    vendor_syndrome: int = 0,
    wqe_opcode: int = 0,
) -> None:
    """A 64-byte ``mlx5_cqe64`` (requester) or ``mlx5_err_cqe``. ``op_own`` (byte 63) is written last."""
    b = bytearray(CQE_SIZE)
    if opcode == MLX5_CQE_REQ_ERR:
        b[54] = _check("vendor_syndrome", vendor_syndrome, 8)
        b[55] = _check("syndrome", syndrome, 8)
        b[56:60] = _U32.pack((_check("wqe_opcode", wqe_opcode, 8) << 24) | _check("qpn", qpn, 24))
    else:
        b[56:60] = _U32.pack(_check("qpn", qpn, 24))
    b[44:48] = _U32.pack(_check("byte_cnt", byte_cnt, 32))
    b[60:62] = struct.pack(">H", _check("wqe_counter", wqe_counter, 16))
    view = np.frombuffer(bytes(b), dtype=np.uint8)
    buf[offset : offset + 63] = view[:63]
    buf[offset + 63] = (_check("cqe opcode", opcode, 4) << 4) | (owner & 1)


def decode_cqe(buf: np.ndarray, offset: int = 0) -> Cqe:
    b = buf[offset : offset + CQE_SIZE].tobytes()
    if len(b) != CQE_SIZE:
        raise WqeFormatError("CQE must be 64 bytes")
    op_own = b[63]
    opcode = op_own >> 4
    (w56,) = _U32.unpack_from(b, 56)
    (byte_cnt,) = _U32.unpack_from(b, 44)
    (wqe_counter,) = struct.unpack_from(">H", b, 60)
    if opcode == MLX5_CQE_REQ_ERR:
        return Cqe(opcode, op_own & 1, w56 & 0xFFFFFF, wqe_counter, byte_cnt, b[55], b[54], w56 >> 24)
    return Cqe(opcode, op_own & 1, w56 & 0xFFFFFF, wqe_counter, byte_cnt)
