"""Other ranks' symmetric regions mapped into this process for the emulated NIC only: the "wire".

Kernels never reach a rank of another node through memory: ``SymmetricRegion.peer_ptrs`` is 0 for those ranks on
purpose, so a kernel that tried would be refused (route kind NONE), not fault or silently succeed. The emulated NIC,
which plays the network, does need to reach their memory: it executes an RDMA write by copying into the
destination (epkern.nic.device_memory), from the sending rank's process. This module makes exactly those mappings,
separate from the kernels' table, held by the PROXY transport and closed with it:

- in-process ranks: the peers' region pointers (one process, unified addressing);
- processes of one host, VMM regions: the peers' allocations imported from file descriptors (memory.fd_exchange,
  which hands them to the group's ranks only), mapped read-write for this device;
- processes of one host, legacy IPC: ``cudaIpcOpenMemHandle`` of the peers' handles.

Ranks on another host cannot be mapped: that needs a real NIC (routes.py refuses the emulated NIC there).
Collective: every rank of the group constructs it (a rank with no ranks to map too).
"""

from __future__ import annotations

import os

from ..errors import GroupError
from . import fd_exchange, vmm


class WireMappings:
    """``ptrs[r]``: rank r's region as the emulated NIC of this process addresses it, for every r in ``ranks``."""

    def __init__(self, region, group, ranks, timeout_s: float):
        self.ptrs: dict[int, int] = {}
        self._maps: list = []
        self._opened: list[int] = []
        self._rt = None
        ranks = sorted(int(r) for r in ranks)
        if getattr(group, "is_in_process", False):
            every = group.exchange_object(int(region.ptr))
            self.ptrs = {r: int(every[r]) for r in ranks}
            return
        mode = getattr(region, "mode", None)
        try:
            if mode == "vmm":
                fd = region.export_fd()
                try:
                    fds = fd_exchange.share_fds(group.allgather_bytes, group.rank, fd, ranks, timeout_s)
                finally:
                    os.close(fd)
                for r in ranks:
                    try:
                        self._maps.append(vmm.Mapping(max(region.nbytes, 256), region.device, fd=fds[r]))
                    finally:
                        os.close(fds[r])
                    self.ptrs[r] = self._maps[-1].ptr
            elif mode == "legacy":
                import cupy.cuda.runtime as rt

                self._rt = rt
                handles = group.allgather_object(region.ipc_handle())
                for r in ranks:
                    self._opened.append(rt.ipcOpenMemHandle(handles[r], rt.cudaIpcMemLazyEnablePeerAccess))
                    self.ptrs[r] = self._opened[-1]
            else:
                raise GroupError(f"the emulated NIC cannot map peers of a region mapped by {mode!r}")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Unmap (idempotent). The NIC using the mappings must be closed first."""
        for p in self._opened:
            self._rt.ipcCloseMemHandle(p)
        self._opened.clear()
        for m in reversed(self._maps):
            m.close()
        self._maps.clear()
        self.ptrs = {}
