"""``EventHandle``: what ``async_finish=True`` returns (a CuPy event on the GPU backend)."""

from __future__ import annotations


class EventHandle:
    """What ``async_finish=True`` returns. On the CPU backend work is done when the call returns, so the
    event is already complete; the GPU backend wraps a CuPy event."""

    def __init__(self, event=None):
        self.event = event

    def current_stream_wait(self) -> None:
        if self.event is not None:
            import cupy

            cupy.cuda.get_current_stream().wait_event(self.event)

    def synchronize(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def done(self) -> bool:
        return self.event is None or self.event.done
