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
    from . import _cuda_driver, _env

    if not _cuda_driver.initialised():  # epkern starts CUDA here: the way its in-process ranks need it
        _env.apply_cuda_defaults()
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


# CUDA majors epkern has an install extra for (pip install "epkern[cudaXY]").
_EXTRAS = {12: "cuda12", 13: "cuda13"}


def _fmt(major: int, minor: int) -> str:
    return f"{major}.{minor}"


def check_driver_for_nvrtc(driver_version: int, nvrtc: tuple[int, int]) -> None:
    """DeviceUnavailableError unless a driver of CUDA version ``driver_version`` (as cudaDriverGetVersion gives
    it: 1000 * major + 10 * minor, e.g. 13000) can load cubins of NVRTC ``nvrtc`` = (major, minor): the driver's
    CUDA major.minor must be at least NVRTC's. Pure (no GPU needed); the message names both versions and the
    extra to install."""
    d_major, d_minor = driver_version // 1000, (driver_version % 1000) // 10
    n_major, n_minor = int(nvrtc[0]), int(nvrtc[1])
    if (d_major, d_minor) >= (n_major, n_minor):
        return
    driver, compiler = _fmt(d_major, d_minor), _fmt(n_major, n_minor)
    if d_major == n_major:
        fix = (
            f'install NVRTC {driver}: pip install "nvidia-cuda-nvrtc{"-cu12" if d_major == 12 else ""}'
            f'=={driver}.*" (epkern[{_EXTRAS.get(d_major, f"cuda{d_major}")}] pins the tested minor)'
        )
    elif d_major in _EXTRAS:
        fix = (
            f"pip uninstall the CUDA {n_major} wheels (cupy-cuda{n_major}x, nvidia-cuda-nvrtc*, "
            f'nvidia-cuda-runtime*), then pip install "epkern[{_EXTRAS[d_major]}]"'
        )
    else:
        fix = f"update the NVIDIA driver (epkern supports CUDA {' and '.join(map(str, sorted(_EXTRAS)))})"
    raise DeviceUnavailableError(
        f"the NVIDIA driver supports CUDA {driver} but NVRTC is {compiler}: the driver cannot load the kernels "
        f"NVRTC {compiler} compiles; {fix}"
    )


@functools.cache
def driver_version() -> int | None:
    """cudaDriverGetVersion (1000 * major + 10 * minor), or None without a GPU or when it cannot be asked."""
    if not gpu_available():
        return None
    try:
        import cupy

        return int(cupy.cuda.runtime.driverGetVersion())
    except Exception:  # noqa: BLE001 - no answer: leave the check to the module load
        return None


def require_driver_for_nvrtc(nvrtc: tuple[int, int]) -> None:
    """On a machine with a GPU, :func:`check_driver_for_nvrtc` against its driver; nothing without one."""
    version = driver_version()
    if version is not None:
        check_driver_for_nvrtc(version, nvrtc)


def poll_until(ready, timeout_s: float, spins_before_sleep: int = 50, each=None) -> bool:
    """Poll ``ready()`` until it holds (True) or ``timeout_s`` passed (False), calling ``each()`` (if given) after
    every failed poll. After ``spins_before_sleep`` polls, sleep 20 µs between them (other in-process ranks need
    the GIL to launch what this rank may wait for; spares the CPU)."""
    import time

    deadline = time.monotonic() + timeout_s
    spins = 0
    while not ready():
        if each is not None:
            each()
        spins += 1
        if spins > spins_before_sleep:
            time.sleep(20e-6)
        if time.monotonic() > deadline:
            return False
    return True


def wait_stream(stream, timeout_s: float, what: str) -> None:
    """``stream.synchronize()`` bounded: poll the stream until it is idle or ``timeout_s`` passed (then
    TimeoutError naming ``what``). For host waits outside a Buffer's runtime (which has its own, with its deadline).
    """
    from .errors import TimeoutError

    if not (stream.done or poll_until(lambda: stream.done, timeout_s)):
        raise TimeoutError(f"{what}: the GPU work did not finish within {timeout_s:g} s")


def call_bounded(fn, timeout_s: float, what: str):
    """``fn()`` (a blocking CUDA call that cannot be polled, e.g. deviceSynchronize) on a helper thread, on the
    caller's current CUDA device, waited for at most ``timeout_s``; TimeoutError naming ``what`` after that (the
    thread is left to finish on its own)."""
    import threading

    import cupy

    from .errors import TimeoutError

    out: list = []
    device = cupy.cuda.runtime.getDevice()

    def run():
        try:
            cupy.cuda.runtime.setDevice(device)  # the current device is per thread
            out.append((True, fn()))
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            out.append((False, exc))

    thread = threading.Thread(target=run, name=f"epkern-bounded-{what[:24]}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not out:
        raise TimeoutError(
            f"{what}: did not return within {timeout_s:g} s (the GPU is busy with work that does not end)"
        )
    ok, value = out[0]
    if not ok:
        raise value
    return value
