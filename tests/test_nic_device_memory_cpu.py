"""DeviceMemory without a GPU: its bounds defence, argument checks, and that nothing imports CuPy early; and the
two-rank scenario of the GPU tests run on host memory (HostMemory, and DeviceMemory over a stand-in for CuPy).

Out-of-range accesses must be refused before CUDA is touched, so these run on any machine; real in-range accesses
need CUDA and are covered by tests/test_nic_device_ranks.py on a GPU."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest

from epkern.group import run_in_process
from epkern.nic import Access, DeviceMemory, EmulatedNic, HostMemory, NicError

sys.path.insert(0, str(Path(__file__).resolve().parent))

BASE = 0x7F00_0000_0000  # fake device addresses: never dereferenced here


@pytest.fixture
def mem():
    m = DeviceMemory()
    m.add(BASE, 4096)
    m.add(BASE + 8192, 64)
    return m


@pytest.mark.parametrize(
    "addr, n",
    [
        (BASE - 1, 1),  # below the first range
        (BASE - 8, 16),  # straddles its start
        (BASE + 4096 - 8, 9),  # one byte past its end
        (BASE + 4096, 1),  # the gap between the ranges
        (BASE + 4000, 8192),  # spans both ranges and the gap: not inside ONE range
        (BASE + 8192 + 60, 8),  # past the end of the second range
        (BASE + (1 << 20), 1),  # far above everything
        (0, 1),
    ],
)
def test_out_of_range_accesses_raise_without_cuda(mem, addr, n):
    with pytest.raises(NicError, match="not inside memory known to this DeviceMemory"):
        mem.read(addr, n)
    with pytest.raises(NicError, match="not inside memory known to this DeviceMemory"):
        mem.write(addr, bytes(n))


@pytest.mark.parametrize("addr", [BASE - 8, BASE + 4096, BASE + 8192 + 64, BASE + 8192 - 8, BASE + (1 << 20)])
def test_out_of_range_atomics_raise_without_cuda(mem, addr):
    with pytest.raises(NicError, match="not inside"):
        mem.atomic_fetch_add64(addr, 1)


def test_atomic_range_is_checked_as_eight_bytes(mem):
    with pytest.raises(NicError, match="not inside"):
        mem.atomic_fetch_add64(BASE + 4096 - 4, 1)  # 4 bytes inside, 4 outside (checked before alignment)


def test_misaligned_atomic_raises_before_cuda(mem):
    with pytest.raises(NicError, match="not 8-byte aligned"):
        mem.atomic_fetch_add64(BASE + 4, 1)


def test_empty_accesses_inside_a_range_need_no_cuda(mem):
    assert mem.read(BASE + 100, 0) == b""
    mem.write(BASE + 4096, b"")  # the end of a range is a valid empty range
    with pytest.raises(NicError, match="not inside"):
        mem.read(BASE + 5000, 0)  # but not in the gap


def test_negative_length_raises(mem):
    with pytest.raises(NicError, match="negative length"):
        mem.read(BASE, -1)


@pytest.mark.parametrize(
    "ptr, nbytes, match",
    [
        (0, 16, "non-null"),
        (-5, 16, "non-null"),
        (1.5, 16, "non-null"),
        (True, 16, "non-null"),
        (BASE, 0, "positive byte count"),
        (BASE, -1, "positive byte count"),
        (BASE, 2.0, "positive byte count"),
        ((1 << 64) - 8, 16, "end of the address space"),
    ],
)
def test_add_rejects_bad_ranges(ptr, nbytes, match):
    with pytest.raises(NicError, match=match):
        DeviceMemory().add(ptr, nbytes)


def test_add_returns_base_replaces_size_and_remove_forgets():
    m = DeviceMemory()
    assert m.add(BASE, 16) == BASE
    with pytest.raises(NicError):
        m.read(BASE + 16, 8)
    m.add(BASE, 32)  # same base again: the size is replaced
    assert m.read(BASE + 32, 0) == b""
    m.remove(BASE)
    with pytest.raises(NicError, match="not inside"):
        m.read(BASE, 0)
    m.remove(BASE)  # removing twice is harmless


def test_bad_device_argument():
    for bad in (-1, "0", 1.0, True):
        with pytest.raises(NicError, match="device ordinal"):
            DeviceMemory(device=bad)
    DeviceMemory(device=0)  # no CUDA call


def test_close_is_idempotent_and_refuses_later_use_without_cuda(mem):
    mem.close()
    mem.close()
    with pytest.raises(NicError, match="not inside"):  # bounds still come first
        mem.read(BASE - 1, 1)
    with pytest.raises(NicError, match="closed"):
        mem.read(BASE, 8)
    with pytest.raises(NicError, match="closed"):
        mem.write(BASE, b"x")
    with pytest.raises(NicError, match="closed"):
        mem.atomic_fetch_add64(BASE, 1)


def test_importing_epkern_nic_does_not_import_cupy():
    code = (
        "import sys\n"
        "import epkern.nic\n"
        "from epkern.nic import DeviceMemory\n"
        "m = DeviceMemory()\n"
        "m.add(1 << 40, 64)\n"
        "try:\n"
        "    m.read((1 << 40) + 60, 8)\n"
        "except epkern.nic.NicError:\n"
        "    pass\n"
        "bad = sorted(k for k in sys.modules if k == 'cupy' or k.startswith('cupy.') or k.startswith('cupy_'))\n"
        "print('CUPY', bad)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "CUPY []" in res.stdout, res.stdout


# --- the two-rank scenario on the CPU ---------------------------------------------------------------------------------
# The GPU tests' plan (tests/nic_device_scenarios.py) run here over host memory: once with HostMemory, once with
# DeviceMemory on a stand-in for CuPy whose copies are memmoves and whose "kernel" adds on the host. This checks the
# plan's expectations and DeviceMemory's Python paths (streams per thread, kind, kernel arguments), not CUDA.


class _FakeCuda:
    """Just the CuPy names DeviceMemory uses, over host memory; records what it was asked."""

    def __init__(self):
        self.copies = self.launches = 0
        self.streams: set[int] = set()
        self.keep = []
        self.current = threading.local()
        fake = self

        class Stream:
            def __init__(self, non_blocking=False):
                assert non_blocking, "DeviceMemory must use a non-blocking stream"
                self._word = ctypes.c_int64(0)
                self.ptr = ctypes.addressof(self._word)
                fake.streams.add(self.ptr)

            def synchronize(self):
                pass

            def __enter__(self):
                fake.current.stream = self

            def __exit__(self, *exc):
                fake.current.stream = None

        class Device:
            def __init__(self, device=None):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                pass

        class RawKernel:
            def __init__(self, code, name):
                assert "atomicAdd_system" in code and name in code

            def __call__(self, grid, block, args):
                assert getattr(fake.current, "stream", None) is not None, "kernel launched off the private stream"
                assert grid == (1,) and block == (1,) and all(isinstance(a, np.uint64) for a in args)
                fake.launches += 1
                target, add, old = (int(a) for a in args)
                word = ctypes.c_uint64.from_address(target)
                ctypes.c_uint64.from_address(old).value = word.value
                word.value = (word.value + add) & ((1 << 64) - 1)

        def memcpy_async(dst, src, n, kind, stream):
            assert kind == 4 and stream in fake.streams
            fake.copies += 1
            ctypes.memmove(dst, src, n)

        def malloc_async(n, stream):
            buf = (ctypes.c_uint8 * n)()
            fake.keep.append(buf)
            return ctypes.addressof(buf)

        class PointerAttributes:
            device = 0

        rt = types.SimpleNamespace(
            memcpyAsync=memcpy_async,
            mallocAsync=malloc_async,
            freeAsync=lambda ptr, stream: None,
            malloc=lambda n: malloc_async(n, 0),
            free=lambda ptr: None,
            pointerGetAttributes=lambda ptr: PointerAttributes(),
            CUDARuntimeError=RuntimeError,
        )
        self.cuda = types.SimpleNamespace(Stream=Stream, Device=Device, runtime=rt)
        self.cupy = types.SimpleNamespace(cuda=self.cuda, RawKernel=RawKernel)


@pytest.fixture
def fake_cuda(monkeypatch):
    import epkern.nic.device_memory as dm

    fake = _FakeCuda()
    monkeypatch.setitem(sys.modules, "cupy", fake.cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", fake.cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.runtime", fake.cuda.runtime)
    from epkern import kernel_loader

    # The shipped kernel's source stands behind the fake launch (checked for the system-scope add).
    code = (kernel_loader.kernel_dir() / "nic_fetch_add.cu").read_text()
    monkeypatch.setattr(dm, "_fetch_add_kernel", lambda: fake.cupy.RawKernel(code, "epk_nic_fetch_add64"))
    monkeypatch.setattr(dm, "_local", threading.local())
    return fake


def _scenario_rank(group, seed, device_memory, direct=True):
    import nic_device_scenarios as S

    rank, peer = group.rank, 1 - group.rank
    rng = np.random.default_rng([seed, rank])
    mem = DeviceMemory(direct_copies=direct) if device_memory else HostMemory()
    nic = EmulatedNic(mem, name=f"rank{rank}")
    try:
        src = rng.integers(0, 256, S.SRC_BYTES, dtype=np.uint8)
        res = S.poisoned_results().copy()
        dst = np.full(S.DST_BYTES, S.POISON, dtype=np.uint8)
        if device_memory:
            mrs = [S.register(nic, mem, a.ctypes.data, a.nbytes, acc) for a, acc in ((src, RO), (res, RO), (dst, TGT))]
        else:
            mrs = [nic.reg_mr(a, access=acc) for a, acc in ((src, RO), (res, RO), (dst, TGT))]
        src_mr, res_mr, dst_mr = mrs
        qp = nic.create_qp(nic.create_cq(16), S.RING)
        peer_qp, peer_dst = group.exchange_object((qp, dst_mr))[peer]
        qp.connect(peer_qp)
        group.barrier()
        expect_peer = S.post_to_peer(rng, qp, src.copy(), src_mr, res_mr, res.copy, peer_dst.addr, peer_dst.rkey)
        expect_mine = group.exchange_object(expect_peer)[peer]
        S.assert_exact(dst, expect_mine, f"rank {rank}")
        flipped = expect_mine.copy()
        flipped[777] ^= 1
        with pytest.raises(AssertionError, match="1 byte\\(s\\) differ, first at 777"):
            S.assert_exact(dst, flipped, "flipped")
        assert nic.counters().doorbells == 2
        nic.check()
        group.barrier()
    finally:
        nic.close()
        if device_memory:
            mem.close()
    return rank


RO = Access.LOCAL_WRITE
TGT = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_ATOMIC


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_two_rank_scenario_over_host_memory(seed):
    assert run_in_process(_scenario_rank, 2, seed, False, timeout_s=30) == [0, 1]


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("seed", [4, 5])
def test_two_rank_scenario_through_device_memory_on_a_fake_cuda(fake_cuda, seed, direct):
    assert run_in_process(_scenario_rank, 2, seed, True, direct, timeout_s=30) == [0, 1]
    # per rank, via the host: batch 1 is 5 reads + 5 writes, batch 2 is 1 + 1 + 2 (inline) + 2 x (result copy
    # back + write); with direct copies each WRITE from memory is one device-to-device copy: 5, then 1 + 2 + 2 x 2
    assert fake_cuda.copies == 2 * (12 if direct else 18) and fake_cuda.launches == 2 * 2


def test_a_given_stream_serves_every_access(fake_cuda):
    """In-process ranks give DeviceMemory their fixed "nic" stream: every copy and the fetch-add kernel go there,
    and no per-thread stream is made (each new stream takes the next hardware queue, which may hold a peer's
    spinning kernel)."""
    fixed = fake_cuda.cuda.Stream(non_blocking=True)
    seen = []
    copy = fake_cuda.cuda.runtime.memcpyAsync

    def recording(dst, src, n, kind, stream):
        seen.append(stream)
        copy(dst, src, n, kind, stream)

    fake_cuda.cuda.runtime.memcpyAsync = recording
    before = set(fake_cuda.streams)
    words = np.zeros(4, np.uint64)
    mem = DeviceMemory(0, stream=fixed)
    mem.add(words.ctypes.data, words.nbytes)
    mem.write(words.ctypes.data, np.uint64(7).tobytes())
    assert mem.read(words.ctypes.data, 8) == np.uint64(7).tobytes()
    assert mem.atomic_fetch_add64(words.ctypes.data + 8, 5) == 0 and words[1] == 5
    mem.close()
    assert seen and set(seen) == {fixed.ptr} and set(fake_cuda.streams) == before
    with pytest.raises(NicError, match="a stream needs its device"):
        DeviceMemory(stream=fixed)


def test_copy_from_is_one_unsynchronised_device_copy_and_flush_waits(fake_cuda, monkeypatch):
    """copy_from between two DeviceMemory objects of one device (the emulated NIC's WRITE since session L): one
    cudaMemcpyAsync on this thread's stream, no synchronize until flush(); both ranges checked first (NicError,
    nothing copied); refused (False, nothing copied) for another kind of source or with direct_copies=False."""
    syncs = []
    monkeypatch.setattr(fake_cuda.cuda.Stream, "synchronize", lambda self: syncs.append(self.ptr))
    src, dst = np.arange(64, dtype=np.uint8), np.zeros(64, np.uint8)
    a, b = DeviceMemory(), DeviceMemory()
    a.add(src.ctypes.data, 64)
    b.add(dst.ctypes.data, 64)
    assert b.copy_from(dst.ctypes.data + 8, a, src.ctypes.data + 16, 32)
    assert fake_cuda.copies == 1 and syncs == [] and (dst[8:40] == src[16:48]).all() and not dst[40:].any()
    b.flush()
    assert len(syncs) == 1
    b.flush()
    assert len(syncs) == 1  # nothing issued since
    with pytest.raises(NicError, match="not inside"):
        b.copy_from(dst.ctypes.data, a, src.ctypes.data + 40, 32)  # source range past its end
    with pytest.raises(NicError, match="not inside"):
        b.copy_from(dst.ctypes.data + 40, a, src.ctypes.data, 32)
    host = HostMemory()
    host.add(src)
    assert not b.copy_from(dst.ctypes.data, host, src.ctypes.data, 8)
    off = DeviceMemory(direct_copies=False)
    off.add(dst.ctypes.data, 64)
    assert not off.copy_from(dst.ctypes.data, a, src.ctypes.data, 8)
    assert fake_cuda.copies == 1
