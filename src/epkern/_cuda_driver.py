"""Every CUDA driver call epkern makes that CuPy does not wrap, bound with ctypes to ``libcuda.so.1`` here only.

The library is loaded at the first call (importing this module needs no driver); where it cannot be loaded, or
lacks one of the calls, the call raises :class:`~epkern.errors.DeviceUnavailableError`. A call the driver refuses
raises :class:`DriverError`, named by ``cuGetErrorName``. The prototypes in :data:`SIGNATURES`, the structs and the
enum values below are those of ``cuda.h`` (tests/test_vmm_layout.py compiles them against it).

- Kernel launches (``cuLaunchKernel``): :class:`DriverLaunch` packs a kernel's arguments once (:func:`pack`) and
  relaunches them with one ctypes call (replayed LL calls, epkern.gpu.ll.plans). CuPy's launch converts every
  argument on every call (about 20 for the LL kernels), which was most of what a replayed LL call cost on the host.
- Virtual memory management (``cuMemCreate`` / ``cuMemMap`` / ...; epkern.memory.vmm): physical allocations
  exported and imported as POSIX file descriptors, mapped read-write.
- Address queries and dma-buf export for the mlx5 NIC (epkern.nic.mlx5).

Tests stand a fake library in for libcuda by setting ``_lib`` (monkeypatch); it needs only the calls the test makes.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

from .errors import DeviceUnavailableError, EpkernError

# --- cuda.h enum values --------------------------------------------------------------------------------------------
CU_MEM_ALLOCATION_TYPE_PINNED = 1
CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 1
CU_MEM_LOCATION_TYPE_DEVICE = 1
CU_MEM_ALLOC_GRANULARITY_RECOMMENDED = 1
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD = 1
CUDA_ERROR_NOT_INITIALIZED = 3


# --- cuda.h structs ------------------------------------------------------------------------------------------------
class CUmemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class CUmemAllocFlags(ctypes.Structure):  # the anonymous allocFlags struct of CUmemAllocationProp
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class CUmemAllocationProp(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", CUmemLocation),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", CUmemAllocFlags),
    ]


class CUmemAccessDesc(ctypes.Structure):
    _fields_ = [("location", CUmemLocation), ("flags", ctypes.c_int)]


class CUDA_KERNEL_NODE_PARAMS(ctypes.Structure):  # noqa: N801 (cuda.h's name; its _v2, what the plain name is)
    _fields_ = [
        ("func", ctypes.c_void_p),
        ("gridDimX", ctypes.c_uint),
        ("gridDimY", ctypes.c_uint),
        ("gridDimZ", ctypes.c_uint),
        ("blockDimX", ctypes.c_uint),
        ("blockDimY", ctypes.c_uint),
        ("blockDimZ", ctypes.c_uint),
        ("sharedMemBytes", ctypes.c_uint),
        ("kernelParams", ctypes.c_void_p),
        ("extra", ctypes.c_void_p),
        ("kern", ctypes.c_void_p),
        ("ctx", ctypes.c_void_p),
    ]


# --- the bound calls -----------------------------------------------------------------------------------------------
# ctypes symbol -> argument types (every call returns CUresult, an int). A `_v2` symbol is what cuda.h's macro for
# the plain name resolves to; binding the plain name would get the old ABI.
_u32, _u64, _size, _vp, _enum = ctypes.c_uint, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int
_P = ctypes.POINTER
SIGNATURES: dict[str, list] = {
    "cuGetErrorName": [_enum, _P(ctypes.c_char_p)],
    "cuLaunchKernel": [_vp, _u32, _u32, _u32, _u32, _u32, _u32, _u32, _vp, _P(_vp), _P(_vp)],
    "cuMemGetAllocationGranularity": [_P(_size), _P(CUmemAllocationProp), _enum],
    "cuMemCreate": [_P(_u64), _size, _P(CUmemAllocationProp), _u64],
    "cuMemExportToShareableHandle": [_vp, _u64, _enum, _u64],
    "cuMemImportFromShareableHandle": [_P(_u64), _vp, _enum],
    "cuMemAddressReserve": [_P(_u64), _size, _size, _u64, _u64],
    "cuMemMap": [_u64, _size, _size, _u64, _u64],
    "cuMemSetAccess": [_u64, _size, _P(CUmemAccessDesc), _size],
    "cuMemUnmap": [_u64, _size],
    "cuMemAddressFree": [_u64, _size],
    "cuMemRelease": [_u64],
    "cuMemGetAddressRange_v2": [_P(_u64), _P(_size), _u64],
    "cuMemGetHandleForAddressRange": [_vp, _u64, _size, _enum, _u64],
    "cuMemHostGetDevicePointer_v2": [_P(_u64), _vp, _u32],
    "cuCtxGetCurrent": [_P(_vp)],
    "cuGraphGetNodes": [_vp, _P(_vp), _P(_size)],
    "cuGraphExecKernelNodeSetParams_v2": [_vp, _vp, _P(CUDA_KERNEL_NODE_PARAMS)],
    "cuGraphLaunch": [_vp, _vp],
}

_lib = None  # the bound libcuda (or a test's stand-in)
_load_lock = threading.Lock()


def _bind(lib):
    """``lib`` (a ctypes library) with the argument and result types of every call of :data:`SIGNATURES`."""
    for name, argtypes in SIGNATURES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise DeviceUnavailableError(f"the CUDA driver has no {name} (too old a driver)") from None
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return lib


def library():
    """libcuda with every call of :data:`SIGNATURES` bound, loaded on first use (or the stand-in in ``_lib``)."""
    global _lib
    if _lib is not None:
        return _lib
    with _load_lock:
        if _lib is None:
            try:
                lib = ctypes.CDLL("libcuda.so.1")
            except OSError as e:
                raise DeviceUnavailableError(f"the CUDA driver (libcuda.so.1) cannot be loaded: {e}") from None
            _lib = _bind(lib)
    return _lib


def initialised() -> bool:
    """Whether CUDA has started in this process (``cuInit`` ran; it reads the CUDA_* variables), asked without
    starting it: cuCtxGetCurrent answers CUDA_ERROR_NOT_INITIALIZED before. False without a driver."""
    try:
        lib = library()
    except DeviceUnavailableError:
        return False
    ctx = ctypes.c_void_p()
    return lib.cuCtxGetCurrent(ctypes.byref(ctx)) != CUDA_ERROR_NOT_INITIALIZED


class DriverError(EpkernError, RuntimeError):
    """A driver call returned an error: ``call``, ``status`` (the CUresult) and ``name`` (``CUDA_ERROR_...``)."""

    def __init__(self, call: str, status: int, name: str, detail: str = ""):
        self.call, self.status, self.name = call, int(status), name
        what = f"{name} (CUresult {status})" if name else f"CUresult {status}"
        super().__init__(f"{call} failed: {what}" + (f" [{detail}]" if detail else ""))


def error_name(status: int) -> str:
    """``cuGetErrorName`` of ``status`` ("" when the driver does not know it)."""
    name = ctypes.c_char_p()
    if library().cuGetErrorName(int(status), ctypes.byref(name)) != 0 or not name.value:
        return ""
    return name.value.decode()


def check(status: int, call: str, detail: str = "") -> None:
    """Raise :class:`DriverError` for a CUresult other than CUDA_SUCCESS."""
    if status != 0:
        raise DriverError(call, status, error_name(status), detail)


# --- kernel launches -----------------------------------------------------------------------------------------------
_CTYPES = {
    np.dtype(np.int32): ctypes.c_int32,
    np.dtype(np.uint32): ctypes.c_uint32,
    np.dtype(np.int64): ctypes.c_int64,
    np.dtype(np.uint64): ctypes.c_uint64,
}


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
    """One kernel's launch (``cuLaunchKernel``) with its arguments packed once; ``launch(stream_ptr)`` after
    ``set(i, value)`` for the arguments that change. Holds the arrays it was given (their memory stays alive).

    Every argument of the call is a ctypes value built here, so a launch converts none (1.1 µs of host time for
    two set() and a launch, against 1.7 µs with Python ints; docs/_driver_notes.md). One thread at a time."""

    def __init__(self, function_ptr: int, grid: int, block: int, args: tuple):
        self._keep = args
        self._values = pack(args)
        self._params = (ctypes.c_void_p * len(self._values))(*(ctypes.addressof(v) for v in self._values))
        self._stream = ctypes.c_void_p()
        dims = [ctypes.c_uint(int(d)) for d in (grid, 1, 1, block, 1, 1)]
        self._call = (ctypes.c_void_p(function_ptr), *dims, ctypes.c_uint(0), self._stream, self._params, None)

    def set(self, i: int, value: int) -> None:
        self._values[i].value = value

    def launch(self, stream_ptr: int) -> None:
        self._stream.value = stream_ptr
        status = (_lib or library()).cuLaunchKernel(*self._call)
        if status != 0:
            check(status, "cuLaunchKernel")


class GraphLaunch:
    """A :class:`DriverLaunch` replayed as an instantiated one-kernel CUDA graph (``graph``: CuPy's Graph of one
    launch of ``packed``, captured by the caller): ``launch(stream_ptr)`` first gives the graph's kernel node the
    arguments ``packed`` holds now (``cuGraphExecKernelNodeSetParams``, which copies them: launches already queued
    keep theirs), then launches the graph. Under MPS ``cuLaunchKernel`` measured 13 µs of host per call and a graph
    launch 2-3 µs (docs/performance.md, session E). One thread at a time."""

    def __init__(self, packed: DriverLaunch, graph):
        lib = library()
        self._graph = graph  # keeps the graph and its executable alive
        count = ctypes.c_size_t(0)
        check(lib.cuGraphGetNodes(graph.graph, None, ctypes.byref(count)), "cuGraphGetNodes")
        if count.value != 1:
            raise EpkernError(f"GraphLaunch: the captured graph has {count.value} nodes, not the one kernel launch")
        node = (ctypes.c_void_p * 1)()
        check(lib.cuGraphGetNodes(graph.graph, node, ctypes.byref(count)), "cuGraphGetNodes")
        func, *dims = (v.value for v in packed._call[:8])  # function, grid, block, shared memory bytes
        params = ctypes.cast(packed._params, ctypes.c_void_p)
        self._node_params = CUDA_KERNEL_NODE_PARAMS(func, *dims, params, None, None, None)
        self._exec, self._stream = ctypes.c_void_p(graph.graphExec), ctypes.c_void_p()
        self._set = (self._exec, ctypes.c_void_p(node[0]), ctypes.byref(self._node_params))
        self._packed = packed  # its argument values are what kernelParams points at

    def launch(self, stream_ptr: int) -> None:
        lib = _lib or library()
        status = lib.cuGraphExecKernelNodeSetParams_v2(*self._set)
        if status != 0:
            check(status, "cuGraphExecKernelNodeSetParams")
        self._stream.value = stream_ptr
        status = lib.cuGraphLaunch(self._exec, self._stream)
        if status != 0:
            check(status, "cuGraphLaunch")


# --- virtual memory management (the caller's context current) ------------------------------------------------------
def _device_prop(device: int) -> CUmemAllocationProp:
    """Pinned memory on ``device``, exportable as a POSIX file descriptor."""
    prop = CUmemAllocationProp()
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED
    prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    prop.location = CUmemLocation(CU_MEM_LOCATION_TYPE_DEVICE, device)
    return prop


def mem_get_allocation_granularity(device: int) -> int:
    """The recommended granularity of :func:`mem_create` allocations on ``device``."""
    g = ctypes.c_size_t()
    prop = _device_prop(device)
    status = library().cuMemGetAllocationGranularity(
        ctypes.byref(g), ctypes.byref(prop), CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
    )
    check(status, "cuMemGetAllocationGranularity", f"device {device}")
    return int(g.value)


def mem_create(size: int, device: int) -> int:
    """A new physical allocation of ``size`` bytes (a granularity multiple) on ``device``, exportable as a file
    descriptor: its handle."""
    handle, prop = ctypes.c_uint64(), _device_prop(device)
    check(library().cuMemCreate(ctypes.byref(handle), size, ctypes.byref(prop), 0), "cuMemCreate", f"{size} bytes")
    return int(handle.value)


def mem_export_to_fd(handle: int) -> int:
    """A new POSIX file descriptor of the physical allocation ``handle`` (the caller closes it)."""
    fd = ctypes.c_int(-1)
    status = library().cuMemExportToShareableHandle(
        ctypes.byref(fd), handle, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0
    )
    check(status, "cuMemExportToShareableHandle")
    return int(fd.value)


def mem_import_from_fd(fd: int) -> int:
    """The handle of the physical allocation behind file descriptor ``fd`` (which stays open)."""
    handle = ctypes.c_uint64()
    status = library().cuMemImportFromShareableHandle(
        ctypes.byref(handle), ctypes.c_void_p(fd), CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    )
    check(status, "cuMemImportFromShareableHandle", f"fd {fd}")
    return int(handle.value)


def mem_address_reserve(size: int, alignment: int) -> int:
    """A reserved virtual address range of ``size`` bytes: its start."""
    ptr = ctypes.c_uint64()
    check(library().cuMemAddressReserve(ctypes.byref(ptr), size, alignment, 0, 0), "cuMemAddressReserve")
    return int(ptr.value)


def mem_map(ptr: int, size: int, handle: int) -> None:
    """Map all ``size`` bytes of allocation ``handle`` at ``ptr`` (a reserved range)."""
    check(library().cuMemMap(ptr, size, 0, handle, 0), "cuMemMap", f"0x{ptr:x}+{size}")


def mem_set_access_readwrite(ptr: int, size: int, device: int) -> None:
    """Make the mapping ``[ptr, ptr + size)`` readable and writable by ``device``."""
    access = CUmemAccessDesc(CUmemLocation(CU_MEM_LOCATION_TYPE_DEVICE, device), CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
    check(library().cuMemSetAccess(ptr, size, ctypes.byref(access), 1), "cuMemSetAccess", f"0x{ptr:x}+{size}")


# Teardown: these return the CUresult and never raise, so a caller releasing several things releases all it can.
def mem_unmap(ptr: int, size: int) -> int:
    return library().cuMemUnmap(ptr, size)


def mem_address_free(ptr: int, size: int) -> int:
    return library().cuMemAddressFree(ptr, size)


def mem_release(handle: int) -> int:
    return library().cuMemRelease(handle)


# --- address queries and dma-buf export (the caller's context current) ---------------------------------------------
def mem_get_address_range(ptr: int) -> tuple[int, int]:
    """(base, size) of the device allocation that holds ``ptr``."""
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    check(
        library().cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ptr),
        "cuMemGetAddressRange",
        f"0x{ptr:x}",
    )
    return int(base.value), int(size.value)


def mem_get_dmabuf_fd(start: int, size: int) -> int:
    """A dma-buf file descriptor of device memory ``[start, start + size)`` (page-aligned; the caller closes it)."""
    fd = ctypes.c_int(-1)
    status = library().cuMemGetHandleForAddressRange(
        ctypes.byref(fd), start, size, CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD, 0
    )
    check(status, "cuMemGetHandleForAddressRange(DMA_BUF_FD)", f"0x{start:x}+{size}")
    return int(fd.value)


def mem_host_get_device_pointer(addr: int) -> int:
    """The device address of registered (mapped) host memory at ``addr``."""
    d = ctypes.c_uint64()
    check(library().cuMemHostGetDevicePointer_v2(ctypes.byref(d), addr, 0), "cuMemHostGetDevicePointer", f"0x{addr:x}")
    return int(d.value)
