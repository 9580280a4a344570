"""Closing what a verbs-backed NIC made (``Mlx5Nic`` and ``VerbsNic``): dependents first, every failure kept while
the rest still closes."""

from __future__ import annotations

from collections.abc import Callable


def close_in_order(nic, first: list[tuple[str, Callable, tuple]] = ()) -> list[str]:
    """Run ``first`` (what, fn, args), then destroy ``nic``'s QPs, CQs and MRs (newest first), its PD and device.
    Returns the failures as "what: error" lines; the lists and handles on ``nic`` are emptied."""
    errors: list[str] = []

    def run(what, fn, *args):
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - keep closing the rest
            errors.append(f"{what}: {e}")

    for what, fn, args in first:
        run(what, fn, *args)
    for qp in reversed(nic._qps):
        run(f"destroy QP {qp.qpn}", qp.handle.close)
        qp.state = type(qp).CLOSED
    nic._qps.clear()
    for cq in reversed(nic._cqs):
        run(f"destroy CQ {getattr(cq, 'cqn', '')}".rstrip(), cq.handle.close)
    nic._cqs.clear()
    for mr in reversed(nic._mrs):
        run(f"deregister MR 0x{mr.addr:x}", mr.handle.close)
    nic._mrs.clear()
    if nic._pd is not None:
        run("dealloc PD", nic._pd.close)
        nic._pd = None
    if nic._ctx is not None:
        run("close device", nic._ctx.close)
    return errors
