"""Replays straight onto the caller's stream (LL and HT alike).

A call normally runs on the Buffer's comm stream: the comm stream waits for the caller's stream (an event), the
kernel runs there, and the caller's stream waits for the comm stream (another event). When the caller's stream
already follows all of the Buffer's work (``Runtime.joined_ptr``: the previous call ended by making it wait) and
the caller waits for this call too (no ``async_finish``, no ``previous_event``, outputs not on the comm stream),
the launch can go onto the caller's stream itself: the same order, without two events, two waits and the stream
switches (measured as a quarter of an HT replay's host time on an H100 under MPS). The next comm-stream work
waits for it (``Runtime.join_direct``).
"""

from __future__ import annotations

from ..events import EventHandle

NO_EVENT = EventHandle(None)  # what a direct replay returns as its event (nothing to wait for); read-only


def direct_stream(rt, async_finish, previous_event=None, allocate_on_comm_stream=False):
    """The caller's current stream if this call may launch straight onto it (see the module docstring), else None."""
    import cupy

    if async_finish or previous_event is not None or allocate_on_comm_stream:
        return None
    compute = cupy.cuda.get_current_stream()
    return compute if compute.ptr == rt.joined_ptr else None


def end_direct(rt, compute, captured: bool = False):
    """After a launch onto ``compute`` (the caller's stream): the comm stream's next work waits for it; with
    in-process ranks the host waits for it as ``Runtime.end`` does (not while ``compute`` is captured)."""
    rt.launched_direct(compute)
    if rt.in_process and rt.num_ranks > 1 and not captured:
        rt.sync_bounded(compute, "waiting for this call's kernel (in-process ranks)")  # as Runtime.end
    return NO_EVENT


__all__ = ["NO_EVENT", "direct_stream", "end_direct"]
