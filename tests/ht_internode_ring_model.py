"""The internode HT network protocol (issue #18; docs/architecture.md, "Internode HT: the plan"), run by Python
threads through the real emulated NIC on host memory: what the kernels' sender, forwarder and receiver warps will do.
One primitive, :class:`Stream`, carries both phases: dispatch (source -> forwarder) and combine (forwarder ->
source, the same pairs reversed, one BF16 partial per dispatch message, merged at the source in token order).

Per (source s, forwarder f = the rank of node n with s's local index) a ring of ``ring`` message slots lives in f's
RDMA area, with a tail word (messages written, u64) next to it; s keeps a credit word (messages f has forwarded).
The source stages messages in its own area at the same ring positions, WRITEs them a chunk at a time (two WRITEs
where a chunk wraps), then the new tail as the chunk's one signaled 8-byte *inline* WRITE (the value travels in the
WQE: a staged word could be overwritten by the next chunk's tail before the NIC reads it), then rings the doorbell
once; before reusing ring positions it waits for credit. The forwarder polls each source's tail, forwards every new
message to the destinations it lists (over IPC: here numpy stores), then WRITEs the new credit back (inline too).
Every wait has a deadline and raises TimeoutError naming rank, phase and peer. Each message carries its sequence
number, so a slot overwritten before it was forwarded is caught.

Message layout (16-byte aligned): seq u32, token i32, L slot i32 (−1: not for that rank of node n), K expert ids
i32, K weights f32, then the BF16 row.
"""

from __future__ import annotations

import threading
import time

import numpy as np

import ht_internode_model as M
from epkern.errors import TimeoutError as EpkTimeoutError
from epkern.nic import Access, EmulatedNic
from epkern.nic import wqe as W


def message_bytes(L: int, K: int, H: int) -> int:
    raw = 8 + 4 * L + 8 * K + 2 * H
    return -(-raw // 16) * 16


class Area:
    """One rank's RDMA area: a receive ring and a tail word per remote source node, a staging ring and a credit
    word per remote destination node."""

    def __init__(self, num_nodes: int, ring: int, msg: int):
        self.ring, self.msg = ring, msg
        self.words = 2 * num_nodes  # u64: tail[m], credit[n]
        self.rings = 2 * num_nodes  # receive ring[m], staging ring[n]
        self.buf = np.zeros(8 * self.words + self.rings * ring * msg, np.uint8)
        self.u64 = self.buf[: 8 * self.words].view(np.uint64)
        self.N = num_nodes

    def word(self, kind: int, node: int) -> int:  # byte offset: 0 tail (from node), 1 credit (from node's forwarder)
        return 8 * (kind * self.N + node)

    def ring_at(self, kind: int, node: int, pos: int) -> int:  # kind 0: receive ring from node, 1: staging to node
        return 8 * self.words + ((kind * self.N + node) * self.ring + pos % self.ring) * self.msg


class Rank:
    """One rank's NIC (emulated, host memory), its area and one loopback QP per remote peer it talks to."""

    def __init__(self, r: int, areas: list, peers: list, slots: int):
        self.r, self.area = r, areas[r]
        self.nic = EmulatedNic(name=f"rank{r}")
        self.local = self.nic.reg_mr(self.area.buf, access=Access.LOCAL_WRITE)
        self.qp, self.peer_mr, self.pi, self.unretired, self.signals = {}, {}, {}, {}, {}
        for p in peers:
            self.peer_mr[p] = self.nic.reg_mr(areas[p].buf, access=Access.REMOTE_WRITE)  # the wire
            qp = self.nic.create_qp(self.nic.create_cq(slots), slots)
            qp.connect(qp)
            self.qp[p], self.pi[p], self.unretired[p], self.signals[p] = qp, 0, 0, []
        self.lock = threading.Lock()  # source and forwarder threads share the QPs

    def post(self, p: int, writes: list, value: int, at: int, deadline: float, phase: str) -> None:
        """WRITEs (local offset, peer offset, bytes) to peer p, then ``value`` as an inline u64 at peer offset ``at``,
        the one signaled WQE; one doorbell."""
        with self.lock:
            qp = self.qp[p]
            while self.unretired[p] + len(writes) + 1 > qp.wqe_cnt:  # SQ full: retire what has completed
                self._retire(p, deadline, phase)
            mr = self.peer_mr[p]
            for lo, ro, n in writes:
                self.pi[p] += W.build_rdma_write(
                    qp.sq, self.pi[p], qpn=qp.qpn, raddr=mr.addr + ro, rkey=mr.rkey, laddr=self.local.addr + lo,
                    lkey=self.local.lkey, length=n,
                )  # fmt: skip
            self.pi[p] += W.build_inline_write_u64(
                qp.sq, self.pi[p], value=value, qpn=qp.qpn, raddr=mr.addr + at, rkey=mr.rkey, signaled=True
            )
            self.unretired[p] += len(writes) + 1
            self.signals[p].append(len(writes) + 1)
            qp.ring_doorbell(self.pi[p])

    def _retire(self, p: int, deadline: float, phase: str) -> None:
        qp = self.qp[p]
        cqes = qp.cq.poll()
        for cqe in cqes:
            if cqe.is_error:
                raise RuntimeError(f"rank {self.r}: {phase}: peer {p}: error CQE {cqe}")
            self.unretired[p] -= self.signals[p].pop(0)
        if not cqes:
            _check(deadline, self.r, phase, p, "its send queue did not drain")
            time.sleep(1e-4)

    def close(self) -> None:
        self.nic.close()


def _check(deadline: float, rank: int, phase: str, peer: int, what: str) -> None:
    if time.monotonic() > deadline:
        raise EpkTimeoutError(f"rank {rank}: {phase}: peer {peer}: {what}")


def _read_u64(buf: np.ndarray, off: int) -> int:
    return int(buf[off : off + 8].view(np.uint64)[0])


def _encode(area: Area, off: int, seq: int, t: int, slots, idx, w, row) -> None:
    L, K = len(slots), len(idx)
    b = area.buf
    b[off : off + 4].view(np.uint32)[0] = seq
    b[off + 4 : off + 8].view(np.int32)[0] = t
    b[off + 8 : off + 8 + 4 * L].view(np.int32)[:] = slots
    at = off + 8 + 4 * L
    b[at : at + 4 * K].view(np.int32)[:] = idx
    b[at + 4 * K : at + 8 * K].view(np.float32)[:] = w
    b[at + 8 * K : at + 8 * K + 2 * len(row)] = row.view(np.uint8)


def _decode(area: Area, off: int, L: int, K: int, H: int):
    """(slots, expert ids, weights, row) of the message at ``off`` (its sequence number is Stream.wait's check)."""
    b = area.buf
    slots = b[off + 8 : off + 8 + 4 * L].view(np.int32).copy()
    at = off + 8 + 4 * L
    idx = b[at : at + 4 * K].view(np.int32).astype(np.int64)
    w = b[at + 4 * K : at + 8 * K].view(np.float32).copy()
    row = b[at + 8 * K : at + 8 * K + 2 * H].copy().view(M.BF16)
    return slots, idx, w, row


class Stream:
    """One ordered stream of messages from rank ``src`` to rank ``dst`` (another node), through a ring in ``dst``'s
    area: the ring and the tail word indexed by ``src``'s node, the staging ring and the credit word in ``src``'s
    area indexed by ``dst``'s node. The sender writes chunks and inline tails; the receiver waits for message i, and
    returns credits (inline) for what it has consumed."""

    def __init__(self, links, areas, nodes, src: int, dst: int, ring: int, chunk: int, deadline: float, phase: str):
        self.links, self.areas, self.src, self.dst = links, areas, src, dst
        self.sn, self.dn = int(nodes[src]), int(nodes[dst])
        self.ring, self.chunk, self.deadline, self.phase = ring, chunk, deadline, phase
        self.tail_seen = self.released = 0

    def send(self, count: int, encode) -> None:
        """Messages 0..count-1, ``encode(i, area, offset)`` writing message i into the staging slot."""
        me, area, peer = self.links[self.src], self.areas[self.src], self.areas[self.dst]
        sent = 0
        while sent < count:
            c = min(self.chunk, count - sent)
            while sent + c - _read_u64(area.buf, area.word(1, self.dn)) > self.ring:
                _check(
                    self.deadline, self.src, f"{self.phase} (waiting for ring space)", self.dst, "no credit came back"
                )
                time.sleep(1e-4)
            for i in range(sent, sent + c):
                encode(i, area, area.ring_at(1, self.dn, i))
            runs = [(sent, min(c, self.ring - sent % self.ring))]
            if runs[0][1] < c:  # the chunk wraps: its second part starts at ring position 0
                runs.append((sent + runs[0][1], c - runs[0][1]))
            wqes = [(area.ring_at(1, self.dn, a), peer.ring_at(0, self.sn, a), k * area.msg) for a, k in runs]
            sent += c
            me.post(self.dst, wqes, sent, peer.word(0, self.sn), self.deadline, f"{self.phase} (sending a chunk)")

    def wait(self, i: int) -> int:
        """The receiver: the offset of message i in its area once it has arrived (its sequence number checked)."""
        area = self.areas[self.dst]
        while self.tail_seen <= i:
            self.tail_seen = _read_u64(area.buf, area.word(0, self.sn))
            if self.tail_seen <= i:
                _check(self.deadline, self.dst, f"{self.phase} (waiting for messages)", self.src,
                       f"message {i} not there (tail {self.tail_seen})")  # fmt: skip
                time.sleep(1e-4)
        off = area.ring_at(0, self.sn, i)
        seq = int(area.buf[off : off + 4].view(np.uint32)[0])
        assert seq == i, f"rank {self.dst}: ring slot {i % self.ring} from rank {self.src} holds message {seq}, not {i}"
        return off

    def release(self, consumed: int) -> None:
        """The receiver: messages before ``consumed`` are done with; the sender may reuse their slots."""
        if consumed > self.released:
            self.released = consumed
            at = self.areas[self.src].word(1, self.dn)
            self.links[self.dst].post(self.src, [], consumed, at, self.deadline, f"{self.phase} (returning credit)")


def _combine_message(K: int, H: int) -> int:
    return -(-(8 + 4 * K + 2 * H) // 16) * 16  # seq u32, pad, K weight partials f32, the BF16 partial row


def _run(jobs) -> None:
    """Run every job in its own thread (the kernels' warps); raise the first failure after all have ended."""
    errors = []

    def run(fn):
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            errors.append(e)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in jobs]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]


class _Net:
    """Every rank's area and NIC for one phase, and the streams between forwarder pairs."""

    def __init__(self, nodes, msg: int, ring: int, chunk: int, timeout_s: float, phase: str):
        self.nodes = np.asarray(nodes)
        self.groups = M.node_ranks(self.nodes)
        R, N = len(self.nodes), len(self.groups)
        self.areas = [Area(N, ring, msg) for _ in range(R)]
        self.peers = {r: [M.forwarder(r, n, self.groups, self.nodes) for n in range(N) if n != self.nodes[r]]
                      for r in range(R)}  # fmt: skip
        self.links = [Rank(r, self.areas, self.peers[r], slots=64) for r in range(R)]
        self.deadline = time.monotonic() + timeout_s
        self.ring, self.chunk, self.phase = ring, chunk, phase

    def stream(self, src: int, dst: int) -> Stream:
        return Stream(self.links, self.areas, self.nodes, src, dst, self.ring, self.chunk, self.deadline, self.phase)

    def close(self, failed: bool) -> dict:
        """Retire every signaled WRITE (unless the run failed), close the NICs; the counters per rank and peer."""
        for me in self.links:
            for p in me.qp:
                while me.unretired[p] and not failed:
                    me._retire(p, self.deadline, "teardown")
            me.close()
        return {r: {p: dict(vars(qp.counters)) for p, qp in me.qp.items()} for r, me in enumerate(self.links)}


def dispatch(xs, idxs, weights, num_experts, handles, rank_to_node, *, ring=8, chunk=3, timeout_s=10.0,
             silent_forwarders=()):  # fmt: skip
    """The dispatch over rings; returns (per rank (recv_x, recv_topk_idx, recv_topk_weights), writes per output
    row, {rank: NIC counters per peer}, messages per (source, forwarder)). ``silent_forwarders``: ranks that never
    receive (their forwarder warps do not run)."""
    nodes = np.asarray(rank_to_node)
    R, L = len(xs), len(M.node_ranks(nodes)[0])
    H, K = xs[0].shape[1], idxs[0].shape[1]
    net = _Net(nodes, message_bytes(L, K, H), ring, chunk, timeout_s, "internode dispatch")
    groups, plan = net.groups, M.plan(handles, nodes)
    out = M.Landing(xs, idxs, weights, num_experts, handles)

    def sender(s, n):
        msgs = plan[(s, n)]

        def encode(i, area, off):
            t = int(msgs.tokens[i])
            _encode(area, off, i, t, msgs.slots[i], idxs[s][t], weights[s][t], xs[s][t])

        net.stream(s, M.forwarder(s, n, groups, nodes)).send(len(msgs.tokens), encode)

    def forwarder(s, n):
        f, msgs = M.forwarder(s, n, groups, nodes), plan[(s, n)]
        st = net.stream(s, f)
        for i in range(len(msgs.tokens)):
            slots, idx, w, row = _decode(net.areas[f], st.wait(i), L, K, H)
            for d, slot in zip(groups[n], slots, strict=True):
                if slot >= 0:
                    out.land(d, slot, idx, w, row)
            if (i + 1) % chunk == 0 or i + 1 == len(msgs.tokens):
                st.release(i + 1)

    jobs = [lambda s=s: out.own_node(s, groups[int(nodes[s])]) for s in range(R)]
    for s, n in plan:
        jobs.append(lambda s=s, n=n: sender(s, n))
        if M.forwarder(s, n, groups, nodes) not in silent_forwarders:
            jobs.append(lambda s=s, n=n: forwarder(s, n))
    try:
        _run(jobs)
    except BaseException:
        net.close(failed=True)
        raise
    counters = net.close(failed=False)
    msgs = {(s, M.forwarder(s, n, groups, nodes)): len(p.tokens) for (s, n), p in plan.items()}
    return out.outputs(), out.writes, counters, msgs


def combine(ys, ws, handles, rank_to_node, *, bias_0=None, ring=8, chunk=3, timeout_s=10.0):
    """The combine over rings, the dispatch's streams reversed: each forwarder sums its node's returned rows per
    message (float32 from +0.0, ranks ascending), sends the BF16 partial and float32 weight partials; each source
    merges its streams in token order, adding per token the nodes' partials in ascending node order after its bias.
    Returns (per rank (combined_x, combined weights), {rank: NIC counters per peer})."""
    nodes = np.asarray(rank_to_node)
    R, H, K = len(ys), ys[0].shape[1], ws[0].shape[1]
    net = _Net(nodes, _combine_message(K, H), ring, chunk, timeout_s, "internode combine")
    groups, plan = net.groups, M.plan(handles, nodes)
    out = [None] * R

    def partial(ranks, slots):  # at node n: one token's partial from its ranks' returned rows (IPC reads)
        part, w_part = np.zeros(H, np.float32), np.zeros(K, np.float32)
        for d, slot in zip(ranks, slots, strict=True):
            if slot >= 0:
                part += ys[d][slot].astype(np.float32)
                w_part += ws[d][slot]
        return part.astype(M.BF16), w_part

    def forwarder(s, n):
        f, msgs = M.forwarder(s, n, groups, nodes), plan[(s, n)]

        def encode(i, area, off):
            row, w = partial(groups[n], msgs.slots[i])
            area.buf[off : off + 4].view(np.uint32)[0] = i
            area.buf[off + 8 : off + 8 + 4 * K].view(np.float32)[:] = w
            area.buf[off + 8 + 4 * K : off + 8 + 4 * K + 2 * H] = row.view(np.uint8)

        net.stream(f, s).send(len(msgs.tokens), encode)

    def source(s):
        h, own = handles[s], int(nodes[s])
        T = h.num_tokens
        acc = np.zeros((T, H), np.float32)
        if bias_0 is not None:
            acc += bias_0[s].astype(np.float32)
        w_acc = np.zeros((T, K), np.float32)
        streams = {n: net.stream(M.forwarder(s, n, groups, nodes), s) for n in range(len(groups)) if n != own}
        pos = dict.fromkeys(streams, 0)
        next_tok = {n: (plan[(s, n)].tokens.tolist() + [T])[0] for n in streams}
        area = net.areas[s]
        for t in range(T):  # token order: every stream is consumed in order, so none waits on another forever
            for n, ranks in enumerate(groups):
                if n == own:
                    slots = h.send_slot[t, ranks]
                    if (slots >= 0).any():
                        row, w = partial(ranks, slots)
                        acc[t] += row.astype(np.float32)
                        w_acc[t] += w
                elif next_tok[n] == t:
                    off = streams[n].wait(pos[n])
                    w_acc[t] += area.buf[off + 8 : off + 8 + 4 * K].view(np.float32)
                    acc[t] += area.buf[off + 8 + 4 * K : off + 8 + 4 * K + 2 * H].view(M.BF16).astype(np.float32)
                    pos[n] += 1
                    toks = plan[(s, n)].tokens
                    next_tok[n] = int(toks[pos[n]]) if pos[n] < len(toks) else T
                    if pos[n] % chunk == 0 or pos[n] == len(toks):
                        streams[n].release(pos[n])
        out[s] = (acc.astype(M.BF16), w_acc)

    jobs = [lambda s=s: source(s) for s in range(R)] + [lambda s=s, n=n: forwarder(s, n) for s, n in plan]
    try:
        _run(jobs)
    except BaseException:
        net.close(failed=True)
        raise
    return out, net.close(failed=False)
