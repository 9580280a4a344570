"""Device-visible memory that epkern manages itself.

``HostMapped``: pinned host memory mapped into every device's address space (counters, flags and error
records the GPU writes and the host polls without a copy). With unified addressing the device pointer
equals the host pointer.
"""

from __future__ import annotations

import ctypes

import numpy as np

from .. import _cuda


class HostMapped:
    """``nbytes`` of zeroed, pinned, device-mapped host memory; ``.host`` is a numpy uint8 view,
    ``.device_ptr`` the address kernels use. ``close()`` (idempotent) frees it."""

    def __init__(self, nbytes: int):
        _cuda.require_gpu("host-mapped memory")
        import cupy.cuda.runtime as rt

        self.nbytes = max(int(nbytes), 1)
        self._rt = rt
        self._ptr = rt.hostAlloc(self.nbytes, rt.hostAllocMapped | rt.hostAllocPortable)
        # Unified addressing (every 64-bit CUDA platform epkern runs on): the device sees the same
        # address. CuPy does not wrap cudaHostGetDevicePointer.
        self.device_ptr = self._ptr
        buf = (ctypes.c_uint8 * self.nbytes).from_address(self._ptr)
        self.host = np.frombuffer(buf, dtype=np.uint8)
        self.host[:] = 0

    def view(self, dtype, offset: int = 0, count: int | None = None) -> np.ndarray:
        """A typed numpy view of the host side (volatile in spirit: re-read it, never cache values)."""
        dtype = np.dtype(dtype)
        count = (self.nbytes - offset) // dtype.itemsize if count is None else count
        return self.host[offset : offset + count * dtype.itemsize].view(dtype)

    def close(self) -> None:
        if self._ptr:
            self.host = None
            self._rt.freeHost(self._ptr)
            self._ptr = 0
            self.device_ptr = 0

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
