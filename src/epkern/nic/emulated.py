"""An emulated mlx5 NIC: send rings, doorbells, MRs and CQs in software, executed by one thread per NIC.

The bytes are the real ones (:mod:`epkern.nic.wqe`): whoever posts work writes mlx5 WQEs into ``QueuePair.sq``,
stores the producer index in the send doorbell record and writes the 8-byte doorbell word, exactly as on
hardware. The NIC thread parses each WQE and executes it through a :class:`MemoryAccess` object (host memory,
or GPU-visible memory through :class:`epkern.nic.device_memory.DeviceMemory`), writing 64-byte CQEs with the
owner-bit convention.

It is strict: a bad opcode, a ds count that does not match the segments, an unknown key, a missing access
right, misalignment or a range outside the MR puts the QP into the error state, writes an error CQE (opcode 13
with an mlx5 syndrome) and records a :class:`NicFault`; nothing is written to the target in that case.

Doorbells reach the thread either through :meth:`QueuePair.ring_doorbell` (host code; wakes the thread) or, with
``EmulatedNic(poll_doorbells=True)``, by the thread watching every QP's doorbell word with an exponential
backoff (for device code that writes the word itself). Idle, the thread sleeps on a condition variable.
A polled word is memory, not MMIO: doorbells stored between two scans count once in ``counters.doorbells``
(their WQEs all run, up to the doorbell record), so there it is at most the number of doorbells rung.
"""

from __future__ import annotations

import bisect
import enum
import itertools
import struct
import threading
import time
from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np

from ..errors import EpkernError
from . import wqe as W

__all__ = [
    "Access",
    "CompletionQueue",
    "EmulatedNic",
    "HostMemory",
    "MemoryAccess",
    "MemoryRegion",
    "NicError",
    "NicFault",
    "QpCounters",
    "QueuePair",
]


class NicError(EpkernError, RuntimeError):
    """The emulated NIC refused work or was used after ``close()``; ``check()`` raises it for recorded faults."""


class Access(enum.IntFlag):
    """MR access rights (the ``ibv_access_flags`` values)."""

    LOCAL_WRITE = 1
    REMOTE_WRITE = 2
    REMOTE_READ = 4
    REMOTE_ATOMIC = 8


# --- memory access ---------------------------------------------------------------------------------------------------


class MemoryAccess(Protocol):
    """How the NIC touches memory, by address. Implementations: :class:`HostMemory` (numpy, CPU) and
    :class:`epkern.nic.device_memory.DeviceMemory` (GPU memory, IPC-opened peer memory, pinned host-mapped memory)."""

    def read(self, addr: int, n: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...

    def atomic_fetch_add64(self, addr: int, value: int) -> int: ...


def range_base(bases: list[int], size_of, addr: int, n: int) -> int | None:
    """The base of the added range holding ``[addr, addr + n)``: ``bases`` sorted, ``size_of(base)`` its
    length (memory backends' second line of defence behind the MR checks). None if no range holds it."""
    i = bisect.bisect_right(bases, addr) - 1
    if i >= 0 and addr + n <= bases[i] + size_of(bases[i]):
        return bases[i]
    return None


class HostMemory:
    """:class:`MemoryAccess` over numpy arrays added with :meth:`add`; addresses are their real host addresses.

    Every access must lie inside one added array (a second line of defence behind the MR checks).
    ``atomic_fetch_add64`` is atomic with respect to other calls on this object (a lock), which is what CPU
    tests need; a device backend uses a system-scope atomic instead."""

    def __init__(self):
        self._lock = threading.Lock()
        self._bases: list[int] = []
        self._arrays: dict[int, np.ndarray] = {}

    def add(self, array: np.ndarray) -> int:
        """Make a C-contiguous array addressable; returns its base address (``array.ctypes.data``)."""
        if not isinstance(array, np.ndarray) or not array.flags.c_contiguous:
            raise NicError("HostMemory.add needs a C-contiguous numpy array")
        flat = array.reshape(-1).view(np.uint8)
        base = flat.ctypes.data
        with self._lock:
            if base not in self._arrays:
                bisect.insort(self._bases, base)
            self._arrays[base] = flat
        return base

    def _view(self, addr: int, n: int) -> np.ndarray:
        base = range_base(self._bases, lambda b: self._arrays[b].shape[0], addr, n)
        if base is not None:
            return self._arrays[base][addr - base : addr - base + n]
        raise NicError(f"address range 0x{addr:x}+{n} is not inside memory known to this HostMemory")

    def read(self, addr: int, n: int) -> bytes:
        return self._view(addr, n).tobytes()

    def write(self, addr: int, data: bytes) -> None:
        self._view(addr, len(data))[:] = np.frombuffer(data, dtype=np.uint8)

    def atomic_fetch_add64(self, addr: int, value: int) -> int:
        with self._lock:
            v = self._view(addr, 8)
            old = int.from_bytes(v.tobytes(), "little")
            v[:] = np.frombuffer(((old + value) & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"), dtype=np.uint8)
            return old


# --- objects ----------------------------------------------------------------------------------------------------------

_keys = itertools.count(0x100)  # process-wide, so a key from one NIC is unknown on another
_qpns = itertools.count(0x100)
_ids_lock = threading.Lock()


def _next(counter) -> int:
    with _ids_lock:
        return next(counter)


@dataclass
class NicFault:
    """One recorded error: the QP, the 16-bit WQE counter, the CQE syndrome and a readable reason."""

    qpn: int
    wqe_counter: int
    syndrome: int
    message: str


@dataclass
class QpCounters:
    wqes: int = 0
    doorbells: int = 0
    bytes: int = 0
    cqes: int = 0
    errors: int = 0

    def __iadd__(self, other: QpCounters) -> QpCounters:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self


@dataclass(frozen=True)
class MemoryRegion:
    """A registered range. Local segments name it by ``lkey``, remote ones by ``rkey``."""

    nic: EmulatedNic
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

    def __init__(self, nic: EmulatedNic, cqe_cnt: int):
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
    :class:`EmulatedNic`; writes go to memory registered on the peer's NIC."""

    RESET, RTS, ERROR = "RESET", "RTS", "ERROR"

    def __init__(self, nic: EmulatedNic, cq: CompletionQueue, wqe_cnt: int):
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
        self._last_db = bytes(8)

    def connect(self, remote: QueuePair) -> None:
        """Connect to ``remote`` (this side only; connect both for a bidirectional pair) and go to RTS."""
        self.remote = remote
        self.state = self.RTS

    def ring_doorbell(self, pi: int) -> None:
        """Post: store ``pi`` in the send doorbell record, write the doorbell word, wake the NIC."""
        W.encode_dbrec(self.dbrec, pi)
        self.db_reg[:] = np.frombuffer(W.doorbell_value(pi, self.qpn), dtype=np.uint8)
        self.nic._doorbell(self)


class _Fault(Exception):
    def __init__(self, syndrome: int, message: str):
        super().__init__(message)
        self.syndrome = syndrome


class NicObservation:
    """Counters and fault report shared by every NIC backend: each keeps its QPs in ``self._qps``, its recorded
    faults in ``self.faults`` and a ``self.name``; ``kind`` names the backend in messages."""

    kind = "NIC"

    def counters(self) -> QpCounters:
        total = QpCounters()
        for qp in list(self._qps):
            total += qp.counters
        return total

    def check(self) -> None:
        """Raise :class:`NicError` listing every recorded fault (tests call this at the end)."""
        if self.faults:
            lines = "; ".join(f"qpn {f.qpn} wqe {f.wqe_counter}: {f.message}" for f in self.faults)
            raise NicError(f"{self.kind} {self.name}: {len(self.faults)} fault(s): {lines}")


class EmulatedNic(NicObservation):
    """One emulated NIC with one progress thread. ``memory`` is its :class:`MemoryAccess` (a fresh
    :class:`HostMemory` by default). Use as a context manager or call :meth:`close`."""

    kind = "emulated NIC"

    POLL_MIN_S = 20e-6
    POLL_MAX_S = 5e-3

    def __init__(self, memory: MemoryAccess | None = None, *, poll_doorbells: bool = False, name: str = "nic"):
        self.memory = memory if memory is not None else HostMemory()
        self.name = name
        self.faults: list[NicFault] = []
        self._poll = poll_doorbells
        self._cv = threading.Condition()
        self._pending: list[QueuePair] = []
        self._busy = False
        self._closing = False
        self._closed = False
        self._qps: list[QueuePair] = []
        self._mrs_l: dict[int, MemoryRegion] = {}
        self._mrs_r: dict[int, MemoryRegion] = {}
        self._thread = threading.Thread(target=self._run, name=f"epkern-emulated-{name}", daemon=True)
        self._thread.start()

    # --- setup ---
    def reg_mr(self, target: np.ndarray | int, length: int | None = None, access: Access = Access.LOCAL_WRITE):
        """Register an array (added to a :class:`HostMemory`), or ``(addr, length)`` the memory backend serves."""
        self._check_open()
        if isinstance(target, np.ndarray):
            if not isinstance(self.memory, HostMemory):
                raise NicError("reg_mr(array) needs a HostMemory backend; pass (addr, length) otherwise")
            addr = self.memory.add(target)
            length = target.nbytes if length is None else length
            if length > target.nbytes:
                raise NicError(f"MR length {length} exceeds the array's {target.nbytes} bytes")
        else:
            addr = int(target)
            if length is None:
                raise NicError("reg_mr(addr) needs a length")
        key = _next(_keys) & 0xFFFFFFFF
        mr = MemoryRegion(self, addr, int(length), Access(access), lkey=key, rkey=key)
        with self._cv:
            self._mrs_l[key] = mr
            self._mrs_r[key] = mr
        return mr

    def dereg_mr(self, mr: MemoryRegion) -> None:
        with self._cv:
            self._mrs_l.pop(mr.lkey, None)
            self._mrs_r.pop(mr.rkey, None)

    def create_cq(self, cqe_cnt: int = 256) -> CompletionQueue:
        self._check_open()
        return CompletionQueue(self, cqe_cnt)

    def create_qp(self, cq: CompletionQueue, wqe_cnt: int = 64) -> QueuePair:
        self._check_open()
        qp = QueuePair(self, cq, wqe_cnt)
        with self._cv:
            self._qps.append(qp)
        return qp

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until every doorbell seen so far has been processed. True when idle."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    # --- lifecycle ---
    def close(self) -> None:
        """Process the doorbells already rung, stop the thread and join it. Idempotent."""
        with self._cv:
            if self._closed:
                return
            self._closing = True
            self._cv.notify_all()
        self._thread.join()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_open(self):
        if self._closing:
            raise NicError(f"emulated NIC {self.name} is closed")

    # --- doorbells and the progress thread ---
    def _doorbell(self, qp: QueuePair) -> None:
        with self._cv:
            self._check_open()
            qp._last_db = qp.db_reg.tobytes()
            qp.counters.doorbells += 1
            if qp not in self._pending:
                self._pending.append(qp)
            self._cv.notify_all()

    def _scan_doorbells(self) -> None:
        """Poll mode: a changed doorbell word is a doorbell (called with the lock held). Words stored since the
        last scan are seen as one: only the latest is left to read."""
        for qp in self._qps:
            cur = qp.db_reg.tobytes()
            if cur != qp._last_db:
                qp._last_db = cur
                qp.counters.doorbells += 1
                if qp not in self._pending:
                    self._pending.append(qp)

    def _run(self) -> None:
        backoff = self.POLL_MIN_S
        while True:
            with self._cv:
                while True:
                    if self._poll:
                        self._scan_doorbells()
                    if self._pending or self._closing:
                        break
                    if self._poll:
                        self._cv.wait(backoff)
                        backoff = min(backoff * 2, self.POLL_MAX_S)
                    else:
                        self._cv.wait()
                if not self._pending:  # closing and drained
                    self._cv.notify_all()
                    return
                work, self._pending = self._pending, []
                self._busy = True
            backoff = self.POLL_MIN_S
            for qp in work:
                try:
                    self._process(qp)
                except Exception as e:  # never let the thread die silently: the QP goes to ERROR instead
                    self._fault(qp, qp._ci, W.MLX5_CQE_SYNDROME_LOCAL_QP_OP_ERR, f"internal error: {e!r}")
            with self._cv:
                self._busy = False
                self._cv.notify_all()

    def _fault(self, qp: QueuePair, counter: int, syndrome: int, message: str, wqe_opcode: int = 0) -> None:
        fault = NicFault(qp.qpn, counter & 0xFFFF, syndrome, message)
        qp.state = QueuePair.ERROR
        qp.error = fault
        qp.counters.errors += 1
        self.faults.append(fault)
        qp.cq._push(
            opcode=W.MLX5_CQE_REQ_ERR,
            qpn=qp.qpn,
            wqe_counter=counter & 0xFFFF,
            syndrome=syndrome,
            wqe_opcode=wqe_opcode,
        )

    def _process(self, qp: QueuePair) -> None:
        if qp.state == QueuePair.ERROR:
            return  # an errored QP executes nothing more (its doorbells are still counted)
        if qp.state != QueuePair.RTS or qp.remote is None:
            self._fault(qp, qp._ci, W.MLX5_CQE_SYNDROME_LOCAL_QP_OP_ERR, "doorbell on a QP that is not connected")
            return
        _, db_qpn, _, _ = W.decode_doorbell(qp.db_reg)
        if db_qpn != qp.qpn:
            self._fault(
                qp, qp._ci, W.MLX5_CQE_SYNDROME_LOCAL_QP_OP_ERR, f"doorbell word names qpn {db_qpn}, not {qp.qpn}"
            )
            return
        delta = (W.decode_dbrec(qp.dbrec) - qp._ci) & 0xFFFF
        if delta > qp.wqe_cnt:
            self._fault(
                qp,
                qp._ci,
                W.MLX5_CQE_SYNDROME_LOCAL_QP_OP_ERR,
                f"producer index is {delta} WQEBBs ahead, more than the ring's {qp.wqe_cnt}",
            )
            return
        end = qp._ci + delta
        while qp._ci < end:
            counter = qp._ci & 0xFFFF
            try:
                wqe = W.decode_wqe(qp.sq, qp._ci)
            except W.WqeFormatError as e:
                self._fault(qp, counter, W.MLX5_CQE_SYNDROME_LOCAL_QP_OP_ERR, f"malformed WQE: {e}")
                return
            try:
                if wqe.pi16 != counter:
                    raise _Fault(W.MLX5_CQE_SYNDROME_LOCAL_QP_OP_ERR, f"ctrl pi16 {wqe.pi16} != slot index {counter}")
                if wqe.qpn != qp.qpn:
                    raise _Fault(W.MLX5_CQE_SYNDROME_LOCAL_QP_OP_ERR, f"ctrl qpn {wqe.qpn} != {qp.qpn}")
                if qp._ci + wqe.nbb > end:
                    raise _Fault(W.MLX5_CQE_SYNDROME_LOCAL_QP_OP_ERR, "WQE extends past the doorbell's producer index")
                nbytes = self._execute(qp, wqe)
            except _Fault as f:
                self._fault(qp, counter, f.syndrome, f"{wqe.opcode_name}: {f}", wqe.opcode)
                return
            qp.counters.wqes += 1
            qp.counters.bytes += nbytes
            if wqe.signaled:
                # Counted before the CQE shows: a host that has seen the CQE reads counters that include it.
                qp.counters.cqes += 1
                if not qp.cq._push(opcode=W.MLX5_CQE_REQ, qpn=qp.qpn, wqe_counter=counter, byte_cnt=nbytes):
                    qp.counters.cqes -= 1
                    qp._ci += wqe.nbb
                    fault = NicFault(qp.qpn, counter, 0, "CQ overrun (host did not consume completions)")
                    qp.state, qp.error = QueuePair.ERROR, fault
                    qp.counters.errors += 1
                    self.faults.append(fault)
                    return
            qp._ci += wqe.nbb

    # --- execution ---
    def _local(self, seg: W.DataSeg, need: Access) -> MemoryRegion:
        mr = self._mrs_l.get(seg.lkey)
        if mr is None:
            raise _Fault(W.MLX5_CQE_SYNDROME_LOCAL_PROT_ERR, f"unknown lkey 0x{seg.lkey:x}")
        if need and not (mr.access & need):
            raise _Fault(W.MLX5_CQE_SYNDROME_LOCAL_PROT_ERR, f"lkey 0x{seg.lkey:x} lacks {need!r}")
        if not mr.contains(seg.addr, seg.byte_count):
            raise _Fault(
                W.MLX5_CQE_SYNDROME_LOCAL_PROT_ERR,
                f"local range 0x{seg.addr:x}+{seg.byte_count} outside MR 0x{mr.addr:x}+{mr.length}",
            )
        return mr

    @staticmethod
    def _remote(qp: QueuePair, wqe: W.Wqe, n: int, need: Access) -> MemoryRegion:
        peer = qp.remote.nic
        mr = peer._mrs_r.get(wqe.rkey)
        if mr is None:
            raise _Fault(W.MLX5_CQE_SYNDROME_REMOTE_ACCESS_ERR, f"unknown rkey 0x{wqe.rkey:x} on {peer.name}")
        if not (mr.access & need):
            raise _Fault(W.MLX5_CQE_SYNDROME_REMOTE_ACCESS_ERR, f"rkey 0x{wqe.rkey:x} lacks {need!r}")
        if not mr.contains(wqe.raddr, n):
            raise _Fault(
                W.MLX5_CQE_SYNDROME_REMOTE_ACCESS_ERR,
                f"remote range 0x{wqe.raddr:x}+{n} outside MR 0x{mr.addr:x}+{mr.length}",
            )
        return mr

    def _execute(self, qp: QueuePair, wqe: W.Wqe) -> int:
        if wqe.opcode == W.MLX5_OPCODE_NOP:
            return 0
        if wqe.opcode == W.MLX5_OPCODE_RDMA_WRITE:
            if wqe.inline is not None:
                payload = wqe.inline
            else:
                for seg in wqe.data:
                    self._local(seg, Access(0))
                payload = b"".join(self.memory.read(s.addr, s.byte_count) for s in wqe.data)
            self._remote(qp, wqe, len(payload), Access.REMOTE_WRITE)
            if payload:
                qp.remote.nic.memory.write(wqe.raddr, payload)
            return len(payload)
        if wqe.opcode == W.MLX5_OPCODE_ATOMIC_FA:
            (seg,) = wqe.data
            if seg.byte_count != 8:
                raise _Fault(W.MLX5_CQE_SYNDROME_LOCAL_LENGTH_ERR, f"result segment of {seg.byte_count} bytes, not 8")
            if wqe.raddr % 8:
                raise _Fault(W.MLX5_CQE_SYNDROME_REMOTE_INVAL_REQ_ERR, f"raddr 0x{wqe.raddr:x} is not 8-byte aligned")
            self._remote(qp, wqe, 8, Access.REMOTE_ATOMIC)
            self._local(seg, Access.LOCAL_WRITE)
            old = qp.remote.nic.memory.atomic_fetch_add64(wqe.raddr, wqe.swap_add)
            self.memory.write(seg.addr, old.to_bytes(8, "little"))
            return 8
        raise _Fault(W.MLX5_CQE_SYNDROME_LOCAL_QP_OP_ERR, "opcode not supported by the emulated NIC")
