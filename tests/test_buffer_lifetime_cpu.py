"""A Buffer's memory and its peers (issue #20, finding 4), without a GPU: ranks that make their Buffers with
different sizes all refuse (a smaller one would be written past); a construction that fails frees what it had
allocated; destroy() after a failed barrier leaves the memory allocated (a peer may still write it) and says so."""

from __future__ import annotations

import os

import pytest

import epkern
import fake_cupy as F
from epkern.errors import ArgumentError, GroupError
from epkern.group import run_in_process


@pytest.mark.parametrize(
    "per_rank",
    [
        dict(num_nvl_bytes=lambda r: 1 << (20 + r)),
        dict(num_rdma_bytes=lambda r: 0 if r == 0 else 1 << 20, low_latency_mode=lambda r: True),
        dict(low_latency_mode=lambda r: r == 1),
    ],
    ids=["nvl", "rdma", "ll_mode"],
)
def test_ranks_with_other_sizes_all_refuse(per_rank):
    name = next(n for n in per_rank if n != "low_latency_mode" or len(per_rank) == 1)

    def body(group):
        kwargs = {k: f(group.rank) for k, f in per_rank.items()}
        try:
            epkern.Buffer(group, backend="cpu", **kwargs).destroy()
        except ArgumentError as exc:
            return str(exc)
        return "made"

    out = run_in_process(body, 3, timeout_s=30)
    assert all(m.startswith(f"{name}: every rank of the group must pass the same value (rank 0: ") for m in out), out
    assert len(set(out)) == 1


def test_a_failed_construction_frees_its_memory(monkeypatch):
    regions = []
    with F.installed(monkeypatch):
        from epkern.gpu import backend, runtime

        real = runtime.SymmetricRegion

        def tracked(*args):
            regions.append(real(*args))
            return regions[-1]

        def broken_engine(*args, **kwargs):
            raise RuntimeError("engine failed")

        monkeypatch.setattr(runtime, "SymmetricRegion", tracked)
        monkeypatch.setattr(backend, "LLEngine", broken_engine)
        with pytest.raises(RuntimeError, match="engine failed"):
            F.fake_buffer()
    assert len(regions) == 1 and regions[0].ptr == 0


def test_destroy_after_a_failed_barrier_keeps_the_memory(monkeypatch):
    with F.installed(monkeypatch):
        buf = F.fake_buffer()
        rt = buf._backend.rt

        def barrier():
            raise GroupError("rank 1 did not reach barrier #9 within 30 s")

        monkeypatch.setattr(rt.group, "barrier", barrier)
        with pytest.raises(GroupError, match=r"rank 0: destroy: .* left allocated, since a peer"):
            buf.destroy()
        assert rt.region.ptr != 0


def test_views_kept_past_destroy_keep_the_memory(monkeypatch):
    """HT outputs and handles (heap blocks) and LL views (the zero-copy combine buffer) keep the region alive past
    destroy(); it is freed when the last of them is gone, and at once when none is alive."""
    import gc

    with F.installed(monkeypatch, emulate={"epk_ht_notify": F.emulate_ht_notify_one_rank}):
        from epkern import Buffer

        hint = Buffer.get_low_latency_rdma_size_hint(16, 1024, 1, 8)
        buf = F.fake_buffer(num_rdma_bytes=hint, low_latency_mode=True)
        region = buf._backend.rt.region
        recv_x, _, _, _, handle, _ = F.full_dispatch(buf, F.ht_inputs(64, 1024, 4, 8))
        x, idx = F.ht_inputs(64, 1024, 4, 8)[:2]
        _, _, ll_handle, _, _ = buf.low_latency_dispatch(x[:16], idx[:16], 16, 8, use_fp8=False)
        zbuf = buf.get_next_low_latency_combine_buffer(ll_handle)
        buf.destroy()
        assert region.ptr != 0  # recv_x, handle and zbuf still view it
        del recv_x, handle
        gc.collect()
        assert region.ptr != 0  # zbuf still does
        del zbuf
        gc.collect()
        assert region.ptr == 0

        buf = F.fake_buffer()
        region = buf._backend.rt.region
        buf.destroy()
        assert region.ptr == 0  # nothing viewed it: freed at destroy


@pytest.mark.parametrize("peer", ["ended", "alive", "unknown"])
def test_destroy_frees_when_the_silent_peers_have_ended(monkeypatch, peer):
    """destroy()'s barrier fails naming the silent ranks: the memory is freed only if each of them is a process of
    this host that has ended (it writes nothing any more); otherwise it stays allocated and GroupError raises."""
    import subprocess
    import sys

    with F.installed(monkeypatch):
        buf = F.fake_buffer()
        rt = buf._backend.rt
        if peer == "ended":
            child = subprocess.Popen([sys.executable, "-c", "pass"])
            child.wait()
            pid = child.pid
        else:
            pid = os.getppid() if peer == "alive" else None
        rt.peer_pids = [None, pid]

        def barrier():
            raise GroupError("rank 1 did not reach barrier #9 within 30 s", silent_ranks=[1])

        monkeypatch.setattr(rt.group, "barrier", barrier)
        if peer == "ended":
            buf.destroy()
            assert rt.region.ptr == 0
        else:
            with pytest.raises(GroupError, match="left allocated"):
                buf.destroy()
            assert rt.region.ptr != 0
