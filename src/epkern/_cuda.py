"""Whether a CUDA GPU is usable, asked once per process without ever raising at import."""

from __future__ import annotations

import functools

from .errors import DeviceUnavailableError


@functools.cache
def _probe() -> tuple[int, str]:
    """(number of visible devices, why none when 0)."""
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001 - any import failure means "no GPU path"
        return 0, f"CuPy cannot be imported ({exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - CUDARuntimeError without a driver/device
        return 0, f"CUDA reports no usable device ({exc})"
    return count, "" if count else "CUDA reports 0 devices"


def device_count() -> int:
    return _probe()[0]


def gpu_available() -> bool:
    return device_count() > 0


def require_gpu(what: str) -> None:
    count, why = _probe()
    if count == 0:
        raise DeviceUnavailableError(f"{what} needs a CUDA GPU, and there is none: {why}")
