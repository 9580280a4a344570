"""Python models of the internode HT kernels (kernels/ht_inter_notify.cu, ht_inter_dispatch.cu,
ht_inter_combine.cu) for the fake CuPy (tests/fake_cupy.py): what each kernel reads, writes and posts, with the same
area layout, message layout, streams and credits, the WQEs written through the device QP table into the
host-mapped rings that the real emulated NIC executes. Used by tests/test_ht_inter_emulated_cpu.py to run the GPU
tests' own scenarios (tests/ht_inter_scenarios.py) on a machine without a GPU: that checks the host side, the
layouts, the protocol and the counting end to end; the CUDA code itself runs only on a GPU.

Ranks are in-process threads: a kernel's blocks are threads here (senders, forwarders, copiers / receivers,
reducers), and the exchange of output / input addresses through the control area is a shared table.
"""

from __future__ import annotations

import ctypes
import threading
import time

import ml_dtypes
import numpy as np

from epkern import kernel_constants as K
from epkern.gpu import ht_inter_layout as lay
from epkern.nic import wqe as W

BF16 = ml_dtypes.bfloat16
ENTRY = K.get("EPK_HT_INTER_ENTRY_BYTES")
MAXN = lay.MAX_NODES
# inter::Words: u64 arrays of 8, in declaration order
MAXR = lay.MAX_RANKS
TAIL, CREDIT, SENT, RECEIVED, C_TAIL, C_CREDIT, C_SENT, C_RECEIVED = (8 * MAXN * i for i in range(8))  # inter::Words
ENTRIES = K.get("EPK_HT_INTER_WORDS_BYTES")  # inter::Area.entry[2][MAXR]
STAGES = ENTRIES + 2 * MAXR * ENTRY  # inter::Area.stage[2][MAXR]
# NotifyEntry fields: flag + padding, rows[MAXR], shape[8], node_msgs[MAXN], padding[8], experts
E_ROWS = 64
E_SHAPE = E_ROWS + 4 * MAXR
E_NODE_MSGS = E_SHAPE + 32
E_EXPERTS = E_NODE_MSGS + 4 * MAXN + 32
OUT = {k: K.get(f"EPK_HT_INTER_OUT_{k}") for k in ("EXPERTS", "SHAPE", "BAD_INDEX", "NODES", "LAYOUT_OK")}
SPACE, ARRIVAL = K.get("EPK_ERR_PHASE_HT_INTER_SPACE"), K.get("EPK_ERR_PHASE_HT_INTER_ARRIVAL")


def mem(addr: int, n: int) -> np.ndarray:
    return np.ctypeslib.as_array((ctypes.c_uint8 * max(n, 1)).from_address(addr))[:n]


def u64(addr: int) -> int:
    return ctypes.c_uint64.from_address(addr).value


def set_u64(addr: int, v: int) -> None:
    ctypes.c_uint64.from_address(addr).value = v


def i32(addr: int) -> int:
    return ctypes.c_int32.from_address(addr).value


class DeviceTimeout(Exception):
    """A device-side wait that reached the Buffer's deadline: the kernel records it (epk::report_error) and ends."""

    def __init__(self, what: str, phase: int, peer: int):
        super().__init__(what)
        self.phase, self.peer = phase, peer


def wait_until(cond, timeout_s: float, what: str, phase: int = 0, peer: int = 0) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > end:
            raise DeviceTimeout(f"model: {what}", phase, peer)
        time.sleep(1e-4)


def recorded(kernel):
    """A kernel model whose expired wait lands in the rank's error record (as the kernels' report_error), then ends."""

    def run(self, a, d):
        try:
            kernel(self, a, d)
        except DeviceTimeout as exc:
            rec = self.backends[int(a["rank"])].rt.error_record
            if not rec[0]:
                rec[1:7] = [K.get("EPK_ERR_CODE_TIMEOUT"), int(a["rank"]), exc.phase, exc.peer, 0, 1]
                rec[0] = 1

    return run


def ptr(arg) -> int:
    """A pointer argument's address: a fake array's, or the integer itself (0: null)."""
    import fake_cupy as F

    return int(arg.data.ptr) if isinstance(arg, F.ndarray) else int(arg)


class Poster:
    """One QP as the kernels post on it, from its table entry (inter::QpEntry); a lock stands for reserve/commit
    ordering between the blocks of one rank."""

    def __init__(self, entry: np.ndarray):
        sq, dbrec, db, retired, ctr, raddr, keys, qp = (int(x) for x in entry)
        self.sq, self.dbrec, self.db, self.retired, self.ctr, self.raddr = sq, dbrec, db, retired, ctr, raddr
        self.rkey, self.lkey = keys & 0xFFFFFFFF, keys >> 32
        self.qpn, self.wqe_cnt = qp & 0xFFFFFFFF, qp >> 32
        self.ring = mem(sq, self.wqe_cnt * 64)
        self.lock = threading.Lock()

    def post(self, writes, inline, timeout_s: float) -> None:
        """``writes``: (local address, remote offset, bytes); ``inline``: (remote offset, value, bits), signaled;
        one doorbell."""
        with self.lock:
            pi = u64(self.ctr)
            n = len(writes) + 1
            wait_until(lambda: pi + n - u64(self.retired) <= self.wqe_cnt, timeout_s, "send ring space")
            kw = dict(qpn=self.qpn, rkey=self.rkey)
            for k, (laddr, roff, nbytes) in enumerate(writes):
                W.build_rdma_write(self.ring, pi + k, raddr=self.raddr + roff, laddr=laddr, lkey=self.lkey,
                                   length=nbytes, **kw)  # fmt: skip
            roff, value, bits = inline
            build = W.build_inline_write_u32 if bits == 32 else W.build_inline_write_u64
            build(self.ring, pi + n - 1, value=value, raddr=self.raddr + roff, signaled=True, **kw)
            set_u64(self.ctr, pi + n)
            set_u64(self.ctr + 8, pi + n)
            ctypes.memmove(self.dbrec + 4, ((pi + n) & 0xFFFF).to_bytes(4, "big"), 4)
            set_u64(self.db, W.doorbell_u64(pi + n, self.qpn))


class Model:
    """The three kernels for every rank of one in-process group; ``backends[rank]`` is registered by the test."""

    def __init__(self):
        self.backends: dict = {}
        self.posters: dict = {}
        self.tables: dict = {}  # (epoch, kind) -> {rank: addresses}
        self.done: dict = {}
        self.lock = threading.Lock()

    # ---- shared plumbing ----
    @property
    def timeout_s(self) -> float:  # the Buffer's deadline (every rank's is the same)
        return next(iter(self.backends.values())).rt.timeout_s

    def area(self, rank: int) -> int:
        rt = self.backends[rank].rt
        return rt.region.ptr + rt.ht_area_offset

    def poster(self, rank: int, peer: int) -> Poster:
        key = (rank, peer)
        if key not in self.posters:
            table = np.asarray(self.backends[rank].ht_inter.transport.table._a)
            self.posters[key] = Poster(table[peer])
        return self.posters[key]

    def publish(self, epoch: int, kind: str, rank: int, value, ranks, phase: int = 0) -> dict:
        """The control area's address exchange: every rank of ``ranks`` publishes, each waits for all."""
        with self.lock:
            self.tables.setdefault((epoch, kind), {})[rank] = value
            table = self.tables[(epoch, kind)]
        missing = lambda: [r for r in ranks if r not in table]  # noqa: E731
        wait_until(lambda: not missing(), self.timeout_s, f"{kind} addresses", phase, (missing() or [0])[0])
        return table

    def finish(self, epoch: int, kind: str, rank: int, ranks, phase: int) -> None:
        self.end_epoch(rank, epoch)
        self.publish(epoch, kind + " done", rank, True, ranks, phase)

    def counter(self, rank: int):
        """ht_common.cuh's HtCtrl::epoch_counter of ``rank`` (its control area starts its region)."""
        return ctypes.c_int32.from_address(self.backends[rank].rt.region.ptr + K.get("EPK_HT_CTRL_COUNTER_AT"))

    def begin_epoch(self, rank: int) -> int:
        """The kernel's epoch, as ht_common.cuh's begin_epoch: one more than the rank's last HT kernel's."""
        return self.counter(rank).value + 1

    def end_epoch(self, rank: int, epoch: int) -> None:
        self.counter(rank).value = epoch

    def send_stream(self, rank, end: dict, credit: int, tail: int, stage) -> None:
        """ht_inter.cuh send_stream: ``end`` = area, rings (offset, ring, msg), n, my_node, peer, count, chunk, done
        (the address of this rank's counter word); ``credit``: the word read here; ``tail``: the peer's word offset.
        ``stage(i, seq, addr)`` writes message i."""
        area, (roff, ring, msg), n, me, peer = end["area"], end["rings"], end["n"], end["my_node"], end["peer"]
        base, count, chunk = u64(end["done"]), end["count"], end["chunk"]
        stage_at = lambda node, i: roff + ((2 * node + 1) * ring + i % ring) * msg  # noqa: E731
        recv_at = lambda node, i: roff + (2 * node * ring + i % ring) * msg  # noqa: E731
        wait_until(lambda: u64(credit) >= base, self.timeout_s, "credit of the previous call", SPACE, peer)
        for c0 in range(0, count, chunk):
            cnt = min(chunk, count - c0)
            e = base + c0 + cnt
            wait_until(lambda e=e: e <= ring or u64(credit) >= e - ring, self.timeout_s,
                       f"rank {rank}: ring space to node {n}", SPACE, peer)  # fmt: skip
            for i in range(c0, c0 + cnt):
                stage(i, base + i, area + stage_at(n, base + i))
            head = min(cnt, ring - (base + c0) % ring)
            writes = [(area + stage_at(n, base + c0), recv_at(me, base + c0), head * msg)]
            if head < cnt:  # the chunk wraps: its rest from slot 0
                writes.append((area + stage_at(n, 0), recv_at(me, 0), (cnt - head) * msg))
            self.poster(rank, peer).post(writes, (tail, e, 64), self.timeout_s)
        set_u64(end["done"], base + count)

    def receive_stream(self, rank, end: dict, tail: int, credit: int, consume, chunk_done=lambda done: None) -> None:
        """ht_inter.cuh receive_stream: ``tail``: the word read here; ``credit``: the peer's word offset;
        ``consume(i, seq, message bytes)`` for each message, ``chunk_done(messages done)`` before each credit."""
        area, (roff, ring, msg), n, peer = end["area"], end["rings"], end["n"], end["peer"]
        base, count, chunk = u64(end["done"]), end["count"], end["chunk"]
        for c0 in range(0, count, chunk):
            cnt = min(chunk, count - c0)
            wait_until(lambda e=base + c0 + cnt: u64(tail) >= e, self.timeout_s,
                       f"rank {rank}: messages from node {n}", ARRIVAL, peer)  # fmt: skip
            for i in range(c0, c0 + cnt):
                consume(i, base + i, mem(area + roff + (2 * n * ring + (base + i) % ring) * msg, msg).copy())
            chunk_done(c0 + cnt)
            self.poster(rank, peer).post([], (credit, base + c0 + cnt, 64), self.timeout_s)
        set_u64(end["done"], base + count)

    @staticmethod
    def nodes(rank, defines, args):
        """Unpacked as ht_inter.cuh's Nodes: node of each rank, the peer of each node, each node's ranks."""
        R, N = defines["EPK_NUM_RANKS"], defines["EPK_NUM_NODES"]
        import fake_cupy as F

        node_of = [int(v) for v in F._array(args["node_of"])._a[:R]]
        peers = [int(v) for v in F._array(args["peer_of_node"])._a[:N]]
        members = [[r for r in range(R) if node_of[r] == n] for n in range(N)]
        return node_of, peers, members

    # ---- ht_inter_notify.cu ----
    @recorded
    def notify(self, a, d):
        import fake_cupy as F

        rank, T = int(a["rank"]), int(a["num_tokens"])
        epoch = self.begin_epoch(rank)
        R, N = d["EPK_NUM_RANKS"], d["EPK_NUM_NODES"]
        node_of, peers, members = self.nodes(rank, d, a)
        me = node_of[rank]
        p = epoch & 1
        in_rank = F._array(a["is_token_in_rank"])._a.reshape(T, R)
        per_rank = F._array(a["num_tokens_per_rank"])._a
        per_expert = F._array(a["num_tokens_per_expert"])._a
        rdma = F._array(a["num_tokens_per_rdma_rank"])._a
        E, topk = int(a["num_experts"]), int(a["topk"])
        idx = F._array(a["topk_idx"])._a.reshape(T, topk)
        E_loc = E // R
        node_msgs = np.zeros(MAXN, np.int32)
        for n in range(N):
            if n != me:
                node_msgs[n] = int(in_rank[:, [r for r in range(R) if node_of[r] == n]].any(axis=1).sum())
        bad = np.flatnonzero(((idx < -1) | (idx >= E)).reshape(-1))
        layout_ok = all(int(rdma[n]) == int(node_msgs[n]) for n in range(N) if n != me)
        shape = [int(a["row_bytes"]), topk, int(a["scale_cols"]), E_loc, 0 if len(bad) else 1, int(layout_ok)]
        mine = self.area(rank)
        for dst in range(R):
            body = np.zeros(ENTRY - 64, np.uint8)
            body[: 4 * R].view(np.int32)[:] = per_rank
            body[E_SHAPE - 64 : E_SHAPE - 64 + 24].view(np.int32)[:] = shape
            body[E_NODE_MSGS - 64 : E_NODE_MSGS - 64 + 4 * MAXN].view(np.int32)[:] = node_msgs
            body[E_EXPERTS - 64 : E_EXPERTS - 64 + 4 * E_loc].view(np.int32)[:] = per_expert[
                dst * E_loc : (dst + 1) * E_loc
            ]
            at = ENTRIES + (p * MAXR + rank) * ENTRY
            if node_of[dst] == me:
                ctypes.memmove(self.area(dst) + at + 64, body.ctypes.data, body.nbytes)
                ctypes.c_int32.from_address(self.area(dst) + at).value = epoch
            else:
                stage = mine + STAGES + (p * MAXR + dst) * ENTRY
                ctypes.memmove(stage + 64, body.ctypes.data, body.nbytes)
                self.poster(rank, dst).post([(stage + 64, at + 64, ENTRY - 64)], (at, epoch, 32), self.timeout_s)
        for s in range(R):
            flag = mine + ENTRIES + (p * MAXR + s) * ENTRY
            wait_until(lambda f=flag: i32(f) == epoch, self.timeout_s, f"rank {rank}: notify entry of rank {s}",
                       K.get("EPK_ERR_PHASE_HT_NOTIFY"), s)  # fmt: skip
        entry = lambda s, off, n: mem(mine + ENTRIES + (p * MAXR + s) * ENTRY + off, 4 * n).view(np.int32)  # noqa: E731
        rows = np.stack([entry(s, E_ROWS, R) for s in range(R)])
        prefix = np.cumsum(rows, axis=0).astype(np.int32)
        F._array(a["rank_prefix_matrix"])._a[...] = prefix.reshape(F._array(a["rank_prefix_matrix"])._a.shape)
        host = mem(int(a["host_out"]), 4 * K.get("EPK_HT_NOTIFY_OUT_WORDS")).view(np.int32)
        host[1] = int(rows[:, rank].sum())
        host[2 : 2 + R] = rows[:, rank]
        host[OUT["EXPERTS"] : OUT["EXPERTS"] + E_loc] = sum(entry(s, E_EXPERTS, E_loc) for s in range(R))
        mismatch = [(s, f) for s in range(R) for f in range(6) if entry(s, E_SHAPE, 6)[f] != shape[f]]
        sh = OUT["SHAPE"]
        host[sh : sh + 4] = [mismatch[0][0] + 1, mismatch[0][1], entry(*mismatch[0][:1], E_SHAPE, 6)[mismatch[0][1]],
                             shape[mismatch[0][1]]] if mismatch else [0, 0, 0, 0]  # fmt: skip
        bi = OUT["BAD_INDEX"]
        host[bi : bi + 2] = [int(bad[0]) + 1, int(idx.reshape(-1)[bad[0]])] if len(bad) else [0, 0]
        host[OUT["LAYOUT_OK"]] = int(layout_ok)
        counts = F._array(a["node_counts"])._a
        for n in range(MAXN):
            sent = int(node_msgs[n]) if n < N else 0
            fwd = int(entry(peers[n], E_NODE_MSGS, MAXN)[me]) if n < N and n != me else 0
            counts[n] = host[OUT["NODES"] + n] = sent
            counts[MAXN + n] = host[OUT["NODES"] + MAXN + n] = fwd
        base = [int(rows[:rank, j].sum()) for j in range(R)]
        send_slot = F._array(a["send_slot"])._a.reshape(T, R)
        node_slot = F._array(a["node_slot"])._a.reshape(T, N)
        node_tokens = F._array(a["node_tokens"])._a.reshape(N, -1)
        for j in range(R):
            col = in_rank[:, j]
            send_slot[:, j] = np.where(col, base[j] + np.cumsum(col) - 1, -1)
        for n in range(N):
            col = in_rank[:, [r for r in range(R) if node_of[r] == n]].any(axis=1) if n != me else np.zeros(T, bool)
            node_slot[:, n] = np.where(col, np.cumsum(col) - 1, -1)
            node_tokens[n, : int(col.sum())] = np.flatnonzero(col)
        self.end_epoch(rank, epoch)
        host[0] = int(a["call"])

    # ---- ht_inter_dispatch.cu ----
    @recorded
    def dispatch(self, a, d):
        import fake_cupy as F

        rank, T = int(a["rank"]), int(a["num_tokens"])
        epoch = self.begin_epoch(rank)
        if ptr(a["notify_out"]):  # num_worst_tokens: notify's verdict, as the kernel reads it
            v = mem(ptr(a["notify_out"]), 4 * K.get("EPK_HT_NOTIFY_OUT_WORDS")).view(np.int32)
            sh = OUT["SHAPE"]
            if v[sh] or v[OUT["BAD_INDEX"]] or not v[OUT["LAYOUT_OK"]]:
                self.backends[rank].rt.error_record[:7] = [1, K.get("EPK_ERR_CODE_BAD_INDEX"), rank,
                                                           K.get("EPK_ERR_PHASE_HT_SHAPE"), max(int(v[sh]) - 1, 0),
                                                           int(v[sh + 2]), int(v[sh + 3])]  # fmt: skip
                return
        R, N, topk = d["EPK_NUM_RANKS"], d["EPK_NUM_NODES"], d["EPK_TOPK"]
        row_bytes, S, E_loc, meta_on = (
            d["EPK_ROW_BYTES"],
            d["EPK_SCALE_COLS"],
            d["EPK_NUM_LOCAL_EXPERTS"],
            d["EPK_WITH_META"],
        )
        node_of, peers, members = self.nodes(rank, d, a)
        me, local = node_of[rank], members[node_of[rank]]
        x = mem(ptr(a["x"]), T * row_bytes).reshape(T, row_bytes)
        scales = mem(ptr(a["x_scales"]), T * S * 4).view(np.float32).reshape(T, S) if S else None
        idx = F._array(a["topk_idx"])._a.reshape(T, topk) if meta_on else None
        w = F._array(a["topk_weights"])._a.reshape(T, topk) if meta_on and int(ptr(a["topk_weights"])) else None
        send_slot = F._array(a["send_slot"])._a.reshape(T, R)
        node_tokens = F._array(a["node_tokens"])._a.reshape(N, -1)
        counts = F._array(a["node_counts"])._a
        fwd_cap = int(a["fwd_cap"])
        fwd = F._array(a["fwd_slots"])._a.reshape(N, fwd_cap, 8) if fwd_cap else None
        outs = {k: int(a[k]) for k in ("out_x", "out_scales", "out_idx", "out_weights", "out_src")}
        outs["rows"] = int(a["out_rows"])
        table = self.publish(epoch, "dispatch", rank, outs, local, K.get("EPK_ERR_PHASE_HT_DISPATCH_ADDRS"))
        msg = lay.dispatch_msg_bytes(topk, S, row_bytes)
        meta = lay.dispatch_meta_bytes(topk, S)
        ring, chunk, roff = int(a["ring"]), int(a["chunk"]), int(a["ring_offset"])
        area = self.area(rank)

        def write_row(dst, slot, row, sc, e, wt, token):
            o = table[dst]
            assert 0 <= slot < o["rows"], (rank, dst, slot, o["rows"])
            mem(o["out_x"] + slot * row_bytes, row_bytes)[:] = row
            if S:
                mem(o["out_scales"] + slot * S * 4, S * 4)[:] = sc.view(np.uint8)
            if meta_on:
                loc = np.where((e >= dst * E_loc) & (e < (dst + 1) * E_loc), e - dst * E_loc, -1).astype(np.int64)
                mem(o["out_idx"] + slot * topk * 8, topk * 8)[:] = loc.view(np.uint8)
                mem(o["out_weights"] + slot * topk * 4, topk * 4)[:] = np.where(loc >= 0, wt, 0).astype(
                    np.float32).view(np.uint8)  # fmt: skip
                ctypes.c_int32.from_address(o["out_src"] + 4 * slot).value = token

        def copier():
            for t in range(T):
                for dst in local:
                    if send_slot[t, dst] >= 0:
                        write_row(dst, int(send_slot[t, dst]), x[t], scales[t] if S else None,
                                  idx[t] if meta_on else None, w[t] if w is not None else 0, t)  # fmt: skip

        def end_of(n, done, count):
            return dict(area=area, rings=(roff, ring, msg), n=n, my_node=me, peer=peers[n], count=count,
                        chunk=chunk, done=area + done + 8 * n)  # fmt: skip

        def sender(n):
            def stage(i, seq, at):
                t = int(node_tokens[n, i])
                m = mem(at, msg)
                m[:16] = 0
                m[:4].view(np.uint32)[0] = seq & 0xFFFFFFFF
                m[4:8].view(np.int32)[0] = t
                m[16:48].view(np.int32)[:] = [int(send_slot[t, r]) for r in members[n]] + [-1] * (8 - len(members[n]))
                if meta_on:
                    m[48 : 48 + 4 * topk].view(np.int32)[:] = idx[t]
                    m[48 + 4 * topk : 48 + 8 * topk].view(np.float32)[:] = w[t] if w is not None else 0
                if S:
                    m[48 + 8 * topk : 48 + 8 * topk + 4 * S].view(np.float32)[:] = scales[t]
                m[meta:] = x[t]

            self.send_stream(rank, end_of(n, SENT, int(counts[n])), area + CREDIT + 8 * n, TAIL + 8 * me, stage)

        def forwarder(n):
            def forward(i, seq, m):
                token = int(m[4:8].view(np.int32)[0])
                assert int(m[:4].view(np.uint32)[0]) == seq & 0xFFFFFFFF, (rank, n, i)
                slots = m[16:48].view(np.int32)
                if fwd is not None:
                    fwd[n, i] = [s if j < len(local) else -1 for j, s in enumerate(slots)]
                e = m[48 : 48 + 4 * topk].view(np.int32).astype(np.int64) if meta_on else None
                wt = m[48 + 4 * topk : 48 + 8 * topk].view(np.float32) if meta_on else None
                sc = m[48 + 8 * topk : 48 + 8 * topk + 4 * S].view(np.float32) if S else None
                for j, dst in enumerate(local):
                    if slots[j] >= 0:
                        write_row(dst, int(slots[j]), m[meta:], sc, e, wt, token)

            end = end_of(n, RECEIVED, int(counts[MAXN + n]))
            self.receive_stream(rank, end, area + TAIL + 8 * n, CREDIT + 8 * me, forward)

        jobs = [copier] + [lambda n=n: sender(n) for n in range(N) if n != me]
        jobs += [lambda n=n: forwarder(n) for n in range(N) if n != me]
        _run(jobs)
        self.finish(epoch, "dispatch", rank, local, K.get("EPK_ERR_PHASE_HT_DISPATCH_DONE"))

    # ---- ht_inter_combine.cu ----
    @recorded
    def combine(self, a, d):
        import fake_cupy as F

        rank, T = int(a["rank"]), int(a["num_tokens"])
        epoch = self.begin_epoch(rank)
        R, N, topk, H = d["EPK_NUM_RANKS"], d["EPK_NUM_NODES"], d["EPK_TOPK"], d["EPK_HIDDEN"]
        has_w = bool(d["EPK_HAS_WEIGHTS"])
        node_of, peers, members = self.nodes(rank, d, a)
        me, local = node_of[rank], members[node_of[rank]]
        send_slot = F._array(a["send_slot"])._a.reshape(T, R)
        node_slot = F._array(a["node_slot"])._a.reshape(T, N)
        counts = F._array(a["node_counts"])._a
        fwd_cap = int(a["fwd_cap"])
        fwd = F._array(a["fwd_slots"])._a.reshape(N, fwd_cap, 8)
        table = self.publish(epoch, "combine", rank, (int(a["in_x"]), int(a["in_weights"])), local,
                             K.get("EPK_ERR_PHASE_HT_COMBINE_ADDRS"))  # fmt: skip
        msg, meta = lay.combine_msg_bytes(topk, H), lay.combine_msg_bytes(topk, 0)
        ring, chunk, roff = int(a["ring"]), int(a["chunk"]), int(a["ring_offset"])
        area = self.area(rank)
        partials = {}

        def row_of(dst, slot):
            return mem(table[dst][0] + slot * 2 * H, 2 * H).view(BF16).astype(np.float32)

        def w_of(dst, slot):
            return mem(table[dst][1] + slot * 4 * topk, 4 * topk).view(np.float32)

        def partial(slots_by_rank):  # float32 from +0.0 in rank order, then BF16 (weights stay float32)
            acc, wacc = np.zeros(H, np.float32), np.zeros(topk, np.float32)
            for dst, slot in slots_by_rank:
                acc = (acc + row_of(dst, slot)).astype(np.float32)
                if has_w:
                    wacc = (wacc + w_of(dst, slot)).astype(np.float32)
            return acc.astype(BF16), wacc

        def end_of(n, done, count):
            return dict(area=area, rings=(roff, ring, msg), n=n, my_node=me, peer=peers[n], count=count,
                        chunk=chunk, done=area + done + 8 * n)  # fmt: skip

        def forwarder(n):
            def stage(i, seq, at):
                row, wt = partial([(dst, int(fwd[n, i, j])) for j, dst in enumerate(local) if fwd[n, i, j] >= 0])
                m = mem(at, msg)
                m[:16] = 0
                m[:4].view(np.uint32)[0] = seq & 0xFFFFFFFF
                m[16 : 16 + 4 * topk].view(np.float32)[:] = wt
                m[meta:] = row.view(np.uint8)

            end = end_of(n, C_SENT, int(counts[MAXN + n]))
            self.send_stream(rank, end, area + C_CREDIT + 8 * n, C_TAIL + 8 * me, stage)

        def receiver(n):
            def copy(i, seq, m):
                assert int(m[:4].view(np.uint32)[0]) == seq & 0xFFFFFFFF, (rank, n, i)
                partials[(n, i)] = (m[meta:].view(BF16).astype(np.float32), m[16 : 16 + 4 * topk].view(np.float32))

            end = end_of(n, C_RECEIVED, int(counts[n]))
            self.receive_stream(rank, end, area + C_TAIL + 8 * n, C_CREDIT + 8 * me, copy)

        fwd_jobs = [lambda n=n: forwarder(n) for n in range(N) if n != me]
        _run(fwd_jobs + [lambda n=n: receiver(n) for n in range(N) if n != me])
        out = F._array(a["out_x"])._a.reshape(T, H)
        out_w = F._array(a["out_weights"])._a.reshape(T, topk) if has_w else None
        b0 = F._array(a["bias0"])._a.reshape(T, H) if int(ptr(a["bias0"])) else None
        b1 = F._array(a["bias1"])._a.reshape(T, H) if int(ptr(a["bias1"])) else None
        for t in range(T):
            acc = np.zeros(H, np.float32)
            for b in (b0, b1):
                if b is not None:
                    acc = (acc + b[t].astype(np.float32)).astype(np.float32)
            wacc = np.zeros(topk, np.float32)
            for n in range(N):
                if n == me:
                    slots = [(dst, int(send_slot[t, dst])) for dst in local if send_slot[t, dst] >= 0]
                    if not slots:
                        continue
                    row, wt = partial(slots)
                    acc = (acc + row.astype(np.float32)).astype(np.float32)
                    wacc = (wacc + wt).astype(np.float32)
                elif node_slot[t, n] >= 0:
                    row, wt = partials[(n, int(node_slot[t, n]))]
                    acc = (acc + row).astype(np.float32)
                    wacc = (wacc + wt).astype(np.float32)
            out[t] = acc.astype(BF16)
            if out_w is not None:
                out_w[t] = wacc
        self.finish(epoch, "combine", rank, local, K.get("EPK_ERR_PHASE_HT_COMBINE_DONE"))


def _run(jobs) -> None:
    """Each job in a thread (a kernel's blocks); the first failure raised after all ended."""
    errors = []

    def wrap(job):
        try:
            job()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(j,), daemon=True) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
