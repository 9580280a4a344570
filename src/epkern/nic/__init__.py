"""NIC layer for RDMA: the mlx5 WQE format (:mod:`.wqe`) and an emulated NIC (:mod:`.emulated`) that executes
those WQEs in software for tests without InfiniBand."""

from . import wqe
from .emulated import (
    Access,
    CompletionQueue,
    EmulatedNic,
    HostMemory,
    MemoryAccess,
    MemoryRegion,
    NicError,
    NicFault,
    QpCounters,
    QueuePair,
)
from .wqe import WqeFormatError

__all__ = [
    "Access",
    "CompletionQueue",
    "EmulatedNic",
    "HostMemory",
    "MemoryAccess",
    "MemoryRegion",
    "NicError",
    "NicFault",
    "QpCounters",
    "QueuePair",
    "WqeFormatError",
    "wqe",
]
