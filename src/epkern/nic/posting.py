"""How the proxy posts a batch of work on one queue pair, whatever the queue pair is.

The proxy (:mod:`epkern.nic.proxy`) decides what goes into a batch and when; a :class:`BatchPoster` knows how a QP
takes it. Every batch is ONE signaled work request at its end and ONE doorbell; its completion retires it. Slots
are numbered from 0 up for the life of the QP (the proxy's producer index): a batch posted at ``start`` with ``n``
items ends at ``post_batch(...) == start + slots used``.

Two implementations:
- :class:`RingPoster` (here): mlx5 WQEs built by :mod:`epkern.nic.wqe` into the QP's send ring, then
  ``qp.ring_doorbell(end)`` — the emulated NIC's and :class:`~epkern.nic.mlx5.Mlx5QueuePair`'s path. A completion
  names the 16-bit index of the batch's last WQE.
- :class:`~epkern.nic.verbs.VerbsQueuePair`: standard verbs (``ibv_post_send`` of a chained list, ``ibv_poll_cq``),
  for any provider (soft-RoCE included). A completion names the batch end itself (``wr_id``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

from ..errors import EpkernError
from . import wqe as W
from .fifo import TriggerOp

__all__ = ["BatchDone", "BatchPoster", "PostFailed", "RingPoster", "WorkItem", "batch_poster"]


class WorkItem(NamedTuple):
    """One unit of proxy work on a QP: a WRITE of ``value`` bytes from ``laddr``/``lkey`` to ``raddr``/``rkey``, or an
    ATOMIC_ADD of ``value`` to the word at ``raddr`` (old value to ``laddr``)."""

    op: int  # TriggerOp.WRITE or TriggerOp.ATOMIC_ADD
    laddr: int
    lkey: int
    raddr: int
    rkey: int
    value: int


class BatchDone(NamedTuple):
    """A completion as the proxy needs it: ``token`` (compare with :meth:`BatchPoster.batch_token`) and, for a failed
    one, what went wrong (without the QP's name: the proxy adds it)."""

    token: int
    error: str | None = None


class PostFailed(EpkernError):
    """The QP refused a batch (a closed NIC, a provider error); the message says why, without the QP's name."""


class BatchPoster(Protocol):
    slots: int  # work requests the send queue holds in flight
    max_batches: int  # batches in flight the CQ has room for (one completion each)

    def post_batch(self, items: Sequence[WorkItem], start: int) -> int:
        """Post ``items`` as one batch (only the last signaled, one doorbell) from slot ``start``; return the end."""
        ...

    def batch_token(self, end: int) -> int:
        """What a completion of the batch ending at slot ``end`` carries."""
        ...

    def completions(self) -> list[BatchDone]:
        """The completions ready now, oldest first."""
        ...

    def fault(self) -> str | None:
        """An error the QP recorded without a completion (e.g. a CQ overrun), else None."""
        ...


def batch_poster(qp: Any) -> BatchPoster:
    """``qp`` itself when it implements :class:`BatchPoster` (verbs QPs), else a :class:`RingPoster` over its mlx5
    send ring (emulated and mlx5 QPs)."""
    return qp if hasattr(qp, "post_batch") else RingPoster(qp)


class RingPoster:
    """Posting into an mlx5 send ring: ``qp.sq``, ``qp.wqe_cnt``, ``qp.qpn``, ``qp.cq.poll()``, ``qp.ring_doorbell``.
    One WQEBB per item; every WQE unsignaled except the batch's last; one doorbell per batch."""

    def __init__(self, qp: Any):
        self.qp = qp
        self.slots = qp.wqe_cnt
        self.max_batches = getattr(qp.cq, "cqe_cnt", 1 << 30)

    def post_batch(self, items: Sequence[WorkItem], start: int) -> int:
        qp = self.qp
        last = len(items) - 1
        pi = start
        for k, (op, laddr, lkey, raddr, rkey, value) in enumerate(items):
            if op == TriggerOp.WRITE:
                pi += W.build_rdma_write(
                    qp.sq,
                    pi,
                    qpn=qp.qpn,
                    raddr=raddr,
                    rkey=rkey,
                    laddr=laddr,
                    lkey=lkey,
                    length=value,
                    signaled=k == last,
                )
            else:
                pi += W.build_fetch_add(
                    qp.sq,
                    pi,
                    qpn=qp.qpn,
                    raddr=raddr,
                    rkey=rkey,
                    add=value,
                    laddr=laddr,
                    lkey=lkey,
                    signaled=k == last,
                )
        try:
            qp.ring_doorbell(pi)
        except Exception as e:  # noqa: BLE001 - a closed NIC, a broken backend: the proxy names the QP
            raise PostFailed(f"doorbell failed: {e}") from e
        return pi

    def batch_token(self, end: int) -> int:
        return (end - 1) & 0xFFFF  # the CQE's wqe_counter: the index of the batch's last WQE

    def completions(self) -> list[BatchDone]:
        out = []
        for cqe in self.qp.cq.poll():
            if cqe.is_error:
                fault = getattr(self.qp, "error", None)
                why = f": {fault.message}" if fault is not None else ""
                out.append(
                    BatchDone(
                        cqe.wqe_counter,
                        f"NIC error completion (syndrome 0x{cqe.syndrome:02x}) for WQE {cqe.wqe_counter}{why}",
                    )
                )
            elif cqe.qpn != self.qp.qpn:
                out.append(
                    BatchDone(cqe.wqe_counter, f"completion for qpn {cqe.qpn} on this QP's CQ (CQs must not be shared)")
                )
            else:
                out.append(BatchDone(cqe.wqe_counter))
        return out

    def fault(self) -> str | None:
        f = getattr(self.qp, "error", None)
        return None if f is None else f"NIC fault on WQE {f.wqe_counter}: {f.message}"
