"""LL routes chosen once (issue #17, step 1) and the PROXY transport's host side (step 4), on the CPU.

- The route table (epkern.gpu.ll.routes): hybrid on and off, virtual nodes, every error (rdma not built, a rank with
  no NIC, the emulated NIC across hosts, ranks that disagree, hybrid without node identity).
- GPU Buffers of in-process ranks on virtual nodes over the fake CuPy (tests/fake_cupy.py): the table in the device
  state, the PROXY build of the kernels and push modes, the FIFO table; then what a kernel would push (the Python
  producer writing the device producer's bytes) goes through the real FIFOs, ProxyService, EmulatedNic and
  DeviceMemory (the fake's copies are host memmoves) into the peers' LL areas; destroy() leaves no thread behind.
Kernels do not run here: the GPU tests (tests/test_ll_gpu.py, tests/ll_mpi_worker.py) run them (first run on the
H200, 2026-12-07).
"""

from __future__ import annotations

import ctypes
import sys
import threading

import ml_dtypes
import numpy as np
import pytest

import fake_cupy as F
from epkern.errors import ArgumentError, ConfigError
from epkern.gpu.ll import routes as R
from epkern.gpu.ll.layout import ROUTE_IPC, ROUTE_PROXY, min_num_rdma_bytes

I, P = ROUTE_IPC, ROUTE_PROXY
EMU = [R.NicInfo("emulated", "h0")] * 8


def test_hybrid_on_keeps_same_node_peers_on_ipc():
    table = R.route_table((0, 0, 1, 1), True, "auto", EMU)
    assert table == ((I, I, P, P), (I, I, P, P), (P, P, I, I), (P, P, I, I))
    assert R.route_table((0, 0, 0, 0), True, "proxy", EMU) == ((I,) * 4,) * 4
    assert not R.needs_nic(R.route_table((0, 0, 0, 0), True, "rdma", EMU))  # no NIC route: rdma is not asked


def test_hybrid_off_sends_to_every_other_rank_over_the_nic():
    table = R.route_table((0, 0, 1, 1), False, "auto", EMU)
    assert [table[r][r] for r in range(4)] == [I] * 4  # a rank reaches itself by a local copy
    assert all(table[r][p] == P for r in range(4) for p in range(4) if p != r)
    assert R.route_table((0, 0), False, "proxy", EMU)[0] == (I, P)  # one node, hybrid off: the NIC too


def test_nic_route_errors_are_clear():
    no_rings = [R.NicInfo("mlx5", "h0", False), R.NicInfo("mlx5", "h0", True)]
    with pytest.raises(ConfigError, match=r"transport='rdma'.*rank 0 \(mlx5\) has no GPU-writable send rings"):
        R.route_table((0, 1), True, "rdma", no_rings)
    rings = [R.NicInfo("emulated", "h0", True)] * 2
    assert R.route_table((0, 1), True, "rdma", rings) == ((I, R.ROUTE_RDMA), (R.ROUTE_RDMA, I))
    assert R.route_table((0, 1), True, "auto", rings) == ((I, R.ROUTE_RDMA), (R.ROUTE_RDMA, I))  # auto: rings -> RDMA
    assert R.route_table((0, 1), True, "proxy", rings) == ((I, P), (P, I))  # proxy asked: proxy
    assert R.route_table((0, 1), True, "auto", no_rings) == ((I, P), (P, I))  # ... else PROXY
    with pytest.raises(ConfigError, match=r"rank 0 -> rank 2 .* rank 2 has no NIC"):
        R.route_table((0, 0, 1, 1), True, "auto", [EMU[0], EMU[0], R.NicInfo(None, "h0"), EMU[0]])
    with pytest.raises(ConfigError, match=r"emulated NIC reaches only ranks of its own host.*'h1'"):
        R.route_table((0, 1), True, "proxy", [R.NicInfo("emulated", "h0"), R.NicInfo("emulated", "h1")])
    with pytest.raises(ConfigError, match="transport: expected"):
        R.route_table((0, 1), True, "nvlink", EMU)


def test_tables_must_be_identical_and_the_differing_ranks_are_named():
    a = R.route_table((0, 0, 1, 1), True, "auto", EMU)
    b = R.route_table((0, 0, 1, 1), False, "auto", EMU)
    R.check_identical([a, a, a])
    with pytest.raises(ConfigError, match=r"ranks \[2\] chose other routes than ranks \[0, 1, 3\].*rank 2: \[ipc"):
        R.check_identical([a, a, b, a])


class _NoNodes:
    """A group that does not say which node each rank is on."""

    rank, size = 0, 2
    hostnames = ("h0", "h0")

    def allgather_object(self, obj):
        return [obj, obj]


def test_hybrid_needs_node_identity():
    with pytest.raises(ConfigError, match="hybrid LL routes .* need node identity"):
        R.choose(_NoNodes(), True, "auto", EMU[0])
    assert R.choose(_NoNodes(), False, "auto", EMU[0]) == ((I, P), (P, I))  # every other rank is remote


def test_choose_agrees_over_the_group_or_names_the_rank_that_differs():
    from epkern.group.threads import run_in_process

    def agreed(group):
        return R.choose(group, True, "auto", R.local_nic(group))

    tables = run_in_process(agreed, 4, ranks_per_node=2, timeout_s=20)
    D = R.ROUTE_RDMA  # auto with the emulated NIC's GPU-writable rings
    assert tables[0] == tables[3] == ((I, I, D, D), (I, I, D, D), (D, D, I, I), (D, D, I, I))

    def one_differs(group):
        return R.choose(group, group.rank != 1, "auto", R.local_nic(group))

    with pytest.raises(ConfigError, match=r"ranks \[1\] chose other routes"):
        run_in_process(one_differs, 4, ranks_per_node=2, timeout_s=20)

    def one_without_nic(group):
        nic = R.local_nic(group) if group.rank != 3 else R.NicInfo(None, "h")
        return R.choose(group, True, "proxy", nic)

    with pytest.raises(ConfigError, match="rank 3 has no NIC"):
        run_in_process(one_without_nic, 4, ranks_per_node=2, timeout_s=20)


# ---- GPU Buffers over the fake CuPy ----

H, E, NUM_MAX = 128, 8, 8


@pytest.fixture
def fake(monkeypatch):
    from epkern.gpu.ll import nic_link

    with F.installed(monkeypatch) as launches:
        import cupy

        monkeypatch.setattr(nic_link, "host_mapped", F.FakeHostMapped)
        # DeviceMemory (the emulated NIC's memory) imports cupy.cuda.runtime: the fake's memmoves
        monkeypatch.setitem(sys.modules, "cupy.cuda.runtime", cupy.cuda.runtime)
        yield launches


def _on_ranks(fn, n=4, ranks_per_node=2, **kw):
    from epkern.group.threads import run_in_process

    return run_in_process(fn, n, ranks_per_node=ranks_per_node, timeout_s=30, **kw)


def _buffer(group, **kw):
    import epkern

    kw.setdefault("num_rdma_bytes", min_num_rdma_bytes(NUM_MAX, H, E))
    kw.setdefault("timeout_s", 20)
    kw.setdefault("transport", "proxy")  # this file is about PROXY (auto is RDMA with the emulated NIC)
    return epkern.Buffer(group, num_nvl_bytes=0, low_latency_mode=True, backend="gpu", **kw)


def _proxy_threads():
    return [t for t in threading.enumerate() if t.name.startswith(("epkern-rank", "epkern-emulated-rank"))]


def test_ht_across_nodes_needs_an_rdma_area_and_ll_only_buffers_refuse_ht_calls(fake):
    import epkern

    def body(group):
        with pytest.raises(ArgumentError, match="num_rdma_bytes: ranks on 2 nodes: high-throughput calls"):
            epkern.Buffer(group, num_nvl_bytes=1 << 20, low_latency_mode=True, backend="gpu")
        buf = _buffer(group)
        with pytest.raises(ArgumentError, match="dispatch: high-throughput calls across nodes need num_nvl_bytes"):
            buf.dispatch(None)
        with pytest.raises(ArgumentError, match="combine: high-throughput calls across nodes need num_nvl_bytes"):
            buf.combine(None, None)
        buf.destroy()

    _on_ranks(body, 2, 1)
    assert not _proxy_threads()


@pytest.mark.parametrize("hybrid", [True, False])
def test_proxy_buffer_state_kernels_and_teardown(fake, hybrid):
    """Routes in the device state, the PROXY kernels in push mode, the FIFO table, then a proxied write from each
    rank to each remote peer lands in that peer's LL area (through the real proxy and emulated NIC)."""
    import cupy

    from epkern.gpu.ll import layout as L
    from epkern.nic.fifo import FifoProducer

    def body(group):
        buf = _buffer(group, allow_nvlink_for_low_latency_mode=hybrid, transport="proxy")
        be = buf._backend
        eng, proxy, rt = be.ll, be.nic_routes, be.rt
        want = R.route_table(group.node_of_rank, hybrid, "proxy", EMU)[group.rank]
        state = cupy.asnumpy(eng.state)
        assert tuple(state[L.STATE_ROUTE : L.STATE_ROUTE + group.size]) == want == eng.routes
        assert eng.nic_build == ROUTE_PROXY and eng.dispatch_pull == 0 and eng.combine_pull == 0
        assert state[L.STATE_PROXY_FIFOS] == proxy.num_fifos and state[L.STATE_PROXY_CAPACITY] == proxy.capacity
        assert int(state[L.STATE_PROXY_TABLE : L.STATE_PROXY_TABLE + 2].view(np.uint64)[0]) == proxy.table_ptr
        table = cupy.asnumpy(proxy.table)
        assert [int(table[i]) for i in range(proxy.num_fifos)] == [f.address for f in proxy.fifos]
        assert sorted(proxy.qps) == [p for p, k in enumerate(want) if k == P]

        x = cupy.asarray(np.ones((4, H), ml_dtypes.bfloat16))
        idx = cupy.asarray(np.tile(np.arange(2, dtype=np.int64), (4, 1)))
        with pytest.raises(ArgumentError, match="zero_copy_recv: not with peers reached over the NIC"):
            buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, zero_copy_recv=True)
        _, _, handle, _, _ = buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False)
        w = cupy.asarray(np.ones((4, 2), np.float32))
        y = cupy.asarray(np.zeros((E // group.size, group.size * NUM_MAX, H), ml_dtypes.bfloat16))
        buf.low_latency_combine(y, idx, w, handle)
        ll = [launch for launch in fake if launch[1].startswith("epk_ll_") and launch[6] == rt.comm_stream.ptr]
        assert {launch[2]["EPK_LL_NIC"] for launch in ll} == {ROUTE_PROXY}
        assert {launch[2].get("EPK_LL_PULL", 0) for launch in ll} == {0}

        # What the kernels push: a WRITE of 64 bytes at this rank's LL offset 4096 * (rank + 1) to every remote peer
        # p, landing at the peer's offset 65536 + 64 * rank (FIFO p % num_fifos, as ll_route.cuh).
        mine = rt.region.ptr + rt.ll_offset
        for p in proxy.qps:
            src = 4096 * (group.rank + 1)
            ctypes.memmove(mine + src, bytes([group.rank + 1] * 64), 64)
            FifoProducer(proxy.fifos[proxy.fifo_of_peer(p)]).write(p, 0, src, 65536 + 64 * group.rank, 64)
        group.barrier()
        deadline = 200
        while deadline and any(qp.counters.wqes == 0 for qp in proxy.qps.values()):
            threading.Event().wait(0.01)
            deadline -= 1
        for qp in proxy.qps.values():
            assert qp.nic.wait_idle(5.0)
        group.barrier()
        counts = proxy.counters()
        assert not proxy.nic.faults and not proxy.service.errors, (proxy.nic.faults, proxy.service.errors)
        assert all(c["wqes"] == 1 and c["bytes"] == 64 and c["errors"] == 0 for c in counts.values()), counts
        for p in range(group.size):
            got = ctypes.string_at(mine + 65536 + 64 * p, 64)
            assert got == (bytes([p + 1] * 64) if want[p] == P else bytes(64)), (group.rank, p)
        buf.check()
        buf.destroy()
        assert proxy.closed and proxy.service.threads and not any(t.is_alive() for t in proxy.service.threads)

    _on_ranks(body)
    assert not _proxy_threads()


def test_a_proxy_failure_is_a_buffer_error_naming_rank_and_peer(fake):
    from epkern.errors import EpkernError
    from epkern.nic.fifo import FifoProducer

    def body(group):
        buf = _buffer(group, transport="proxy")
        proxy = buf._backend.nic_routes
        peer = next(iter(proxy.qps))
        if group.rank == 0:  # a write past the peer's LL area: the NIC refuses it, the proxy reports it
            FifoProducer(proxy.fifos[proxy.fifo_of_peer(peer)]).write(peer, 0, 0, buf._backend.rt.ll_bytes, 64)
            for _ in range(500):
                if proxy.failed:
                    break
                threading.Event().wait(0.01)
            with pytest.raises(EpkernError, match=rf"rank 0: PROXY route failed: .*peer {peer} qp 0"):
                buf.check()
            with pytest.raises(EpkernError, match="PROXY route failed"):
                buf.low_latency_dispatch(None, None, NUM_MAX, E)
        group.barrier()
        with pytest.raises(EpkernError, match="PROXY route failed") if group.rank == 0 else _nothing():
            buf.destroy()

    _on_ranks(body, 2, 1)
    assert not _proxy_threads()


class _nothing:  # noqa: N801 - a no-op context manager
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_failed_construction_closes_the_proxy(fake, monkeypatch):
    from epkern.gpu.ll import engine

    def boom(*a, **k):
        raise RuntimeError("engine failed")

    monkeypatch.setattr(engine.LLEngine, "__init__", boom)

    def body(group):
        with pytest.raises(RuntimeError, match="engine failed"):
            _buffer(group)

    _on_ranks(body, 2, 1)
    assert not _proxy_threads()


# ---- nothing queued behind a PROXY kernel (first GPU run, H100: the first dispatch with its combine queued behind it
# timed out on each of 8 MPS ranks waiting for a PROXY peer's count) ----


class _InFlightStream(F.Stream):
    """A rank's comm stream whose LL kernels stay in flight for a few ``done`` polls (cudaStreamQuery) after their
    launch: a host that returns from a PROXY call without waiting for them leaves one ``in_flight``."""

    def __init__(self, ptr, launches):
        super().__init__(ptr=ptr)
        self.launches, self.seen, self.left = launches, 0, 0

    @property
    def in_flight(self) -> bool:
        n = sum(1 for x in self.launches if x[6] == self.ptr and x[1].startswith("epk_ll_") and int(x[5][0]) == 0)
        if n > self.seen:
            self.seen, self.left = n, 3
        return self.left > 0

    @property
    def done(self) -> bool:
        if not self.in_flight:
            return True
        self.left -= 1
        return False


def _ll_arrays(group):
    import cupy

    R, e_loc = group.size, E // group.size
    rows = R * NUM_MAX
    x = cupy.asarray(np.ones((4, H), ml_dtypes.bfloat16))
    idx = cupy.asarray(np.tile(np.arange(2, dtype=np.int64), (4, 1)))
    w = cupy.asarray(np.ones((4, 2), np.float32))
    y = cupy.asarray(np.zeros((e_loc, rows, H), ml_dtypes.bfloat16))
    outs = dict(
        out_x=cupy.empty((e_loc, rows, H), ml_dtypes.bfloat16),
        out_src_info=cupy.empty((e_loc, rows), np.int32),
        out_layout_range=cupy.empty((e_loc, R), np.int64),
        out_count=cupy.empty((e_loc,), np.int32),
    )
    return x, idx, w, y, outs, cupy.empty((4, H), ml_dtypes.bfloat16)


def test_a_proxy_call_returns_only_after_its_kernels_ended(fake):
    """Every LL call over PROXY (validated, replayed from its plan, async_finish, a receive hook) returns only once its
    kernels ended, and the caller's stream is made to wait only then: nothing (the next call, the caller's work) is
    ever queued behind a PROXY kernel, which waits for the emulated NIC's CUDA copies. Before: the caller's stream
    waited on the running kernel, async_finish returned with it running, and repeats went straight onto the caller's
    stream."""
    import cupy

    def body(group):
        buf = _buffer(group, transport="proxy")
        rt, eng = buf._backend.rt, buf._backend.ll
        comm = rt.comm_stream = _InFlightStream(rt.comm_stream.ptr, fake)
        caller = cupy.cuda.get_current_stream()
        waits, wait = [], caller.wait_event
        caller.wait_event = lambda ev: (waits.append(comm.in_flight), wait(ev))[1]
        x, idx, w, y, outs, out = _ll_arrays(group)
        for async_finish in (False, True):
            for _ in range(3):  # validated, then replayed from the plan
                *_, handle, _, _ = buf.low_latency_dispatch(
                    x, idx, NUM_MAX, E, use_fp8=False, async_finish=async_finish, **outs
                )
                assert not comm.in_flight, async_finish
                buf.low_latency_combine(y, idx, w, handle, out=out, async_finish=async_finish)
                assert not comm.in_flight, async_finish
        *_, handle, _, hook = buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, return_recv_hook=True)
        assert not comm.in_flight
        hook()
        assert not comm.in_flight
        assert waits and not any(waits), waits  # the caller's stream never waited on a kernel in flight
        assert eng.replays >= 8 and eng.direct == 0, (eng.replays, eng.direct)
        buf.destroy()

    _on_ranks(body, 2, 1)
    assert not _proxy_threads()


def test_graph_capture_over_the_proxy_route_records_every_call(fake):
    """Inside a CUDA graph capture every LL call of a PROXY Buffer (validated, replayed from a plan, prepared, a
    combine, a receive hook) is recorded onto the captured streams, and the host does not wait for it (eager
    NIC-route calls do: LLEngine.end); after the capture the Buffer runs eager calls as before. (Captured pairs
    replayed exact over PROXY and RDMA on the H100, 8 MPS processes: tests/ll_mpi_worker.py --proxy=4.)"""
    import cupy

    def body(group):
        buf = _buffer(group, transport="proxy")
        rt, eng = buf._backend.rt, buf._backend.ll
        x, idx, w, y, outs, out = _ll_arrays(group)

        def dispatch(**kw):
            return buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, **kw)

        *_, handle, _, _ = dispatch(**outs)  # eager: warm, agreed, a plan
        buf.low_latency_combine(y, idx, w, handle, out=out)
        prepared = buf.prepare_low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, **outs)
        prepared()
        *_, hook = dispatch(return_recv_hook=True)
        hook()
        stream = cupy.cuda.Stream(non_blocking=True)
        comm = rt.comm_stream.ptr
        launched = sum(1 for x_ in fake if x_[6] == comm)
        sends, waits = eng.sends, []
        sync_bounded = rt.sync_bounded
        rt.sync_bounded = lambda waitable, *a, **k: (waits.append(waitable), sync_bounded(waitable, *a, **k))[1]
        with stream:
            stream.begin_capture()
            dispatch(**outs)  # replayed from its plan
            *_, handle, _, _ = dispatch()  # validated (outputs allocated)
            prepared()
            buf.low_latency_combine(y, idx, w, handle, out=out)
            *_, hook = dispatch(**outs, return_recv_hook=True)
            hook()
            graph = stream.end_capture()
        rt.sync_bounded = sync_bounded
        assert graph is not None and eng.sends == sends + 5, eng.sends - sends  # the hook's receive sends nothing
        # (replayed plans launch into the capture the comm stream joined; kernels called directly are recorded)
        captured = sum(1 for x_ in fake if x_[6] == comm) - launched + len(graph.captured)
        assert captured >= 6, captured  # the hook's call: send and receive launches
        assert rt.comm_stream not in waits, waits  # no host wait on a captured call's kernels
        dispatch(**outs)  # eager again
        buf.check()
        buf.destroy()

    _on_ranks(body, 2, 1)
    assert not _proxy_threads()


def test_a_timeout_naming_a_proxy_peer_says_what_the_host_side_did(fake):
    from epkern.errors import TimeoutError as EpkTimeout
    from epkern.gpu.ll.layout import LL_PHASES

    phase = next(p for p, what in LL_PHASES.items() if "token count" in what)

    def body(group):
        buf = _buffer(group, transport="proxy")
        peer = 1 - group.rank
        with pytest.raises(EpkTimeout, match=rf"peer {peer} did not answer.*\[PROXY route to peer {peer}: FIFO 0 "
                           r"consumed 0 triggers; QP 0 WQEs posted, 0 executed by the NIC, 0 retired; the NIC "
                           r"thread's longest pass 0\.\d\d s\]"):  # fmt: skip
            buf._backend.ll_masks.raise_recoverable(1, group.rank, phase, peer, 22, 24)
        buf.destroy()

    _on_ranks(body, 2, 1)


def test_after_a_proxy_failure_the_nic_stops_before_the_teardown_barrier():
    """quiesce() after a failed proxy stops the NIC (an emulated one drops what is still posted) before the
    teardown's barrier, after which peers free the memory its WRITEs target; a NIC that cannot be stopped in time is
    NicStillWriting, which makes destroy keep the memory. Without it the NIC executed its backlog in close(), after
    the memory was freed (on the H200: illegal address, 8 in-process ranks after a PROXY timeout)."""
    from epkern.errors import EpkernError
    from epkern.gpu.ll.nic_link import NicLink
    from epkern.gpu.ll.proxy import NicStillWriting, ProxyTransport

    calls = []

    class Service:
        def close(self):
            calls.append("service")
            raise EpkernError("peer 1 qp 0: NIC error completion")

    class Nic:
        def __init__(self, ends):
            self.ends = ends

        def abort(self, timeout_s):
            calls.append(("abort", timeout_s))
            return self.ends

    proxy = object.__new__(ProxyTransport)
    proxy.link = link = object.__new__(NicLink)
    proxy.rank, proxy.service = 0, Service()
    link.rank, link.timeout_s, link.nic = 0, 3.0, Nic(True)
    with pytest.raises(EpkernError, match="rank 0: PROXY route failed: peer 1") as err:
        proxy.quiesce()
    assert not isinstance(err.value, NicStillWriting) and calls == ["service", ("abort", 3.0)]
    calls.clear()
    link.nic = Nic(False)
    with pytest.raises(NicStillWriting, match="still executing a WRITE after 3 s"):
        proxy.quiesce()
    assert calls == ["service", ("abort", 3.0)]


def test_a_nic_still_writing_keeps_the_memory_and_skips_the_barrier(fake, monkeypatch):
    """Buffer.destroy when the PROXY NIC cannot be stopped: no barrier (the peer's barrier fails naming this rank,
    and it keeps its memory too), no release of this rank's memory, and the error names the rank."""
    from epkern.errors import GroupError
    from epkern.gpu.ll.proxy import NicStillWriting

    released, raised = {0: [], 1: []}, {}
    peer_done = threading.Event()

    def body(group):
        buf = _buffer(group, transport="proxy", timeout_s=5)
        rank = group.rank
        monkeypatch.setattr(buf._backend.rt, "release", lambda: released[rank].append(True))
        if rank == 0:

            def stuck():
                raise NicStillWriting("rank 0: PROXY route failed (x) and the NIC is still executing a WRITE")

            buf._backend.nic_routes.quiesce = stuck
        try:
            buf.destroy()
        except Exception as exc:  # noqa: BLE001 - recorded for the checks below
            raised[rank] = exc
        if rank == 0:
            peer_done.wait(30)  # stay alive: the peer's barrier must fail by its deadline, not by our exit
        else:
            peer_done.set()

    from epkern.group.threads import run_in_process

    with pytest.raises(GroupError):  # the in-process launcher re-raises the group's failure
        run_in_process(body, 2, ranks_per_node=1, timeout_s=5)
    assert isinstance(raised[0], NicStillWriting) and "rank 0" in str(raised[0])
    assert isinstance(raised[1], GroupError) and "rank 0" in str(raised[1]) and "left allocated" in str(raised[1])
    assert released == {0: [], 1: []}


def test_in_process_nic_copies_use_the_ranks_fixed_nic_stream(fake, monkeypatch):
    """In-process ranks: the emulated NIC's copies go on the rank's "nic" stream from rank_stream, made with the
    rank's other streams (consecutive hardware queues) and reused by every Buffer, not on a new stream per NIC
    thread (H200: 8 in-process ranks over PROXY stalled with the NIC's copies waiting)."""
    import cupy

    from epkern.group import threads

    made = []
    real = cupy.cuda.Stream

    def counting(*args, **kwargs):
        made.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(cupy.cuda, "Stream", counting)
    key = (0, 12345)
    first = threads.rank_stream(*key, "compute")
    assert len(made) == len(threads.RANK_STREAM_ROLES)  # all roles of a new rank at once
    assert threads.rank_stream(*key, "nic") is threads.rank_stream(*key, "nic") and len(made) == 3
    assert threads.rank_stream(*key, "compute") is first
    with pytest.raises(ValueError, match="role"):
        threads.rank_stream(*key, "other")

    def body(group):
        streams = []
        for _ in range(2):  # two Buffers: the same stream
            buf = _buffer(group, transport="proxy")
            streams.append(buf._backend.nic_routes.link.memory._stream)
            buf.destroy()
        assert streams[0] is streams[1] is group.stream("nic")
        return True

    assert _on_ranks(body, 2, 1) == [True, True]


def test_the_number_of_proxy_threads_is_a_constructor_argument(fake, monkeypatch):
    """Buffer(num_proxy_threads=N) (issue #17: set in the constructor; default EPKERN_NUM_PROXY_THREADS, 4): N threads
    and FIFOs, never more than remote peers; a bad value is an ArgumentError naming it, before anything is made."""

    before = set(_proxy_threads())  # another test may leave a daemon thread on purpose (a NIC that would not stop)

    def body(group, **kw):
        buf = _buffer(group, **kw)
        proxy = buf._backend.nic_routes
        got = (proxy.num_fifos, proxy.service.num_threads, len(proxy.remote))
        buf.destroy()
        return got

    assert _on_ranks(body, 4, 1, num_proxy_threads=2) == [(2, 2, 3)] * 4  # 3 remote peers, 2 threads
    assert _on_ranks(body, 4, 1) == [(3, 3, 3)] * 4  # the default, 4: at most one per remote peer
    monkeypatch.setenv("EPKERN_NUM_PROXY_THREADS", "1")
    assert _on_ranks(body, 4, 1) == [(1, 1, 3)] * 4

    def refused(group):
        with pytest.raises(ArgumentError, match="num_proxy_threads"):
            _buffer(group, num_proxy_threads=0)
        return True

    assert all(_on_ranks(refused, 2, 1))
    assert not set(_proxy_threads()) - before
