"""The internode HT plan's model (tests/ht_internode_model.py, issue #18) against the reference: the routed
dispatch lands every row exactly once in the reference's place, each token crosses the network once per remote node
it has a destination on and never between ranks of one node, and the routed combine is the reference's two-level
order bit for bit (and the flat order on integer-valued data)."""

import ml_dtypes
import numpy as np
import pytest

import ht_internode_model as M
from epkern import reference as ref
from epkern.errors import ArgumentError

BF16 = ml_dtypes.bfloat16


def bits(a):
    return np.asarray(a).view(np.uint16)


def _routing(rng, kind, R, T, E, K):
    """topk_idx [T, K] of one rank: random distinct experts with some -1, everything to node 0's first rank's
    experts ("skewed"), everything to one expert repeated, or all -1."""
    if kind == "random":
        idx = np.argsort(rng.random((T, E)), axis=1)[:, :K]
        idx[rng.random((T, K)) < 0.2] = -1
    elif kind == "skewed":
        idx = np.argsort(rng.random((T, E // R)), axis=1)[:, :K] if K <= E // R else np.zeros((T, K), np.int64)
    elif kind == "one_expert":
        idx = np.full((T, K), E - 1)
    else:
        idx = np.full((T, K), -1)
    return idx.astype(np.int64)


def _problem(seed, R, kind, H=32, E_per_rank=4, K=4, t_max=40):
    rng = np.random.default_rng(seed)
    E = R * E_per_rank
    xs, idxs, ws = [], [], []
    for r in range(R):
        T = 0 if r == 1 else (1 if r == 2 else int(rng.integers(3, t_max)))  # T = 0 and T = 1 ranks
        xs.append(rng.integers(-8, 9, size=(T, H)).astype(BF16))
        idxs.append(_routing(rng, kind, R, T, E, K))
        ws.append(rng.integers(-4, 5, size=(T, K)).astype(np.float32))
    return rng, xs, idxs, ws, E


SPLITS = [(8, 4), (8, 2), (8, 1), (4, 2), (2, 1)]


@pytest.mark.parametrize("kind", ["random", "skewed", "one_expert", "none"])
@pytest.mark.parametrize("R,per_node", SPLITS)
@pytest.mark.parametrize("seed", [0, 1])
def test_routed_dispatch_and_combine_match_the_reference(seed, R, per_node, kind):
    rng, xs, idxs, ws, E = _problem(seed, R, kind)
    nodes = [r // per_node for r in range(R)]
    res = ref.ht_dispatch(xs, idxs, E, topk_weights=ws)
    handles = [r.handle for r in res]
    got, traffic = M.dispatch(xs, idxs, ws, E, handles, nodes)
    for d, (x, i, w) in enumerate(got):
        assert (traffic.row_writes[d] == 1).all(), f"rank {d}: every row written exactly once"
        assert np.array_equal(bits(x), bits(res[d].recv_x)), f"rank {d}: recv_x"
        assert np.array_equal(i, res[d].recv_topk_idx) and np.array_equal(w, res[d].recv_topk_weights)

    # Counting: one message per (token, remote node with a destination of it), to the forwarder only.
    for s in range(R):
        lay = ref.get_dispatch_layout(idxs[s], E, R, rank_to_node=nodes if per_node < R else None)
        remote = 0 if lay.num_tokens_per_rdma_rank is None else int(
            sum(c for n, c in enumerate(lay.num_tokens_per_rdma_rank) if n != nodes[s])
        )  # fmt: skip
        sent = {dst: c for (src, dst), c in traffic.network.items() if src == s}
        assert sum(sent.values()) == remote
        for dst in sent:
            assert nodes[dst] != nodes[s] and dst % per_node == s % per_node  # a forwarder on another node

    # Combine: the expert outputs are the received rows (integer-valued), the weights returned as received.
    ys = [rng.integers(-8, 9, size=(h.num_recv_tokens, 32)).astype(BF16) for h in handles]
    rws = [r.recv_topk_weights for r in res]
    b0 = [rng.integers(-2, 3, size=x.shape).astype(BF16) for x in xs]
    comb, back = M.combine(ys, rws, handles, nodes, bias_0=b0)
    want = ref.ht_combine(ys, handles, topk_weights=rws, bias_0=b0, rank_to_node=nodes)
    flat = ref.ht_combine(ys, handles, topk_weights=rws, bias_0=b0)
    for s in range(R):
        assert np.array_equal(bits(comb[s][0]), bits(want[s][0])) and np.array_equal(comb[s][1], want[s][1])
        assert np.array_equal(bits(comb[s][0]), bits(flat[s][0]))  # integer-valued: the orders agree
    assert back.network == {(dst, src): c for (src, dst), c in traffic.network.items()}  # one partial per message


@pytest.mark.parametrize("R,per_node", [(8, 4), (4, 2)])
def test_routed_combine_of_real_valued_rows_is_the_two_level_order(R, per_node):
    """Real-valued expert outputs (rounding matters): the model's combine equals the reference's two-level order
    bit for bit."""
    rng, xs, idxs, ws, E = _problem(7, R, "random")
    nodes = [r // per_node for r in range(R)]
    res = ref.ht_dispatch(xs, idxs, E, topk_weights=ws)
    handles = [r.handle for r in res]
    ys = [(rng.standard_normal((h.num_recv_tokens, 32)) * 2.0 ** rng.integers(-6, 6)).astype(BF16) for h in handles]
    rws = [r.recv_topk_weights for r in res]
    comb, _ = M.combine(ys, rws, handles, nodes)
    want = ref.ht_combine(ys, handles, topk_weights=rws, rank_to_node=nodes)
    for s in range(R):
        assert np.array_equal(bits(comb[s][0]), bits(want[s][0]))


def test_a_poisoned_row_is_caught_and_uneven_nodes_are_refused():
    """The model's checks can fail: a message that skips a destination leaves a poisoned row; nodes of different
    sizes are an ArgumentError naming them."""
    _, xs, idxs, ws, E = _problem(3, 4, "random")
    res = ref.ht_dispatch(xs, idxs, E, topk_weights=ws)
    handles = [r.handle for r in res]
    victim = next(s for s in range(4) if (handles[s].send_slot[:, 2:] >= 0).any() and s < 2)
    t = int(np.nonzero((handles[victim].send_slot[:, 2:] >= 0).any(axis=1))[0][0])
    d = 2 + int(np.nonzero(handles[victim].send_slot[t, 2:] >= 0)[0][0])
    slot = int(handles[victim].send_slot[t, d])
    handles[victim].send_slot[t, d] = -1  # the message no longer lists (d, slot)
    got, traffic = M.dispatch(xs, idxs, ws, E, handles, [0, 0, 1, 1])
    assert traffic.row_writes[d][slot] == 0 and bits(got[d][0])[slot, 0] == M.POISON
    with pytest.raises(ArgumentError, match="node 0: 3, node 1: 1"):
        M.node_ranks([0, 0, 0, 1])
