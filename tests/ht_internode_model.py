"""An executable model of the internode HT plan (issue #18; docs/architecture.md, "Internode HT: the plan"):
what the kernels will move, in numpy, so the layout math is settled before any CUDA is written.

Every rank's ``send_slot`` (the final row of each token in each destination) comes from the reference dispatch, as
the kernels' notify will compute it. A token of source s bound for ranks of another node n travels once, as one
message to the forwarder f(s, n) (node n's rank with s's local index), carrying the row, its expert ids and
weights and the L slots of node n's ranks; the forwarder writes the row to each listed (rank, slot). Destinations on
s's own node are written directly. Combine runs the same routes backwards: the forwarder sums node n's returned
rows (float32 from +0.0, ranks ascending) and sends one BF16 partial per message; the source adds the partials of
the nodes in ascending order after its biases.

The model counts what crosses the network (per ordered rank pair) and checks that every output row is written
exactly once; the tests compare its outputs with ``epkern.reference`` bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from epkern.errors import ArgumentError
from epkern.reference.high_throughput import BF16

POISON = 0x7FC1  # a BF16 NaN pattern: a row never written stays visibly wrong


def node_ranks(rank_to_node) -> list[list[int]]:
    """The ranks of each node, ascending; ArgumentError unless every node has the same number of ranks."""
    nodes = np.asarray(rank_to_node, dtype=np.int64)
    groups = [np.nonzero(nodes == n)[0].tolist() for n in range(int(nodes.max()) + 1)]
    sizes = {len(g) for g in groups}
    if len(sizes) != 1:
        raise ArgumentError(
            "rank_to_node: internode HT needs the same number of ranks on every node, got "
            + ", ".join(f"node {n}: {len(g)}" for n, g in enumerate(groups))
        )
    return groups


def forwarder(s: int, n: int, groups: list[list[int]], nodes) -> int:
    """The rank of node ``n`` with the local index of source rank ``s``."""
    return groups[n][groups[int(nodes[s])].index(s)]


@dataclass
class Messages:
    """The network messages of one source s to one remote node n, in the order they are sent (tokens ascending)."""

    tokens: np.ndarray  # int64 [M]: source token of each message
    slots: np.ndarray  # int32 [M, L]: its row in each of node n's ranks (-1: not sent there)


@dataclass
class Traffic:
    """What the model moved: network messages per (source, forwarder) pair; writes of each output row."""

    network: dict = field(default_factory=dict)  # (src, dst rank) -> messages
    row_writes: dict = field(default_factory=dict)  # dst rank -> int array, writes per output row

    def send(self, src: int, dst: int, count: int) -> None:
        self.network[(src, dst)] = self.network.get((src, dst), 0) + count


class Landing:
    """The destinations' outputs (poisoned first) and how one row lands in its final place on rank d over IPC (from
    its source or its forwarder): data, expert ids made local to d, weights where local; writes counted per row."""

    def __init__(self, xs, idxs, weights, num_experts, handles):
        self.xs, self.idxs, self.weights, self.handles = xs, idxs, weights, handles
        self.e_loc = num_experts // len(xs)
        H, K = xs[0].shape[1], idxs[0].shape[1]
        rows = [h.num_recv_tokens for h in handles]
        self.recv_x = [np.full((n, H), POISON, np.uint16).view(BF16) for n in rows]
        self.recv_idx = [np.full((n, K), -7, np.int64) for n in rows]
        self.recv_w = [np.full((n, K), np.nan, np.float32) for n in rows]
        self.writes = {d: np.zeros(n, np.int64) for d, n in enumerate(rows)}

    def land(self, d: int, slot: int, idx, w, row) -> None:
        here = (idx >= d * self.e_loc) & (idx < (d + 1) * self.e_loc)
        self.recv_x[d][slot] = row
        self.recv_idx[d][slot] = np.where(here, idx - d * self.e_loc, -1)
        self.recv_w[d][slot] = np.where(here, w, np.float32(0))
        self.writes[d][slot] += 1

    def own_node(self, s: int, ranks) -> None:
        """Source s's rows for the ranks of its own node, written straight to them."""
        h = self.handles[s]
        for d in ranks:
            for t in np.nonzero(h.send_slot[:, d] >= 0)[0]:
                self.land(d, h.send_slot[t, d], self.idxs[s][t], self.weights[s][t], self.xs[s][t])

    def outputs(self) -> list:
        return list(zip(self.recv_x, self.recv_idx, self.recv_w, strict=True))


def plan(handles, rank_to_node) -> dict:
    """(s, n) -> Messages for every source s and every node n other than s's (empty ones included)."""
    nodes = np.asarray(rank_to_node)
    groups = node_ranks(nodes)
    out = {}
    for s, h in enumerate(handles):
        for n, ranks in enumerate(groups):
            if n == nodes[s]:
                continue
            slots = h.send_slot[:, ranks]
            tokens = np.nonzero((slots >= 0).any(axis=1))[0]
            out[(s, n)] = Messages(tokens, slots[tokens])
    return out


def dispatch(xs, idxs, weights, num_experts, handles, rank_to_node):
    """The routed dispatch: per rank (recv_x BF16 [N, H], recv_topk_idx int64 [N, K], recv_topk_weights float32
    [N, K]) plus the Traffic. ``handles``: the reference dispatch's, one per rank."""
    nodes = np.asarray(rank_to_node)
    groups = node_ranks(nodes)
    out = Landing(xs, idxs, weights, num_experts, handles)
    traffic = Traffic(row_writes=out.writes)
    for s in range(len(xs)):
        out.own_node(s, groups[int(nodes[s])])
    for (s, n), msgs in plan(handles, nodes).items():
        f = forwarder(s, n, groups, nodes)
        traffic.send(s, f, len(msgs.tokens))
        for t, slots in zip(msgs.tokens, msgs.slots, strict=True):  # at the forwarder: the message's own routing
            for d, slot in zip(groups[n], slots, strict=True):
                if slot >= 0:
                    out.land(d, slot, idxs[s][t], weights[s][t], xs[s][t])
    return out.outputs(), traffic


def combine(ys, ws, handles, rank_to_node, bias_0=None, bias_1=None):
    """The routed combine: per rank (combined_x BF16 [T, H], combined weights float32 [T, K]) plus the Traffic
    (network messages: one BF16 partial per dispatch message, sent back from the forwarder to the source)."""
    nodes = np.asarray(rank_to_node)
    groups = node_ranks(nodes)
    traffic = Traffic()
    out = []
    msgs = plan(handles, nodes)
    for s, h in enumerate(handles):
        T, H, K = h.num_tokens, ys[0].shape[1], ws[0].shape[1]
        acc = np.zeros((T, H), np.float32)
        for b in (bias_0, bias_1):
            if b is not None:
                acc += b[s].astype(np.float32)
        w_acc = np.zeros((T, K), np.float32)
        for n, ranks in enumerate(groups):
            if n == nodes[s]:
                tokens = np.nonzero((h.send_slot[:, ranks] >= 0).any(axis=1))[0]
                slots = h.send_slot[tokens][:, ranks]
            else:
                tokens, slots = msgs[(s, n)].tokens, msgs[(s, n)].slots
                traffic.send(forwarder(s, n, groups, nodes), s, len(tokens))
            # at node n (the forwarder, or s itself for its own node): one partial per token, ranks ascending
            part = np.zeros((len(tokens), H), np.float32)
            w_part = np.zeros((len(tokens), K), np.float32)
            for i, d in enumerate(ranks):
                sent = slots[:, i] >= 0
                part[sent] += ys[d][slots[sent, i]].astype(np.float32)
                w_part[sent] += ws[d][slots[sent, i]]
            acc[tokens] += part.astype(BF16).astype(np.float32)  # the partial crosses as BF16
            w_acc[tokens] += w_part
        out.append((acc.astype(BF16), w_acc))
    return out, traffic
