"""A region of device memory of the same size on every rank, addressable by every rank on its node.

Between processes the region is a VMM allocation (``cuMemCreate``) that each peer maps itself from a file
descriptor (epkern.memory.vmm; also between MPS clients on one GPU), or, with ``EPKERN_IPC=legacy`` or a
driver without the VMM calls, a ``cudaMalloc`` exported with ``cudaIpcGetMemHandle`` and opened with
``cudaIpcOpenMemHandle`` (copies into such a mapping ran at half the speed, docs/performance.md). Inside one process
(in-process ranks) the pointers are used directly — opening one's own allocation is not allowed — and
peer access is enabled between distinct GPUs. Ranks on other nodes get a null pointer (RDMA routes).
"""

from __future__ import annotations

import os

import numpy as np

from .. import _cuda, _env
from ..errors import GroupError
from . import fd_exchange, vmm


def _enable_peer_access(device: int, peer: int) -> None:
    import cupy
    import cupy.cuda.runtime as rt

    if device == peer:
        return
    if not rt.deviceCanAccessPeer(device, peer):
        raise GroupError(
            f"GPU {device} cannot access GPU {peer} directly (no P2P); in-process ranks on "
            f"these GPUs cannot share memory"
        )
    with cupy.cuda.Device(device):
        try:
            rt.deviceEnablePeerAccess(peer)
        except rt.CUDARuntimeError as exc:
            if "PeerAccessAlreadyEnabled" not in str(exc) and "already" not in str(exc).lower():
                raise


def choose_mapping(votes) -> str:
    """The group's way of mapping peers from every rank's (EPKERN_IPC, VMM usable here): vmm when every rank
    can, else legacy; GroupError (on every rank alike) when a rank asked for vmm and some rank cannot."""
    can = [bool(c) for _, c in votes]
    if all(can):
        return "vmm"
    if any(m == "vmm" for m, _ in votes):
        bad = [r for r, c in enumerate(can) if not c]
        raise GroupError(f"EPKERN_IPC=vmm: ranks {bad} cannot map peers' memory with the VMM API")
    return "legacy"


class SymmetricRegion:
    """``nbytes`` of zeroed device memory per rank. ``peer_ptrs[r]``: rank r's region as seen from here
    (0 for ranks off this node); ``peer_table``: the same as a device uint64 array."""

    def __init__(self, group, nbytes: int, device: int):
        _cuda.require_gpu("a symmetric memory region")
        import cupy
        import cupy.cuda.runtime as rt

        self.group = group
        self.nbytes = int(nbytes)
        self.device = device
        self._opened: list[int] = []  # legacy IPC mappings of peers
        self._maps: list[vmm.Mapping] = []  # VMM mappings: mine first, then peers'
        self._rt = rt
        same_node = [n == group.node for n in group.node_of_rank]
        in_process = getattr(group, "is_in_process", False)
        mode = "direct" if in_process else _env.ipc_mode()
        if mode != "direct":
            # Collective choice: every process of the group must map the same way.
            with cupy.cuda.Device(device):
                # the device's context exists before any driver call
                _cuda.call_bounded(rt.deviceSynchronize, _env.timeout_s(), "creating the Buffer's memory")
                can_vmm = mode != "legacy" and vmm.supported(device)
            mode = choose_mapping(group.allgather_object((mode, can_vmm)))
        self.mode = mode
        size = max(self.nbytes, 256)
        with cupy.cuda.Device(device):
            if mode == "vmm":
                self._maps.append(vmm.Mapping(size, device))
                self.ptr = self._maps[0].ptr
            else:
                # A raw cudaMalloc (not CuPy's pool) so the IPC handle covers exactly this allocation.
                self.ptr = rt.malloc(size)
            rt.memset(self.ptr, 0, size)
            _cuda.call_bounded(rt.deviceSynchronize, _env.timeout_s(), "clearing the Buffer's memory")
        if mode == "direct":
            infos = group.exchange_object((self.ptr, device))
            for r, (_, dev) in enumerate(infos):
                if same_node[r]:
                    _enable_peer_access(device, dev)
            self.peer_ptrs = [p if same_node[r] else 0 for r, (p, _) in enumerate(infos)]
        else:
            if mode == "vmm":
                peers = [r for r in range(group.size) if same_node[r] and r != group.rank]
                fd = self._maps[0].export_fd()
                try:
                    fds = fd_exchange.share_fds(group.allgather_bytes, group.rank, fd, peers, _env.timeout_s())
                finally:
                    os.close(fd)

                def open_peer(r):
                    try:
                        self._maps.append(vmm.Mapping(size, device, fd=fds[r]))
                    finally:
                        os.close(fds[r])
                    return self._maps[-1].ptr
            else:
                handles = group.allgather_object(bytes(rt.ipcGetMemHandle(self.ptr)))

                def open_peer(r):
                    self._opened.append(rt.ipcOpenMemHandle(handles[r], rt.cudaIpcMemLazyEnablePeerAccess))
                    return self._opened[-1]

            with cupy.cuda.Device(device):
                self.peer_ptrs = [
                    self.ptr if r == group.rank else open_peer(r) if same_node[r] else 0 for r in range(group.size)
                ]
        with cupy.cuda.Device(device):
            self.peer_table = cupy.asarray(np.array(self.peer_ptrs, dtype=np.uint64))

    def export_fd(self) -> int:
        """A new file descriptor of this region's VMM allocation (the caller closes it); VMM mode only. For a
        NIC emulation that maps other nodes' regions (memory.wire): ``peer_ptrs`` stays 0 for those on purpose."""
        if self.mode != "vmm":
            raise GroupError(f"export_fd: the region is mapped by {self.mode!r}, not by the VMM API")
        return self._maps[0].export_fd()

    def ipc_handle(self) -> bytes:
        """This region's legacy IPC handle (``cudaIpcGetMemHandle``); legacy mode only (see export_fd)."""
        if self.mode != "legacy":
            raise GroupError(f"ipc_handle: the region is mapped by {self.mode!r}, not by legacy IPC")
        return bytes(self._rt.ipcGetMemHandle(self.ptr))

    def close(self) -> None:
        """Unmaps peers' regions and frees this one (idempotent). Callers barrier first, so no peer is
        still writing here."""
        if not self.ptr:
            return
        import cupy

        with cupy.cuda.Device(self.device):
            for p in self._opened:
                self._rt.ipcCloseMemHandle(p)
            self._opened.clear()
            self.peer_table = None
            if self._maps:
                _cuda.call_bounded(self._rt.deviceSynchronize, _env.timeout_s(), "freeing the Buffer's memory")
                for m in reversed(self._maps):  # peers' mappings first, then mine
                    m.close()
                self._maps.clear()
            else:
                self._rt.free(self.ptr)
        self.ptr = 0
