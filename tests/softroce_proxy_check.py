"""The PROXY route's verbs layer against a real kernel RDMA provider: soft-RoCE (``rdma_rxe``), run INSIDE the QEMU
guest of scripts/softroce_guest.sh (tests/test_softroce.py starts it; it is no pytest module itself).

    python tests/softroce_proxy_check.py [--device rxe0] [--seed N]

Checks, each printed as a ``CHECK`` line, then ``SOFTROCE_PROXY_PASS`` (exit 0) or a traceback (exit 1):
1. burst: two in-process ranks (a VerbsNic each, 2 RC QPs per peer, loopback included, connected by connect_mesh
   over a threaded allgather); triggers pre-filled into host-memory TriggerFifos before the proxy starts, so one
   burst posts one batch per QP: exactly one ibv_post_send and one completion per QP, destination bytes exact.
2. stream: the same ranks, producer threads pushing RDMA writes of 0 B .. 192 KiB and fetch-adds through 64-slot
   FIFOs while 2 proxy threads per rank drain them into 16-request send queues (batches cut), then FLUSH; every
   destination byte and counter exact; per QP one completion per post (= one signaled request per batch).
3. processes: rank 1 in a child process (the same script, ``--child``), the allgather over a socketpair; each rank
   writes into the other's memory; both check what they received.
4. error: a write with a bad rkey ends as a ProxyError naming the peer, the QP and IBV_WC_REM_ACCESS_ERR within
   the deadline; the producer waiting on its flush is released with a ProxyError too.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np

from epkern import _verbs_cffi as V
from epkern._verbs_cffi._cdef import CONSTANTS
from epkern.nic import FifoProducer, PeerRoute, ProxyError, ProxyService, TriggerFifo
from epkern.nic.verbs import VerbsNic
from thread_allgather import threaded_allgathers  # beside this script

TIMEOUT_S = 60.0  # every wait below; the whole script is bounded by WATCHDOG_S
WATCHDOG_S = 240.0
# the rights this test needs and no more: local writes (fetch-add results), remote writes and remote atomics
ACCESS = (
    CONSTANTS["IBV_ACCESS_LOCAL_WRITE"] | CONSTANTS["IBV_ACCESS_REMOTE_WRITE"] | CONSTANTS["IBV_ACCESS_REMOTE_ATOMIC"]
)
PHASES = {"burst": 1, "stream": 2, "procs": 3}  # salts of the plans (stable across processes, unlike hash())
SIZES = [0, 1, 3, 8, 63, 64, 65, 127, 1000, 4096, 4097, 65536, 196608]
AREA = 4 << 20  # each rank's send area and receive area
COUNTERS = 64  # 8-byte counters after the receive area


def check(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(what)
    print(f"CHECK {what}", flush=True)


# --- allgathers ---------------------------------------------------------------------------------------------------


def socket_allgather(sock: socket.socket, rank: int):
    """Two ranks over a connected socket: each sends its blob (length-prefixed) and reads the other's."""
    sock.settimeout(TIMEOUT_S)

    def recv_exact(n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("the other rank closed the socket")
            out += chunk
        return out

    def allgather(data: bytes) -> list[bytes]:
        sock.sendall(struct.pack("<Q", len(data)) + bytes(data))
        other = recv_exact(struct.unpack("<Q", recv_exact(8))[0])
        return [bytes(data), other] if rank == 0 else [other, bytes(data)]

    return allgather


# --- one rank -----------------------------------------------------------------------------------------------------


class Rank:
    """One rank: a VerbsNic on the device, [send area | receive area | counters] registered once, ``nqps`` RC QPs
    (own CQs, ``max_send_wr`` each) towards every rank, connected with connect_mesh; routes to every peer's MR."""

    def __init__(self, device: str, rank: int, n: int, allgather, seed: int, nqps: int = 2, max_send_wr: int = 16):
        self.rank, self.n, self.allgather, self.nqps = rank, n, allgather, nqps
        self.nic = VerbsNic(device, name=f"rank{rank}")
        self.buf = np.zeros(2 * AREA + 8 * COUNTERS, dtype=np.uint8)
        self.buf[:AREA] = np.random.default_rng([seed, rank]).integers(0, 256, AREA, dtype=np.uint8)
        self.mr = self.nic.reg_mr(self.buf, access=ACCESS)
        self.qps = [[self.nic.create_qp(self.nic.create_cq(64), max_send_wr) for _ in range(nqps)] for _ in range(n)]
        self.nic.connect_mesh(allgather, rank, self.qps)
        blobs = allgather(struct.pack("<QI", self.mr.addr, self.mr.rkey))
        self.remote = [struct.unpack("<QI", b) for b in blobs]
        self.last_stats = None  # the ProxyStats of the last phase

    def routes(self, bad_rkey_to: int | None = None) -> list[PeerRoute]:
        return [
            PeerRoute(self.qps[p], addr, rkey + (1000 if p == bad_rkey_to else 0))
            for p, (addr, rkey) in enumerate(self.remote)
        ]

    def counters(self) -> dict[str, int]:
        c = self.nic.counters()
        return dict(wqes=c.wqes, posts=c.doorbells, completions=c.cqes, errors=c.errors, bytes=c.bytes)

    def close(self) -> None:
        self.nic.close()


def plan(seed: int, src: int, n: int, fifo: int, nfifos: int, salt: int, count: int, nqps: int) -> list[tuple]:
    """FIFO ``fifo`` of rank ``src``: ``count`` ops; writes go to a slice of every destination's receive area that
    belongs to (src, fifo) alone; every 7th op is a fetch-add on a counter. Every rank can rebuild every plan."""
    rng = np.random.default_rng([seed, src, fifo, salt])
    slice_bytes = AREA // (n * nfifos)
    base = (src * nfifos + fifo) * slice_bytes
    pos = [0] * n
    ops = []
    for k in range(count):
        dst, qp = int(rng.integers(0, n)), int(rng.integers(0, nqps))
        if k % 7 == 6:
            ops.append(
                ("add", dst, qp, 8 * int(rng.integers(0, COUNTERS)), int(rng.integers(0, 1 << 64, dtype=np.uint64)))
            )
            continue
        length = SIZES[int(rng.integers(0, len(SIZES)))]
        src_off = int(rng.integers(0, AREA - length + 1))
        if pos[dst] + length > slice_bytes:  # the slice is full: a write of no bytes at its start
            ops.append(("write", dst, qp, src_off, base, 0))
            continue
        ops.append(("write", dst, qp, src_off, base + pos[dst], length))
        pos[dst] += length + int(rng.integers(0, 16))
    return ops


def expected_receive(seed: int, me: int, n: int, plans: dict) -> tuple[np.ndarray, np.ndarray]:
    """What rank ``me``'s receive area and counters must hold after every rank ran ``plans[(src, fifo)]``."""
    area = np.zeros(AREA, dtype=np.uint8)
    ctrs = [0] * COUNTERS
    sends = {}
    for (src, _fifo), ops in plans.items():
        if src not in sends:
            sends[src] = np.random.default_rng([seed, src]).integers(0, 256, AREA, dtype=np.uint8)
        for op in ops:
            if op[1] != me:
                continue
            if op[0] == "write":
                _, _, _, src_off, dst_off, length = op
                area[dst_off : dst_off + length] = sends[src][src_off : src_off + length]
            else:
                ctrs[op[3] // 8] = (ctrs[op[3] // 8] + op[4]) % (1 << 64)
    return area, np.array(ctrs, dtype=np.uint64)


def push(fifo: TriggerFifo, ops: list[tuple], flush: bool = True) -> int | None:
    prod = FifoProducer(fifo, timeout_s=TIMEOUT_S)
    for op in ops:
        if op[0] == "write":
            _, dst, qp, src_off, dst_off, length = op
            prod.write(dst, qp, src_off, AREA + dst_off, length)
        else:
            _, dst, qp, off, add = op
            prod.atomic_add(dst, qp, 2 * AREA + off, add)
    return prod.flush() if flush else None


def run_rank(rank: Rank, seed: int, phase: str, count: int, nfifos: int = 2) -> dict[tuple, list]:
    """One phase of traffic from ``rank``; returns every rank's plans (to compute what this rank receives)."""
    n = rank.n
    plans = {
        (s, f): plan(seed, s, n, f, nfifos, PHASES[phase], count, rank.nqps) for s in range(n) for f in range(nfifos)
    }
    burst = phase == "burst"
    fifos = [TriggerFifo(256 if burst else 64, name=f"r{rank.rank}{phase}{f}") for f in range(nfifos)]
    # burst: one proxy thread drains both FIFOs before posting, so each QP gets its whole group at once
    svc = ProxyService(
        fifos, local=rank.mr, peers=rank.routes(), num_threads=1 if burst else 2, timeout_s=TIMEOUT_S, start=not burst
    )
    try:
        if burst:
            tickets = [push(f, plans[rank.rank, i]) for i, f in enumerate(fifos)]
            svc.start()
            for f, t in zip(fifos, tickets, strict=True):
                FifoProducer(f, timeout_s=TIMEOUT_S).wait_flushed(t)
        else:
            errors = []

            def produce(i):
                try:
                    t = push(fifos[i], plans[rank.rank, i])
                    FifoProducer(fifos[i], timeout_s=TIMEOUT_S).wait_flushed(t)
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(e)

            threads = [threading.Thread(target=produce, args=(i,)) for i in range(nfifos)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(TIMEOUT_S)
            if errors or any(t.is_alive() for t in threads):
                raise AssertionError(f"rank {rank.rank} producers: {errors or 'still running at the deadline'}")
    finally:
        svc.close()
    rank.last_stats = svc.stats()
    return plans


def verify(rank: Rank, seed: int, plans: dict, what: str) -> None:
    area, ctrs = expected_receive(seed, rank.rank, rank.n, plans)
    got = rank.buf[AREA : 2 * AREA]
    diff = np.flatnonzero(got != area)
    check(
        diff.size == 0,
        f"{what}: rank {rank.rank} receive area ({AREA} bytes) exact"
        + (f" (first bad byte {diff[0]})" if diff.size else ""),
    )
    got_c = rank.buf[2 * AREA :].view(np.uint64)
    check(np.array_equal(got_c, ctrs), f"{what}: rank {rank.rank} {COUNTERS} fetch-add counters exact mod 2^64")


def check_counters(rank: Rank, before: dict[str, int], what: str) -> None:
    """The NIC's counters since ``before`` against the proxy's stats: one completion per ibv_post_send (only the
    batch's last request is signaled), one post per batch, every trigger one work request, no error."""
    delta = {k: v - before[k] for k, v in rank.counters().items()}
    st = rank.last_stats
    check(
        delta["errors"] == 0
        and delta["completions"] == delta["posts"] == st.doorbells
        and delta["wqes"] == st.wqes == st.writes + st.atomics,
        f"{what}: rank {rank.rank} {st.writes} writes + {st.atomics} fetch-adds, {delta['bytes']} bytes, in "
        f"{delta['posts']} ibv_post_send calls with one completion each (one signaled request per batch), no error",
    )


def reset(rank: Rank) -> None:
    rank.buf[AREA:] = 0


# --- the phases ---------------------------------------------------------------------------------------------------


def in_process_phases(device: str, seed: int) -> None:
    gathers = threaded_allgathers(2, TIMEOUT_S)
    ranks: list = [None, None]

    def make(r):
        ranks[r] = Rank(device, r, 2, gathers[r], seed)

    threads = [threading.Thread(target=make, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    check(all(ranks), "two in-process ranks on " + device + ": 2 RC QPs per peer (loopback included) connected")
    try:
        # burst: 2 x 8 ops over 4 QPs, so no QP's group outgrows its 16-request send queue
        for phase, count in (("burst", 8), ("stream", 300)):
            for r in ranks:
                reset(r)
            before = [r.counters() for r in ranks]
            t0 = time.monotonic()
            plans = [None, None]

            def go(r, phase=phase, count=count, out=plans):
                out[r] = run_rank(ranks[r], seed, phase, count)

            threads = [threading.Thread(target=go, args=(r,)) for r in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(2 * TIMEOUT_S)
            check(all(plans), f"{phase}: both ranks' proxies flushed in {time.monotonic() - t0:.2f} s")
            for r in ranks:
                verify(r, seed, plans[r.rank], phase)
                check_counters(r, before[r.rank], phase)
                st = r.last_stats
                if phase == "burst":
                    per_qp = [(q.counters.doorbells, q.counters.cqes) for row in r.qps for q in row if q.counters.wqes]
                    check(
                        all(c == (1, 1) for c in per_qp),
                        f"burst: rank {r.rank}: each of its {len(per_qp)} QPs used got exactly one post and one "
                        "completion",
                    )
                else:
                    check(st.doorbells > 8, f"stream: rank {r.rank}: groups cut to the 16-request send queues")
    finally:
        for r in ranks:
            if r is not None:
                r.close()


def child(device: str, seed: int, fd: int) -> None:
    sock = socket.socket(fileno=fd)
    rank = Rank(device, 1, 2, socket_allgather(sock, 1), seed, nqps=1)
    try:
        process_rank(rank, seed)
    finally:
        rank.close()


def process_rank(rank: Rank, seed: int) -> None:
    """Both processes: traffic into the other rank (and a loopback QP), then the receive checks."""
    before = rank.counters()
    plans = run_rank(rank, seed, "procs", 200, nfifos=1)
    rank.allgather(b"flushed")  # after it, the other rank's writes into this one have completed
    verify(rank, seed, plans, "processes")
    check_counters(rank, before, "processes")
    rank.allgather(b"checked")


def two_process_phase(device: str, seed: int) -> None:
    a, b = socket.socketpair()
    env = dict(os.environ)
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--device",
            device,
            "--seed",
            str(seed),
            "--child",
            str(b.fileno()),
        ],
        pass_fds=[b.fileno()],
        env=env,
    )
    b.close()
    try:
        rank = Rank(device, 0, 2, socket_allgather(a, 0), seed, nqps=1)
        try:
            process_rank(rank, seed)
        finally:
            rank.close()
        rc = proc.wait(TIMEOUT_S)
        check(rc == 0, f"processes: rank 1 (pid {proc.pid}) ran in its own process and exited 0")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        a.close()


def error_phase(device: str, seed: int) -> None:
    rank = Rank(device, 0, 1, lambda data: [bytes(data)], seed, nqps=1)  # one rank: a loopback QP pair
    try:
        f = TriggerFifo(16, name="err")
        svc = ProxyService([f], local=rank.mr, peers=rank.routes(bad_rkey_to=0), num_threads=1, timeout_s=TIMEOUT_S)
        prod = FifoProducer(f, timeout_s=TIMEOUT_S)
        t0 = time.monotonic()
        for k in range(4):
            prod.write(0, 0, 64 * k, AREA + 64 * k, 64)
        ticket = prod.flush()
        try:
            prod.wait_flushed(ticket)
            raise AssertionError("a write with a bad rkey was flushed as if it had landed")
        except ProxyError:
            waited = time.monotonic() - t0
        try:
            svc.close()
            raise AssertionError("the proxy service closed without reporting the bad rkey")
        except ProxyError as e:
            msg = str(e)
        q = rank.qps[0][0]
        print(f"error message: {msg}", flush=True)
        check(
            f"peer 0 qp 0 (qpn {q.qpn})" in msg and "IBV_WC_REM_ACCESS_ERR" in msg and "remote access error" in msg,
            "error: the bad rkey ended as a ProxyError naming peer, QP and IBV_WC_REM_ACCESS_ERR",
        )
        check(waited < TIMEOUT_S, f"error: the waiting producer was released after {waited:.2f} s (no hang)")
        check(q.state == "ERROR" and not rank.buf[AREA : AREA + 256].any(), "error: QP in ERROR, nothing written")
    finally:
        rank.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="rxe0")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)  # a hang anywhere ends the run with a traceback
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    if args.child is not None:
        child(args.device, seed, args.child)
        return 0
    t0 = time.monotonic()
    ok, why = V.rdma_available()
    check(ok and args.device in why, f"device: {why}; seed {seed}")
    in_process_phases(args.device, seed)
    two_process_phase(args.device, seed)
    error_phase(args.device, seed)
    print(f"SOFTROCE_PROXY_PASS device={args.device} seed={seed} time={time.monotonic() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
