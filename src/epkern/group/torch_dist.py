"""torch.distributed backend: a group over a ProcessGroup (torch is imported only when used).

Making a :class:`TorchGroup` is collective (it gathers every rank's hostname). Ranks are those *within* the
process group (``dist.get_rank(group)``). Deadlines are torch's: the ``timeout=`` given to
``init_process_group`` / ``new_group`` bounds every collective; ``EPKERN_TIMEOUT_S`` does not apply here.
"""

from __future__ import annotations

import os
import sys

from ..errors import ArgumentError, GroupError
from .base import Group, as_bytes
from .nodes import local_entry, node_map_from_entries


def is_torch_group(obj) -> bool:
    """Whether ``obj`` is a torch.distributed ProcessGroup (without importing torch if nobody has)."""
    dist = sys.modules.get("torch.distributed")
    cls = getattr(dist, "ProcessGroup", None) if dist is not None else None
    return cls is not None and isinstance(obj, cls)


def torch_world() -> Group | None:
    """The default torch.distributed group when it is initialised with several ranks, else None."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        world = os.environ.get("WORLD_SIZE", "").strip()
        if world.isdigit() and int(world) > 1 and "LOCAL_RANK" in os.environ:
            raise GroupError(
                f"WORLD_SIZE={world} (started by torchrun?) but torch.distributed is not initialised: call "
                "torch.distributed.init_process_group() first, or pass a group explicitly"
            )
        return None
    if dist.get_world_size() <= 1:
        return None
    return TorchGroup(None)


class TorchGroup(Group):
    kind = "torch"
    is_in_process = False

    def __init__(self, process_group=None):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise GroupError("torch.distributed is not initialised: call init_process_group() first")
        if process_group is None:
            process_group = dist.group.WORLD
        self._pg = process_group
        self._dist = dist
        rank = dist.get_rank(process_group)
        if rank < 0:
            raise ArgumentError("group: this process is not a member of the given torch.distributed group")
        self._rank = rank
        self._size = dist.get_world_size(process_group)
        self._nodes = node_map_from_entries(self.allgather_object(local_entry()))

    @property
    def process_group(self):
        return self._pg

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    @property
    def device(self) -> int | None:
        """torch's current CUDA device when torch has CUDA, else host-local rank modulo the GPU count."""
        try:
            import torch

            if torch.cuda.is_available():
                return int(torch.cuda.current_device())
        except Exception:  # noqa: BLE001 - fall back to CuPy's view
            pass
        return self._device_by_host_local_rank()

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        """Two tensor all_gathers (lengths, then the bytes padded to the longest): torch's all_gather_object
        would unpickle the peers' data."""
        import torch

        data = as_bytes(data)
        device = torch.device("cpu")
        if "nccl" in str(self._dist.get_backend(self._pg)).lower():
            device = torch.device("cuda", torch.cuda.current_device())
        n = torch.tensor([len(data)], dtype=torch.int64, device=device)
        lengths = [torch.empty_like(n) for _ in range(self._size)]
        self._torch_call("all_gather", lambda: self._dist.all_gather(lengths, n, group=self._pg))
        sizes = [int(t.item()) for t in lengths]
        mine = torch.zeros(max(sizes) or 1, dtype=torch.uint8)
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else mine[:0]
        mine = mine.to(device)
        parts = [torch.empty_like(mine) for _ in range(self._size)]
        self._torch_call("all_gather", lambda: self._dist.all_gather(parts, mine, group=self._pg))
        return [bytes(p[:size].cpu().numpy().tobytes()) for p, size in zip(parts, sizes, strict=True)]

    def barrier(self) -> None:
        self._torch_call("barrier", lambda: self._dist.barrier(group=self._pg))

    def _torch_call(self, op: str, call) -> None:
        """A torch.distributed collective; its failure (a peer gone, torch's timeout) as GroupError."""
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError / DistBackendError subclasses
            raise GroupError(f"rank {self._rank}: torch.distributed {op} failed: {type(exc).__name__}: {exc}") from exc
