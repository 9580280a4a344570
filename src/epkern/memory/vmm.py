"""Device memory shared between processes through CUDA's virtual memory management API (cuMemCreate /
cuMemMap; CuPy does not expose these calls: epkern._cuda_driver binds them).

Why not ``cudaIpcOpenMemHandle``: on an H200 with 8 MPS processes, the same copy loop ran at 0.45 of the
HBM floor into memory opened with ``cudaIpcOpenMemHandle`` against 0.86 into the process's own memory
(bench/bench_copy_patterns.py --mpi [--ipc], docs/performance.md). Here every process maps the physical
allocation itself, at the allocation granularity the driver recommends, with read-write access for its
device.

A physical allocation is exported as a POSIX file descriptor; descriptors travel between processes over
abstract-namespace Unix sockets (``share_fds``), so this works only between processes of one host.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid

from .. import _cuda_driver as driver
from ..errors import EpkernError, GroupError


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
