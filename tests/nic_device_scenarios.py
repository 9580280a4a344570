"""What one sending rank does in the two-rank DeviceMemory tests (tests/test_nic_device_ranks.py in process,
tests/nic_mpi_worker.py across MPS processes): post two batches of WQEs built by :mod:`epkern.nic.wqe` to a remote
MR, one doorbell each, and check its completions, counters and fetch-add results. The caller checks the target.

Batch 1: 5 RDMA writes of random sizes from random source offsets into regions 0..4 of the target (one doorbell, the
last WQE signaled). Batch 2: an RDMA write into region 5, a 4-byte and an 8-byte inline write into region 6 and two
fetch-adds on one word of region 7 (one doorbell; it wraps the 8-slot send ring). The target starts as 0xFF in every
byte, so a byte no WQE should touch stays 0xFF and a missed byte fails the exact comparison.
"""

from __future__ import annotations

import numpy as np

from epkern.nic import Access, DeviceMemory, EmulatedNic, MemoryRegion, QueuePair
from epkern.nic import wqe as W

SRC_BYTES = 256 << 10
DST_BYTES = 256 << 10
RING = 8  # WQEBBs: batch 2 (slots 5..9) wraps
POISON = 0xFF
TARGET_ACCESS = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_ATOMIC
MASK64 = (1 << 64) - 1


def register(nic: EmulatedNic, mem: DeviceMemory, ptr: int, nbytes: int, access: Access) -> MemoryRegion:
    """Make ``[ptr, ptr + nbytes)`` known to the memory backend and register it as an MR on ``nic``."""
    mem.add(ptr, nbytes)
    return nic.reg_mr(ptr, nbytes, access=access)


def poisoned_results() -> np.ndarray:
    """The two uint64 fetch-add result words, every byte ``POISON`` (host copy; the caller puts it on the GPU)."""
    return np.full(16, POISON, dtype=np.uint8).view(np.uint64)


def _wait_one(qp: QueuePair, pi: int, byte_cnt: int) -> None:
    (cqe,) = qp.cq.wait(1, timeout=20)
    assert not cqe.is_error, f"error CQE {cqe}; faults: {qp.nic.faults}"
    assert cqe.qpn == qp.qpn and cqe.wqe_counter == (pi - 1) & 0xFFFF and cqe.byte_cnt == byte_cnt, cqe
    assert qp.nic.wait_idle(10)  # the NIC bumps its counters just after writing the CQE


def post_to_peer(
    rng: np.random.Generator,
    qp: QueuePair,
    src_host: np.ndarray,
    src_mr: MemoryRegion,
    res_mr: MemoryRegion,
    read_results,
    dst_addr: int,
    dst_rkey: int,
) -> np.ndarray:
    """Post both batches on ``qp`` (connected, nothing posted yet) to the ``DST_BYTES`` target at ``dst_addr``
    (``dst_rkey``), which holds ``POISON`` everywhere. ``src_host`` is a host copy of the source MR's bytes;
    ``read_results()`` returns the two uint64 words of the result MR. Returns the bytes the target must hold."""
    assert qp.wqe_cnt == RING and src_host.size == src_mr.length
    expect = np.full(DST_BYTES, POISON, dtype=np.uint8)
    region = DST_BYTES // 8
    pi = 0
    nbytes = 0

    def write(k: int, signaled: bool) -> int:
        nonlocal pi
        n = int(rng.integers(1, region + 1))
        doff = k * region + int(rng.integers(0, region - n + 1))
        soff = int(rng.integers(0, src_host.size - n + 1))
        pi += W.build_rdma_write(
            qp.sq,
            pi,
            qpn=qp.qpn,
            raddr=dst_addr + doff,
            rkey=dst_rkey,
            laddr=src_mr.addr + soff,
            lkey=src_mr.lkey,
            length=n,
            signaled=signaled,
        )
        expect[doff : doff + n] = src_host[soff : soff + n]
        return n

    # batch 1: five writes, one doorbell
    sizes = [write(k, signaled=k == 4) for k in range(5)]
    qp.ring_doorbell(pi)
    _wait_one(qp, pi, sizes[-1])
    nbytes += sum(sizes)
    c = qp.counters
    assert (c.doorbells, c.wqes, c.cqes, c.errors, c.bytes) == (1, 5, 1, 0, nbytes), c

    # batch 2: a write, two inline writes, two fetch-adds on one word; one doorbell
    nbytes += write(5, signaled=False)
    off32 = 6 * region + 4 * int(rng.integers(0, region // 8))  # first half of region 6
    v32 = int(rng.integers(0, 1 << 32))
    pi += W.build_inline_write_u32(qp.sq, pi, qpn=qp.qpn, raddr=dst_addr + off32, rkey=dst_rkey, value=v32)
    expect[off32 : off32 + 4] = np.frombuffer(v32.to_bytes(4, "little"), np.uint8)
    off64 = 6 * region + region // 2 + 8 * int(rng.integers(0, region // 16))  # second half
    v64 = int(rng.integers(0, 1 << 63)) * 2 + 1
    pi += W.build_inline_write_u64(qp.sq, pi, qpn=qp.qpn, raddr=dst_addr + off64, rkey=dst_rkey, value=v64)
    expect[off64 : off64 + 8] = np.frombuffer(v64.to_bytes(8, "little"), np.uint8)
    nbytes += 12
    word = 7 * region + 8 * int(rng.integers(0, region // 8))
    adds = [int(rng.integers(1, 1 << 63)) * 2 for _ in range(2)]
    old0 = MASK64  # the poisoned word
    olds = [old0, (old0 + adds[0]) & MASK64]
    for i, add in enumerate(adds):
        pi += W.build_fetch_add(
            qp.sq,
            pi,
            qpn=qp.qpn,
            raddr=dst_addr + word,
            rkey=dst_rkey,
            add=add,
            laddr=res_mr.addr + 8 * i,
            lkey=res_mr.lkey,
            signaled=i == 1,
        )
    final = (olds[1] + adds[1]) & MASK64
    expect[word : word + 8] = np.frombuffer(final.to_bytes(8, "little"), np.uint8)
    nbytes += 16
    assert pi == 10
    qp.ring_doorbell(pi)
    _wait_one(qp, pi, 8)
    c = qp.counters
    assert (c.doorbells, c.wqes, c.cqes, c.errors, c.bytes) == (2, 10, 2, 0, nbytes), c
    got = [int(x) for x in np.asarray(read_results(), dtype=np.uint64).reshape(-1)[:2]]
    assert got == olds, f"fetch-add results {got}, expected {olds}"
    qp.nic.check()
    return expect


def assert_exact(got: np.ndarray, expect: np.ndarray, what: str) -> None:
    assert got.shape == expect.shape and got.dtype == expect.dtype
    if not np.array_equal(got, expect):
        bad = np.flatnonzero(got != expect)
        raise AssertionError(
            f"{what}: {bad.size} byte(s) differ, first at {bad[0]} (got 0x{int(got[bad[0]]):02x}, "
            f"expected 0x{int(expect[bad[0]]):02x}); last at {bad[-1]}"
        )
