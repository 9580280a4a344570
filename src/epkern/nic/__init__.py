"""NIC layer for RDMA: the mlx5 WQE format (:mod:`.wqe`), an emulated NIC (:mod:`.emulated`) that executes
those WQEs in software for tests without InfiniBand, its GPU-memory backend :class:`DeviceMemory`
(:mod:`.device_memory`; CuPy is imported only when it first touches memory), and the PROXY transport's trigger FIFO
(:mod:`.fifo`) and host proxy service (:mod:`.proxy`). The real mlx5 backend (:mod:`.mlx5`) is imported lazily, on
first use of one of its names, so that importing this package never needs rdma-core."""

from . import device_memory, fifo, proxy, wqe
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
    "device_memory",
    "fifo",
    "mlx5",
    "proxy",
    "wqe",
]

_MLX5_NAMES = {"Mlx5CompletionQueue", "Mlx5GpuQp", "Mlx5MemoryRegion", "Mlx5Nic", "Mlx5QueuePair"}


def __getattr__(name: str):
    if name == "mlx5" or name in _MLX5_NAMES:
        import importlib

        mod = importlib.import_module(".mlx5", __name__)
        return mod if name == "mlx5" else getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
