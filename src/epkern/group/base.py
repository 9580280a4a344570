"""The process-group interface every backend implements, and the trivial one-rank group.

A group knows its rank and size, the node of every rank (see :mod:`.nodes`), the CUDA device this rank
should use, and offers four collectives: ``allgather_bytes``, ``allgather_object``, ``broadcast_object`` and
``barrier``. Collectives are called by every rank of the group in the same order (as in MPI). Objects travel
as plain data (:mod:`.wire`), never pickled.
"""

from __future__ import annotations

import abc

from .. import _cuda
from ..errors import ArgumentError, GroupError
from . import wire
from .nodes import NodeMap, node_map


def as_bytes(data, name: str = "data") -> bytes:
    """``bytes`` of a bytes-like argument, or ArgumentError naming it."""
    if isinstance(data, bytes):
        return data
    try:
        return memoryview(data).tobytes()
    except TypeError:
        raise ArgumentError(f"{name}: expected bytes (or a bytes-like object), got {type(data).__name__}") from None


def describe_ranks(ranks) -> str:
    """ "rank 3" or "ranks 1, 3": the ranks an error names."""
    ranks = list(ranks)
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def gpu_count() -> int:
    """Number of visible CUDA devices; 0 when CuPy is missing or CUDA reports an error."""
    try:
        return _cuda.device_count()
    except Exception:  # noqa: BLE001 - any failure means no GPU
        return 0


class Group(abc.ABC):
    """A set of ranks that run collectives together. Subclasses set ``self._nodes`` (a NodeMap)."""

    kind: str = ""
    #: True when all ranks live in this process (threads): device pointers can be shared directly,
    #: and :meth:`exchange_object` passes the objects themselves.
    is_in_process: bool = False

    _nodes: NodeMap

    # ---- identity ----
    @property
    @abc.abstractmethod
    def rank(self) -> int: ...

    @property
    @abc.abstractmethod
    def size(self) -> int: ...

    @property
    def node_of_rank(self) -> tuple[int, ...]:
        """Node index of every rank (nodes numbered 0.. in order of first appearance by rank)."""
        return self._nodes.node_of_rank

    @property
    def local_rank_of_rank(self) -> tuple[int, ...]:
        """Index of every rank among the ranks of its node (ascending by rank)."""
        return self._nodes.local_rank_of_rank

    @property
    def hostnames(self) -> tuple[str, ...]:
        """Hostname (or EPKERN_HOSTNAME) of every rank, as gathered when the group was made."""
        return self._nodes.hostnames

    @property
    def node(self) -> int:
        return self.node_of_rank[self.rank]

    @property
    def local_rank(self) -> int:
        return self.local_rank_of_rank[self.rank]

    @property
    def num_nodes(self) -> int:
        return max(self.node_of_rank) + 1

    @property
    def local_size(self) -> int:
        """Number of ranks on my node."""
        return self.node_of_rank.count(self.node)

    def ranks_on_node(self, node: int) -> tuple[int, ...]:
        if isinstance(node, bool) or not isinstance(node, int) or not 0 <= node < self.num_nodes:
            raise ArgumentError(f"node: expected an integer in [0, {self.num_nodes}), got {node!r}")
        return tuple(r for r, n in enumerate(self.node_of_rank) if n == node)

    @property
    @abc.abstractmethod
    def device(self) -> int | None:
        """CUDA device ordinal this rank should use; None where there is no GPU."""

    def _device_by_host_local_rank(self) -> int | None:
        ndev = gpu_count()
        if ndev == 0:
            return None
        return self._nodes.host_local_rank_of_rank[self.rank] % ndev

    # ---- collectives ----
    @abc.abstractmethod
    def allgather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, indexed by rank."""

    @abc.abstractmethod
    def barrier(self) -> None: ...

    def allgather_object(self, obj) -> list:
        """Every rank's ``obj`` (plain data, see :mod:`.wire`; never pickled; each rank gets copies), by rank."""
        return [wire.decode(b, r) for r, b in enumerate(self.allgather_bytes(wire.encode(obj)))]

    def broadcast_object(self, obj, root: int = 0):
        """``obj`` (plain data, see :mod:`.wire`) of rank ``root`` on every rank (others' ``obj`` is ignored)."""
        root = self._check_root(root)
        payload = wire.encode(obj) if self.rank == root else b""
        return wire.decode(self.allgather_bytes(payload)[root], root)

    def exchange_object(self, obj) -> list:
        """The objects themselves (not copies) of every rank; only for in-process groups."""
        raise GroupError(f"exchange_object needs an in-process group (threads); this group is {self.kind!r}")

    def _check_root(self, root) -> int:
        if isinstance(root, bool) or not isinstance(root, int) or not 0 <= root < self.size:
            raise ArgumentError(f"root: expected a rank in [0, {self.size}), got {root!r}")
        return root

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(rank={self.rank}, size={self.size}, node={self.node}, "
            f"num_nodes={self.num_nodes}, device={self.device})"
        )


class SingleGroup(Group):
    """One rank on its own: collectives return at once. What ``as_group(None)`` gives outside a launcher."""

    kind = "single"
    is_in_process = True

    def __init__(self, device: int | None = None):
        from .nodes import local_hostname

        self._nodes = node_map([local_hostname()], None)
        self._device = device

    @property
    def rank(self) -> int:
        return 0

    @property
    def size(self) -> int:
        return 1

    @property
    def device(self) -> int | None:
        if self._device is not None:
            return self._device
        return 0 if gpu_count() else None

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        return [as_bytes(data)]

    def allgather_object(self, obj) -> list:
        return [wire.decode(wire.encode(obj), 0)]

    def broadcast_object(self, obj, root: int = 0):
        self._check_root(root)
        return obj

    def exchange_object(self, obj) -> list:
        return [obj]

    def barrier(self) -> None:
        return None
