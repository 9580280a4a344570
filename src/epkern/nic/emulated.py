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

Here: :class:`EmulatedNic`, its setup, doorbell intake, progress thread and lifecycle. The rest lives in
:mod:`.observation` (errors, faults, counters), :mod:`.memory_access` (:class:`MemoryAccess`, :class:`HostMemory`),
:mod:`.emulated_objects` (MRs, CQs, QPs) and :mod:`.emulated_execution` (what the thread does with a WQE); their
names are importable from here too.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from . import wqe as W
from .emulated_execution import WqeExecution
from .emulated_objects import Access, CompletionQueue, MemoryRegion, QueuePair, next_key
from .memory_access import HostMemory, MemoryAccess
from .memory_access import range_base as range_base
from .observation import NicError, NicFault, NicObservation, QpCounters

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


class EmulatedNic(NicObservation, WqeExecution):
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
        self.longest_pass_s = 0.0  # longest time the thread spent on one batch of doorbells (a stalled copy shows)
        self._closing = False
        self._aborting = False  # abort(): the executing loop stops between WQEs
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
        key = next_key()
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
    def abort(self, timeout_s: float) -> bool:
        """Stop without executing what is still posted: rung doorbells are dropped and the WQE being executed is the
        last; the thread is joined for at most ``timeout_s``. True when it has ended (nothing is touched any more);
        False while a copy it started still runs. For a Buffer's teardown after a failure, when peers are about to
        free the memory the posted WRITEs target."""
        with self._cv:
            self._aborting = self._closing = True
            self._pending = []
            self._cv.notify_all()
        self._thread.join(max(0.0, float(timeout_s)))
        if self._thread.is_alive():
            return False
        self._closed = True
        return True

    def close(self) -> None:
        """Process the doorbells already rung, stop the thread and join it. Idempotent. After :meth:`abort` it
        waits for nothing (a copy the thread still runs ends on its own)."""
        with self._cv:
            if self._closed or self._aborting:
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
            started = time.monotonic()
            for qp in work:
                try:
                    self._process(qp)
                except Exception as e:  # never let the thread die silently: the QP goes to ERROR instead
                    self._fault(qp, qp._ci, W.MLX5_CQE_SYNDROME_LOCAL_QP_OP_ERR, f"internal error: {e!r}")
            with self._cv:
                self._busy = False
                self.longest_pass_s = max(self.longest_pass_s, time.monotonic() - started)
                self._cv.notify_all()
