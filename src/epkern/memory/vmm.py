"""Device memory shared between processes through CUDA's virtual memory management API (cuMemCreate /
cuMemMap; CuPy does not expose these calls: epkern._cuda_driver binds them).

Why not ``cudaIpcOpenMemHandle``: on an H200 with 8 MPS processes, the same copy loop ran at 0.45 of the
HBM floor into memory opened with ``cudaIpcOpenMemHandle`` against 0.86 into the process's own memory
(bench/bench_copy_patterns.py --mpi [--ipc], docs/performance.md). Here every process maps the physical
allocation itself, at the allocation granularity the driver recommends, with read-write access for its
device.

A physical allocation is exported as a POSIX file descriptor; descriptors travel between processes over Unix
sockets (:mod:`.fd_exchange`, which hands them to the group's ranks only), so this works only between processes of
one host.
"""

from __future__ import annotations

from .. import _cuda_driver as driver
from ..errors import EpkernError


def granularity(device: int) -> int:
    return driver.mem_get_allocation_granularity(device)


def supported(device: int = 0) -> bool:
    """Whether the driver has the VMM calls (it loads and answers a granularity query for ``device``)."""
    try:
        return granularity(device) > 0
    except EpkernError:  # DeviceUnavailableError (no driver, or too old a one) or DriverError
        return False


class Mapping:
    """``nbytes`` (rounded up to the granularity) of device memory mapped read-write at ``ptr`` for
    ``device``: a new physical allocation (``fd=None``), or another process's, imported from its file
    descriptor. The caller's CUDA context must be current (CuPy's device of ``device``)."""

    def __init__(self, nbytes: int, device: int, fd: int | None = None):
        g = granularity(device)
        self.size = max(g, -(-int(nbytes) // g) * g)
        self.ptr = 0
        self.handle = driver.mem_create(self.size, device) if fd is None else driver.mem_import_from_fd(fd)
        try:
            self.ptr = driver.mem_address_reserve(self.size, g)
            driver.mem_map(self.ptr, self.size, self.handle)
            driver.mem_set_access_readwrite(self.ptr, self.size, device)
        except Exception:
            self.close()
            raise

    def export_fd(self) -> int:
        """A new file descriptor of the physical allocation (the caller closes it)."""
        return driver.mem_export_to_fd(self.handle)

    def close(self) -> None:
        """Unmaps and releases (idempotent); the physical memory goes when its last mapping does."""
        if self.ptr:
            driver.mem_unmap(self.ptr, self.size)  # teardown: statuses ignored, everything is released
            driver.mem_address_free(self.ptr, self.size)
            self.ptr = 0
        if self.handle:
            driver.mem_release(self.handle)
            self.handle = 0
