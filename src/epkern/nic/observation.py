"""What every NIC backend (emulated and mlx5) reports: :class:`NicError`, the :class:`NicFault` records, the
per-QP :class:`QpCounters`, and :class:`NicObservation`, the base that sums the counters and raises the faults."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import EpkernError


class NicError(EpkernError, RuntimeError):
    """The emulated NIC refused work or was used after ``close()``; ``check()`` raises it for recorded faults."""


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
