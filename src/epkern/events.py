"""``EventHandle``: what ``async_finish=True`` returns (a CuPy event on the GPU backend)."""

from __future__ import annotations


class EventHandle:
    """The event every ``Buffer`` call returns (last in its tuple): the end of that call's work.

    With ``async_finish=False`` (the default) the caller's current stream already waits for the call, so the
    event is rarely needed; a repeated call launched straight onto that stream (gpu/direct.py) returns an empty
    one (``event`` None: its methods return at once; to wait on the host, synchronize that stream). With
    ``async_finish=True`` the caller's stream does not wait: the call runs on the Buffer's communication stream,
    and this event marks its end; order later work after it with
    :meth:`current_stream_wait` (device side) or :meth:`synchronize` (host side), or pass it as
    ``previous_event=`` to a later call, which then waits for it instead of for the current stream.

    On the GPU backend ``event`` is a ``cupy.cuda.Event``; on the CPU backend work is done when the call
    returns, so ``event`` is None and the handle is already complete (every method returns at once).

    A failure of the call's GPU work (a peer that never answered, a device-side error) raises here at the
    latest: :meth:`synchronize` waits at most the Buffer's deadline (plus a margin) and then raises what the
    kernels recorded; :meth:`current_stream_wait` raises a failure already recorded. Otherwise it raises at the
    Buffer's next call or :meth:`epkern.Buffer.check`.

    Args:
        event: a ``cupy.cuda.Event``, or None (nothing to wait for here: the CPU backend's finished work, or work
            already ordered on the caller's stream).
        runtime: the Buffer's GPU runtime (its deadline and error record), or None.

    Example::

        recv_x, _, _, _, handle, event = buf.dispatch(x, ..., async_finish=True)
        overlap_other_work()                     # on the current stream, concurrent with the dispatch
        event.current_stream_wait()              # then the current stream waits for the dispatch
        y = expert(recv_x)
        combined_x, _, event = buf.combine(y, handle, previous_event=event, async_finish=True)
        event.synchronize()                      # the host waits for the combine
    """

    def __init__(self, event=None, runtime=None):
        self.event = event
        self._runtime = runtime

    def current_stream_wait(self) -> None:
        """Make the current CuPy stream wait for the event (no host wait); nothing on the CPU backend. Raises a
        failure the Buffer's kernels already recorded."""
        if self.event is not None:
            import cupy

            if self._runtime is not None:
                self._runtime.raise_recorded()
            cupy.cuda.get_current_stream().wait_event(self.event)

    def synchronize(self) -> None:
        """Block the host until the event has completed (at most the Buffer's deadline plus a margin), then raise
        what the call's kernels recorded (TimeoutError naming rank, phase and peer); returns at once on the CPU
        backend."""
        if self.event is None:
            return
        if self._runtime is None:
            self.event.synchronize()
            return
        self._runtime.wait_event_bounded(self.event, "waiting for an event of this Buffer")

    def done(self) -> bool:
        """Whether the event has completed, without waiting (always True on the CPU backend)."""
        return self.event is None or self.event.done
