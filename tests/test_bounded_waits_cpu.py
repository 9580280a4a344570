"""Host waits epkern does not bound through a Buffer's runtime are bounded too (issue #20, finding 7):
stream waits poll against a deadline, blocking calls that cannot be polled run on a helper thread waited for with
a timeout. Both raise TimeoutError naming what waited."""

from __future__ import annotations

import time

import cupy
import pytest

from epkern import _cuda
from epkern.errors import TimeoutError as EpTimeout


class _Stream:
    def __init__(self, done_after_s: float | None):
        self.until = None if done_after_s is None else time.monotonic() + done_after_s

    @property
    def done(self):
        return self.until is not None and time.monotonic() >= self.until


def test_wait_stream_returns_when_idle_and_raises_at_the_deadline():
    _cuda.wait_stream(_Stream(0.05), 5, "a wait")
    start = time.monotonic()
    with pytest.raises(EpTimeout, match=r"^the layout check: the GPU work did not finish within 0.2 s"):
        _cuda.wait_stream(_Stream(None), 0.2, "the layout check")
    assert time.monotonic() - start < 2


@pytest.fixture
def fake_device(monkeypatch):
    seen = []
    monkeypatch.setattr(cupy.cuda.runtime, "getDevice", lambda: 3)
    monkeypatch.setattr(cupy.cuda.runtime, "setDevice", seen.append)
    return seen


def test_call_bounded_runs_on_the_callers_device_and_returns(fake_device):
    assert _cuda.call_bounded(lambda: 42, 5, "a call") == 42
    assert fake_device == [3]


def test_call_bounded_raises_the_calls_error_and_times_out(fake_device):
    def boom():
        raise ValueError("driver said no")

    with pytest.raises(ValueError, match="driver said no"):
        _cuda.call_bounded(boom, 5, "a call")
    start = time.monotonic()
    with pytest.raises(EpTimeout, match=r"^freeing: did not return within 0.1 s"):
        _cuda.call_bounded(lambda: time.sleep(3), 0.1, "freeing")
    assert time.monotonic() - start < 2
