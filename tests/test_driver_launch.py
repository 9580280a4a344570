"""epkern._cuda_driver on the CPU: the packed kernel parameters hold exactly the values CuPy would pass
(numpy scalars by dtype, arrays as pointers), launches go through cuLaunchKernel with them (a stand-in driver
decodes what it is given), LL replays pass the driver what the full path passed CuPy, a refused call is named
by cuGetErrorName, and without libcuda every call raises DeviceUnavailableError.
(tests/test_vmm_layout.py checks the bindings against cuda.h and calls each through a compiled stand-in.)"""

from __future__ import annotations

import ctypes
import types

import numpy as np
import pytest

import fake_cupy as F
from epkern import _cuda_driver as D
from epkern.errors import DeviceUnavailableError, EpkernError

_DECODE = {np.dtype(np.int32): ctypes.c_int32, np.dtype(np.uint32): ctypes.c_uint32}


def _decode(params, like):
    """Read each parameter back with the type its argument in ``like`` has."""
    out = []
    for i, a in enumerate(like):
        if not isinstance(a, np.generic):  # a device array: its pointer
            ctype = ctypes.c_uint64
        else:
            ctype = _DECODE.get(a.dtype, ctypes.c_int64 if isinstance(a, np.int64) else ctypes.c_uint64)
        out.append(int(ctype.from_address(params[i]).value))
    return out


def _as_ints(args):
    return [int(a.data.ptr) if hasattr(getattr(a, "data", None), "ptr") else int(a) for a in args]


class _Driver:
    """Stands in for libcuda: records (function, grid, block, stream, params) of every launch."""

    NAMES = {700: b"CUDA_ERROR_ILLEGAL_ADDRESS"}

    def __init__(self, status=0):
        self.calls, self.status = [], status

    def cuLaunchKernel(self, *args):  # noqa: N802 - the driver's name
        f, gx, gy, gz, bx, by, bz, smem, stream = (a.value for a in args[:9])  # ctypes values, as the driver gets
        self.calls.append((f, (gx, gy, gz), (bx, by, bz), smem, stream, args[9], args[10]))
        return self.status

    def cuGetErrorName(self, status, name_ref):  # noqa: N802
        if status not in self.NAMES:
            return 1  # CUDA_ERROR_INVALID_VALUE, as the driver answers for an unknown code
        name_ref._obj.value = self.NAMES[status]
        return 0


def test_pack_lays_out_values_as_cupy_passes_them():
    arr = types.SimpleNamespace(data=types.SimpleNamespace(ptr=0xDEAD0000))
    args = (np.int32(-3), np.uint32(7), np.int64(-(1 << 40)), np.uint64(1 << 63), np.uintp(0x1234), arr)
    values = D.pack(args)
    assert [ctypes.sizeof(v) for v in values] == [4, 4, 8, 8, 8, 8]
    assert [bytes(v) for v in values[:5]] == [a.tobytes() for a in args[:5]]
    assert values[5].value == 0xDEAD0000
    with pytest.raises(TypeError, match="argument 0: numpy float32"):
        D.pack((np.float32(1),))
    with pytest.raises(TypeError, match="argument 1: expected a numpy scalar or a device array"):
        D.pack((np.int32(1), 5))


def test_launch_passes_the_packed_parameters_and_updates_set_ones(monkeypatch):
    driver = _Driver()
    monkeypatch.setattr(D, "_lib", driver)
    args = (np.int32(0), np.int32(5), np.int32(1), np.int32(0), np.uintp(0xABC), np.int64(42))
    launch = D.DriverLaunch(0x77, 16, 512, args)
    launch.launch(0x99)
    assert _decode(driver.calls[0][5], args) == [0, 5, 1, 0, 0xABC, 42]  # read before the next set()
    launch.set(2, 2)
    launch.set(3, 1)
    launch.launch(0x99)
    assert _decode(driver.calls[1][5], args) == [0, 5, 2, 1, 0xABC, 42]
    assert [c[:5] for c in driver.calls] == [(0x77, (16, 1, 1), (512, 1, 1), 0, 0x99)] * 2
    assert driver.calls[0][6] is None
    monkeypatch.setattr(D, "_lib", _Driver(status=700))
    with pytest.raises(D.DriverError, match=r"cuLaunchKernel failed: CUDA_ERROR_ILLEGAL_ADDRESS \(CUresult 700\)"):
        launch.launch(0x99)
    monkeypatch.setattr(D, "_lib", _Driver(status=12345))
    with pytest.raises(EpkernError, match=r"cuLaunchKernel failed: CUresult 12345$") as err:
        launch.launch(0x99)
    assert (err.value.call, err.value.status, err.value.name) == ("cuLaunchKernel", 12345, "")


def test_without_libcuda_every_call_raises_device_unavailable(monkeypatch):
    """Importing needs no driver; the first call loads it, and its absence is a DeviceUnavailableError."""
    import ctypes.util

    if ctypes.util.find_library("cuda"):
        pytest.skip("this machine has a CUDA driver")
    monkeypatch.setattr(D, "_lib", None)
    for call in (D.library, lambda: D.mem_get_allocation_granularity(0), lambda: D.error_name(1)):
        with pytest.raises(DeviceUnavailableError, match=r"libcuda\.so\.1"):
            call()
    launch = D.DriverLaunch(0x77, 1, 32, (np.int32(1),))
    with pytest.raises(DeviceUnavailableError):
        launch.launch(0)
    assert D._lib is None


def test_a_driver_without_a_bound_call_is_refused():
    class Old:  # a driver that has every call but the last of SIGNATURES
        def __getattr__(self, name):
            if name == list(D.SIGNATURES)[-1]:
                raise AttributeError(name)
            return types.SimpleNamespace()

    with pytest.raises(DeviceUnavailableError, match=f"no {list(D.SIGNATURES)[-1]} "):
        D._bind(Old())


def test_ll_replays_pass_the_driver_what_the_full_path_passed_cupy(monkeypatch):
    """The LL engine's replays through the real DriverLaunch (fake_cupy stands in a recording one; this test puts
    the real one back, over the stand-in driver): every parameter the driver gets is the value the full path gave
    CuPy, with the same grid and block, on the comm stream."""
    from epkern.gpu.ll import plans
    from test_gpu_host_paths_cpu import NUM_MAX, E, _ll_buffer, _ll_setup

    driver = _Driver()
    monkeypatch.setattr(D, "_lib", driver)
    with F.installed(monkeypatch) as launches:
        monkeypatch.setattr(plans, "DriverLaunch", D.DriverLaunch)
        buf = _ll_buffer()
        x, idx, w, outs, y, out = _ll_setup()

        def pair():
            handle = buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, async_finish=True, **outs)[2]
            buf.low_latency_combine(y, idx, w, handle, out=out, async_finish=True)

        pair()
        full = F.real_launches(launches)
        assert [launch[1] for launch in full] == ["epk_ll_dispatch", "epk_ll_combine"]
        for _ in range(3):
            pair()
        assert len(F.real_launches(launches)) == 2 and len(driver.calls) == 6 and buf._backend.ll.replays == 6
        for i, call in enumerate(driver.calls):
            want = full[i % 2]
            assert call[1] == want[3] + (1, 1) and call[2] == want[4] + (1, 1) and call[3] == 0
            assert call[4] == want[6]  # the comm stream, as the full path's launch
            assert _decode(call[5], want[5]) == _as_ints(want[5])
        buf.destroy()
