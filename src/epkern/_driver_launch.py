"""Kernel launches through the CUDA driver's ``cuLaunchKernel`` (ctypes) with the arguments packed once.

CuPy's launch converts every argument on every call (about 20 for the LL kernels), which is most of what a
replayed LL call costs on the host (``EPKERN_LL_FAST_HOST=2``, ll_plans.py). Here the arguments are ctypes
values laid out once, as CuPy lays them out (a numpy scalar by its dtype, a device array as its pointer);
a launch only updates the few values that change (phase, back) and makes one ctypes call.
"""

from __future__ import annotations

import ctypes

import numpy as np

from .errors import EpkernError

_CTYPES = {
    np.dtype(np.int32): ctypes.c_int32,
    np.dtype(np.uint32): ctypes.c_uint32,
    np.dtype(np.int64): ctypes.c_int64,
    np.dtype(np.uint64): ctypes.c_uint64,
}
_lib = None  # libcuda, bound on first use (tests put a stand-in here)


def _driver():
    global _lib
    if _lib is None:
        lib = ctypes.CDLL("libcuda.so.1")
        u32 = ctypes.c_uint
        lib.cuLaunchKernel.argtypes = [
            ctypes.c_void_p,  # CUfunction
            u32, u32, u32,  # grid
            u32, u32, u32,  # block
            u32,  # dynamic shared memory
            ctypes.c_void_p,  # CUstream
            ctypes.POINTER(ctypes.c_void_p),  # kernelParams
            ctypes.POINTER(ctypes.c_void_p),  # extra
        ]  # fmt: skip
        lib.cuLaunchKernel.restype = ctypes.c_int
        _lib = lib
    return _lib


def pack(args) -> list:
    """ctypes values of kernel arguments as CuPy passes them: numpy scalars by their dtype (int32, uint32,
    int64, uint64; np.uintp is uint64), device arrays (anything with ``.data.ptr``) as 64-bit pointers."""
    values = []
    for i, a in enumerate(args):
        if isinstance(a, np.generic):
            ctype = _CTYPES.get(a.dtype)
            if ctype is None:
                raise TypeError(f"kernel argument {i}: numpy {a.dtype} has no packing here")
            values.append(ctype(a.item()))
        elif hasattr(getattr(a, "data", None), "ptr"):
            values.append(ctypes.c_uint64(a.data.ptr))
        else:
            raise TypeError(f"kernel argument {i}: expected a numpy scalar or a device array, got {type(a).__name__}")
    return values


class DriverLaunch:
    """One kernel's launch with its arguments packed once; ``launch(stream_ptr)`` after ``set(i, value)``
    for the arguments that change. Holds the arrays it was given (their memory stays alive)."""

    def __init__(self, function_ptr: int, grid: int, block: int, args: tuple):
        self._keep = args
        self._values = pack(args)
        self._params = (ctypes.c_void_p * len(self._values))(*(ctypes.addressof(v) for v in self._values))
        self._function = ctypes.c_void_p(function_ptr)
        self._grid, self._block = int(grid), int(block)

    def set(self, i: int, value: int) -> None:
        self._values[i].value = value

    def launch(self, stream_ptr: int) -> None:
        status = _driver().cuLaunchKernel(
            self._function, self._grid, 1, 1, self._block, 1, 1, 0, ctypes.c_void_p(stream_ptr), self._params, None
        )
        if status != 0:
            raise EpkernError(f"cuLaunchKernel failed: CUresult {status}")
