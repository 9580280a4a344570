"""HT across nodes (issue #18) end to end on the CPU: GPU Buffers of in-process ranks on virtual nodes over the fake
CuPy, the internode kernels replaced by their Python models (tests/ht_inter_kernel_model.py), which post real WQEs
through the device QP table into the host-mapped rings that the real emulated NIC executes. The GPU tests' own
scenarios (tests/ht_inter_scenarios.py) run unchanged: exact against the reference, and the NIC's byte counters per
peer as the design says. What this does not check is the CUDA code itself (tests/test_ht_inter_gpu.py)."""

from __future__ import annotations

import ctypes
import sys
import threading

import numpy as np
import pytest

import fake_cupy as F
import ht_inter_kernel_model as M
import ht_inter_scenarios as S
from epkern import reference
from epkern.gpu import ht_inter_layout as lay


@pytest.fixture
def model(monkeypatch):
    from epkern import dispatch_layout, kernel_loader, memory
    from epkern.gpu.ll import nic_link

    m = M.Model()
    models = {"epk_ht_inter_notify": m.notify, "epk_ht_inter_dispatch": m.dispatch, "epk_ht_inter_combine": m.combine}
    with F.installed(monkeypatch):
        import cupy

        monkeypatch.setattr(nic_link, "host_mapped", F.FakeHostMapped)
        monkeypatch.setitem(sys.modules, "cupy.cuda.runtime", cupy.cuda.runtime)
        monkeypatch.setattr(dispatch_layout, "_sm_count", lambda device: 132)
        monkeypatch.setattr(memory, "HostMapped", F.FakeHostMapped)
        monkeypatch.setattr(dispatch_layout, "_workspaces", {})
        recorded = kernel_loader.get_function

        def get_function(source, name, defines=None):
            fn = recorded(source, name, defines)
            if name == "epk_get_dispatch_layout":
                return lambda grid, block, args: _layout(fn, grid, block, args, defines)
            if name not in models:
                return fn
            spec = {s.name: s for s in __import__("epkern.gpu.kernels", fromlist=["x"]).LIBRARY_KERNELS}[name]

            def launch(grid, block, args):
                fn(grid, block, args)
                if int(args[0]) == 0:  # run now, or at each launch of the graph being captured
                    named = dict(zip([n for n, _ in spec.args], args, strict=True))
                    F.in_stream_order(cupy.cuda.get_current_stream(), lambda: models[name](named, dict(defines)))

            launch.kernel = fn.kernel
            return launch

        monkeypatch.setattr(kernel_loader, "get_function", get_function)
        yield m


def _layout(fn, grid, block, args, defines):
    """The layout kernel by the reference: counts per rank, node and expert, is_token_in_rank, no bad index."""
    fn(grid, block, args)
    idx, nodes, per_rank, per_node, per_expert, in_rank = args[0]._a, args[2], args[3], args[4], args[5], args[6]
    E, R = defines["EPK_NUM_EXPERTS"], defines["EPK_NUM_RANKS"]
    lo = reference.get_dispatch_layout(idx, E, R, rank_to_node=nodes._a if hasattr(nodes, "_a") else None)
    per_rank._a[...] = lo.num_tokens_per_rank
    per_expert._a[...] = lo.num_tokens_per_expert
    in_rank._a[...] = lo.is_token_in_rank
    if hasattr(per_node, "_a"):
        per_node._a[...] = lo.num_tokens_per_rdma_rank
    if int(args[9]):
        ctypes.c_int32.from_address(int(args[9])).value = 0


def _threads():
    return {t for t in threading.enumerate() if t.name.startswith(("epkern-rank", "epkern-emulated-rank"))}


def _on_ranks(model, body, n, rpn, hidden=256, topk=4, ring=64, timeout_s=20):
    import epkern
    from epkern.group.threads import run_in_process

    area = lay.area_bytes_hint(hidden, topk, n // rpn, ring=ring)

    def rank_main(group):
        buf = epkern.Buffer(group, num_nvl_bytes=1 << 22, num_rdma_bytes=area, backend="gpu", timeout_s=timeout_s)
        model.backends[group.rank] = buf._backend
        group.barrier()
        try:
            body(buf, group)
        finally:
            buf.destroy()

    before = _threads()
    run_in_process(rank_main, n, ranks_per_node=rpn, timeout_s=120)
    assert not _threads() - before


@pytest.mark.parametrize("n,rpn", [(4, 2), (4, 1), (2, 1)])
def test_dispatch_combine_cached_and_counting(model, n, rpn):
    _on_ranks(model, lambda b, g: S.run_inter_case(b, g, 24, 256, 8 * n, 4), n, rpn)


@pytest.mark.parametrize("n,rpn", [(16, 8), (16, 4)])
def test_more_than_eight_ranks(model, n, rpn):
    """Real clusters' shape: 2 nodes of 8 GPUs (and 4 x 4): per-destination state by local index, the node map from
    device arrays, notify entries for 16 sources."""
    _on_ranks(model, lambda b, g: S.run_inter_case(b, g, 12, 128, 2 * n, 4), n, rpn, hidden=128)


def test_sixteen_nodes_on_one_gpu_are_refused_not_deadlocked(model):
    """16 ranks sharing one (fake, 132-SM) GPU as 16 nodes would need 16 x 33 blocks resident at once: the call
    says so before launching (one rank per GPU, a real cluster's case, always fits)."""
    from epkern.errors import ArgumentError

    def body(b, g):
        with pytest.raises(ArgumentError, match=r"dispatch: 16 ranks on this GPU x 33 blocks \(16 nodes need 33\)"):
            S.run_inter_case(b, g, 4, 128, 32, 2, count=False)

    _on_ranks(model, body, 16, 1, hidden=128)


@pytest.mark.parametrize("routing", ["skewed", "empty_rank", "none"])
def test_routings(model, routing):
    _on_ranks(model, lambda b, g: S.run_inter_case(b, g, 20, 256, 16, 4, routing), 4, 2)


def test_small_rings_wrap_and_credits_flow(model):
    """3 messages per ring, 40 tokens: both streams wrap many times and wait for credit."""
    _on_ranks(model, lambda b, g: S.run_inter_case(b, g, 40, 256, 16, 4), 4, 2, ring=3)


def test_fp8_worst_tokens_tiny_and_alternating(model):
    def body(b, g):
        S.run_inter_case(b, g, 20, 256, 16, 4, fp8=True)
        S.run_inter_case(b, g, 10, 256, 16, 4, num_worst_tokens=64, count=False)
        S.run_inter_case(b, g, [0, 1, 3, 0], 256, 16, 4)
        S.run_alternating(b, g, 5, num_tokens=12, hidden=256, num_experts=16, topk=4)

    _on_ranks(model, body, 4, 2)


def test_mismatched_calls_are_refused_and_the_streams_stay_in_step(model):
    _on_ranks(model, lambda b, g: S.run_mismatched(b, g), 4, 2)


def test_an_absent_remote_rank_makes_the_others_raise_within_the_deadline(model):
    took = []

    def body(b, g):
        t = S.run_absent_peer(b, g, absent_rank=3)
        if t is not None:
            took.append(t)

    _on_ranks(model, body, 4, 2, timeout_s=2)
    assert len(took) == 3 and max(took) < 2 + 5, took


def test_the_benchmark_counts_network_bytes_against_the_minimum(model):
    """bench_ht.py --ranks-per-node: its network figures of one cached dispatch and one combine (rows once per remote
    node is the minimum; the metadata, tails, credits and notify-free cached call add a little)."""
    from pathlib import Path

    import cupy

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_ht

    def body(b, g):
        T, H, E = 32, 256, 16
        rng = np.random.default_rng(g.rank)
        idx = cupy.asarray(np.stack([rng.choice(E, 4, replace=False) for _ in range(T)]).astype(np.int64))
        per_rank, per_node, per_expert, in_rank, _ = b.get_dispatch_layout(idx, E)
        x = cupy.asarray(np.ones((T, H), M.BF16))
        recv_x, _, _, _, handle, _ = b.dispatch(
            x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=idx,
        )  # fmt: skip
        got = bench_ht._network_bytes(
            b, g, lambda: b.dispatch(x, handle=handle), lambda: b.combine(recv_x, handle), in_rank
        )
        nodes = np.asarray(g.node_of_rank)
        other = nodes != nodes[g.rank]
        assert got["net_messages"] == int(cupy.asnumpy(in_rank)[:, other].any(axis=1).sum())
        # a rank's NIC carries its own messages in dispatch but its forwarded ones' partials in combine: the group's
        # sums are what compares (as the benchmark's summary does)
        every = g.allgather_object(got)
        keys = ("net_messages", "net_dispatch_bytes", "net_combine_bytes")
        msgs, disp, comb = (sum(e[k] for e in every) for k in keys)
        per_msg_d, per_msg_c = lay.dispatch_msg_bytes(4, 0, 2 * H), lay.combine_msg_bytes(4, H)
        assert msgs * 2 * H < disp <= msgs * per_msg_d + 16 * msgs  # + a tail and a credit per chunk at most
        assert msgs * 2 * H < comb <= msgs * per_msg_c + 16 * msgs

    _on_ranks(model, body, 4, 2)


def test_over_a_real_nic_wiring(model, monkeypatch):
    """The same kernels' models over the real NIC's wiring (``Mlx5Nic`` over the tests' fake verbs layer, whose
    emulated hardware executes at the responder): the HT area registered as the NIC's GPU MR, QPs connected by
    connect_mesh, each target the peer's own HT area; exact. Never run on a real NIC."""
    from epkern.nic import mlx5
    from test_ll_real_nic_cpu import real_nic_wiring

    made, verbs = real_nic_wiring(monkeypatch)

    def body(b, g):
        link, rt = b._backend.ht_inter.transport.link, b._backend.rt
        assert isinstance(link.nic, mlx5.Mlx5Nic) and link.wire is None
        mine = rt.region.ptr + rt.ht_area_offset
        assert (link.local_mr.addr, link.local_mr.length) == (mine, rt.ht_area_bytes)
        bases = g.allgather_object((mine, link.local_mr.rkey))
        assert all(link.peer_targets[p] == bases[p] for p in link.qps)
        S.run_inter_case(b, g, 24, 256, 16, 4, count=False)  # the counting is the emulated NIC's (its counters)

    try:
        _on_ranks(model, body, 4, 2)
    finally:
        for emu in verbs.emus:
            emu.close()
    assert len(made) == 4


def test_a_buffer_with_both_ll_and_ht_across_nodes(model):
    """low_latency_mode with num_nvl_bytes too: an LL area and the HT area, an LL NIC transport and the HT one side
    by side (two NICs per rank); HT calls exact, both transports closed by destroy."""
    import epkern
    from epkern.group.threads import run_in_process

    area = lay.area_bytes_hint(256, 4, 2, ring=64)

    def rank_main(group):
        buf = epkern.Buffer(
            group, num_nvl_bytes=1 << 22, num_rdma_bytes=area, low_latency_mode=True, backend="gpu", timeout_s=20
        )
        be = buf._backend
        model.backends[group.rank] = be
        group.barrier()
        try:
            assert be.rt.ll_bytes and be.rt.ht_area_bytes == area and be.nic_routes is not None
            assert be.rt.ht_area_offset >= be.rt.ll_offset + be.rt.ll_bytes  # separate areas
            assert be.nic_routes.link.nic is not be.ht_inter.transport.link.nic
            S.run_inter_case(buf, group, 16, 256, 16, 4)
        finally:
            buf.destroy()
        return be.nic_routes.closed and be.ht_inter.transport.closed

    before = _threads()
    assert run_in_process(rank_main, 4, ranks_per_node=2, timeout_s=120) == [True] * 4
    assert not _threads() - before


@pytest.mark.parametrize("n,rpn", [(4, 2), (2, 1)])
def test_graph_capture_replays_across_nodes(model, n, rpn):
    """HT across nodes in a CUDA graph (as DeepEP allows): the GPU scenario (a dispatch with num_worst_tokens, its
    cached dispatch, an expert's copy, the combine of that fresh output) captured once and replayed on fresh inputs,
    every replay exact: the kernels' models run at each graph launch, their epochs and the streams' words counted
    in device memory, the emulated NIC carrying the rings."""
    import ht_scenarios

    _on_ranks(model, lambda b, g: ht_scenarios.run_ht_graph(b, g, replays=3, num_tokens=12, hidden=256), n, rpn)


def test_bad_inputs_across_nodes_name_the_argument_and_the_buffer_goes_on(model):
    """The intranode bad-argument scenario across nodes (plus the tokens per node: missing, dtype, shape): each an
    ArgumentError naming the argument before any launch, then an exact dispatch / combine over the same streams."""
    import ht_scenarios

    _on_ranks(model, lambda b, g: ht_scenarios.run_bad_inputs(b, g), 4, 2, hidden=2048)
