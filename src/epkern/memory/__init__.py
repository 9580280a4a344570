"""Memory epkern manages itself: host-mapped words, symmetric device regions shared across ranks
(CUDA IPC between processes, direct pointers inside one), and a heap for outputs that peers write."""

from .heap import Heap, HeapBlock
from .host_mapped import HostMapped
from .symmetric import SymmetricRegion

__all__ = ["Heap", "HeapBlock", "HostMapped", "SymmetricRegion"]
