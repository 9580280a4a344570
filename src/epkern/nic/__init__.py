"""NIC layer for RDMA: the mlx5 WQE format (:mod:`.wqe`), an emulated NIC (:mod:`.emulated`) that executes
those WQEs in software for tests without InfiniBand, its GPU-memory backend :class:`DeviceMemory`
(:mod:`.device_memory`; CuPy is imported only when it first touches memory), and the PROXY transport's trigger FIFO
(:mod:`.fifo`) and host proxy service (:mod:`.proxy`, posting through :mod:`.posting`). The real mlx5 backend
(:mod:`.mlx5`) and the standard-verbs NIC (:mod:`.verbs`) are imported lazily, on first use of one of their names,
so that importing this package never needs rdma-core."""

from . import device_memory, fifo, posting, proxy, wqe
from .device_memory import DeviceMemory
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
    "DeviceMemory",
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
    "Mlx5CompletionQueue",
    "Mlx5GpuQp",
    "Mlx5MemoryRegion",
    "Mlx5Nic",
    "Mlx5QueuePair",
    "VerbsCompletionQueue",
    "VerbsMemoryRegion",
    "VerbsNic",
    "VerbsQueuePair",
    "device_memory",
    "fifo",
    "mlx5",
    "posting",
    "proxy",
    "verbs",
    "wqe",
]

_LAZY = {
    "mlx5": {"Mlx5CompletionQueue", "Mlx5GpuQp", "Mlx5MemoryRegion", "Mlx5Nic", "Mlx5QueuePair"},
    "verbs": {"VerbsCompletionQueue", "VerbsMemoryRegion", "VerbsNic", "VerbsQueuePair"},
}


def __getattr__(name: str):
    for module, names in _LAZY.items():
        if name == module or name in names:
            import importlib

            mod = importlib.import_module(f".{module}", __name__)
            return mod if name == module else getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
