"""The GPU → host trigger FIFO of the PROXY transport: byte layout, a host view, and a Python producer.

A FIFO is one block of host memory (pinned and GPU-mapped in production, e.g. :class:`epkern.memory.HostMapped`;
a plain numpy array in CPU tests): a 256-byte control header followed by ``capacity`` (a power of two) 32-byte
trigger records. Everything is little-endian (host and GPU native). ``kernels/proxy_fifo.cuh`` writes the same
bytes from a kernel; this module is the one place that defines them.

Control header (each word on its own 64-byte line; offsets in bytes):

=======  ====  =============================================================================================
offset   size  field
=======  ====  =============================================================================================
0        8     ``head``: u64 reservation counter; a producer takes ticket ``t = head++`` (atomic). A GPU
               producer may keep its head in device memory instead (see ``proxy_fifo.cuh``); it must then be
               the only kind of producer of this FIFO.
64       8     ``tail``: u64 consumer index, written by the proxy thread after it copied a record out; ticket
               ``t`` may be written once ``t - tail < capacity`` (the producer's back-pressure wait).
128      8     ``flushed``: u64, ``t + 1`` of the last FLUSH trigger (ticket ``t``) whose prior work completed.
136      4     ``error``: u32, non-zero once the proxy service failed (a producer stops waiting and reports it).
=======  ====  =============================================================================================

Trigger record at ``256 + 32 * (t % capacity)``:

=======  ====  =============================================================================================
offset   size  field
=======  ====  =============================================================================================
0        8     ``local_offset``: u64, bytes into the proxy's local (source) region (WRITE); 0 otherwise
8        8     ``remote_offset``: u64, bytes into the peer's registered region (WRITE, ATOMIC_ADD)
16       8     ``value``: u64, the length in bytes (WRITE, < 2**31) or the addend (ATOMIC_ADD, mod 2**64)
24       8     ``header``: u64 = ``peer | qp << 16 | op << 24 | seq << 32`` — written LAST, as one 8-byte
               release store; ``seq = (t + 1) mod 2**32`` marks the record valid for ticket ``t``
=======  ====  =============================================================================================

Ops: 1 WRITE (RDMA write), 2 ATOMIC_ADD (64-bit fetch-and-add, old value discarded), 3 FLUSH (when every earlier
trigger of this FIFO has completed at the NIC, the proxy stores ``t + 1`` into ``flushed``). ``peer`` is the
destination rank (u16), ``qp`` the index of the queue pair to that peer (u8).

Because ``seq`` changes on every lap of the ring, a stale record is never mistaken for a new one and slots need
no clearing. A consumer reads the header word first, checks ``seq``, then the body (x86 keeps load order; the
producer's release store keeps store order).
"""

from __future__ import annotations

import enum
import struct
import threading
import time
from dataclasses import dataclass

import numpy as np

from .. import _env
from .. import errors as _errors

__all__ = [
    "FIFO_HEADER_BYTES",
    "TRIGGER_BYTES",
    "FifoProducer",
    "ProxyError",
    "ProxyTimeoutError",
    "Trigger",
    "TriggerFifo",
    "TriggerOp",
    "decode_trigger",
    "encode_trigger",
    "fifo_nbytes",
]

FIFO_HEADER_BYTES = 256
TRIGGER_BYTES = 32
HEAD_OFFSET = 0
TAIL_OFFSET = 64
FLUSHED_OFFSET = 128
ERROR_OFFSET = 136

MAX_WRITE_BYTES = (1 << 31) - 1  # an mlx5 data segment's byte_count is 31 bits

_RECORD = struct.Struct("<QQQQ")
assert _RECORD.size == TRIGGER_BYTES


class ProxyError(_errors.EpkernError, RuntimeError):
    """The proxy service (or a FIFO) failed: a bad trigger, a NIC fault (the message names the peer and QP), or a
    deadline; raised by ``ProxyService.check()`` and by producers once the service has failed."""


class ProxyTimeoutError(ProxyError, _errors.TimeoutError):
    """A FIFO or proxy wait ran past its deadline."""


class TriggerOp(enum.IntEnum):
    WRITE = 1
    ATOMIC_ADD = 2
    FLUSH = 3


@dataclass(frozen=True)
class Trigger:
    """One trigger record's fields (``seq`` only matters on the wire)."""

    op: int
    peer: int = 0
    qp: int = 0
    local_offset: int = 0
    remote_offset: int = 0
    value: int = 0
    seq: int = 0

    @property
    def header(self) -> int:
        return (self.peer & 0xFFFF) | (self.qp & 0xFF) << 16 | (self.op & 0xFF) << 24 | (self.seq & 0xFFFFFFFF) << 32


def _fits(name: str, value: int, bits: int) -> int:
    value = int(value)
    if not 0 <= value < (1 << bits):
        raise ProxyError(f"trigger field {name}={value} does not fit in {bits} bits")
    return value


def encode_trigger(t: Trigger) -> bytes:
    """The 32 record bytes for ``t`` (fields range-checked; ``value`` of an ATOMIC_ADD may be negative)."""
    value = int(t.value) & 0xFFFFFFFFFFFFFFFF if t.op == TriggerOp.ATOMIC_ADD else _fits("value", t.value, 64)
    _fits("peer", t.peer, 16)
    _fits("qp", t.qp, 8)
    _fits("op", t.op, 8)
    _fits("seq", t.seq, 32)
    return _RECORD.pack(
        _fits("local_offset", t.local_offset, 64), _fits("remote_offset", t.remote_offset, 64), value, t.header
    )


def decode_trigger(raw: bytes | np.ndarray) -> Trigger:
    raw = raw.tobytes() if isinstance(raw, np.ndarray) else bytes(raw)
    if len(raw) != TRIGGER_BYTES:
        raise ProxyError(f"a trigger record is {TRIGGER_BYTES} bytes, got {len(raw)}")
    local, remote, value, hdr = _RECORD.unpack(raw)
    return Trigger(
        op=(hdr >> 24) & 0xFF,
        peer=hdr & 0xFFFF,
        qp=(hdr >> 16) & 0xFF,
        local_offset=local,
        remote_offset=remote,
        value=value,
        seq=hdr >> 32,
    )


def fifo_nbytes(capacity: int) -> int:
    """Bytes of memory a FIFO of ``capacity`` records occupies."""
    return FIFO_HEADER_BYTES + TRIGGER_BYTES * int(capacity)


class TriggerFifo:
    """A view of one FIFO block. ``buffer``: a C-contiguous uint8 array of at least ``fifo_nbytes(capacity)``
    bytes, zeroed (e.g. ``HostMapped(n).host``); default: a fresh numpy array (CPU tests). ``address`` is the
    block's host address, which is also the device address of UVA-mapped pinned memory.

    The consumer side (``peek``/``release``) belongs to exactly one proxy thread; ``reserve`` is safe from many
    Python threads (a lock stands in for the GPU's atomic add)."""

    def __init__(self, capacity: int = 1024, buffer: np.ndarray | None = None, *, name: str = "fifo"):
        capacity = int(capacity)
        if capacity <= 0 or capacity & (capacity - 1) or capacity > 1 << 24:
            raise ProxyError(f"FIFO capacity must be a power of two <= 2**24, got {capacity}")
        need = fifo_nbytes(capacity)
        if buffer is None:
            raw = np.zeros(need + 64, dtype=np.uint8)
            start = -raw.ctypes.data % 64
            buffer = raw[start : start + need]
        if not isinstance(buffer, np.ndarray) or buffer.dtype != np.uint8 or not buffer.flags.c_contiguous:
            raise ProxyError("FIFO buffer must be a C-contiguous numpy uint8 array")
        if buffer.nbytes < need:
            raise ProxyError(
                f"FIFO buffer of {buffer.nbytes} bytes is smaller than the {need} a {capacity}-record FIFO needs"
            )
        if buffer.ctypes.data % 64:
            raise ProxyError("FIFO buffer must be 64-byte aligned")
        self.name = name
        self.capacity = capacity
        self.buffer = buffer[:need]
        self.address = int(self.buffer.ctypes.data)
        self._words = self.buffer[:FIFO_HEADER_BYTES].view(np.uint64)
        self._error = self.buffer[ERROR_OFFSET : ERROR_OFFSET + 4].view(np.uint32)
        self.records = self.buffer[FIFO_HEADER_BYTES:].view(np.uint64).reshape(capacity, 4)
        self._reserve_lock = threading.Lock()
        self.consumed = int(self._words[TAIL_OFFSET // 8])  # consumer's private copy of ``tail``

    # --- control words ---
    @property
    def head(self) -> int:
        return int(self._words[HEAD_OFFSET // 8])

    @property
    def tail(self) -> int:
        return int(self._words[TAIL_OFFSET // 8])

    @property
    def flushed(self) -> int:
        return int(self._words[FLUSHED_OFFSET // 8])

    @property
    def error(self) -> int:
        return int(self._error[0])

    def set_flushed(self, value: int) -> None:
        self._words[FLUSHED_OFFSET // 8] = np.uint64(value)

    def set_error(self, code: int) -> None:
        self._error[0] = np.uint32(code)

    # --- producer side ---
    def reserve(self, count: int = 1) -> int:
        """Take ``count`` consecutive tickets (what the GPU does with ``atomicAdd(head, count)``); returns the first."""
        with self._reserve_lock:
            t = int(self._words[HEAD_OFFSET // 8])
            self._words[HEAD_OFFSET // 8] = np.uint64(t + count)
        return t

    def has_space(self, ticket: int) -> bool:
        return ticket - self.tail < self.capacity

    def write_record(self, ticket: int, trig: Trigger) -> None:
        """Store ``trig`` at ``ticket``'s slot: the body first, then the header word (with ``seq``) in one store."""
        rec = Trigger(
            trig.op, trig.peer, trig.qp, trig.local_offset, trig.remote_offset, trig.value, (ticket + 1) & 0xFFFFFFFF
        )
        words = _RECORD.unpack(encode_trigger(rec))
        row = self.records[ticket & (self.capacity - 1)]
        row[0] = words[0]
        row[1] = words[1]
        row[2] = words[2]
        row[3] = words[3]  # publishes the record (one aligned 8-byte store; x86 keeps the order)

    # --- consumer side (the owning proxy thread only) ---
    def peek(self, ticket: int) -> Trigger | None:
        """The record for ``ticket`` if its producer has published it, else None."""
        row = self.records[ticket & (self.capacity - 1)]
        hdr = int(row[3])
        if (hdr >> 32) != ((ticket + 1) & 0xFFFFFFFF):
            return None
        return Trigger(
            op=(hdr >> 24) & 0xFF,
            peer=hdr & 0xFFFF,
            qp=(hdr >> 16) & 0xFF,
            local_offset=int(row[0]),
            remote_offset=int(row[1]),
            value=int(row[2]),
            seq=hdr >> 32,
        )

    def release(self, tail: int) -> None:
        """Hand slots below ``tail`` back to the producers."""
        self.consumed = tail
        self._words[TAIL_OFFSET // 8] = np.uint64(tail)

    def __repr__(self):
        return f"TriggerFifo({self.name!r}, capacity={self.capacity}, head={self.head}, tail={self.tail})"


class FifoProducer:
    """Pushes triggers into a :class:`TriggerFifo` with exactly the bytes and protocol a GPU producer uses:
    reserve a ticket, wait (bounded by ``timeout_s``, default ``EPKERN_TIMEOUT_S``) until its slot is free, write
    the body, then publish the header word. Safe to share between threads."""

    POLL_MIN_S = 10e-6
    POLL_MAX_S = 1e-3

    def __init__(self, fifo: TriggerFifo, timeout_s: float | None = None):
        self.fifo = fifo
        self.timeout_s = _env.timeout_s() if timeout_s is None else _env.check_timeout(timeout_s, "timeout_s")

    def _wait(self, ready, what: str, timeout_s: float | None) -> None:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        sleep = self.POLL_MIN_S
        while not ready():
            if self.fifo.error:
                raise ProxyError(f"{self.fifo.name}: the proxy service failed (error {self.fifo.error}) while {what}")
            if time.monotonic() > deadline:
                raise ProxyTimeoutError(f"{self.fifo.name}: {what} ran past its {timeout} s deadline ({self.fifo!r})")
            time.sleep(sleep)
            sleep = min(sleep * 2, self.POLL_MAX_S)

    def push(self, trig: Trigger, timeout_s: float | None = None) -> int:
        """Push one trigger; returns its ticket. Raises :class:`ProxyTimeoutError` when the FIFO stays full
        (the reserved ticket is then lost and the FIFO unusable, as on the GPU)."""
        encode_trigger(trig)  # validate before taking a ticket
        if self.fifo.error:
            raise ProxyError(f"{self.fifo.name}: the proxy service failed (error {self.fifo.error})")
        ticket = self.fifo.reserve()
        self._wait(lambda: self.fifo.has_space(ticket), f"waiting for space for ticket {ticket}", timeout_s)
        self.fifo.write_record(ticket, trig)
        return ticket

    def write(self, peer: int, qp: int, local_offset: int, remote_offset: int, length: int, **kw) -> int:
        return self.push(Trigger(TriggerOp.WRITE, peer, qp, local_offset, remote_offset, length), **kw)

    def atomic_add(self, peer: int, qp: int, remote_offset: int, value: int, **kw) -> int:
        return self.push(Trigger(TriggerOp.ATOMIC_ADD, peer, qp, 0, remote_offset, value), **kw)

    def flush(self, **kw) -> int:
        """Push a FLUSH; ``wait_flushed(ticket)`` then waits for every earlier trigger of this FIFO."""
        return self.push(Trigger(TriggerOp.FLUSH), **kw)

    def wait_flushed(self, ticket: int, timeout_s: float | None = None) -> None:
        self._wait(lambda: self.fifo.flushed >= ticket + 1, f"waiting for flush ticket {ticket}", timeout_s)
