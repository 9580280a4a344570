"""``Config``: launch and capacity settings of the HT kernels (DeepEP's ``deep_ep.Config`` names)."""

from __future__ import annotations

from dataclasses import dataclass

from ._validate import check_int

CTRL_BYTES = 1 << 17  # control area at the start of every rank's symmetric region (kernels/ht_common.cuh)


@dataclass(frozen=True)
class Config:
    """Launch settings of the HT kernels, passed as ``config=`` to ``Buffer.dispatch`` / ``Buffer.combine``
    (``Buffer.get_dispatch_config()`` / ``get_combine_config()`` return the Buffer's default).

    Args:
        num_sms: blocks each HT kernel launches (one per SM), 1 to 1024.
        num_max_nvl_chunked_send_tokens, num_max_nvl_chunked_recv_tokens, num_max_rdma_chunked_send_tokens,
            num_max_rdma_chunked_recv_tokens: positive ints, accepted for DeepEP compatibility: epkern's
            intranode kernels write rows straight into their final place and need no chunked ring buffers, so
            they do not use them.

    Raises ``epkern.ArgumentError`` naming the field on a bad value. The CPU backend checks ``config`` and
    launches nothing.

    Example::

        config = epkern.Config(num_sms=24)
        recv_x, *_ = buf.dispatch(x, topk_idx=topk_idx, ..., config=config)
        nvl_bytes = epkern.Config.get_nvl_buffer_size_hint(hidden * 2, group.size, num_tokens, topk)
    """

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def __post_init__(self):
        check_int(self.num_sms, "num_sms", min_value=1, max_value=1024)
        for name in (
            "num_max_nvl_chunked_send_tokens",
            "num_max_nvl_chunked_recv_tokens",
            "num_max_rdma_chunked_send_tokens",
            "num_max_rdma_chunked_recv_tokens",
        ):
            check_int(getattr(self, name), name, min_value=1)

    @staticmethod
    def get_rdma_buffer_size_hint(hidden_bytes: int, num_ranks: int, num_nodes: int | None = None) -> int:
        """Bytes of ``num_rdma_bytes`` for high-throughput calls across nodes (DeepEP's name): the HT RDMA area's
        stream rings (gpu/ht_inter_layout.py), 256 messages of a row of ``hidden_bytes`` (plus FP8 scales and
        top-32 metadata) per node and direction. ``num_nodes``: the group's nodes (virtual nodes too); without it,
        as DeepEP: 0 for up to 8 ranks (one node), else 8 ranks per node. The LL size is
        ``Buffer.get_low_latency_rdma_size_hint``."""
        from .gpu import ht_inter_layout as lay

        check_int(hidden_bytes, "hidden_bytes", min_value=16)
        check_int(num_ranks, "num_ranks", min_value=1)
        if num_nodes is None:
            num_nodes = -(-num_ranks // 8)
        check_int(num_nodes, "num_nodes", min_value=1, max_value=num_ranks)
        if num_nodes == 1:
            return 0
        msg = lay.dispatch_msg_bytes(32, -(-hidden_bytes // 128), -(-hidden_bytes // 16) * 16)
        return lay.area_bytes_for(msg, num_nodes, ring=256)

    @staticmethod
    def get_nvl_buffer_size_hint(
        hidden_bytes: int, num_ranks: int, num_max_tokens_per_rank: int = 4096, topk: int = 8
    ) -> int:
        """Bytes of ``num_nvl_bytes`` (``Buffer(group, num_nvl_bytes=...)``) for processes on one node:
        dispatch outputs are allocated in the shared region so peers can write them in place, and combine
        stages its input there when it is not already inside. Enough for the outputs of two dispatches alive
        at once plus one staged combine input, every token reaching every rank (the worst case).

        Args:
            hidden_bytes: bytes of one token row: ``H * 2`` for BF16, ``H`` for FP8 (at least 16).
            num_ranks: ranks of the group.
            num_max_tokens_per_rank: the most tokens one rank dispatches in a call (default 4096).
            topk: K, the experts per token (default 8).
        Returns:
            an int number of bytes. Raises ``epkern.ArgumentError`` naming a bad argument.

        Example::

            nvl_bytes = epkern.Config.get_nvl_buffer_size_hint(7168 * 2, 8, num_max_tokens_per_rank=4096, topk=8)
            buf = epkern.Buffer(group, num_nvl_bytes=nvl_bytes)
        """
        hidden_bytes = check_int(hidden_bytes, "hidden_bytes", min_value=16)
        num_ranks = check_int(num_ranks, "num_ranks", min_value=1)
        rows = num_ranks * check_int(num_max_tokens_per_rank, "num_max_tokens_per_rank", min_value=1)
        meta = check_int(topk, "topk", min_value=1) * 12 + 4 + hidden_bytes // 128 * 4
        per_call = rows * (hidden_bytes + meta) + 5 * 256
        return CTRL_BYTES + 3 * per_call + (1 << 20)
