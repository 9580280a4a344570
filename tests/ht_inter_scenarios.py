"""HT across nodes (issue #18) scenarios checked exactly against the reference, run by every rank of a group on
virtual nodes: tests/test_ht_inter_gpu.py (in-process ranks) and tests/ht_inter_mpi_worker.py (MPS processes).

Every rank draws every rank's inputs from one shared seed (ht_scenarios.make_inputs) and evaluates the reference for
the whole group. Dispatch is the reference's (source rank, then token) order whatever the nodes; combine is
reference.ht_combine with ``rank_to_node`` (per node a BF16 partial, nodes ascending), bit for bit on any data.

Counting: the NIC counters of this rank's HT transport around one dispatch and one combine must show exactly the
messages the design sends: per other node n, one dispatch message per token of this rank with a destination there
(plus the tail WRITEs per chunk and the credits this rank returns as a forwarder), one notify entry + flag to every
rank of another node, and nothing at all between ranks of one node (they have no QP).
"""

from __future__ import annotations

import re

import numpy as np

import ht_scenarios as S
from epkern import kernel_constants as K
from epkern import reference


def rank_to_node(group):
    return np.array(group.node_of_rank)


def _counts(buf):
    """The HT transport's NIC counters per peer once the NIC has executed what the ended kernels posted (the last
    credit of a call may still be queued when its kernel ends)."""
    return buf._backend.ht_inter.transport.drained_counters()


def expected_bytes(group, idxs, E, msg_dispatch, msg_combine, chunk):
    """(dispatch bytes, combine bytes) this rank's NIC writes to each peer of another node in one call pair."""
    from epkern.gpu import ht_inter_layout as lay

    R, r = group.size, group.rank
    nodes = rank_to_node(group)
    n_of = lay.nodes_of(tuple(int(n) for n in nodes), r)
    body = K.get("EPK_HT_INTER_ENTRY_BYTES") - 64 + 4  # the notify entry after its flag, then the flag (inline u32)

    def to_node(src, n):  # messages of rank src to node n: its tokens with a destination there
        lo = reference.get_dispatch_layout(idxs[src], E, R)
        return int(lo.is_token_in_rank[:, nodes == n].any(axis=1).sum())

    chunks = lambda m: -(-m // chunk)  # noqa: E731
    disp, comb = {}, {}
    for p in range(R):
        if nodes[p] == nodes[r]:
            continue
        disp[p] = comb[p] = 0
        disp[p] += body
        if n_of.peers[nodes[p]] == p:  # the forwarder of node nodes[p] for this rank, and this rank's source there
            sent, fwd = to_node(r, nodes[p]), to_node(p, nodes[r])
            disp[p] += sent * msg_dispatch + 8 * chunks(sent) + 8 * chunks(fwd)
            comb[p] += fwd * msg_combine + 8 * chunks(fwd) + 8 * chunks(sent)
    return disp, comb


def run_inter_case(
    buf, group, num_tokens, hidden, num_experts, topk, routing="random", fp8=False, num_worst_tokens=0, count=True
):
    """Layout, dispatch (non-cached or worst-tokens), combine, cached dispatch of fresh data, combine of a fresh
    expert output; all exact; the NIC counters as the design says (``count``)."""
    import cupy

    from epkern.gpu import ht_inter_layout as lay

    r, R = group.rank, group.size
    nodes = rank_to_node(group)
    seed = S.shared_seed(group)
    xs, idxs, ws = S.make_inputs(seed, R, num_tokens, hidden, num_experts, topk, routing)
    inputs = [reference.per_token_cast_to_fp8(x) for x in xs] if fp8 else xs
    ref = reference.ht_dispatch(inputs, idxs, num_experts, topk_weights=ws, num_worst_tokens=num_worst_tokens)
    mine = ref[r]
    n = len(mine.handle.src_idx) if not num_worst_tokens else int((mine.handle.src_idx >= 0).sum())

    def dev(a):
        if isinstance(a, tuple):
            return tuple(dev(v) for v in a)
        return cupy.asarray(a.view(np.uint8) if a.dtype == np.dtype(S.FP8) else a)

    idx_dev, w_dev = cupy.asarray(idxs[r]), cupy.asarray(ws[r])
    per_rank, per_node, per_expert, in_rank, _ = buf.get_dispatch_layout(idx_dev, num_experts)
    want = reference.get_dispatch_layout(idxs[r], num_experts, R, rank_to_node=nodes)
    S.assert_same(cupy.asnumpy(per_node), want.num_tokens_per_rdma_rank, f"rank {r} num_tokens_per_rdma_rank")
    before = _counts(buf)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        dev(inputs[r]),
        num_tokens_per_rank=per_rank,
        num_tokens_per_rdma_rank=per_node,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=idx_dev,
        topk_weights=w_dev,
        num_worst_tokens=num_worst_tokens,
    )
    S.settle(buf)
    after_dispatch = _counts(buf)
    S.assert_same(cupy.asnumpy(handle.rank_prefix_matrix), mine.handle.rank_prefix_matrix, f"rank {r} prefix")
    S.assert_same(cupy.asnumpy(handle.recv_src_idx), mine.handle.src_idx, f"rank {r} src_idx")
    if fp8:
        S.assert_same(cupy.asnumpy(recv_x[0])[:n], mine.recv_x[0][:n], f"rank {r} recv_x fp8")
        S.assert_same(cupy.asnumpy(recv_x[1])[:n], mine.recv_x[1][:n], f"rank {r} recv scales")
    else:
        S.assert_same(cupy.asnumpy(recv_x)[:n], mine.recv_x[:n], f"rank {r} recv_x")
    S.assert_same(cupy.asnumpy(recv_idx), mine.recv_topk_idx, f"rank {r} recv_topk_idx")
    S.assert_same(cupy.asnumpy(recv_w), mine.recv_topk_weights, f"rank {r} recv_topk_weights")
    if not num_worst_tokens:
        assert list(counts) == list(mine.num_recv_tokens_per_expert_list), f"rank {r} per-expert counts"
    if fp8:
        return
    # combine of the dispatch output, then of fresh expert outputs (integer multiples: exact in BF16)
    handles = [res.handle for res in ref]
    ys = [res.recv_x for res in ref]
    rng = np.random.default_rng(seed + 7)  # biases of every rank (k = 3): small integers, exact in BF16
    b0 = [rng.integers(-8, 9, (x.shape[0], hidden)).astype(S.BF16) for x in xs]
    b1 = [rng.integers(-8, 9, (x.shape[0], hidden)).astype(S.BF16) for x in xs]
    for k in (1, 3):
        ys_k = [(y.astype(np.float32) * k).astype(y.dtype) for y in ys]
        bias = dict(bias_0=b0, bias_1=b1) if k == 3 else {}
        want_k = reference.ht_combine(
            ys_k, handles, topk_weights=[res.recv_topk_weights for res in ref], rank_to_node=nodes, **bias
        )[r]
        y_dev = recv_x if k == 1 else cupy.asarray(ys_k[r])
        dev_bias = (cupy.asarray(b0[r]), cupy.asarray(b1[r])) if k == 3 else None
        out, out_w, _ = buf.combine(y_dev, handle, topk_weights=recv_w, bias=dev_bias)
        S.settle(buf)
        S.assert_same(cupy.asnumpy(out), want_k[0], f"rank {r} combined_x (x{k}{', biases' if k == 3 else ''})")
        S.assert_same(cupy.asnumpy(out_w), want_k[1], f"rank {r} combined_topk_weights (x{k})")
        if k == 1:
            after_combine = _counts(buf)
    # cached dispatch of fresh data over the same streams
    xs2, _, _ = S.make_inputs(seed + 1, R, num_tokens, hidden, num_experts, topk, routing)
    want2 = reference.ht_cached_dispatch(xs2, handles)[r]
    got2 = buf.dispatch(cupy.asarray(xs2[r]), handle=handle)[0]
    S.settle(buf)
    S.assert_same(cupy.asnumpy(got2)[:n], want2[:n], f"rank {r} cached recv_x")
    if count:
        msg_d = lay.dispatch_msg_bytes(topk, 0, 2 * hidden)
        msg_c = lay.combine_msg_bytes(topk, hidden)
        chunk = lay.rings(buf._backend.rt.ht_area_bytes, int(nodes.max()) + 1, msg_d, 0, "dispatch").chunk
        chunk_c = lay.rings(buf._backend.rt.ht_area_bytes, int(nodes.max()) + 1, msg_c, 1, "combine").chunk
        disp, _ = expected_bytes(group, idxs, num_experts, msg_d, msg_c, chunk)
        _, comb = expected_bytes(group, idxs, num_experts, msg_d, msg_c, chunk_c)
        got_d = {p: after_dispatch[p]["bytes"] - before[p]["bytes"] for p in disp}
        got_c = {p: after_combine[p]["bytes"] - after_dispatch[p]["bytes"] for p in comb}
        assert got_d == disp, f"rank {r}: dispatch bytes per peer {got_d}, the design sends {disp}"
        assert got_c == comb, f"rank {r}: combine bytes per peer {got_c}, the design sends {comb}"
        assert set(after_dispatch) == {p for p in range(R) if nodes[p] != nodes[r]}, "a QP to a rank of this node"


def run_alternating(buf, group, iterations, num_tokens=64, hidden=1024, num_experts=32, topk=4, drain=False):
    """``iterations`` dispatch/combine pairs of fresh inputs, each exact (the streams' counters carry across).
    ``drain``: the host waits for the dispatch and the NIC between the two (no NIC work overlaps the next kernel)."""
    import cupy

    r, R = group.rank, group.size
    nodes = rank_to_node(group)
    seed = S.shared_seed(group)
    for it in range(iterations):
        xs, idxs, ws = S.make_inputs(seed + it, R, num_tokens, hidden, num_experts, topk)
        ref = reference.ht_dispatch(xs, idxs, num_experts, topk_weights=ws)
        idx_dev = cupy.asarray(idxs[r])
        per_rank, per_node, per_expert, in_rank, _ = buf.get_dispatch_layout(idx_dev, num_experts)
        recv_x, _, recv_w, _, handle, _ = buf.dispatch(
            cupy.asarray(xs[r]), num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node,
            is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=idx_dev,
            topk_weights=cupy.asarray(ws[r]),
        )  # fmt: skip
        want = reference.ht_combine(
            [res.recv_x for res in ref], [res.handle for res in ref],
            topk_weights=[res.recv_topk_weights for res in ref], rank_to_node=nodes,
        )[r]  # fmt: skip
        if drain:
            S.settle(buf)
            _counts(buf)
        out, _, _ = buf.combine(recv_x, handle, topk_weights=recv_w)
        S.settle(buf)
        S.assert_same(cupy.asnumpy(recv_x), ref[r].recv_x, f"rank {r} iteration {it} recv_x")
        S.assert_same(cupy.asnumpy(out), want[0], f"rank {r} iteration {it} combined_x")
        if r == 0 and (it + 1) % 10 == 0:
            print(f"alternating: {it + 1} pairs exact", flush=True)


def run_mismatched(buf, group):
    """Calls that differ between ranks: every rank refuses them before anything moves (ArgumentError naming the
    argument), the streams stay in step (a matching call afterwards is exact, its NIC bytes as designed); then with
    num_worst_tokens (no host wait) the dispatch kernel itself refuses, sends nothing, and the failure raises at the
    next synchronisation."""
    import cupy

    from epkern.errors import ArgumentError, EpkernError

    r, R = group.rank, group.size
    T, H, E, topk = 16, 256, 4 * R, 2
    idx_np = np.stack([np.random.default_rng(r * 100 + t).choice(E, topk, replace=False) for t in range(T)])
    idx = cupy.asarray(idx_np.astype(np.int64))
    per_rank, per_node, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    args = dict(num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node, is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert, topk_idx=idx)  # fmt: skip
    x = cupy.asarray(np.ones((T, H * (1 + (r == 1))), S.BF16))
    try:
        buf.dispatch(x, **args)
        raise AssertionError(f"rank {r}: a dispatch with another hidden size on rank 1 was accepted")
    except ArgumentError as exc:
        assert str(exc).startswith("x: ") and "row bytes" in str(exc), exc
    wrong = cupy.asarray(np.asarray(cupy.asnumpy(per_node)) + (1 if r == 0 else 0))
    try:
        buf.dispatch(cupy.asarray(np.ones((T, H), S.BF16)), **{**args, "num_tokens_per_rdma_rank": wrong})
        raise AssertionError(f"rank {r}: a wrong num_tokens_per_rdma_rank on rank 0 was accepted")
    except ArgumentError as exc:
        assert "num_tokens_per_rdma_rank" in str(exc), exc
    run_inter_case(buf, group, 24, H, E, topk)  # the streams are still in step
    for hidden in (H, 2 * H):  # a kernel's first use is collective: every rank uses both specialisations first
        buf.dispatch(cupy.asarray(np.ones((T, hidden), S.BF16)), **args, num_worst_tokens=T * R)
        S.settle(buf)
    x = cupy.asarray(np.ones((T, H * (1 + (r == 1))), S.BF16))
    try:
        buf.dispatch(x, **args, num_worst_tokens=T * R)
        S.settle(buf)
    except EpkernError as exc:  # at the call or at the synchronisation, as the device's record is seen
        assert "another row size" in str(exc), exc
        return
    raise AssertionError(f"rank {r}: a mismatched num_worst_tokens dispatch did not raise")


def run_absent_peer(buf, group, absent_rank):
    """``absent_rank`` (on another node than rank 0) never dispatches after a first collective call: every other
    rank raises TimeoutError naming itself and the peer within the Buffer's deadline (no hang). Returns the seconds
    it took (None on the absent rank)."""
    import time

    import cupy

    from epkern.errors import TimeoutError as EpTimeout

    r, R = group.rank, group.size
    T, H, E = 16, 256, 4 * R
    idx = cupy.asarray(np.tile(np.arange(2, dtype=np.int64) * (E // 2), (T, 1)))  # experts 0 and E/2: two nodes
    per_rank, per_node, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    args = dict(num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node, is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert, topk_idx=idx)  # fmt: skip
    x = cupy.asarray(np.ones((T, H), S.BF16))
    buf.dispatch(x, **args)  # everyone once: first uses are collective
    S.settle(buf)
    group.barrier()
    if r == absent_rank:
        return None
    t0 = time.monotonic()
    try:
        buf.dispatch(x, **args)
        S.settle(buf)
    except EpTimeout as exc:
        assert f"rank {r}" in str(exc) and "peer" in str(exc), exc
        named = re.search(r"peer (\d+) did not answer", str(exc))
        nodes = rank_to_node(group)
        if named and nodes[int(named.group(1))] != nodes[r]:  # a peer of another node: what the NIC did for it
            assert f"[RDMA route to peer {named.group(1)}: QP" in str(exc), exc
        return time.monotonic() - t0
    raise AssertionError(f"rank {r}: a dispatch with rank {absent_rank} absent did not raise")
