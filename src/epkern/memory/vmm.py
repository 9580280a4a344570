"""Device memory shared between processes through CUDA's virtual memory management API (cuMemCreate /
cuMemMap), bound with ctypes to the driver (libcuda; CuPy does not expose these calls).

Why not ``cudaIpcOpenMemHandle``: on an H200 with 8 MPS processes, the same copy loop ran at 0.45 of the
HBM floor into memory opened with ``cudaIpcOpenMemHandle`` against 0.86 into the process's own memory
(bench/bench_copy_patterns.py --mpi [--ipc], docs/performance.md). Here every process maps the physical
allocation itself, at the allocation granularity the driver recommends, with read-write access for its
device.

A physical allocation is exported as a POSIX file descriptor; descriptors travel between processes over
abstract-namespace Unix sockets (``share_fds``), so this works only between processes of one host.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
import time
import uuid

from ..errors import EpkernError, GroupError

_CU_MEM_ALLOCATION_TYPE_PINNED = 1
_CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 1
_CU_MEM_LOCATION_TYPE_DEVICE = 1
_CU_MEM_ALLOC_GRANULARITY_RECOMMENDED = 1
_CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class _AllocationProp(ctypes.Structure):  # CUmemAllocationProp
    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", _Location),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", _AllocFlags),
    ]


class _AccessDesc(ctypes.Structure):  # CUmemAccessDesc
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


_u64, _size_t, _vp = ctypes.c_ulonglong, ctypes.c_size_t, ctypes.c_void_p
# The driver calls bound here, as cuda.h declares them (tests/test_vmm_layout.py checks them against it).
SIGNATURES = {
    "cuMemGetAllocationGranularity": [ctypes.POINTER(_size_t), ctypes.POINTER(_AllocationProp), ctypes.c_int],
    "cuMemCreate": [ctypes.POINTER(_u64), _size_t, ctypes.POINTER(_AllocationProp), _u64],
    "cuMemExportToShareableHandle": [_vp, _u64, ctypes.c_int, _u64],
    "cuMemImportFromShareableHandle": [ctypes.POINTER(_u64), _vp, ctypes.c_int],
    "cuMemAddressReserve": [ctypes.POINTER(_u64), _size_t, _size_t, _u64, _u64],
    "cuMemMap": [_u64, _size_t, _size_t, _u64, _u64],
    "cuMemSetAccess": [_u64, _size_t, ctypes.POINTER(_AccessDesc), _size_t],
    "cuMemUnmap": [_u64, _size_t],
    "cuMemAddressFree": [_u64, _size_t],
    "cuMemRelease": [_u64],
    "cuGetErrorName": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
}
_lib = None


def _driver():
    global _lib
    if _lib is None:
        lib = ctypes.CDLL("libcuda.so.1")
        for name, args in SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
        _lib = lib
    return _lib


def _check(status: int, what: str) -> None:
    if status != 0:
        name = ctypes.c_char_p()
        _driver().cuGetErrorName(status, ctypes.byref(name))
        raise EpkernError(f"{what} failed: {(name.value or b'?').decode()} ({status})")


def _prop(device: int) -> _AllocationProp:
    prop = _AllocationProp()
    prop.type = _CU_MEM_ALLOCATION_TYPE_PINNED
    prop.requestedHandleTypes = _CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    prop.location = _Location(_CU_MEM_LOCATION_TYPE_DEVICE, device)
    return prop


def granularity(device: int) -> int:
    g = ctypes.c_size_t()
    prop = _prop(device)
    status = _driver().cuMemGetAllocationGranularity(
        ctypes.byref(g), ctypes.byref(prop), _CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
    )
    _check(status, "cuMemGetAllocationGranularity")
    return int(g.value)


def supported(device: int = 0) -> bool:
    """Whether the driver has the VMM calls (it loads and answers a granularity query for ``device``)."""
    try:
        return granularity(device) > 0
    except (OSError, AttributeError, EpkernError):
        return False


class Mapping:
    """``nbytes`` (rounded up to the granularity) of device memory mapped read-write at ``ptr`` for
    ``device``: a new physical allocation (``fd=None``), or another process's, imported from its file
    descriptor. The caller's CUDA context must be current (CuPy's device of ``device``)."""

    def __init__(self, nbytes: int, device: int, fd: int | None = None):
        lib = _driver()
        g = granularity(device)
        self.size = max(g, -(-int(nbytes) // g) * g)
        self.handle = ctypes.c_ulonglong()
        self.ptr = 0
        if fd is None:
            prop = _prop(device)
            _check(lib.cuMemCreate(ctypes.byref(self.handle), self.size, ctypes.byref(prop), 0), "cuMemCreate")
        else:
            _check(
                lib.cuMemImportFromShareableHandle(
                    ctypes.byref(self.handle), ctypes.c_void_p(fd), _CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
                ),
                "cuMemImportFromShareableHandle",
            )
        try:
            ptr = ctypes.c_ulonglong()
            _check(lib.cuMemAddressReserve(ctypes.byref(ptr), self.size, g, 0, 0), "cuMemAddressReserve")
            self.ptr = int(ptr.value)
            _check(lib.cuMemMap(self.ptr, self.size, 0, self.handle, 0), "cuMemMap")
            access = _AccessDesc(_Location(_CU_MEM_LOCATION_TYPE_DEVICE, device), _CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
            _check(lib.cuMemSetAccess(self.ptr, self.size, ctypes.byref(access), 1), "cuMemSetAccess")
        except Exception:
            self.close()
            raise

    def export_fd(self) -> int:
        """A new file descriptor of the physical allocation (the caller closes it)."""
        fd = ctypes.c_int(-1)
        _check(
            _driver().cuMemExportToShareableHandle(
                ctypes.byref(fd), self.handle, _CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0
            ),
            "cuMemExportToShareableHandle",
        )
        return int(fd.value)

    def close(self) -> None:
        """Unmaps and releases (idempotent); the physical memory goes when its last mapping does."""
        lib = _driver()
        if self.ptr:
            lib.cuMemUnmap(self.ptr, self.size)
            lib.cuMemAddressFree(self.ptr, self.size)
            self.ptr = 0
        if self.handle.value:
            lib.cuMemRelease(self.handle)
            self.handle = ctypes.c_ulonglong()


def share_fds(allgather, rank: int, fd: int, peers: list[int], timeout_s: float = 30.0) -> dict[int, int]:
    """Every rank's file descriptor ``fd``, duplicated into this process, for the ranks in ``peers``
    (this host's other ranks). ``allgather(obj)`` is the group's allgather of picklable objects; every
    rank of it calls this. Descriptors go over abstract Unix sockets (SCM_RIGHTS)."""
    token = allgather(uuid.uuid4().hex)[0]
    name = f"\0epkern-fd-{token}-{rank}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(name)
    server.listen(max(1, len(peers)))
    server.settimeout(timeout_s)
    errors: list[BaseException] = []

    def serve():
        try:
            for _ in peers:
                conn, _ = server.accept()
                with conn:
                    socket.send_fds(conn, [b"f"], [fd])
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    allgather(None)  # every server listens before anyone connects
    got: dict[int, int] = {}
    deadline = time.monotonic() + timeout_s
    try:
        for peer in peers:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                s.connect(f"\0epkern-fd-{token}-{peer}")
                _, fds, _, _ = socket.recv_fds(s, 1, 1)
                if len(fds) != 1:
                    raise GroupError(f"rank {rank}: no file descriptor came from rank {peer}")
                got[peer] = fds[0]
        thread.join(max(0.1, deadline - time.monotonic()))
        if thread.is_alive() or errors:
            raise GroupError(f"rank {rank}: handing its memory descriptor to peers failed: {errors or 'timeout'}")
    except BaseException:
        for f in got.values():
            os.close(f)
        raise
    finally:
        server.close()
    return got
