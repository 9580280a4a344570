"""The owned verbs objects: an opened device (:class:`Context`), PD, MR, CQ and RC QP handles. Each holds its
cffi pointer and its parents (kept alive by reference); ``close()`` destroys it once."""

from __future__ import annotations

from typing import Any

from ..errors import EpkernError
from ._library import check_rc, verbs_lib


class Handle:
    """An owned verbs object; ``close()`` is idempotent; parents are kept alive by reference."""

    _destroy: str = ""

    def __init__(self, ptr: Any):
        self.ptr = ptr

    @property
    def closed(self) -> bool:
        return self.ptr is None

    def _require(self) -> Any:
        if self.ptr is None:
            raise EpkernError(f"{type(self).__name__} is closed")
        return self.ptr

    def close(self) -> None:
        if self.ptr is not None:
            ptr, self.ptr = self.ptr, None
            check_rc(self._destroy, getattr(verbs_lib(), self._destroy)(ptr))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Context(Handle):
    """An opened RDMA device (``struct ibv_context *``)."""

    _destroy = "ibv_close_device"

    def __init__(self, ptr: Any, name: str, is_mlx5: bool):
        super().__init__(ptr)
        self.name = name
        self.is_mlx5 = is_mlx5


class ProtectionDomain(Handle):
    _destroy = "ibv_dealloc_pd"

    def __init__(self, ptr: Any, context: Context):
        super().__init__(ptr)
        self.context = context


class MemoryRegion(Handle):
    """A registered region: ``addr`` (iova the peer uses in RDMA WQEs), ``length``, ``lkey``, ``rkey``."""

    _destroy = "ibv_dereg_mr"

    def __init__(self, ptr: Any, pd: ProtectionDomain, addr: int):
        super().__init__(ptr)
        self.pd = pd
        self.addr = addr
        self.length = int(ptr.length)
        self.lkey = int(ptr.lkey)
        self.rkey = int(ptr.rkey)


class CompletionQueue(Handle):
    """A CQ; ``cqe`` is the number of completions it holds (what the provider made of the request: at least it)."""

    _destroy = "ibv_destroy_cq"

    def __init__(self, ptr: Any, context: Context, cqe: int):
        super().__init__(ptr)
        self.context = context
        self.cqe = cqe


class QueuePair(Handle):
    """An RC queue pair; ``qp_num`` is what the peer needs (with lid/gid/psn, see :class:`PeerInfo`).
    ``max_send_wr`` and ``max_inline_data`` are what the provider granted (``ibv_create_qp`` writes them back)."""

    _destroy = "ibv_destroy_qp"

    def __init__(
        self,
        ptr: Any,
        pd: ProtectionDomain,
        send_cq: CompletionQueue,
        recv_cq: CompletionQueue,
        *,
        max_send_wr: int = 0,
        max_inline_data: int = 0,
    ):
        super().__init__(ptr)
        self.pd = pd
        self.send_cq = send_cq
        self.recv_cq = recv_cq
        self.qp_num = int(ptr.qp_num)
        self.max_send_wr = max_send_wr
        self.max_inline_data = max_inline_data
