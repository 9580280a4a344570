"""The internode HT dispatch's network protocol (tests/ht_internode_ring_model.py, issue #18) through the real
emulated NIC: rings with credits, chunked WRITEs and one signaled inline tail per chunk. Exact against the
reference, every row written once, the NIC's counters equal to what the plan says must cross, ring wrap-around
exercised, and a forwarder that never drains ends in a TimeoutError naming rank, phase and peer."""

import numpy as np
import pytest

import ht_internode_model as M
import ht_internode_ring_model as RM
from epkern import reference as ref
from epkern.errors import TimeoutError as EpkTimeoutError
from test_ht_internode_model_cpu import _problem, bits


@pytest.mark.parametrize("ring,chunk", [(8, 3), (5, 5), (64, 6)])
@pytest.mark.parametrize("R,per_node", [(8, 4), (4, 2), (8, 1)])
def test_ring_dispatch_is_exact_and_moves_each_message_once(R, per_node, ring, chunk):
    _, xs, idxs, ws, E = _problem(11 + R + per_node, R, "random", H=16, t_max=30)
    nodes = [r // per_node for r in range(R)]
    res = ref.ht_dispatch(xs, idxs, E, topk_weights=ws)
    handles = [r.handle for r in res]
    recv, writes, counters, msgs = RM.dispatch(xs, idxs, ws, E, handles, nodes, ring=ring, chunk=chunk)
    for d in range(R):
        assert (writes[d] == 1).all(), f"rank {d}: every row written exactly once"
        x, i, w = recv[d]
        assert np.array_equal(bits(x), bits(res[d].recv_x)) and np.array_equal(i, res[d].recv_topk_idx)
        assert np.array_equal(w, res[d].recv_topk_weights)
    L, K, H = per_node, idxs[0].shape[1], 16
    msg = RM.message_bytes(L, K, H)
    for (s, f), count in msgs.items():
        # s's QP to its forwarder f carries s's messages (a WRITE per chunk, two where it wraps) with one inline tail
        # per chunk, and s's credits for what it forwarded of f's messages (one inline WRITE per forwarding pass)
        c, chunks, f_chunks = counters[s][f], -(-count // chunk), -(-msgs[(f, s)] // chunk)
        credits = (c["bytes"] - count * msg) // 8 - chunks
        assert c["errors"] == 0 and (c["bytes"] - count * msg) % 8 == 0, c
        assert (1 if msgs[(f, s)] else 0) <= credits <= f_chunks, (credits, f_chunks)
        assert chunks <= c["wqes"] - chunks - credits <= 2 * chunks  # the data WRITEs
        assert c["cqes"] == chunks + credits and c["doorbells"] <= chunks + credits
    for s in range(R):  # nothing crosses between ranks of one node
        assert all(nodes[p] != nodes[s] for p in counters[s])


def test_a_forwarder_that_never_drains_is_a_timeout_naming_rank_phase_and_peer():
    _, xs, idxs, ws, E = _problem(5, 4, "random", H=16, t_max=30)
    res = ref.ht_dispatch(xs, idxs, E, topk_weights=ws)
    handles = [r.handle for r in res]
    plan = M.plan(handles, [0, 0, 1, 1])
    s = next(s for s in (0, 1) if len(plan[(s, 1)].tokens) > 4)  # needs more than one ring of messages
    f = 2 + s
    with pytest.raises(EpkTimeoutError, match=rf"rank {s}: internode dispatch \(waiting for ring space\): peer {f}"):
        RM.dispatch(xs, idxs, ws, E, handles, [0, 0, 1, 1], ring=2, chunk=2, timeout_s=1.5, silent_forwarders=(f,))


@pytest.mark.parametrize("real_valued", [False, True])
@pytest.mark.parametrize("R,per_node", [(8, 4), (4, 2), (8, 1)])
def test_ring_combine_is_the_two_level_order_and_moves_one_partial_per_message(R, per_node, real_valued):
    """The combine over the same streams reversed: bit for bit the reference's two-level order (real-valued rows:
    rounding matters), the flat order too on integer-valued rows; the forwarders' QPs carry one partial per
    dispatch message."""
    rng, xs, idxs, ws, E = _problem(21 + R + per_node, R, "random", H=16, t_max=30)
    nodes = [r // per_node for r in range(R)]
    res = ref.ht_dispatch(xs, idxs, E, topk_weights=ws)
    handles = [r.handle for r in res]
    if real_valued:
        ys = [(rng.standard_normal((h.num_recv_tokens, 16)) * 4).astype(M.BF16) for h in handles]
    else:
        ys = [rng.integers(-8, 9, size=(h.num_recv_tokens, 16)).astype(M.BF16) for h in handles]
    rws = [r.recv_topk_weights for r in res]
    b0 = [rng.integers(-2, 3, size=x.shape).astype(M.BF16) for x in xs]
    out, counters = RM.combine(ys, rws, handles, nodes, bias_0=b0, ring=8, chunk=3)
    want = ref.ht_combine(ys, handles, topk_weights=rws, bias_0=b0, rank_to_node=nodes)
    flat = ref.ht_combine(ys, handles, topk_weights=rws, bias_0=b0)
    for s in range(R):
        assert np.array_equal(bits(out[s][0]), bits(want[s][0])) and np.array_equal(out[s][1], want[s][1])
        if not real_valued:
            assert np.array_equal(bits(out[s][0]), bits(flat[s][0]))
    msg = RM._combine_message(idxs[0].shape[1], 16)
    plan = M.plan(handles, nodes)
    groups = M.node_ranks(nodes)
    for (s, n), p in plan.items():
        f = M.forwarder(s, n, groups, nodes)
        # f's QP to s: f's partials for s's tokens (one per dispatch message) with a tail per chunk, and f's
        # credits for the partials s sends it (s forwards for f's node in turn)
        c, count, back = counters[f][s], len(p.tokens), len(plan[(f, nodes[s])].tokens)
        chunks, credits = -(-count // 3), (c["bytes"] - count * msg) // 8 - -(-count // 3)
        assert c["errors"] == 0 and (c["bytes"] - count * msg) % 8 == 0
        assert (1 if back else 0) <= credits <= -(-back // 3) and c["cqes"] == chunks + credits
