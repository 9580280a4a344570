"""epkern.memory.vmm's descriptor exchange (CPU: plain files stand in for exported GPU allocations) and its
refusal without a driver. Its driver calls go through a stand-in libcuda in tests/test_vmm_layout.py; the GPU
mapping itself runs in bench_copy_patterns --ipc vmm and the MPS workers (docs/performance.md)."""

from __future__ import annotations

import os
import tempfile

import pytest

from epkern.errors import GroupError
from epkern.group import run_in_process
from epkern.memory import fd_exchange, vmm


def _share(group):
    with tempfile.TemporaryFile() as f:
        f.write(f"rank {group.rank} {os.urandom(4).hex()}".encode())
        f.flush()
        f.seek(0)
        mine = f.read()
        peers = [r for r in range(group.size) if r != group.rank]
        got = fd_exchange.share_fds(group.allgather_bytes, group.rank, f.fileno(), peers, timeout_s=20)
        assert sorted(got) == peers
        texts = {}
        for r, fd in got.items():
            assert fd != f.fileno()
            texts[r] = os.pread(fd, 64, 0)
            os.close(fd)
        return mine, texts


@pytest.mark.parametrize("ranks", [2, 4])
def test_every_rank_gets_every_peers_descriptor(ranks):
    out = run_in_process(_share, ranks, timeout_s=60)
    for r, (_, texts) in enumerate(out):
        assert set(texts) == set(range(ranks)) - {r}
        for peer, text in texts.items():
            assert text == out[peer][0], f"rank {r} read the wrong file for rank {peer}"


def test_missing_peer_raises_instead_of_hanging():
    def fn(group):
        # rank 1 names a peer (itself + 5) that never listens: connect fails, no hang
        peers = [r for r in range(group.size) if r != group.rank]
        if group.rank == 1:
            peers = peers + [group.size + 5]
        with tempfile.TemporaryFile() as f:
            try:
                fd_exchange.share_fds(group.allgather_bytes, group.rank, f.fileno(), peers, timeout_s=3)
            except GroupError as exc:
                return str(exc)
        return "ok"

    out = run_in_process(fn, 2, timeout_s=60)
    assert out[1] == "rank 1: peers [7] are not ranks of this group of 2", out
    assert out[0].startswith("rank 0: receiving the memory descriptor of rank 1 failed"), out


def test_vmm_is_unsupported_without_a_driver(monkeypatch):
    import ctypes.util

    from epkern import _cuda_driver

    if ctypes.util.find_library("cuda"):
        pytest.skip("this machine has a CUDA driver")
    monkeypatch.setattr(_cuda_driver, "_lib", None)
    assert vmm.supported(0) is False


def test_mapping_choice_is_collective():
    from epkern.errors import GroupError
    from epkern.memory.symmetric import choose_mapping

    assert choose_mapping([("auto", True), ("auto", True)]) == "vmm"
    assert choose_mapping([("auto", True), ("auto", False)]) == "legacy"
    # legacy asked anywhere: that rank reports it cannot (can_vmm is False there), so every rank goes legacy
    assert choose_mapping([("legacy", False), ("auto", True)]) == "legacy"
    with pytest.raises(GroupError, match=r"ranks \[1\]"):
        choose_mapping([("vmm", True), ("auto", False)])


class _Group:
    """Three ranks, rank 0 here; rank 2 on another node. allgather gives every rank this rank's object
    (what the others would send differs only in content, which these tests do not look at)."""

    rank, size, node, node_of_rank = 0, 3, "a", ["a", "a", "b"]

    def allgather_object(self, obj):
        return [obj] * self.size

    def allgather_bytes(self, data):
        return [data] * self.size


class _Runtime:
    cudaIpcMemLazyEnablePeerAccess = 1

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def call(*args):
            self.calls.append((name, args))
            return {"malloc": 0x1000, "ipcGetMemHandle": b"h", "ipcOpenMemHandle": 0x2000}.get(name)

        return call


@pytest.mark.parametrize("ipc", ["legacy", "vmm"])
def test_symmetric_region_maps_same_node_peers_only(monkeypatch, ipc):
    """The peer pointers: mine at my rank, a mapping for the same-node peer, 0 for the other node's rank;
    close() undoes each mapping and frees my region (with CUDA and the VMM calls stood in for)."""
    import sys

    import fake_cupy
    from epkern.memory import symmetric

    cupy, cuda = fake_cupy._module()
    rt = _Runtime()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.runtime", rt)
    monkeypatch.setattr(cuda, "runtime", rt, raising=False)
    monkeypatch.setattr(symmetric._cuda, "require_gpu", lambda what="": None)
    monkeypatch.setenv("EPKERN_IPC", ipc)
    mapped, closed = [], []

    class Mapping:
        def __init__(self, nbytes, device, fd=None):
            self.ptr = 0x3000 if fd is None else 0x4000 + fd
            mapped.append((nbytes, fd))

        def export_fd(self):
            return os.open(os.devnull, os.O_RDONLY)

        def close(self):
            closed.append(self.ptr)

    peer_fd = os.open(os.devnull, os.O_RDONLY)
    monkeypatch.setattr(vmm, "Mapping", Mapping)
    monkeypatch.setattr(vmm, "supported", lambda device=0: True)
    monkeypatch.setattr(
        fd_exchange, "share_fds", lambda gather, rank, fd, peers, timeout_s: {p: peer_fd for p in peers}
    )
    region = symmetric.SymmetricRegion(_Group(), 100, 0)
    assert region.mode == ipc
    if ipc == "vmm":
        assert region.peer_ptrs == [0x3000, 0x4000 + peer_fd, 0]
        assert mapped == [(256, None), (256, peer_fd)]
        with pytest.raises(OSError):
            os.fstat(peer_fd)  # the peer's descriptor is closed once mapped
    else:
        assert region.peer_ptrs == [0x1000, 0x2000, 0]
        assert [c[0] for c in rt.calls].count("ipcOpenMemHandle") == 1
    region.close()
    if ipc == "vmm":
        assert closed == [0x4000 + peer_fd, 0x3000]  # peers' mappings first, then mine
    else:
        names = [c[0] for c in rt.calls]
        assert names[-2:] == ["ipcCloseMemHandle", "free"] and rt.calls[-1][1] == (0x1000,)
