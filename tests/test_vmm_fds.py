"""epkern.memory.vmm's descriptor exchange (CPU: plain files stand in for exported GPU allocations) and its
driver binding's refusal without a GPU. The GPU mapping itself runs in bench_copy_patterns --ipc vmm and
the MPS workers (docs/performance.md)."""

from __future__ import annotations

import os
import tempfile

import pytest

from epkern.group import run_in_process
from epkern.memory import vmm


def _share(group):
    with tempfile.TemporaryFile() as f:
        f.write(f"rank {group.rank} {os.urandom(4).hex()}".encode())
        f.flush()
        f.seek(0)
        mine = f.read()
        peers = [r for r in range(group.size) if r != group.rank]
        got = vmm.share_fds(group.allgather_object, group.rank, f.fileno(), peers, timeout_s=20)
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
                vmm.share_fds(group.allgather_object, group.rank, f.fileno(), peers, timeout_s=3)
            except (OSError, Exception) as exc:  # noqa: BLE001 - whichever the failing side raises
                return type(exc).__name__
        return "ok"

    out = run_in_process(fn, 2, timeout_s=60)
    assert out[1] != "ok"


def test_mapping_choice_is_collective():
    from epkern.errors import GroupError
    from epkern.memory.symmetric import choose_mapping

    assert choose_mapping([("auto", True), ("auto", True)]) == "vmm"
    assert choose_mapping([("auto", True), ("auto", False)]) == "legacy"
    # legacy asked anywhere: that rank reports it cannot (can_vmm is False there), so every rank goes legacy
    assert choose_mapping([("legacy", False), ("auto", True)]) == "legacy"
    with pytest.raises(GroupError, match=r"ranks \[1\]"):
        choose_mapping([("vmm", True), ("auto", False)])
