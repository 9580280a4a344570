"""HT across nodes (issue #18) on the CPU: the node map and the ring layout (gpu/ht_inter_layout.py, the host's side of
kernels/ht_inter.cuh), and GPU Buffers of in-process ranks on virtual nodes over the fake CuPy (tests/fake_cupy.py):
the HT RDMA area and its RDMA transport (QPs to the ranks of the other node only, their targets the peers' HT areas),
the notify and dispatch launches with their arguments, the refusals, and a destroy that leaves no thread. The kernels
do not run here (tests/test_ht_inter_gpu.py runs them)."""

from __future__ import annotations

import threading

import ml_dtypes
import numpy as np
import pytest

from epkern import reference
from epkern.errors import ArgumentError
from epkern.gpu import ht_inter_layout as lay
from test_ll_routes_cpu import fake  # noqa: F401 - the fake-CuPy fixture

H, K, E, T = 128, 2, 8, 6


def test_node_map_gives_nodes_and_same_index_peers():
    n = lay.nodes_of((0, 0, 1, 1), 1)
    assert (n.num_nodes, n.per_node, n.node, n.node_of, n.peers) == (2, 2, 0, (0, 0, 1, 1), (1, 3))
    n = lay.nodes_of(tuple(range(8)), 5)
    assert n.peers == tuple(range(8)) and n.node == 5
    n = lay.nodes_of((0, 1, 0, 1), 2)  # nodes need not be contiguous: local index = position among the node's ranks
    assert n.peers == (2, 3)
    n = lay.nodes_of(tuple(r // 8 for r in range(16)), 11)  # 2 nodes of 8: rank 11 is index 3 of node 1
    assert n.peers == (3, 11) and n.per_node == 8
    assert lay.nodes_of(tuple(range(16)), 0).num_nodes == 16
    with pytest.raises(ArgumentError, match=r"same number of ranks on every node \(node 0: ranks \[0, 1, 2\]"):
        lay.nodes_of((0, 0, 0, 1), 0)
    with pytest.raises(ArgumentError, match="up to 8 ranks per node, 16 nodes and 128 ranks; got 9 per node"):
        lay.nodes_of((0,) * 9 + (1,) * 9, 0)
    with pytest.raises(ArgumentError, match="got 1 per node on 17 nodes"):
        lay.nodes_of(tuple(range(17)), 0)


def test_message_and_ring_layout():
    assert lay.dispatch_meta_bytes(8, 0) == 16 + 32 + 64
    assert lay.dispatch_meta_bytes(8, 56) == 16 + 32 + 64 + 224
    assert lay.dispatch_meta_bytes(1, 0) == 64  # 16 + 32 + 8 rounded up to 16
    msg = lay.dispatch_msg_bytes(8, 0, 14336)
    area = lay.area_bytes_hint(7168, 8, 2, ring=64)
    d, c = lay.rings(area, 2, msg, 0, "dispatch"), lay.rings(area, 2, msg, 1, "combine")
    assert d.offset == lay.HEADER_BYTES and c.offset == d.offset + (area - lay.HEADER_BYTES) // 2 // 256 * 256
    assert d.ring == 64 and d.chunk == lay.CHUNK and d.offset + 4 * d.ring * msg <= c.offset
    assert c.offset + 4 * c.ring * msg <= area
    with pytest.raises(ArgumentError, match=r"dispatch: num_rdma_bytes=200000 holds 0 messages .* at least \d+ bytes"):
        lay.rings(200_000, 2, msg, 0, "dispatch")
    small = lay.HEADER_BYTES + 2 * -(-(4 * msg * 3) // 256) * 256  # each half: 2 nodes x 2 rings x 3 slots
    assert lay.rings(small, 2, msg, 0, "dispatch").chunk == lay.rings(small, 2, msg, 0, "dispatch").ring == 3


def _layout(rank, R, node_of):
    rng = np.random.default_rng(rank)
    idx = np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int64)
    idx[0] = -1  # a token sent nowhere
    lo = reference.get_dispatch_layout(idx, E, R, rank_to_node=np.array(node_of))
    return idx, lo


def _threads():
    return [t for t in threading.enumerate() if t.name.startswith(("epkern-rank", "epkern-emulated-rank"))]


def test_a_buffer_across_nodes_sets_up_ht_and_launches_notify_then_dispatch(fake):  # noqa: F811
    import cupy

    import epkern
    from epkern.group.threads import run_in_process

    area = lay.area_bytes_hint(H, K, 2, ring=8)
    before = set(_threads())  # another test's threads may still be winding down

    def body(group):
        R, node_of = group.size, tuple(group.node_of_rank)
        with pytest.raises(ArgumentError, match="num_rdma_bytes: ranks on 2 nodes"):
            epkern.Buffer(group, num_nvl_bytes=1 << 22, backend="gpu", timeout_s=20)
        buf = epkern.Buffer(group, num_nvl_bytes=1 << 22, num_rdma_bytes=area, backend="gpu", timeout_s=20)
        be = buf._backend
        rt, inter = be.rt, be.ht_inter
        assert rt.ll_bytes == 0 and rt.ht_area_bytes == area  # no LL area outside low_latency_mode
        remote = [p for p in range(R) if node_of[p] != node_of[group.rank]]
        assert sorted(inter.transport.qps) == remote
        table = cupy.asnumpy(inter.transport.table)
        for p in remote:  # each QP targets the peer's HT area (as the emulated NIC maps it here)
            assert int(table[p][5]) == inter.transport.link.wire.ptrs[p] + rt.ht_area_offset
        assert not table[[p for p in range(R) if p not in remote]].any()

        idx, lo = _layout(group.rank, R, node_of)
        x = cupy.asarray(np.ones((T, H), ml_dtypes.bfloat16))
        args = dict(
            topk_idx=cupy.asarray(idx),
            num_tokens_per_rank=cupy.asarray(lo.num_tokens_per_rank),
            is_token_in_rank=cupy.asarray(lo.is_token_in_rank),
            num_tokens_per_expert=cupy.asarray(lo.num_tokens_per_expert),
        )
        with pytest.raises(ArgumentError, match="num_tokens_per_rdma_rank: required across nodes"):
            buf.dispatch(x, **args, num_worst_tokens=64)
        with pytest.raises(ArgumentError, match=r"num_tokens_per_rdma_rank: expected shape \(2,\)"):
            buf.dispatch(x, **args, num_tokens_per_rdma_rank=cupy.zeros(3, np.int32), num_worst_tokens=64)
        args["num_tokens_per_rdma_rank"] = cupy.asarray(lo.num_tokens_per_rdma_rank)
        recv_x, recv_idx, _, _, handle, _ = buf.dispatch(x, **args, num_worst_tokens=64)  # no host wait
        mine = rt.comm_stream.ptr  # the launches of this rank (the list is every in-process rank's)
        launches = [launch for launch in fake if int(launch[5][0]) == 0 and launch[6] == mine]
        assert [launch[1] for launch in launches] == ["epk_ht_inter_notify", "epk_ht_inter_dispatch"]
        notify, dispatch = launches
        assert notify[2] == {"EPK_NUM_RANKS": R, "EPK_NUM_NODES": 2}
        nodes = lay.nodes_of(node_of, group.rank)
        names = [n for n, _ in epkern.gpu.kernels.HT_INTER_DISPATCH.args]
        got = dict(zip(names, dispatch[5], strict=True))
        rings = lay.rings(area, 2, lay.dispatch_msg_bytes(K, 0, 2 * H), 0, "dispatch")
        assert (int(got["ring"]), int(got["chunk"]), int(got["ring_offset"])) == (rings.ring, rings.chunk, rings.offset)
        assert [int(v) for v in got["node_of"]._a] == list(nodes.node_of)  # the node map as device arrays
        assert [int(v) for v in got["peer_of_node"]._a] == list(nodes.peers)
        assert int(got["qps"]) == inter.transport.table_ptr and int(got["area_offset"]) == rt.ht_area_offset
        assert dispatch[3][0] >= 2 * 2 + 1 and dispatch[2]["EPK_NUM_NODES"] == 2  # a sender and forwarder per node
        assert dispatch[2]["EPK_MIN_BLOCKS"] >= 2  # every rank's blocks resident at once (HtInter.blocks_per_sm)
        assert recv_x.shape == (64, H) and recv_idx.shape == (64, K)
        assert handle.node_tokens.shape == (2, T) and handle.node_slot.shape == (T, 2)
        assert handle.fwd_slots.shape == (2, 2 * 64, lay.SLOTS_PER_MSG) and handle.fwd_cap == 2 * 64
        assert int(got["fwd_cap"]) == handle.fwd_cap

        y = buf.get_combine_buffer(handle)
        assert y.shape == (64, H)
        # over the emulated NIC every call's kernels end before it returns (HtInter.complete), as the LL NIC routes
        waits, sync_bounded = [], rt.sync_bounded
        rt.sync_bounded = lambda w, phase, *a, **k: (waits.append((w, phase)), sync_bounded(w, phase, *a, **k))[1]
        nic_wait = (rt.comm_stream, "waiting for this call's kernels (NIC route)")  # not the in-process ranks' wait
        out, out_w, _ = buf.combine(y, handle)
        assert nic_wait in waits and inter.host_copies
        launch = [x for x in fake if int(x[5][0]) == 0 and x[6] == mine][-1]
        assert launch[1] == "epk_ht_inter_combine" and launch[2]["EPK_NUM_NODES"] == 2 and launch[3][0] >= 5
        names = [n for n, _ in epkern.gpu.kernels.HT_INTER_COMBINE.args]
        got = dict(zip(names, launch[5], strict=True))
        rings = lay.rings(area, 2, lay.combine_msg_bytes(K, H), 1, "combine")
        assert (int(got["ring"]), int(got["ring_offset"]), int(got["fwd_cap"])) == (rings.ring, rings.offset, 128)
        assert out.shape == (T, H) and out_w is None
        # cached dispatch: the streams replay; fwd_slots are not written again (combine keeps the first's)
        waits.clear()
        buf.dispatch(x, handle=handle)
        assert nic_wait in waits
        rt.sync_bounded = sync_bounded
        launch = [x for x in fake if int(x[5][0]) == 0 and x[6] == mine][-1]
        got = dict(zip([n for n, _ in epkern.gpu.kernels.HT_INTER_DISPATCH.args], launch[5], strict=True))
        assert launch[2]["EPK_WITH_META"] == 0 and int(got["fwd_slots"]) == 0 and int(got["fwd_cap"]) == 0
        buf.destroy()
        assert inter.transport.closed

    run_in_process(body, 4, ranks_per_node=2, timeout_s=60)
    assert not set(_threads()) - before


def test_rdma_buffer_size_hint_holds_rings_of_the_largest_messages():
    from epkern import Config

    assert Config.get_rdma_buffer_size_hint(7168 * 2, 8) == 0  # one node of 8 (DeepEP's answer)
    hint = Config.get_rdma_buffer_size_hint(7168 * 2, 8, num_nodes=2)
    for topk, scales, row in ((8, 0, 14336), (32, 56, 7168), (32, 0, 14336)):  # BF16, FP8 + scales, top-32
        assert lay.rings(hint, 2, lay.dispatch_msg_bytes(topk, scales, row), 0, "dispatch").ring >= 256
        assert lay.rings(hint, 2, lay.combine_msg_bytes(topk, row // 2), 1, "combine").ring >= 256
    assert Config.get_rdma_buffer_size_hint(7168 * 2, 16) == Config.get_rdma_buffer_size_hint(7168 * 2, 16, 2)
    with pytest.raises(ArgumentError, match="num_nodes"):
        Config.get_rdma_buffer_size_hint(7168 * 2, 4, num_nodes=5)


@pytest.mark.parametrize("ranks_per_node", [2, 1])  # intranode (one node of 2) and across nodes (2 of 1)
def test_ht_graph_capture_takes_what_deepep_allows(fake, ranks_per_node, monkeypatch):  # noqa: F811
    """Intranode and across nodes, the calls DeepEP allows in a CUDA graph are captured (their kernels count epochs
    on the device): dispatch with num_worst_tokens, cached dispatch, combine, and the memory a graph replays into is
    held for the Buffer's life; across nodes no call waits on the host for the NIC inside the capture. Refused,
    naming the call, before anything launches: a dispatch that waits on the host for its counts and a
    specialisation's first use."""
    import cupy

    import epkern
    from epkern.gpu.ll import nic_link
    from epkern.group.threads import run_in_process

    host_waits = []  # HtInter.complete's waits for the NIC: none while capturing
    real_wait = nic_link.wait_for_call
    monkeypatch.setattr(
        nic_link, "wait_for_call", lambda rt: host_waits.append(cupy.cuda.get_current_stream().is_capturing())
        or real_wait(rt)
    )  # fmt: skip

    def body(group):
        R = group.size
        buf = epkern.Buffer(
            group, num_nvl_bytes=1 << 22, num_rdma_bytes=0 if ranks_per_node == 2 else lay.area_bytes_hint(H, K, 2, 8),
            backend="gpu", timeout_s=20,
        )  # fmt: skip
        rt = buf._backend.rt
        idx, lo = _layout(group.rank, R, tuple(group.node_of_rank))
        x = cupy.asarray(np.ones((T, H), ml_dtypes.bfloat16))
        args = dict(
            topk_idx=cupy.asarray(idx), num_tokens_per_rank=cupy.asarray(lo.num_tokens_per_rank),
            num_tokens_per_rdma_rank=None if lo.num_tokens_per_rdma_rank is None else cupy.asarray(
                lo.num_tokens_per_rdma_rank),
            is_token_in_rank=cupy.asarray(lo.is_token_in_rank),
            num_tokens_per_expert=cupy.asarray(lo.num_tokens_per_expert), num_worst_tokens=64,
        )  # fmt: skip
        recv_x, _, _, _, handle, _ = buf.dispatch(x, **args)  # eager: warms every kernel used below
        buf.dispatch(x, handle=handle)
        buf.combine(recv_x, handle)
        stream = cupy.cuda.get_current_stream()
        comm = rt.comm_stream.ptr
        mine = lambda: sum(1 for launch in fake if launch[6] == comm and launch[5][0] == 0)  # noqa: E731
        no_wait = {k: v for k, v in args.items() if k != "num_worst_tokens"}
        stream.begin_capture()
        launched = mine()
        with pytest.raises(ArgumentError, match="dispatch: a dispatch without a handle waits on the host"):
            buf.dispatch(x, **no_wait)
        assert mine() == launched
        held, waits = len(rt.graph_held), len(host_waits)
        out, *_, h2, _ = buf.dispatch(x, **args)  # notify + dispatch
        buf.dispatch(x, handle=h2)
        buf.combine(out, h2)
        assert mine() == launched + 4  # no host wait, nothing refused
        # everything a replay writes, held (a CuPy-pool allocation instead would not be): intranode the handle's
        # arrays and 3 calls' outputs; across nodes also the notify's work arrays, fwd_slots, combine scratch, copied
        assert len(rt.graph_held) == held + (4 if ranks_per_node == 2 else 7), len(rt.graph_held) - held
        assert len(host_waits) == waits  # no wait for the NIC inside the capture
        held = len(rt.graph_held)
        with pytest.raises(ArgumentError, match="used for the first time inside a CUDA graph capture"):
            buf.dispatch(cupy.asarray(np.ones((T, 2 * H), ml_dtypes.bfloat16)), **args)  # a new row size
        assert len(rt.graph_held) == held  # what the refused call had taken from the heap is given back
        stream.end_capture()
        buf.combine(recv_x, handle)  # eager again
        if ranks_per_node == 1:
            assert host_waits and not any(host_waits), host_waits  # eager calls across nodes waited, outside captures
        buf.destroy()

    run_in_process(body, 2, ranks_per_node=ranks_per_node, timeout_s=60)


def test_a_captured_ht_call_needs_the_heap(fake):  # noqa: F811
    """A captured HT call takes its outputs from the Buffer's heap: with num_nvl_bytes=0 (in-process ranks need none
    eagerly) the capture is refused naming num_nvl_bytes, before anything launches; eager calls go on."""
    import cupy

    import epkern
    from epkern.group.threads import run_in_process

    def body(group):
        buf = epkern.Buffer(group, num_nvl_bytes=0, backend="gpu", timeout_s=20)
        idx, lo = _layout(group.rank, group.size, tuple(group.node_of_rank))
        x = cupy.asarray(np.ones((T, H), ml_dtypes.bfloat16))
        args = dict(
            topk_idx=cupy.asarray(idx), num_tokens_per_rank=cupy.asarray(lo.num_tokens_per_rank),
            is_token_in_rank=cupy.asarray(lo.is_token_in_rank),
            num_tokens_per_expert=cupy.asarray(lo.num_tokens_per_expert), num_worst_tokens=64,
        )  # fmt: skip
        recv_x, _, _, _, handle, _ = buf.dispatch(x, **args)
        stream = cupy.cuda.get_current_stream()
        comm = buf._backend.rt.comm_stream.ptr
        mine = lambda: sum(1 for launch in fake if launch[6] == comm)  # noqa: E731 - this rank's launches
        stream.begin_capture()
        launched = mine()
        for call in (lambda: buf.dispatch(x, **args), lambda: buf.combine(recv_x, handle)):
            with pytest.raises(ArgumentError, match="num_nvl_bytes: a captured HT"):
                call()
        assert mine() == launched
        stream.end_capture()
        buf.combine(recv_x, handle)
        buf.destroy()

    run_in_process(body, 2, ranks_per_node=2, timeout_s=60)


def test_the_ht_transport_cq_is_as_deep_as_its_send_ring(fake):  # noqa: F811
    """Every chunk's tail and every credit is a signaled WQE: the CQ must hold as many CQEs as the send ring holds
    WQEs, or a poller that falls behind lets the emulated NIC fault the QP (CQ overrun)."""
    import epkern
    from epkern.group.threads import run_in_process

    def body(group):
        buf = epkern.Buffer(group, num_nvl_bytes=1 << 22, num_rdma_bytes=lay.area_bytes_hint(H, K, 2, 8), backend="gpu")
        t = buf._backend.ht_inter.transport
        assert all(qp.cq.cqe_cnt >= qp.wqe_cnt for qp in t.qps.values()), [
            (qp.cq.cqe_cnt, qp.wqe_cnt) for qp in t.qps.values()
        ]
        buf.destroy()

    run_in_process(body, 2, ranks_per_node=1, timeout_s=60)
