"""epkern: Mixture-of-Experts expert-parallel dispatch/combine with run-time-compiled CUDA kernels.

Importing epkern is cheap and works without a GPU, MPI, torch or rdma-core; each facility is loaded when
first used and says clearly why it is unavailable.
"""

from __future__ import annotations

from . import errors
from ._cuda import gpu_available
from .buffer import Buffer, EventHandle
from .config import Config
from .errors import (
    ArgumentError,
    ConfigError,
    DeviceUnavailableError,
    EpkernError,
    GroupError,
    KernelCompileError,
)

__version__ = "0.1.0"

__all__ = [
    "Buffer",
    "Config",
    "EventHandle",
    "ArgumentError",
    "ConfigError",
    "DeviceUnavailableError",
    "EpkernError",
    "GroupError",
    "KernelCompileError",
    "errors",
    "gpu_available",
    "__version__",
]
