"""The emulated NIC between two MPS processes on one GPU, over CUDA IPC memory, exactly:

    mpiexec -n 2 python -m mpi4py tests/nic_mpi_worker.py [--seed N]

MPS must run first (bash scripts/mps.sh start; export CUDA_MPS_PIPE_DIRECTORY), as for tests/ht_mpi_worker.py.

The emulated NIC executes every WQE on the *sender's* side (its thread reads the local source and writes the
target through the ``memory`` of the NIC that owns the target MR). A process cannot reach the peer process's NIC
object, so each rank here plays both ends on its own ``EmulatedNic``: the peer's destination, a ``cudaMalloc``
allocation (so the pointer is the allocation base) exported with ``cudaIpcGetMemHandle``, is opened with
``cudaIpcOpenMemHandle``, added to this rank's ``DeviceMemory`` and registered on this rank's NIC as the remote
MR, and the sending QP is connected in loopback to a second QP of the same NIC. The sender's NIC thread thus
writes (``cudaMemcpyAsync``) and fetch-adds (``atomicAdd_system``) straight into the peer's GPU memory.

Both ranks post to each other at once (tests/nic_device_scenarios.py); after a barrier each rank compares its own
destination byte for byte with what the peer expects it to hold, and prints ``OK rank R``.
"""

import secrets
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nic_device_scenarios as S  # noqa: E402
from epkern.group import as_group  # noqa: E402
from epkern.nic import Access, DeviceMemory, EmulatedNic  # noqa: E402


def main():
    import cupy
    import cupy.cuda.runtime as rt
    from mpi4py import MPI

    group = as_group(MPI.COMM_WORLD)
    assert group.size == 2, f"run with mpiexec -n 2, not {group.size}"
    rank, peer = group.rank, 1 - group.rank
    seed = int(sys.argv[sys.argv.index("--seed") + 1]) if "--seed" in sys.argv else secrets.randbits(32)
    seed = group.broadcast_object(seed, root=0)
    if rank == 0:
        print(f"seed={seed}", flush=True)
    rng = np.random.default_rng([seed, rank])
    device = group.device
    cupy.cuda.Device(device).use()

    # this rank's destination: a raw allocation (its IPC handle covers exactly it), poisoned
    dst_ptr = rt.malloc(S.DST_BYTES)
    rt.memset(dst_ptr, S.POISON, S.DST_BYTES)
    rt.deviceSynchronize()
    handles = group.allgather_object(bytes(rt.ipcGetMemHandle(dst_ptr)))
    peer_ptr = rt.ipcOpenMemHandle(handles[peer], rt.cudaIpcMemLazyEnablePeerAccess)

    mem = DeviceMemory(device=device)
    nic = EmulatedNic(mem, poll_doorbells=False, name=f"rank{rank}")
    try:
        src_host = rng.integers(0, 256, S.SRC_BYTES, dtype=np.uint8)
        src = cupy.asarray(src_host)
        res = cupy.asarray(S.poisoned_results())
        rt.deviceSynchronize()  # the NIC's own stream must see these bytes
        src_mr = S.register(nic, mem, src.data.ptr, src.nbytes, Access.LOCAL_WRITE)
        res_mr = S.register(nic, mem, res.data.ptr, res.nbytes, Access.LOCAL_WRITE)
        # the peer's memory, opened here, is a remote MR of THIS NIC (the sender's side executes the WQEs)
        remote_mr = S.register(nic, mem, peer_ptr, S.DST_BYTES, S.TARGET_ACCESS)
        qp = nic.create_qp(nic.create_cq(16), S.RING)
        qp.connect(nic.create_qp(nic.create_cq(16), S.RING))  # loopback: the target MR lives on this NIC
        group.barrier()  # both destinations poisoned before anyone posts

        expect_peer = S.post_to_peer(rng, qp, src_host, src_mr, res_mr, res.get, remote_mr.addr, remote_mr.rkey)
        assert nic.counters().doorbells == 2
        nic.check()
    finally:
        nic.close()
        mem.close()
    rt.ipcCloseMemHandle(peer_ptr)

    # the peer reaches this only after its last CQE, i.e. after its NIC wrote everything into our destination
    expect_mine = group.allgather_object(expect_peer)[peer]
    got = np.empty(S.DST_BYTES, dtype=np.uint8)
    rt.memcpy(got.ctypes.data, dst_ptr, S.DST_BYTES, 4)  # cudaMemcpyDefault
    S.assert_exact(got, expect_mine, f"rank {rank}'s destination (written by rank {peer}'s NIC)")
    group.barrier()  # the peer closed its mapping of our destination (before the allgather) - free it
    rt.free(dst_ptr)
    print(f"OK rank {rank} of {group.size} seed={seed}", flush=True)


if __name__ == "__main__":
    main()
