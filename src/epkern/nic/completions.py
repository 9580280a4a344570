"""Send-completion polling for QPs that GPU kernels post to themselves (the RDMA route): one host thread polls each
QP's CQ, advances the QP's ``retired`` word (a u64 the kernels read before they reuse ring slots: mlx5_wqe.cuh's
``wait_sq_space``) and records the first error CQE or NIC fault. It posts nothing.

A CQE reports the 16-bit counter of the signaled WQE it completes; on an RC QP every WQE before it has completed
too, so ``retired`` becomes that producer index + 1, widened to 64 bits from the previous value (rings hold at most
32768 WQEBBs, so a completion is never more than 2^16 ahead). Idle, the thread sleeps with an exponential backoff
(``idle_min_s`` .. ``idle_max_s``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np


@dataclass
class PolledQp:
    """One QP to poll: ``retired`` is a one-element uint64 array the kernels read (host-mapped memory)."""

    peer: int
    qp: object  # .cq.poll(), .qpn
    retired: np.ndarray


def widen(last: int, counter16: int) -> int:
    """The 64-bit producer index after the WQE whose 16-bit counter a CQE reports, given the last retired index."""
    return last + ((counter16 + 1 - last) & 0xFFFF)


class CompletionPoller:
    """Polls ``qps`` until :meth:`close`. ``failed`` / ``errors`` (one text per failure, naming the peer and QP)."""

    def __init__(self, qps: list[PolledQp], nic=None, *, name: str = "cq", idle_min_s=20e-6, idle_max_s=2e-3):
        self.qps = list(qps)
        self.nic = nic  # its recorded faults count as failures too (a fault writes an error CQE as well)
        self.errors: list[str] = []
        self.completions = 0
        self._min, self._max = float(idle_min_s), float(idle_max_s)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"epkern-{name}", daemon=True)
        self._thread.start()

    @property
    def failed(self) -> bool:
        return bool(self.errors)

    def poll_once(self) -> int:
        """Consume every ready CQE once; the number consumed (the thread calls this; tests may too)."""
        n = 0
        with self._lock:
            for q in self.qps:
                for cqe in q.qp.cq.poll():
                    n += 1
                    if cqe.is_error:
                        self._fail(
                            f"peer {q.peer} qp 0x{q.qp.qpn:x}: error CQE (syndrome 0x{cqe.syndrome:x}, wqe "
                            f"{cqe.wqe_counter})"
                        )
                        continue
                    q.retired[0] = widen(int(q.retired[0]), cqe.wqe_counter)
            faults = getattr(self.nic, "faults", None)
            if faults and not self.errors:
                self._fail("; ".join(f"qpn 0x{f.qpn:x} wqe {f.wqe_counter}: {f.message}" for f in faults))
        self.completions += n
        return n

    def _fail(self, text: str) -> None:
        if text not in self.errors:
            self.errors.append(text)

    def _run(self) -> None:
        sleep = self._min
        while not self._stop.is_set():
            try:
                got = self.poll_once()
            except Exception as exc:  # noqa: BLE001 - never die silently: the failure is reported instead
                self._fail(f"CQ poller: {exc!r}")
                got = 0
            sleep = self._min if got else min(sleep * 2, self._max)
            self._stop.wait(sleep)

    def close(self) -> None:
        """Stop and join the thread (idempotent); the last CQEs are consumed first."""
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            self.poll_once()
