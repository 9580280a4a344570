"""The internode HT dispatch's network protocol (issue #18; docs/architecture.md, "Internode HT: the plan"), run by
Python threads through the real emulated NIC on host memory: what the kernels' sender and forwarder warps will do.

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
    b = area.buf
    seq = int(b[off : off + 4].view(np.uint32)[0])
    t = int(b[off + 4 : off + 8].view(np.int32)[0])
    slots = b[off + 8 : off + 8 + 4 * L].view(np.int32).copy()
    at = off + 8 + 4 * L
    idx = b[at : at + 4 * K].view(np.int32).astype(np.int64)
    w = b[at + 4 * K : at + 8 * K].view(np.float32).copy()
    row = b[at + 8 * K : at + 8 * K + 2 * H].copy().view(M.BF16)
    return seq, t, slots, idx, w, row


def dispatch(xs, idxs, weights, num_experts, handles, rank_to_node, *, ring=8, chunk=3, timeout_s=10.0,
             silent_forwarders=()):  # fmt: skip
    """The dispatch over rings; returns (per rank (recv_x, recv_topk_idx, recv_topk_weights), {rank: NIC counters
    per peer}, messages sent per (source, forwarder)). ``silent_forwarders``: ranks whose forwarder never runs."""
    nodes = np.asarray(rank_to_node)
    groups = M.node_ranks(nodes)
    R, N, L = len(xs), len(groups), len(groups[0])
    H, K, e_loc = xs[0].shape[1], idxs[0].shape[1], num_experts // len(xs)
    msg = message_bytes(L, K, H)
    plan = M.plan(handles, nodes)
    areas = [Area(N, ring, msg) for _ in range(R)]
    peers = {r: [M.forwarder(r, n, groups, nodes) for n in range(N) if n != nodes[r]] for r in range(R)}
    ranks = [Rank(r, areas, peers[r], slots=64) for r in range(R)]
    n_rows = [h.num_recv_tokens for h in handles]
    recv = [
        (np.full((n, H), M.POISON, np.uint16).view(M.BF16), np.full((n, K), -7, np.int64),
         np.full((n, K), np.nan, np.float32))
        for n in n_rows
    ]  # fmt: skip
    writes = [np.zeros(n, np.int64) for n in n_rows]
    deadline = time.monotonic() + timeout_s

    def land(d, slot, idx, w, row):
        here = (idx >= d * e_loc) & (idx < (d + 1) * e_loc)
        recv[d][0][slot] = row
        recv[d][1][slot] = np.where(here, idx - d * e_loc, -1)
        recv[d][2][slot] = np.where(here, w, np.float32(0))
        writes[d][slot] += 1

    def source(s):
        me, area = ranks[s], areas[s]
        h = handles[s]
        for d in groups[int(nodes[s])]:  # own node: straight to the destination
            for t in np.nonzero(h.send_slot[:, d] >= 0)[0]:
                land(d, h.send_slot[t, d], idxs[s][t], weights[s][t], xs[s][t])
        todo = {n: plan[(s, n)] for n in range(N) if n != nodes[s]}
        sent = dict.fromkeys(todo, 0)
        while any(sent[n] < len(m.tokens) for n, m in todo.items()):
            progressed = False
            for n, msgs in todo.items():
                f, left = M.forwarder(s, n, groups, nodes), len(msgs.tokens) - sent[n]
                c = min(chunk, left)
                if c == 0 or sent[n] + c - _read_u64(area.buf, area.word(1, n)) > ring:
                    continue  # done, or no room until the forwarder's credit comes back
                first = sent[n]
                for i in range(first, first + c):
                    t = int(msgs.tokens[i])
                    _encode(area, area.ring_at(1, n, i), i, t, msgs.slots[i], idxs[s][t], weights[s][t], xs[s][t])
                runs = [(first, min(c, ring - first % ring))]
                if runs[0][1] < c:  # the chunk wraps: its second part starts at ring position 0
                    runs.append((first + runs[0][1], c - runs[0][1]))
                wqes = [(area.ring_at(1, n, a), areas[f].ring_at(0, int(nodes[s]), a), k * msg) for a, k in runs]
                sent[n] += c
                me.post(f, wqes, sent[n], areas[f].word(0, int(nodes[s])), deadline,
                        "internode dispatch (sending a chunk)")  # fmt: skip
                progressed = True
            if not progressed:
                blocked = next(n for n, m in todo.items() if sent[n] < len(m.tokens))
                _check(deadline, s, "internode dispatch (waiting for ring space)",
                       M.forwarder(s, blocked, groups, nodes), "no credit came back")  # fmt: skip
                time.sleep(1e-4)

    def forward(f):
        me, area = ranks[f], areas[f]
        sources = {m: M.forwarder(f, m, groups, nodes) for m in range(N) if m != nodes[f]}
        expect = {m: len(plan[(s, int(nodes[f]))].tokens) for m, s in sources.items()}
        done = dict.fromkeys(sources, 0)
        while any(done[m] < expect[m] for m in sources):
            progressed = False
            for m, s in sources.items():
                tail = _read_u64(area.buf, area.word(0, m))
                if tail == done[m]:
                    continue
                for i in range(done[m], tail):
                    seq, t, slots, idx, w, row = _decode(area, area.ring_at(0, m, i), L, K, H)
                    assert seq == i, f"rank {f}: ring slot {i % ring} from rank {s} holds message {seq}, not {i}"
                    for d, slot in zip(groups[int(nodes[f])], slots, strict=True):
                        if slot >= 0:
                            land(d, slot, idx, w, row)
                done[m] = tail
                me.post(s, [], tail, areas[s].word(1, int(nodes[f])), deadline, "internode dispatch (returning credit)")
                progressed = True
            if not progressed:
                waiting = next(m for m in sources if done[m] < expect[m])
                _check(deadline, f, "internode dispatch (waiting for a source's messages)", sources[waiting],
                       f"tail {done[waiting]} of {expect[waiting]}")  # fmt: skip
                time.sleep(1e-4)

    errors, threads = [], []

    def run(fn, r):
        try:
            fn(r)
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            errors.append(e)

    for r in range(R):
        threads.append(threading.Thread(target=run, args=(source, r)))
        if r not in silent_forwarders:
            threads.append(threading.Thread(target=run, args=(forward, r)))
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for me in ranks:  # every signaled WRITE completed (unless a run failed): the counters are final
        for p in me.qp:
            while me.unretired[p] and not errors:
                me._retire(p, deadline, "teardown")
        me.close()
    if errors:
        raise errors[0]
    counters = {r: {p: dict(vars(qp.counters)) for p, qp in ranks[r].qp.items()} for r in range(R)}
    msgs = {(s, M.forwarder(s, n, groups, nodes)): len(p.tokens) for (s, n), p in plan.items()}
    return recv, writes, counters, msgs
