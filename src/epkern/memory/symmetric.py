"""A region of device memory of the same size on every rank, addressable by every rank on its node.

Between processes the region is exported with ``cudaIpcGetMemHandle`` and opened by each peer with
``cudaIpcOpenMemHandle`` (this also works between MPS clients on one GPU). Inside one process
(in-process ranks) the pointers are used directly — opening one's own allocation is not allowed — and
peer access is enabled between distinct GPUs. Ranks on other nodes get a null pointer (RDMA routes).
"""

from __future__ import annotations

import numpy as np

from .. import _cuda
from ..errors import GroupError


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
        self._opened: list[int] = []
        self._rt = rt
        with cupy.cuda.Device(device):
            # A raw cudaMalloc (not CuPy's pool) so the IPC handle covers exactly this allocation.
            self.ptr = rt.malloc(max(self.nbytes, 256))
            rt.memset(self.ptr, 0, max(self.nbytes, 256))
            rt.deviceSynchronize()
        same_node = [n == group.node for n in group.node_of_rank]
        if getattr(group, "is_in_process", False):
            infos = group.exchange_object((self.ptr, device))
            for r, (_, dev) in enumerate(infos):
                if same_node[r]:
                    _enable_peer_access(device, dev)
            self.peer_ptrs = [p if same_node[r] else 0 for r, (p, _) in enumerate(infos)]
        else:
            handle = bytes(rt.ipcGetMemHandle(self.ptr))
            handles = group.allgather_object(handle)
            self.peer_ptrs = []
            with cupy.cuda.Device(device):
                for r, h in enumerate(handles):
                    if r == group.rank:
                        self.peer_ptrs.append(self.ptr)
                    elif same_node[r]:
                        p = rt.ipcOpenMemHandle(h, rt.cudaIpcMemLazyEnablePeerAccess)
                        self._opened.append(p)
                        self.peer_ptrs.append(p)
                    else:
                        self.peer_ptrs.append(0)
        with cupy.cuda.Device(device):
            self.peer_table = cupy.asarray(np.array(self.peer_ptrs, dtype=np.uint64))

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
            self._rt.free(self.ptr)
        self.ptr = 0
