"""NIC layer for RDMA: the mlx5 WQE format (:mod:`.wqe`), an emulated NIC (:mod:`.emulated`) that executes
those WQEs in software for tests without InfiniBand, and the PROXY transport's trigger FIFO (:mod:`.fifo`) and host
proxy service (:mod:`.proxy`)."""

from . import fifo, proxy, wqe
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
from .fifo import FifoProducer, ProxyError, ProxyTimeoutError, Trigger, TriggerFifo, TriggerOp
from .proxy import LocalRegion, PeerRoute, ProxyService, ProxyStats
from .wqe import WqeFormatError

__all__ = [
    "Access",
    "CompletionQueue",
    "EmulatedNic",
    "FifoProducer",
    "HostMemory",
    "LocalRegion",
    "MemoryAccess",
    "MemoryRegion",
    "NicError",
    "NicFault",
    "PeerRoute",
    "ProxyError",
    "ProxyService",
    "ProxyStats",
    "ProxyTimeoutError",
    "QpCounters",
    "QueuePair",
    "Trigger",
    "TriggerFifo",
    "TriggerOp",
    "WqeFormatError",
    "fifo",
    "proxy",
    "wqe",
]
