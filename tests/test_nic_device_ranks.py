"""The emulated NIC moving data between two ranks over GPU memory (:class:`epkern.nic.DeviceMemory`), exactly.

- in process: two ranks (threads, ``run_in_process``) on one GPU, each with its own ``EmulatedNic(DeviceMemory())``
  and CuPy source / result / destination arrays registered as MRs; the ranks' QPs are connected across the two NICs
  (the QueuePair objects exchanged with ``group.exchange_object``); both ranks post to each other at once
  (tests/nic_device_scenarios.py: writes of random sizes, one doorbell over several WQEs, 4- and 8-byte inline
  writes, fetch-adds) and each destination is then compared byte for byte with what its peer expects;
- across two MPS processes: tests/nic_mpi_worker.py under ``mpiexec -n 2`` (each rank's destination is a
  ``cudaMalloc`` allocation exported with CUDA IPC; the peer registers the opened pointer on its own NIC).

Random data from a printed seed; every destination byte starts as 0xFF.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nic_device_scenarios as S  # noqa: E402
import test_ht_mps as ht_mps  # noqa: E402  (the mps_env fixture and the mpiexec command line)
from epkern.nic import DeviceMemory, EmulatedNic  # noqa: E402

mps_env = ht_mps.mps_env
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def seed():
    s = secrets.randbits(32)
    print(f"seed={s}")
    return s


def _in_process_rank(group, seed):
    import cupy

    from epkern.nic import Access

    rank, peer = group.rank, 1 - group.rank
    rng = np.random.default_rng([seed, rank])
    mem = DeviceMemory(device=group.device)
    nic = EmulatedNic(mem, poll_doorbells=False, name=f"rank{rank}")
    try:
        src_host = rng.integers(0, 256, S.SRC_BYTES, dtype=np.uint8)
        src = cupy.asarray(src_host)
        res = cupy.asarray(S.poisoned_results())
        dst = cupy.full(S.DST_BYTES, S.POISON, dtype=cupy.uint8)
        cupy.cuda.get_current_stream().synchronize()  # the NIC's own stream must see these bytes
        src_mr = S.register(nic, mem, src.data.ptr, src.nbytes, Access.LOCAL_WRITE)
        res_mr = S.register(nic, mem, res.data.ptr, res.nbytes, Access.LOCAL_WRITE)
        dst_mr = S.register(nic, mem, dst.data.ptr, dst.nbytes, S.TARGET_ACCESS)
        qp = nic.create_qp(nic.create_cq(16), S.RING)
        shared = group.exchange_object((qp, dst_mr))  # the objects themselves: in-process ranks only
        peer_qp, peer_dst = shared[peer]
        qp.connect(peer_qp)  # writes on qp land in memory registered on the peer's NIC
        assert peer_dst.nic is peer_qp.nic is not nic
        group.barrier()  # every QP connected and every destination poisoned before anyone posts

        expect_peer = S.post_to_peer(rng, qp, src_host, src_mr, res_mr, res.get, peer_dst.addr, peer_dst.rkey)

        # the exchange happens after the peer saw its last CQE, i.e. after its NIC wrote everything here
        expect_mine = group.exchange_object(expect_peer)[peer]
        S.assert_exact(dst.get(), expect_mine, f"rank {rank}'s destination (written by rank {peer})")
        assert nic.counters().doorbells == 2  # only this rank's QP rings this NIC
        nic.check()
        group.barrier()  # the peer's NIC is done with this rank's memory before it is closed
    finally:
        nic.close()
        mem.close()
    return rank


@pytest.mark.gpu
def test_two_in_process_ranks_both_directions_exact(seed):
    from epkern.group import run_in_process

    assert run_in_process(_in_process_rank, 2, seed, devices=[0], timeout_s=60) == [0, 1]


@pytest.mark.gpu
@pytest.mark.mpi
def test_two_mps_processes_both_directions_exact(seed, mps_env):
    cmd = ht_mps._mpiexec(2) + [
        sys.executable,
        "-m",
        "mpi4py",  # an uncaught exception aborts the whole job instead of leaving the peer in a barrier
        str(ROOT / "tests" / "nic_mpi_worker.py"),
        "--seed",
        str(seed),
    ]
    res = subprocess.run(cmd, env=mps_env, capture_output=True, text=True, timeout=180)
    oks = [line for line in res.stdout.splitlines() if line.startswith("OK rank")]
    assert res.returncode == 0 and len(oks) == 2, res.stdout[-3000:] + res.stderr[-3000:]
