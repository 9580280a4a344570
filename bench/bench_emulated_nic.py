"""The emulated NIC's own ceiling: bytes per second and WRITEs per second it can execute (issue #17: so that NIC-route
LL numbers are not mistaken for a network's). One process, one QP in loopback, one doorbell per batch; the target
memory is GPU memory through ``DeviceMemory``, each WRITE one unsynchronised device-to-device copy (what the LL
routes' NIC does since session L; path ``host``: the older way, a device-to-host read of the source and a
host-to-device write of the payload, each synchronised), or host memory with ``--host`` (the NIC's Python alone;
runs on a CPU).

    python3 bench/bench_emulated_nic.py [--sizes 16,4112,14336,262144] [--batch 256] [--paths direct,host] [--host]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def measure(size: int, batch: int, host: bool, direct: bool = True) -> dict:
    from epkern.nic import Access, EmulatedNic
    from epkern.nic import wqe as W

    total = size * batch
    if host:
        from epkern.nic import HostMemory

        mem = HostMemory()
        src = np.random.default_rng(0).integers(0, 256, total, dtype=np.uint8)
        dst = np.zeros(total, np.uint8)
        src_addr, dst_addr = mem.add(src), mem.add(dst)
    else:
        import cupy

        from epkern.nic import DeviceMemory

        mem = DeviceMemory(cupy.cuda.Device().id, direct_copies=direct)
        src_d, dst_d = cupy.arange(total, dtype=cupy.uint8), cupy.zeros(total, cupy.uint8)
        src_addr, dst_addr = src_d.data.ptr, dst_d.data.ptr
        mem.add(src_addr, total)
        mem.add(dst_addr, total)
    nic = EmulatedNic(mem, name="ceiling")
    try:
        smr = nic.reg_mr(src_addr, total, access=Access.LOCAL_WRITE)
        dmr = nic.reg_mr(dst_addr, total, access=Access.REMOTE_WRITE)
        ring = 1 << max(4, (batch + 1).bit_length())
        qp = nic.create_qp(nic.create_cq(ring), ring)
        qp.connect(qp)
        pi = 0
        for i in range(batch):
            pi += W.build_rdma_write(
                qp.sq, pi, qpn=qp.qpn, raddr=dst_addr + i * size, rkey=dmr.rkey, laddr=src_addr + i * size,
                lkey=smr.lkey, length=size, signaled=i == batch - 1,
            )  # fmt: skip
        t0 = time.perf_counter()
        qp.ring_doorbell(pi)
        (cqe,) = qp.cq.wait(1, timeout=600)
        dt = time.perf_counter() - t0
        assert not cqe.is_error, nic.faults
        if host:
            assert np.array_equal(dst, src)
        else:
            assert bool((dst_d == src_d).all())
    finally:
        nic.close()
        if not host:
            mem.close()
    path = "direct" if direct else "via host"
    return dict(size=size, batch=batch, memory="host" if host else "gpu", path=path, s=dt, GBps=total / dt / 1e9,
                writes_per_s=batch / dt)  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="16,4112,14336,262144", help="WRITE sizes in bytes (4112: an LL message, H 2048)")
    p.add_argument("--batch", type=int, default=256, help="WRITEs per doorbell")
    p.add_argument("--host", action="store_true", help="host memory (the NIC's Python alone)")
    p.add_argument(
        "--paths", default="direct,host", help="GPU memory: 'direct' (one device copy per WRITE, the default) and/or "
        "'host' (DeviceMemory(direct_copies=False): a read to the host and a write back, each synchronised)"
    )  # fmt: skip
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    paths = [True] if a.host else [x.strip() == "direct" for x in a.paths.split(",")]
    rows = [measure(int(s), a.batch, a.host, d) for d in paths for s in a.sizes.split(",")]
    print(f"emulated NIC ceiling ({'host' if a.host else 'GPU'} memory, {a.batch} WRITEs per doorbell, one QP):")
    for r in rows:
        print(
            f"  {r['path']:>8} {r['size']:>8} B: {r['GBps']:8.3f} GB/s  {r['writes_per_s']:10.0f} WRITEs/s  "
            f"({r['s'] * 1e3:.1f} ms)"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
