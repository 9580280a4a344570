"""Errors on the call that failed (issue #20, finding 3), over the fake CuPy (no GPU) and the CPU backend: an
event's synchronize() waits at most the deadline and raises what the call's kernels recorded; its
current_stream_wait() raises a failure already recorded; Buffer.check() raises without waiting; a Buffer used by
two threads at once refuses the second instead of mixing their rows."""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest

import epkern
import fake_cupy as F
from epkern.errors import EpkernError
from epkern.errors import TimeoutError as EpTimeout
from epkern.gpu.runtime import PHASES

PHASE = next(iter(PHASES))


@pytest.fixture
def fake(monkeypatch):
    with F.installed(monkeypatch, emulate={"epk_ht_notify": F.emulate_ht_notify_one_rank}) as launches:
        yield launches


def _async_dispatch(buf):
    inputs = F.ht_inputs(64, 1024, 4, 8)
    return F.full_dispatch(buf, inputs, async_finish=True)


def test_event_synchronize_raises_the_calls_recorded_failure(fake):
    buf = F.fake_buffer()
    event = _async_dispatch(buf)[-1]
    event.synchronize()  # nothing recorded: returns
    buf.check()
    F.record_kernel_error(buf, 1, PHASE, 1, 7, 8)
    with pytest.raises(EpTimeout, match=rf"rank 0: {re.escape(PHASES[PHASE])}: peer 1 did not answer"):
        event.synchronize()
    with pytest.raises(EpkernError, match="peer 1 did not answer"):  # and again at every later call
        buf.check()
    buf.destroy()


def test_event_current_stream_wait_raises_a_recorded_failure(fake):
    buf = F.fake_buffer()
    event = _async_dispatch(buf)[-1]
    F.record_kernel_error(buf, 1, PHASE, 1)
    with pytest.raises(EpTimeout, match="peer 1 did not answer"):
        event.current_stream_wait()
    buf.destroy()


def test_event_that_never_completes_raises_within_the_bound(fake, monkeypatch):
    from epkern.gpu import runtime

    monkeypatch.setattr(runtime, "HOST_MARGIN_S", 0.05)
    buf = F.fake_buffer(timeout_s=0.05)
    event = _async_dispatch(buf)[-1]
    event.event.done = False
    start = time.monotonic()
    with pytest.raises(EpTimeout, match="the event did not complete within 0.1 s"):
        event.synchronize()
    assert time.monotonic() - start < 5
    with pytest.raises(EpkernError, match="unusable"):
        buf.check()


def test_check_raises_the_recorded_failure_without_waiting(fake):
    buf = F.fake_buffer()
    buf.check()
    F.record_kernel_error(buf, 1, PHASE, 0)
    with pytest.raises(EpTimeout):
        buf.check()
    buf.destroy()
    with pytest.raises(EpkernError, match="destroyed"):
        buf.check()


def test_a_buffer_refuses_a_second_thread_inside_a_call():
    buf = epkern.Buffer(None, backend="cpu")
    inside, release = threading.Event(), threading.Event()
    real = buf._backend.get_config

    def slow_get_config():
        inside.set()
        release.wait(10)
        return real()

    buf._backend.get_config = slow_get_config
    first = threading.Thread(target=buf.get_dispatch_config)
    first.start()
    assert inside.wait(10)
    try:
        with pytest.raises(EpkernError, match=r"Buffer.set_num_sms: another thread is inside this Buffer's "):
            buf.set_num_sms(4)
    finally:
        release.set()
        first.join(10)
    buf.set_num_sms(4)  # after the first thread left: fine
    buf._backend.get_config = real
    assert buf.get_dispatch_config().num_sms == 4
    buf.destroy()


def test_sequential_calls_from_several_threads_are_fine():
    buf = epkern.Buffer(None, backend="cpu")
    errors = []

    def use(n):
        try:
            buf.set_num_sms(n)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    for n in range(1, 5):
        t = threading.Thread(target=use, args=(n,))
        t.start()
        t.join()
    assert errors == [] and buf.get_dispatch_config().num_sms == 4
    assert np.int64(1)  # numpy imported for fake_cupy's arrays
    buf.destroy()
