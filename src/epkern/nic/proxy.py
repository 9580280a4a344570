"""Host proxy service of the PROXY transport: N threads drain GPU → host trigger FIFOs and post RDMA work.

Each :class:`~epkern.nic.fifo.TriggerFifo` is owned by one proxy thread (FIFO ``i`` by thread ``i % N``). A thread
works in *bursts*: it copies out every published record of each of its FIFOs (up to ``max_burst`` per FIFO, and
stopping at a FLUSH), hands the slots back to the producers, groups the work by queue pair (order kept per QP),
and posts each QP's group as one batch: every work request unsignaled except the batch's last, then ONE doorbell.
So a burst costs one doorbell per (peer, QP), unless the send queue has less free room than the batch, in which
case the batch is cut into queue-sized pieces. Completions (one per batch) are polled to retire the slots. A FLUSH
records, per QP the FIFO used since the previous flush, the producer index after its last request; once every one
of those has completed, the thread stores ``ticket + 1`` into the FIFO's ``flushed`` word (what a kernel polls).

How a batch reaches a QP is a :class:`~epkern.nic.posting.BatchPoster`: mlx5 WQEs built by :mod:`epkern.nic.wqe`
written into the send ring and one ``ring_doorbell`` (the :class:`~epkern.nic.emulated.QueuePair` interface:
``sq``, ``wqe_cnt``, ``qpn``, ``cq``, ``ring_doorbell``; emulated and mlx5 QPs), or a chain of standard verbs work
requests posted with one ``ibv_post_send`` (:class:`~epkern.nic.verbs.VerbsQueuePair`). Each QP needs its own CQ.
Threads may share a QP (a lock per QP), but giving each thread its
own QP per peer (trigger field ``qp``) avoids the contention.

Failures — a malformed trigger, an unknown peer/QP index, an error CQE (the NIC's fault message is quoted, with
the peer, QP index and QP number), a deadline — are recorded, set every FIFO's ``error`` word (so producers stop
waiting) and are raised by :meth:`ProxyService.check` and :meth:`ProxyService.close`. After a failure the threads
keep consuming and dropping triggers so that producers never block on a dead service. Idle threads sleep with an
exponential backoff (``idle_min_s`` .. ``idle_max_s``); every wait has a deadline (``timeout_s``, default
``EPKERN_TIMEOUT_S``).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .. import _env
from ..errors import ConfigError
from .fifo import MAX_WRITE_BYTES, ProxyError, ProxyTimeoutError, Trigger, TriggerFifo, TriggerOp
from .posting import PostFailed, WorkItem, batch_poster

__all__ = ["LocalRegion", "PeerRoute", "ProxyService", "ProxyStats"]

_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class LocalRegion:
    """The proxy's source region: trigger ``local_offset`` is relative to ``addr``; ``lkey`` names it on the NIC
    of every QP used. A registered ``MemoryRegion`` works as well (same attributes)."""

    addr: int
    lkey: int


@dataclass
class PeerRoute:
    """How to reach one peer: ``qps[i]`` serves trigger field ``qp == i``; ``remote_addr``/``rkey`` name the peer's
    registered region that ``remote_offset`` is relative to."""

    qps: Sequence
    remote_addr: int
    rkey: int


@dataclass
class ProxyStats:
    triggers: int = 0
    writes: int = 0
    atomics: int = 0
    flushes: int = 0
    wqes: int = 0
    doorbells: int = 0
    bursts: int = 0


class _QpState:
    """Posting state of one QP: producer index, retired index, the batches in flight. Guarded by ``lock``. How a
    batch reaches the QP is its :class:`~epkern.nic.posting.BatchPoster`'s business (mlx5 ring or verbs)."""

    def __init__(self, qp, peer: int, index: int):
        self.qp = qp
        self.poster = batch_poster(qp)
        self.peer = peer
        self.index = index
        self.lock = threading.Lock()
        self.pi = 0
        self.retired = 0
        self.batches: collections.deque[int] = collections.deque()  # end producer index of each batch in flight
        self.error: str | None = None

    @property
    def name(self) -> str:
        return f"peer {self.peer} qp {self.index} (qpn {self.qp.qpn})"

    def poll(self) -> str | None:
        """Consume ready completions and retire their batches. Returns an error message once the QP has failed."""
        if self.error:
            return self.error
        poster = self.poster
        for done in poster.completions():
            if done.error:
                self.error = f"{self.name}: {done.error}"
                return self.error
            while self.batches:
                end = self.batches.popleft()
                self.retired = end
                if poster.batch_token(end) == done.token:
                    break
            else:
                self.error = f"{self.name}: completion for {done.token}, which no batch ends with"
                return self.error
        fault = poster.fault()  # a fault that produced no completion (e.g. CQ overrun)
        if fault is not None and not self.error:
            self.error = f"{self.name}: {fault}"
        return self.error

    def post(self, items: list[WorkItem], deadline: float, stats: ProxyStats) -> None:
        """Post ``items`` as one batch per free-room-full, each ending with a signaled request and one doorbell."""
        cnt = self.poster.slots
        i = 0
        sleep = 10e-6
        while i < len(items):
            if self.poll():
                raise ProxyError(self.error)
            free = cnt - (self.pi - self.retired)
            if free <= 0 or len(self.batches) >= self.poster.max_batches:
                if time.monotonic() > deadline:
                    raise ProxyTimeoutError(
                        f"{self.name}: send queue still full ({self.pi - self.retired} of {cnt} slots in flight) "
                        "at the deadline"
                    )
                time.sleep(sleep)
                sleep = min(sleep * 2, 1e-3)
                continue
            chunk = items[i : i + free]
            try:
                pi = self.poster.post_batch(chunk, self.pi)
            except PostFailed as e:
                self.error = f"{self.name}: {e}"
                raise ProxyError(self.error) from e
            self.batches.append(pi)
            self.pi = pi
            stats.wqes += len(chunk)
            stats.doorbells += 1
            i += len(chunk)
            sleep = 10e-6


@dataclass
class _FifoState:
    fifo: TriggerFifo
    index: int
    touched: dict = field(default_factory=dict)  # _QpState -> producer index after this FIFO's last WQE there
    pending: collections.deque = field(default_factory=collections.deque)  # (ticket, {_QpState: pi}, deadline)


class _Worker:
    def __init__(self, index: int, fifos: list[_FifoState]):
        self.index = index
        self.fifos = fifos
        self.qps: set[_QpState] = set()
        self.stats = ProxyStats()
        self.thread: threading.Thread | None = None


class ProxyService:
    """N proxy threads over ``fifos`` posting to the peers' queue pairs.

    - ``local``: the source region of WRITE triggers (:class:`LocalRegion` or a registered ``MemoryRegion``).
    - ``peers``: ``{rank: PeerRoute}`` or a sequence indexed by rank (``None`` for ranks without a route).
    - ``atomic_result``: ``(addr, lkey)`` of 8 bytes that receive (and discard) fetch-and-add results; default:
      8 bytes registered on each QP's NIC (needs ``reg_mr`` of a numpy array, as the emulated NIC offers).
    - ``num_threads``: default ``EPKERN_NUM_PROXY_THREADS`` (4); never more than there are FIFOs.
    - ``start=False`` leaves the threads unstarted until :meth:`start` (tests pre-fill FIFOs that way).
    """

    def __init__(
        self,
        fifos: Sequence[TriggerFifo],
        *,
        local,
        peers: Mapping[int, PeerRoute] | Sequence[PeerRoute | None],
        num_threads: int | None = None,
        atomic_result: tuple[int, int] | None = None,
        timeout_s: float | None = None,
        max_burst: int = 256,
        idle_min_s: float = 10e-6,
        idle_max_s: float = 1e-3,
        start: bool = True,
        name: str = "proxy",
    ):
        if not fifos:
            raise ConfigError("ProxyService needs at least one FIFO")
        n = _env.num_proxy_threads() if num_threads is None else int(num_threads)
        if n <= 0:
            raise ConfigError(f"num_threads={num_threads!r}: expected a positive integer")
        if max_burst <= 0:
            raise ConfigError(f"max_burst={max_burst!r}: expected a positive integer")
        self.name = name
        self.timeout_s = _env.timeout_s() if timeout_s is None else _env.check_timeout(timeout_s, "timeout_s")
        self.max_burst = int(max_burst)
        self.idle_min_s, self.idle_max_s = float(idle_min_s), float(idle_max_s)
        self.local_addr, self.lkey = int(local.addr), int(local.lkey)
        items = peers.items() if isinstance(peers, Mapping) else enumerate(peers)
        self._routes: dict[int, tuple[list[_QpState], int, int]] = {}
        cqs: dict[int, str] = {}
        for rank, route in items:
            if route is None:
                continue
            states = [_QpState(qp, int(rank), i) for i, qp in enumerate(route.qps)]
            for s in states:
                if id(s.qp.cq) in cqs:
                    raise ConfigError(f"{s.name} shares its CQ with {cqs[id(s.qp.cq)]}; give every QP its own CQ")
                cqs[id(s.qp.cq)] = s.name
            self._routes[int(rank)] = (states, int(route.remote_addr), int(route.rkey))
        if not self._routes:
            raise ConfigError("ProxyService needs at least one peer route")
        self._scratch: list[np.ndarray] = []
        self._atomic: dict[int, tuple[int, int]] = {}  # id(nic) -> (addr, lkey)
        self._atomic_default = None if atomic_result is None else (int(atomic_result[0]), int(atomic_result[1]))
        if self._atomic_default is None:
            for states, _, _ in self._routes.values():
                for s in states:
                    nic = s.qp.nic
                    if id(nic) not in self._atomic:
                        buf = np.zeros(1, dtype=np.uint64)
                        try:
                            mr = nic.reg_mr(buf, access=1)  # LOCAL_WRITE
                        except Exception as e:  # noqa: BLE001
                            raise ConfigError(
                                f"cannot register an atomic-result buffer on {s.name}'s NIC ({e}); "
                                "pass atomic_result=(addr, lkey)"
                            ) from e
                        self._scratch.append(buf)
                        self._atomic[id(nic)] = (mr.addr, mr.lkey)
        self.fifos = list(fifos)
        self.num_threads = min(n, len(self.fifos))
        states = [_FifoState(f, i) for i, f in enumerate(self.fifos)]
        self._workers = [_Worker(w, states[w :: self.num_threads]) for w in range(self.num_threads)]
        self._errors: list[str] = []
        self._err_lock = threading.Lock()
        self._stop = threading.Event()
        self._started = False
        self._closed = False
        if start:
            self.start()

    # --- lifecycle ---
    def start(self) -> None:
        if self._started:
            return
        self._started = True
        for w in self._workers:
            w.thread = threading.Thread(target=self._run, args=(w,), name=f"epkern-{self.name}-{w.index}", daemon=True)
            w.thread.start()

    def close(self, timeout_s: float | None = None) -> None:
        """Let each thread finish what its FIFOs already hold (and the completions it waits for), stop and join
        them. Raises :class:`ProxyError` for a recorded failure or a thread that did not stop. Idempotent."""
        if not self._closed:
            self._closed = True
            self._stop.set()
            limit = self.timeout_s + 5.0 if timeout_s is None else float(timeout_s)
            deadline = time.monotonic() + limit
            for w in self._workers:
                if w.thread is not None:
                    w.thread.join(max(0.0, deadline - time.monotonic()))
                    if w.thread.is_alive():
                        self._fail(f"proxy thread {w.index} did not stop within {limit} s")
        self.check()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            try:
                self.close()
            except ProxyError:
                pass

    @property
    def threads(self) -> list[threading.Thread]:
        return [w.thread for w in self._workers if w.thread is not None]

    # --- observation ---
    @property
    def failed(self) -> bool:
        return bool(self._errors)

    @property
    def errors(self) -> list[str]:
        with self._err_lock:
            return list(self._errors)

    def check(self) -> None:
        """Raise :class:`ProxyError` listing every recorded failure."""
        errs = self.errors
        if errs:
            raise ProxyError(f"proxy service {self.name}: {len(errs)} error(s): " + "; ".join(errs))

    def posted(self, peer: int) -> list[tuple[int, int]]:
        """(WQEs posted, WQEs retired) of each QP to ``peer`` (a diagnostic; read without the QP locks)."""
        states = self._routes.get(int(peer), ((),))[0]
        return [(q.pi, q.retired) for q in states]

    def stats(self) -> ProxyStats:
        total = ProxyStats()
        for w in self._workers:
            for k, v in vars(w.stats).items():
                setattr(total, k, getattr(total, k) + v)
        return total

    def _fail(self, message: str) -> None:
        with self._err_lock:
            self._errors.append(message)
        for f in self.fifos:
            f.set_error(1)

    # --- the thread ---
    def _run(self, w: _Worker) -> None:
        sleep = self.idle_min_s
        stop_deadline = None
        try:
            while not self.failed:  # another thread's failure stops this one's posting too
                stopping = self._stop.is_set()
                if stopping and stop_deadline is None:
                    stop_deadline = time.monotonic() + self.timeout_s
                busy = self._round(w)
                if not busy:
                    if stopping and (self.failed or self._quiet(w)):
                        return
                    if stopping and time.monotonic() > stop_deadline:
                        self._fail(f"proxy thread {w.index}: work still in flight at shutdown after {self.timeout_s} s")
                        return
                    if stopping:
                        time.sleep(sleep)
                    else:
                        self._stop.wait(sleep)
                    sleep = min(sleep * 2, self.idle_max_s)
                else:
                    sleep = self.idle_min_s
        except ProxyError as e:
            self._fail(str(e))
        except Exception as e:  # noqa: BLE001 - never die silently
            self._fail(f"proxy thread {w.index} crashed: {e!r}")
        # After a failure: keep handing slots back (dropping the work) until asked to stop.
        while not self._stop.is_set():
            if not self._drop(w):
                self._stop.wait(self.idle_max_s)
        self._drop(w)

    def _quiet(self, w: _Worker) -> bool:
        if any(fs.pending for fs in w.fifos):
            return False
        for q in w.qps:
            with q.lock:
                q.poll()
                if q.batches:
                    return False
        return True

    def _drop(self, w: _Worker) -> bool:
        moved = False
        for fs in w.fifos:
            f = fs.fifo
            t = f.consumed
            while f.peek(t) is not None:
                t += 1
            if t != f.consumed:
                f.release(t)
                moved = True
        return moved

    def _route(self, fs: _FifoState, ticket: int, trig: Trigger):
        where = f"{fs.fifo.name} ticket {ticket}"
        if trig.op not in (TriggerOp.WRITE, TriggerOp.ATOMIC_ADD):
            raise ProxyError(f"{where}: unknown trigger op {trig.op} (peer {trig.peer})")
        route = self._routes.get(trig.peer)
        if route is None:
            raise ProxyError(f"{where}: no route to peer {trig.peer}")
        states, remote_addr, rkey = route
        if trig.qp >= len(states):
            raise ProxyError(f"{where}: peer {trig.peer} has {len(states)} QP(s), trigger names qp {trig.qp}")
        q = states[trig.qp]
        raddr = remote_addr + trig.remote_offset
        if raddr > _U64:
            raise ProxyError(f"{where}: remote offset 0x{trig.remote_offset:x} overflows for {q.name}")
        if trig.op == TriggerOp.WRITE:
            if trig.value > MAX_WRITE_BYTES:
                raise ProxyError(f"{where}: write of {trig.value} bytes to {q.name} exceeds {MAX_WRITE_BYTES}")
            laddr = self.local_addr + trig.local_offset
            if laddr > _U64:
                raise ProxyError(f"{where}: local offset 0x{trig.local_offset:x} overflows ({q.name})")
            return q, WorkItem(TriggerOp.WRITE, laddr, self.lkey, raddr, rkey, trig.value)
        addr, lkey = self._atomic_default or self._atomic[id(q.qp.nic)]
        return q, WorkItem(TriggerOp.ATOMIC_ADD, addr, lkey, raddr, rkey, trig.value)

    def _round(self, w: _Worker) -> bool:
        """One burst: drain, post one batch per QP, start flushes, retire completions. True if anything moved."""
        batches: dict[_QpState, list[WorkItem]] = {}
        users: dict[_QpState, list[_FifoState]] = {}
        flushes: list[tuple[_FifoState, int]] = []
        moved = False
        for fs in w.fifos:
            f = fs.fifo
            t = f.consumed
            end = t + self.max_burst
            while t < end:
                trig = f.peek(t)
                if trig is None:
                    break
                w.stats.triggers += 1
                if trig.op == TriggerOp.FLUSH:
                    flushes.append((fs, t))
                    t += 1
                    break
                q, item = self._route(fs, t, trig)
                batches.setdefault(q, []).append(item)
                users.setdefault(q, []).append(fs)
                if trig.op == TriggerOp.WRITE:
                    w.stats.writes += 1
                else:
                    w.stats.atomics += 1
                t += 1
            if t != f.consumed:
                f.release(t)  # the records are copied out: the producers may reuse the slots
                moved = True
        if batches:
            w.stats.bursts += 1
        deadline = time.monotonic() + self.timeout_s
        for q, items in batches.items():
            if not q.lock.acquire(timeout=self.timeout_s):
                raise ProxyTimeoutError(f"{q.name}: QP lock not acquired within {self.timeout_s} s")
            try:
                q.post(items, deadline, w.stats)
                end_pi = q.pi
            finally:
                q.lock.release()
            w.qps.add(q)
            for fs in users[q]:
                fs.touched[q] = end_pi
        for fs, ticket in flushes:
            fs.pending.append((ticket, fs.touched, time.monotonic() + self.timeout_s))
            fs.touched = {}
        # retire completions; resolve flushes in order
        for q in w.qps:
            if q.batches and q.lock.acquire(blocking=False):
                try:
                    if q.poll():
                        raise ProxyError(q.error)
                finally:
                    q.lock.release()
        for fs in w.fifos:
            while fs.pending:
                ticket, marks, flush_deadline = fs.pending[0]
                if not all(q.retired >= pi for q, pi in marks.items()):
                    for q in marks:
                        if q.error:
                            raise ProxyError(f"{fs.fifo.name} flush ticket {ticket}: {q.error}")
                    if time.monotonic() > flush_deadline:
                        late = ", ".join(
                            f"{q.name} at {q.retired} of {pi}" for q, pi in marks.items() if q.retired < pi
                        )
                        raise ProxyTimeoutError(
                            f"{fs.fifo.name} flush ticket {ticket}: completions missing after {self.timeout_s} s "
                            f"({late})"
                        )
                    break
                fs.pending.popleft()
                fs.fifo.set_flushed(ticket + 1)
                w.stats.flushes += 1
                moved = True
        return moved or bool(batches)
