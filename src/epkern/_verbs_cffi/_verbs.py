"""Thin Python wrappers over libibverbs / libmlx5 through cffi ABI mode (no compiler, no headers needed), gathered
from their modules, one per family of verbs objects:

- :mod:`._library`: loading the libraries and the cdef (nothing at import: on first use), checking call results,
  :class:`VerbsError` (errno and its text) and :class:`RdmaUnavailableError` (a missing library or device, and why);
- :mod:`._handles`: the owned objects (``Context``, ``ProtectionDomain``, ``MemoryRegion``, ``CompletionQueue``,
  ``QueuePair``);
- :mod:`._device`: listing and opening devices, port and GID queries;
- :mod:`._resources`: creating PDs, MRs (host and dma-buf), CQs and RC QPs;
- :mod:`._connection`: :class:`PeerInfo` and the RC state transitions;
- :mod:`._mlx5dv`: the mlx5 ring, doorbell and CQE addresses (``mlx5dv_init_obj``).
"""

from __future__ import annotations

from ._connection import PeerInfo, connect_rc_qp, init_attr, local_peer_info, modify_qp, rtr_attr, rts_attr
from ._device import PortAttr, device_list, open_device, query_gid, query_port, rdma_available
from ._handles import CompletionQueue, Context, MemoryRegion, ProtectionDomain, QueuePair
from ._library import RdmaUnavailableError, VerbsError, get_ffi, mlx5_lib, verbs_lib
from ._mlx5dv import Mlx5CqInfo, Mlx5QpInfo, mlx5_cq_info, mlx5_qp_info
from ._resources import DEFAULT_ACCESS, alloc_pd, create_cq, create_rc_qp, reg_dmabuf_mr, reg_mr

__all__ = [
    "DEFAULT_ACCESS",
    "CompletionQueue",
    "Context",
    "MemoryRegion",
    "Mlx5CqInfo",
    "Mlx5QpInfo",
    "PeerInfo",
    "PortAttr",
    "ProtectionDomain",
    "QueuePair",
    "RdmaUnavailableError",
    "VerbsError",
    "alloc_pd",
    "connect_rc_qp",
    "create_cq",
    "create_rc_qp",
    "device_list",
    "get_ffi",
    "init_attr",
    "local_peer_info",
    "mlx5_cq_info",
    "mlx5_lib",
    "mlx5_qp_info",
    "modify_qp",
    "open_device",
    "query_gid",
    "query_port",
    "rdma_available",
    "reg_dmabuf_mr",
    "reg_mr",
    "rtr_attr",
    "rts_attr",
    "verbs_lib",
]
