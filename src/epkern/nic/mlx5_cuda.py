"""What the mlx5 backend asks of CUDA: host pages (send rings, doorbell records, the doorbell register's UAR
page) mapped into the GPU through reference-counted ``cudaHostRegister`` (:class:`HostPageRegistry`; the device
addresses of one QP: :class:`Mlx5GpuQp`), and GPU memory exported as dma-buf for ``ibv_reg_dmabuf_mr``
(:func:`dmabuf_range`). :class:`CudaCalls` makes the calls (``epkern._cuda_driver`` and CuPy's runtime), loaded
only on GPU machines; the page arithmetic is tested on the CPU."""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable
from dataclasses import dataclass

from .. import _cuda_driver as driver
from ..errors import DeviceUnavailableError
from .observation import NicError

# cudaHostRegister flags (driver_types.h) = CU_MEMHOSTREGISTER_* (cuda.h)
HOST_REGISTER_PORTABLE = 0x01
HOST_REGISTER_MAPPED = 0x02
HOST_REGISTER_IOMEMORY = 0x04


def page_size() -> int:
    return mmap.PAGESIZE


def page_range(addr: int, length: int, page: int | None = None) -> tuple[int, int]:
    """``(start, size)`` of the smallest page-aligned range covering ``[addr, addr + length)``."""
    page = page_size() if page is None else int(page)
    if page <= 0 or page & (page - 1):
        raise NicError(f"page size must be a power of two, got {page}")
    if length <= 0 or addr < 0:
        raise NicError(f"page_range needs a non-empty range, got addr=0x{addr:x} length={length}")
    start = addr & ~(page - 1)
    end = (addr + length + page - 1) & ~(page - 1)
    return start, end - start


def dmabuf_range(
    addr: int, length: int, alloc_base: int, alloc_size: int, page: int | None = None
) -> tuple[int, int, int]:
    """What to export and register for GPU memory ``[addr, addr + length)`` inside the CUDA allocation
    ``[alloc_base, alloc_base + alloc_size)``: ``(start, size, offset)``.

    ``cuMemGetHandleForAddressRange`` wants a host-page-aligned start and size inside one allocation; the MR is then
    ``ibv_reg_dmabuf_mr(pd, offset=addr - start, length, iova=addr, fd)``, so remote WQEs name device addresses and
    iova and offset have the same page offset (what the kernel's dma-buf umem needs)."""
    start, size = page_range(addr, length, page)
    if not (alloc_base <= addr and addr + length <= alloc_base + alloc_size):
        raise NicError(f"GPU range 0x{addr:x}+{length} is not inside its allocation 0x{alloc_base:x}+{alloc_size}")
    if start < alloc_base or start + size > alloc_base + alloc_size:
        raise NicError(
            f"GPU range 0x{addr:x}+{length} rounds out to pages 0x{start:x}+{size}, outside its allocation "
            f"0x{alloc_base:x}+{alloc_size}; allocate page-aligned GPU memory (e.g. a large cupy allocation) to "
            "register it through dma-buf"
        )
    return start, size, addr - start


class CudaCalls:
    """The driver calls of the mlx5 backend (epkern._cuda_driver; their errors raised as :class:`NicError`) plus CuPy's
    cudaHostRegister."""

    _inst: CudaCalls | None = None
    _lock = threading.Lock()

    def __init__(self):
        try:
            import cupy.cuda.runtime as rt
        except Exception as e:  # noqa: BLE001
            raise DeviceUnavailableError(f"mapping mlx5 queues into the GPU needs CuPy ({e})") from None
        driver.library()  # DeviceUnavailableError here, not at the first call, without a driver
        self.rt = rt

    @classmethod
    def get(cls) -> CudaCalls:
        with cls._lock:
            if cls._inst is None:
                cls._inst = cls()
            return cls._inst

    @staticmethod
    def _call(fn, *args):
        try:
            return fn(*args)
        except driver.DriverError as e:
            raise NicError(str(e)) from None

    def address_range(self, ptr: int) -> tuple[int, int]:
        self.rt.pointerGetAttributes(ptr)  # a runtime call: makes the primary context current on this thread
        return self._call(driver.mem_get_address_range, ptr)

    def dmabuf_fd(self, start: int, size: int) -> int:
        return self._call(driver.mem_get_dmabuf_fd, start, size)

    def host_register(self, addr: int, size: int, flags: int) -> None:
        self.rt.hostRegister(addr, size, flags)

    def host_unregister(self, addr: int) -> None:
        self.rt.hostUnregister(addr)

    def device_pointer(self, addr: int) -> int:
        return self._call(driver.mem_host_get_device_pointer, addr)


class HostPageRegistry:
    """Reference-counted ``cudaHostRegister`` of host pages, one registration per page.

    Doorbell records of several QPs and CQs share pages, and QPs may share a UAR page, so pages are registered
    once and unregistered when their last user releases them. A page registered as I/O memory cannot be taken as
    normal memory or the reverse. ``register(addr, size, flags)``/``unregister(addr)``/``device_pointer(addr)``
    default to CUDA (tests pass fakes)."""

    def __init__(
        self,
        register: Callable[[int, int, int], None] | None = None,
        unregister: Callable[[int], None] | None = None,
        device_pointer: Callable[[int], int] | None = None,
        page: int | None = None,
    ):
        self.page = page_size() if page is None else int(page)
        self._register = register
        self._unregister = unregister
        self._device_pointer = device_pointer
        self._pages: dict[int, list[int]] = {}  # page address -> [refcount, flags]
        self._lock = threading.Lock()

    def _cuda(self):
        """(register, unregister, device_pointer): the injected ones, CUDA for the rest (loaded only if needed)."""
        fns = (self._register, self._unregister, self._device_pointer)
        if all(fns):
            return fns
        c = CudaCalls.get()
        return tuple(f or g for f, g in zip(fns, (c.host_register, c.host_unregister, c.device_pointer), strict=True))

    def acquire(self, addr: int, length: int, flags: int) -> int:
        """Register the pages of ``[addr, addr + length)`` (those not yet registered) and return the device address
        of ``addr``."""
        start, size = page_range(addr, length, self.page)
        register, unregister, devptr = self._cuda()
        with self._lock:
            pages = range(start, start + size, self.page)
            for p in pages:
                if p in self._pages and self._pages[p][1] != flags:
                    raise NicError(
                        f"page 0x{p:x} is already registered with flags 0x{self._pages[p][1]:x}, not 0x{flags:x}"
                    )
            done = []
            try:
                for p in pages:
                    if p not in self._pages:
                        register(p, self.page, flags)
                        self._pages[p] = [0, flags]
                        done.append(p)
                    self._pages[p][0] += 1
            except Exception:
                for p in pages:
                    if p in self._pages and p not in done:
                        self._pages[p][0] -= 1
                for p in done:
                    self._pages.pop(p, None)
                    unregister(p)
                raise
            return devptr(addr)

    def release(self, addr: int, length: int) -> None:
        start, size = page_range(addr, length, self.page)
        _, unregister, _ = self._cuda()
        with self._lock:
            for p in range(start, start + size, self.page):
                entry = self._pages.get(p)
                if entry is None:
                    continue
                entry[0] -= 1
                if entry[0] <= 0:
                    del self._pages[p]
                    unregister(p)

    @property
    def registered_pages(self) -> dict[int, tuple[int, int]]:
        with self._lock:
            return {p: (c, f) for p, (c, f) in self._pages.items()}


@dataclass(frozen=True)
class Mlx5GpuQp:
    """Device addresses of one QP for ``kernels/mlx5_wqe.cuh``: ``sq`` (ring of ``wqe_cnt`` WQEBBs), ``dbrec``
    (``uint32_t *``; ``[1]`` is the send record), ``db_reg`` (``unsigned long long *``, the doorbell register)."""

    sq: int
    dbrec: int
    db_reg: int
    qpn: int
    wqe_cnt: int
