"""EPKERN_REUSE_DIRECT_REGIONS: a freed in-process region is kept and handed to the next one of its size."""

from __future__ import annotations

import sys
import types

from epkern.memory import symmetric


class _Rt:
    def __init__(self):
        self.freed, self.synced = [], 0

    def free(self, ptr):
        self.freed.append(ptr)

    def deviceSynchronize(self):  # noqa: N802 - CUDA's name
        self.synced += 1


def _region(ptr, keep, device=0, size=4096):
    reg = object.__new__(symmetric.SymmetricRegion)
    reg.ptr, reg.device, reg._size, reg._keep = ptr, device, size, keep
    reg._opened, reg._maps, reg._rt, reg.peer_table = [], [], _Rt(), None
    return reg


def test_kept_regions_go_to_the_next_region_of_their_size(monkeypatch):
    fake_cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(Device=lambda d: _Null()))
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    monkeypatch.setattr(symmetric, "_kept_direct", {})
    kept = _region(0x1000, keep=True)
    kept.close()
    assert kept.ptr == 0 and kept._rt.freed == [] and kept._rt.synced == 1  # kept, after a device sync
    assert symmetric._take_kept(0, 8192) == 0  # another size: nothing
    assert symmetric._take_kept(1, 4096) == 0  # another GPU: nothing
    assert symmetric._take_kept(0, 4096) == 0x1000
    assert symmetric._take_kept(0, 4096) == 0  # handed out once
    freed = _region(0x2000, keep=False)
    freed.close()
    assert freed._rt.freed == [0x2000] and symmetric._take_kept(0, 4096) == 0


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
