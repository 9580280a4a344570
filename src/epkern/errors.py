"""Exception types raised by epkern."""

from __future__ import annotations


class EpkernError(Exception):
    """Base class of every epkern error."""


class ConfigError(EpkernError, ValueError):
    """A bad environment variable or configuration value."""


class ArgumentError(EpkernError, ValueError):
    """A public argument failed validation; the message names the argument and what was expected."""


class DeviceUnavailableError(EpkernError, RuntimeError):
    """A GPU (or another device facility) was needed and is not there."""


class KernelCompileError(EpkernError, RuntimeError):
    """NVRTC rejected a kernel source; the message carries the compiler log."""


class GroupError(EpkernError, RuntimeError):
    """A process-group operation failed or ran past its deadline. ``silent_ranks``: the ranks that did not arrive,
    where the group knows them (in-process and MPI groups), else None."""

    def __init__(self, *args, silent_ranks=None):
        super().__init__(*args)
        self.silent_ranks = None if silent_ranks is None else tuple(silent_ranks)


class TimeoutError(EpkernError, RuntimeError):  # noqa: A001 - deliberate: epkern.errors.TimeoutError
    """A device-side or group wait ran past its deadline (message names rank, phase and peer)."""
