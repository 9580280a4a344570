"""A :class:`~epkern.nic.emulated.MemoryAccess` backend over GPU-visible addresses, for the emulated NIC.

:class:`DeviceMemory` serves device memory (``cudaMalloc``, CuPy arrays, a peer's allocation opened with
``cudaIpcOpenMemHandle``) and pinned host-mapped memory, by address. The caller adds every range it wants the NIC
to touch with :meth:`DeviceMemory.add`; every access must lie inside one added range, else :class:`NicError` (a
second line of defence behind the NIC's MR checks, as for :class:`~epkern.nic.emulated.HostMemory`).

How the NIC thread touches the memory:

- ``read``/``write``: ``cudaMemcpyAsync(kind=cudaMemcpyDefault)`` between a host buffer and the address, on a
  private non-blocking stream of the calling thread (made on first use in that thread, one per device), then a
  synchronize of that stream. Never the legacy default stream: in-process ranks keep kernels spinning on their own
  streams, and a copy on the legacy stream would wait for them.
- ``copy_from`` (an RDMA WRITE whose source is GPU-visible memory of another or the same DeviceMemory on the same
  device): one ``cudaMemcpyAsync`` device to device on that stream, not synchronised; ``flush`` synchronises the
  stream (the NIC does before it writes a completion or advances the consumer index). The older path, a read to
  the host and a write back, each synchronised, is kept for ``direct_copies=False`` (the A/B of
  ``bench/bench_emulated_nic.py --paths host``).
- ``atomic_fetch_add64``: a one-thread kernel (``kernels/nic_fetch_add.cu``) doing ``atomicAdd_system`` on the
  64-bit word, the old value stored in an 8-byte device buffer (``cudaMallocAsync`` on that stream at the first
  atomic) and copied back, on the same private stream. System scope, so the add is atomic with respect to device
  code and to other processes on the GPU (MPS clients of an IPC-opened allocation). On pinned host memory of a
  platform without native host atomics (``hostNativeAtomicSupported`` = 0, most x86 PCIe hosts) it is atomic only
  among devices, not against the host CPU.

All calls on one object are serialised by a lock. Nothing touches CUDA (or imports CuPy) until the first
``read``/``write``/``atomic_fetch_add64`` of a non-empty range: constructing the object and adding ranges works
without a GPU.

Remote memory: the emulated NIC executes a WQE on the *sender's* side, in the sender NIC's thread, through the
``memory`` of the NIC that owns the target MR. Across processes there is no peer NIC object, so the sender opens
the peer's allocation with ``cudaIpcOpenMemHandle``, adds the opened pointer here and registers it as an MR on its
own :class:`~epkern.nic.emulated.EmulatedNic`; a QP connected in loopback then writes straight into the peer's
memory (see ``tests/nic_mpi_worker.py``).
"""

from __future__ import annotations

import bisect
import threading

import numpy as np

from .emulated import NicError, range_base

__all__ = ["DeviceMemory"]

_MASK64 = (1 << 64) - 1
_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: direction inferred from the addresses (unified addressing)

_local = threading.local()  # per thread: {device ordinal: cupy Stream}


def _fetch_add_kernel():
    """kernels/nic_fetch_add.cu, through the project's NVRTC pipeline (cubin, disk cache)."""
    from .. import kernel_loader

    return kernel_loader.get_function("nic_fetch_add.cu", "epk_nic_fetch_add64")


def _thread_stream(device: int):
    """The calling thread's private non-blocking stream on ``device`` (made on first use)."""
    streams = getattr(_local, "streams", None)
    if streams is None:
        streams = _local.streams = {}
    stream = streams.get(device)
    if stream is None:
        import cupy

        with cupy.cuda.Device(device):
            stream = streams[device] = cupy.cuda.Stream(non_blocking=True)
    return stream


class DeviceMemory:
    """:class:`MemoryAccess` over GPU-visible address ranges added with :meth:`add`.

    ``device``: the CUDA device whose streams and kernel serve the accesses; by default the device of the first
    added range (``cudaPointerGetAttributes``), asked at the first access."""

    def __init__(self, device: int | None = None, stream=None, direct_copies: bool = True):
        if device is not None and (isinstance(device, bool) or not isinstance(device, int) or device < 0):
            raise NicError(f"DeviceMemory: device must be a CUDA device ordinal, got {device!r}")
        if stream is not None and device is None:
            raise NicError("DeviceMemory: a stream needs its device")
        self._device = device
        # the stream of every access (default: the calling thread's own): in-process ranks give their fixed one
        self._stream = stream
        self._lock = threading.Lock()
        self._bases: list[int] = []
        self._sizes: dict[int, int] = {}
        self._first: int | None = None  # base of the first added range (names the device by default)
        self._old: int = 0  # 8-byte device buffer for fetch-add results (allocated at the first atomic)
        self._old_device: int | None = None
        self._old_async = False  # allocated with cudaMallocAsync (freed with cudaFreeAsync)
        self._closed = False
        self._direct = bool(direct_copies)
        self._unflushed: dict = {}  # thread id -> the stream its unsynchronised copies went to

    # --- ranges ---
    def add(self, ptr: int, nbytes: int) -> int:
        """Make ``[ptr, ptr + nbytes)`` addressable (a device pointer, an IPC-opened peer pointer or a pinned
        host-mapped pointer); returns ``ptr``. Adding the same base again replaces its size."""
        if isinstance(ptr, bool) or not isinstance(ptr, int | np.integer) or int(ptr) <= 0:
            raise NicError(f"DeviceMemory.add needs a non-null integer address, got {ptr!r}")
        if isinstance(nbytes, bool) or not isinstance(nbytes, int | np.integer) or int(nbytes) <= 0:
            raise NicError(f"DeviceMemory.add needs a positive byte count, got {nbytes!r}")
        ptr, nbytes = int(ptr), int(nbytes)
        if ptr + nbytes > 1 << 64:
            raise NicError(f"DeviceMemory.add: range 0x{ptr:x}+{nbytes} passes the end of the address space")
        with self._lock:
            if ptr not in self._sizes:
                bisect.insort(self._bases, ptr)
            if self._first is None:
                self._first = ptr
            self._sizes[ptr] = nbytes
        return ptr

    def remove(self, ptr: int) -> None:
        """Forget the range added at base ``ptr`` (e.g. before closing an IPC mapping)."""
        with self._lock:
            if self._sizes.pop(int(ptr), None) is not None:
                self._bases.remove(int(ptr))
                if self._first == int(ptr):
                    self._first = self._bases[0] if self._bases else None

    def _check(self, addr: int, n: int) -> None:
        """Raise unless ``[addr, addr + n)`` lies inside one added range (called with the lock held)."""
        if n < 0:
            raise NicError(f"negative length {n} at 0x{addr:x}")
        if range_base(self._bases, self._sizes.__getitem__, addr, n) is not None:
            return
        raise NicError(f"address range 0x{addr:x}+{n} is not inside memory known to this DeviceMemory")

    # --- CUDA (lazy) ---
    def _cuda_device(self) -> int:
        if self._device is None:
            import cupy.cuda.runtime as rt

            if self._first is None:
                raise NicError("DeviceMemory: no range added, so no device to use")
            self._device = int(rt.pointerGetAttributes(self._first).device)
        return self._device

    def _open(self):
        if self._closed:
            raise NicError("DeviceMemory is closed")
        device = self._cuda_device()
        return device, self._stream if self._stream is not None else _thread_stream(device)

    def read(self, addr: int, n: int) -> bytes:
        addr, n = int(addr), int(n)
        with self._lock:
            self._check(addr, n)
            if n == 0:
                return b""
            device, stream = self._open()
            import cupy
            import cupy.cuda.runtime as rt

            out = np.empty(n, dtype=np.uint8)
            with cupy.cuda.Device(device):
                rt.memcpyAsync(out.ctypes.data, addr, n, _MEMCPY_DEFAULT, stream.ptr)
                stream.synchronize()
            return out.tobytes()

    def write(self, addr: int, data: bytes) -> None:
        addr = int(addr)
        src = np.frombuffer(bytes(data), dtype=np.uint8)
        with self._lock:
            self._check(addr, src.size)
            if src.size == 0:
                return
            device, stream = self._open()
            import cupy
            import cupy.cuda.runtime as rt

            with cupy.cuda.Device(device):
                rt.memcpyAsync(addr, src.ctypes.data, src.size, _MEMCPY_DEFAULT, stream.ptr)
                stream.synchronize()  # `src` must outlive the copy

    def copy_from(self, dst: int, source, src: int, n: int) -> bool:
        """Device to device on this object's stream, not synchronised (see the module doc); False when the source
        is not a DeviceMemory of the same device or direct copies are off."""
        dst, src, n = int(dst), int(src), int(n)
        if not self._direct or not isinstance(source, DeviceMemory):
            return False
        if source is not self:
            with source._lock:
                source._check(src, n)
                src_device = source._cuda_device()
        with self._lock:
            self._check(dst, n)
            if source is self:
                self._check(src, n)
            elif src_device != self._cuda_device():
                return False
            if n == 0:
                return True
            device, stream = self._open()
            import cupy
            import cupy.cuda.runtime as rt

            with cupy.cuda.Device(device):
                rt.memcpyAsync(dst, src, n, _MEMCPY_DEFAULT, stream.ptr)
            self._unflushed[threading.get_ident()] = stream
        return True

    def flush(self) -> None:
        """Wait for every :meth:`copy_from` this thread issued so far."""
        with self._lock:
            stream = self._unflushed.pop(threading.get_ident(), None)
        if stream is not None:
            stream.synchronize()

    def atomic_fetch_add64(self, addr: int, value: int) -> int:
        addr = int(addr)
        with self._lock:
            self._check(addr, 8)
            if addr % 8:
                raise NicError(f"64-bit atomic at 0x{addr:x} is not 8-byte aligned")
            device, stream = self._open()
            import cupy
            import cupy.cuda.runtime as rt

            with cupy.cuda.Device(device):
                if not self._old:
                    self._alloc_old(rt, stream)
                    self._old_device = device
                kernel = _fetch_add_kernel()
                with stream:
                    kernel((1,), (1,), (np.uint64(addr), np.uint64(int(value) & _MASK64), np.uint64(self._old)))
                out = np.zeros(1, dtype=np.uint64)
                rt.memcpyAsync(out.ctypes.data, self._old, 8, _MEMCPY_DEFAULT, stream.ptr)
                stream.synchronize()
            return int(out[0])

    def _alloc_old(self, rt, stream) -> None:
        # Stream-ordered, so the NIC thread does not wait for the whole device as a plain cudaMalloc may (a peer
        # rank's kernel may be spinning); cudaMalloc where the stream-ordered allocator is not supported.
        try:
            self._old, self._old_async = rt.mallocAsync(8, stream.ptr), True
        except rt.CUDARuntimeError:
            self._old, self._old_async = rt.malloc(8), False

    # --- lifecycle ---
    def close(self) -> None:
        """Free the fetch-add result buffer (idempotent). Close the NIC first: nothing may use this afterwards.
        The ranges themselves belong to the caller and are not freed."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._old:
                import cupy
                import cupy.cuda.runtime as rt

                with cupy.cuda.Device(self._old_device):
                    if self._old_async:
                        stream = self._stream if self._stream is not None else _thread_stream(self._old_device)
                        rt.freeAsync(self._old, stream.ptr)
                        stream.synchronize()
                    else:
                        rt.free(self._old)
                self._old, self._old_device = 0, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
