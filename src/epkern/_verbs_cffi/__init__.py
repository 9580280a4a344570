"""cffi (ABI mode) bindings to libibverbs + libmlx5: devices, PD, MR (host and dma-buf), CQ, RC QP state
machine, standard-verbs posting (``ibv_post_send`` / ``ibv_poll_cq`` through the ops table), and
``mlx5dv_init_obj`` for the send ring / doorbell record / BlueFlame register.

Importing this package loads nothing; libraries are opened on first use, and a missing library or device
raises :class:`RdmaUnavailableError`. See docs/rdma.md.
"""

from __future__ import annotations

from ._connection import PeerInfo, connect_rc_qp, init_attr, local_peer_info, modify_qp, rtr_attr, rts_attr
from ._device import PortAttr, device_list, open_device, query_gid, query_port, rdma_available
from ._handles import CompletionQueue, Context, MemoryRegion, ProtectionDomain, QueuePair
from ._library import RdmaUnavailableError, VerbsError, get_ffi, mlx5_lib, verbs_lib
from ._mlx5dv import Mlx5CqInfo, Mlx5QpInfo, mlx5_cq_info, mlx5_qp_info
from ._posting import (
    MAX_MESSAGE_BYTES,
    SendRequest,
    WorkCompletion,
    WorkCompletionError,
    build_send_wrs,
    enum_name,
    fetch_add,
    poll_cq,
    post_send,
    rdma_write,
)
from ._resources import DEFAULT_ACCESS, MR_ACCESS, alloc_pd, create_cq, create_rc_qp, reg_dmabuf_mr, reg_mr

__all__ = [
    "DEFAULT_ACCESS",
    "MAX_MESSAGE_BYTES",
    "MR_ACCESS",
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
    "SendRequest",
    "VerbsError",
    "WorkCompletion",
    "WorkCompletionError",
    "alloc_pd",
    "build_send_wrs",
    "connect_rc_qp",
    "create_cq",
    "create_rc_qp",
    "device_list",
    "enum_name",
    "fetch_add",
    "get_ffi",
    "init_attr",
    "local_peer_info",
    "mlx5_cq_info",
    "mlx5_lib",
    "mlx5_qp_info",
    "modify_qp",
    "open_device",
    "poll_cq",
    "post_send",
    "query_gid",
    "query_port",
    "rdma_available",
    "rdma_write",
    "reg_dmabuf_mr",
    "reg_mr",
    "rtr_attr",
    "rts_attr",
    "verbs_lib",
]
