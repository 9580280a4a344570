"""The emulated NIC's verbs objects, as the posting side sees them: :class:`MemoryRegion` (with its
:class:`Access` rights), :class:`CompletionQueue` and :class:`QueuePair`, whose rings, doorbell records and
doorbell words are the real mlx5 bytes. Each holds the :class:`~epkern.nic.emulated.EmulatedNic` that made it
(``nic``, typed ``Any``: that module imports this one, not the reverse); the NIC executes what is posted."""

from __future__ import annotations

import enum
import itertools
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import wqe as W
from .observation import NicError, NicFault, QpCounters


class Access(enum.IntFlag):
    """MR access rights (the ``ibv_access_flags`` values)."""

    LOCAL_WRITE = 1
    REMOTE_WRITE = 2
    REMOTE_READ = 4
    REMOTE_ATOMIC = 8


_keys = itertools.count(0x100)  # process-wide, so a key from one NIC is unknown on another
_qpns = itertools.count(0x100)
_ids_lock = threading.Lock()


def _next(counter) -> int:
    with _ids_lock:
        return next(counter)


def next_key() -> int:
    """A fresh MR key (lkey = rkey), unique in the process."""
    return _next(_keys) & 0xFFFFFFFF


@dataclass(frozen=True)
class MemoryRegion:
    """A registered range. Local segments name it by ``lkey``, remote ones by ``rkey``."""

    nic: Any  # the EmulatedNic that registered it
    addr: int
    length: int
    access: Access
    lkey: int
    rkey: int

    def contains(self, addr: int, n: int) -> bool:
        return self.addr <= addr and addr + n <= self.addr + self.length


class CompletionQueue:
    """A ring of ``cqe_cnt`` 64-byte CQEs (``.ring``) and its doorbell record (``.dbrec``: BE32 consumer index).

    The NIC writes CQE ``n`` at slot ``n % cqe_cnt`` with owner bit ``(n // cqe_cnt) & 1``; slots start invalid
    (``op_own = 0xF1``). :meth:`poll` consumes in order and updates the doorbell record; the NIC faults if the
    ring would overflow (more than ``cqe_cnt`` unconsumed CQEs)."""

    def __init__(self, nic: Any, cqe_cnt: int):
        if cqe_cnt <= 0 or cqe_cnt & (cqe_cnt - 1):
            raise NicError(f"cqe_cnt must be a power of two, got {cqe_cnt}")
        self.nic = nic
        self.cqe_cnt = cqe_cnt
        self.ring = np.zeros(cqe_cnt * W.CQE_SIZE, dtype=np.uint8)
        self.ring[W.CQE_SIZE - 1 :: W.CQE_SIZE] = (W.MLX5_CQE_INVALID << 4) | 1
        self.dbrec = np.zeros(8, dtype=np.uint8)
        self.ci = 0  # host consumer index
        self._pi = 0  # NIC producer index (NIC thread only)

    def _consumer_index(self) -> int:
        return struct.unpack(">I", self.dbrec[:4].tobytes())[0] & 0xFFFFFF

    def _push(self, **cqe) -> bool:
        """NIC side: write the next CQE. False if the ring is full."""
        if ((self._pi - self._consumer_index()) & 0xFFFFFF) >= self.cqe_cnt:
            return False
        slot = self._pi & (self.cqe_cnt - 1)
        W.encode_cqe(self.ring, slot * W.CQE_SIZE, owner=(self._pi // self.cqe_cnt) & 1, **cqe)
        self._pi += 1
        return True

    def poll(self, max_entries: int | None = None) -> list[W.Cqe]:
        """Consume the CQEs that are ready (owner bit matches), oldest first."""
        out: list[W.Cqe] = []
        while max_entries is None or len(out) < max_entries:
            off = (self.ci & (self.cqe_cnt - 1)) * W.CQE_SIZE
            op_own = int(self.ring[off + 63])
            if (op_own >> 4) == W.MLX5_CQE_INVALID or (op_own & 1) != ((self.ci // self.cqe_cnt) & 1):
                break
            out.append(W.decode_cqe(self.ring, off))
            self.ci += 1
            self.dbrec[:4] = np.frombuffer(struct.pack(">I", self.ci & 0xFFFFFF), dtype=np.uint8)
        return out

    def wait(self, n: int, timeout: float = 5.0) -> list[W.Cqe]:
        """Poll until ``n`` CQEs arrived (or an error CQE); raises :class:`NicError` on timeout."""
        out: list[W.Cqe] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            got = self.poll(n - len(out))
            out += got
            if any(c.is_error for c in got):
                break
            if not got:
                if time.monotonic() > deadline:
                    raise NicError(f"CQ: {len(out)} of {n} completions after {timeout} s")
                self.nic.wait_idle(timeout=0.01)
        return out


class QueuePair:
    """An RC send queue: ``.sq`` (``wqe_cnt`` WQEBBs), ``.dbrec`` (8 bytes; ``[1]`` = send, BE32),
    ``.db_reg`` (the 8-byte doorbell register word), ``.qpn``. :meth:`connect` it to a QP, possibly on another
    :class:`~epkern.nic.emulated.EmulatedNic`; writes go to memory registered on the peer's NIC."""

    RESET, RTS, ERROR = "RESET", "RTS", "ERROR"

    def __init__(self, nic: Any, cq: CompletionQueue, wqe_cnt: int):
        if wqe_cnt <= 0 or wqe_cnt & (wqe_cnt - 1) or wqe_cnt > 0x8000:
            raise NicError(f"wqe_cnt must be a power of two <= 32768, got {wqe_cnt}")
        self.nic = nic
        self.cq = cq
        self.wqe_cnt = wqe_cnt
        self.qpn = _next(_qpns) & 0xFFFFFF
        self.sq = np.zeros(wqe_cnt * W.MLX5_SEND_WQE_BB, dtype=np.uint8)
        self.dbrec = np.zeros(8, dtype=np.uint8)
        self.db_reg = np.zeros(8, dtype=np.uint8)
        self.remote: QueuePair | None = None
        self.state = self.RESET
        self.error: NicFault | None = None
        self.counters = QpCounters()
        self._ci = 0  # NIC consumer index in WQEBBs (monotonic)
        self._done = 0  # ... of the WQEs whose writes have landed (copies flushed): what ``consumed`` reports
        self._last_db = bytes(8)

    @property
    def consumed(self) -> int:
        """The NIC's consumer index (WQEBBs executed, their writes landed, or failed so far; monotonic)."""
        return self._done

    def connect(self, remote: QueuePair) -> None:
        """Connect to ``remote`` (this side only; connect both for a bidirectional pair) and go to RTS."""
        self.remote = remote
        self.state = self.RTS

    def ring_doorbell(self, pi: int) -> None:
        """Post: store ``pi`` in the send doorbell record, write the doorbell word, wake the NIC."""
        W.encode_dbrec(self.dbrec, pi)
        self.db_reg[:] = np.frombuffer(W.doorbell_value(pi, self.qpn), dtype=np.uint8)
        self.nic._doorbell(self)
