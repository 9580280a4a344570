"""The LL NIC routes over a *real* NIC's wiring (issue #17: the same Python and CUDA code drives the mlx5 backend,
only the lowest layer differs), on the CPU: ``Mlx5Nic`` over the tests' fake ``_verbs_cffi`` (tests/test_nic_mlx5.py:
emulated NICs play the hardware, executing at the responder), a GPU Buffer of in-process ranks over the fake CuPy.

What differs from the emulated wiring, and is checked here: the LL area registered as the NIC's GPU MR; one QP per
remote peer connected to that peer's QP through ``connect_mesh``; each target the peer's own LL address and rkey
(from an allgather, no wire mapping); the RDMA route's device table naming the QP's own ring, doorbell record and
doorbell register as ``map_for_gpu`` maps them. Then what the kernels post through that table (modelled by
``DevicePoster``) lands exactly in the peers' LL areas. Never run on a real NIC (docs/rdma.md)."""

from __future__ import annotations

import ctypes

import pytest

from epkern import _verbs_cffi as V
from epkern.nic import mlx5 as M
from test_ll_rdma_cpu import DevicePoster, _buffer, _nic_threads, _on_ranks, _wait, fake, post_one_call_and_check  # noqa: F401
from test_nic_mlx5 import FakeVerbs


@pytest.fixture
def real(fake, monkeypatch):  # noqa: F811 - the fake CuPy fixture, imported above
    made, verbs = real_nic_wiring(monkeypatch)
    yield made
    for emu in verbs.emus:
        emu.close()


def real_nic_wiring(monkeypatch):
    """The fake verbs layer behind Mlx5Nic; ranks say they have an mlx5 NIC; GPU MRs are host registrations (the
    fake CuPy's device memory is host memory); the page registry maps host addresses to themselves. Returns the NICs
    made (a list filled as ranks make them) and the fake verbs (close its ``emus`` after)."""
    from epkern.gpu.ll import routes as R

    verbs = FakeVerbs()
    for name in FakeVerbs.names:
        monkeypatch.setattr(V, name, getattr(verbs, name))
    monkeypatch.setattr(R, "local_nic", lambda g: R.NicInfo("mlx5", str(g.hostnames[g.rank]), gpu_rings=True))
    made = []

    def real_nic(rank, device):
        def make():
            pages = M.HostPageRegistry(lambda a, s, f: None, lambda a: None, lambda a: a)
            nic = M.Mlx5Nic(name=f"rank{rank}", page_registry=pages)
            made.append(nic)
            return nic

        return make

    monkeypatch.setattr(R, "real_nic", real_nic)
    monkeypatch.setattr(
        M.Mlx5Nic, "reg_gpu_mr", lambda self, ptr, length, access=V.MR_ACCESS: self.reg_mr(ptr, length, access)
    )
    return made, verbs


def test_rdma_route_over_a_real_nic_wiring_lands_exactly(real):
    import cupy

    def body(group):
        buf = _buffer(group)
        rdma, rt = buf._backend.nic_routes, buf._backend.rt
        link = rdma.link
        assert isinstance(link.nic, M.Mlx5Nic) and link.memory is None and link.wire is None
        mine = rt.region.ptr + rt.ll_offset
        assert (link.local_mr.addr, link.local_mr.length) == (mine, rt.ll_bytes)
        bases = group.allgather_object((mine, link.local_mr.rkey))
        table = cupy.asnumpy(rdma.table)
        for p, qp in rdma.qps.items():
            assert isinstance(qp, M.Mlx5QueuePair) and qp.state == "RTS"
            assert link.peer_targets[p] == bases[p]  # the peer's own LL address and rkey: it executes at the responder
            d, gpu = DevicePoster(table[p]), qp.map_for_gpu()
            assert (d.sq, d.dbrec, d.db, d.qpn, d.wqe_cnt) == (gpu.sq, gpu.dbrec, gpu.db_reg, qp.qpn, qp.wqe_cnt)
            assert (d.raddr, d.rkey, d.lkey) == (*bases[p], link.local_mr.lkey)
        post_one_call_and_check(group, rdma, rt, buf._backend.ll.routes)  # as the kernels post, through the table
        buf.check()
        buf.destroy()  # quiesce waits on the retired words (a real NIC's consumer index cannot be read)
        return sorted(rdma.qps)

    assert _on_ranks(body) == [[2, 3], [2, 3], [0, 1], [0, 1]]
    assert len(real) == 4 and not _nic_threads()


def test_proxy_route_over_a_real_nic_wiring_lands_exactly(real):
    """The PROXY route over the same wiring: the proxy threads post through Mlx5QueuePair's host path (WQEs in the
    QP's own ring, doorbell record, BlueFlame store) what the kernels push into the FIFOs."""
    from epkern.nic.fifo import FifoProducer

    def body(group):
        buf = _buffer(group, transport="proxy")
        proxy, rt = buf._backend.nic_routes, buf._backend.rt
        assert isinstance(proxy.link.nic, M.Mlx5Nic) and all(isinstance(q, M.Mlx5QueuePair) for q in proxy.qps.values())
        mine = rt.region.ptr + rt.ll_offset
        for p in proxy.qps:  # a WRITE of 64 bytes at this rank's 4096 (rank + 1) to the peer's 65536 + 64 rank
            src = 4096 * (group.rank + 1)
            ctypes.memmove(mine + src, bytes([group.rank + 1] * 64), 64)
            FifoProducer(proxy.fifos[proxy.fifo_of_peer(p)]).write(p, 0, src, 65536 + 64 * group.rank, 64)
        remote = [s for s in range(group.size) if s in proxy.qps]  # symmetric: they write here too
        _wait(
            lambda: all(ctypes.string_at(mine + 65536 + 64 * s, 64) == bytes([s + 1] * 64) for s in remote),
            f"rank {group.rank}: the peers' proxied WRITEs",
        )
        group.barrier()
        assert not proxy.service.errors, proxy.service.errors
        for s in range(group.size):
            if s not in remote:
                assert ctypes.string_at(mine + 65536 + 64 * s, 64) == bytes(64)
        buf.check()
        buf.destroy()
        return sorted(proxy.qps)

    assert _on_ranks(body) == [[2, 3], [2, 3], [0, 1], [0, 1]]
    assert len(real) == 4 and not _nic_threads()
