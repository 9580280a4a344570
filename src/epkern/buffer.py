"""``epkern.Buffer``: the communication buffer, DeepEP V1's ``deep_ep.Buffer`` surface.

``Buffer(group, ...)`` picks its implementation from ``backend=`` (or EPKERN_BACKEND): ``"cpu"`` runs every
operation on the numpy reference across the group's ranks (arrays are numpy); ``"gpu"`` is the CUDA path
(arrays are CuPy). ``"auto"`` (the default) takes the GPU when CuPy sees one.
"""

from __future__ import annotations

import functools

from . import _cuda, _env
from .errors import ArgumentError


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


def resolve_backend(backend: str | None) -> str:
    choice = _env.backend() if backend is None else backend
    if choice not in ("auto", "gpu", "cpu"):
        raise ArgumentError(f"backend: expected 'auto', 'gpu' or 'cpu', got {choice!r}")
    if choice == "auto":
        return "gpu" if _cuda.gpu_available() else "cpu"
    return choice


class Buffer:
    """Dispatch/combine buffer over a process group (epkern group, mpi4py communicator, torch.distributed
    process group, or None for the world). Use as a context manager or call ``destroy()``."""

    backend: str = ""

    def __new__(cls, group=None, *args, backend: str | None = None, **kwargs):
        if cls is not Buffer:
            return super().__new__(cls)
        choice = resolve_backend(backend)
        if choice == "cpu":
            from .cpu_buffer import CpuBuffer

            return super().__new__(CpuBuffer)
        _cuda.require_gpu("Buffer(backend='gpu')")
        from .gpu_buffer import GpuBuffer

        return super().__new__(GpuBuffer)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()
        return False

    def destroy(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    # A callable repeating one LL call with the same arguments (the GPU backend replays its validated launch:
    # ll_prepared.py); here, the call itself.
    def prepare_low_latency_dispatch(self, *args, **kwargs):
        return functools.partial(self.low_latency_dispatch, *args, **kwargs)

    def prepare_low_latency_combine(self, *args, **kwargs):
        return functools.partial(self.low_latency_combine, *args, **kwargs)
