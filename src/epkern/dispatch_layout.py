"""get_dispatch_layout on the GPU (kernels/layout.cu): one launch, outputs allocated here."""

from __future__ import annotations

import functools
import threading
from typing import NamedTuple

import numpy as np

from . import _cuda, _env, api_checks, kernel_loader
from ._validate import as_device_array, check_int, check_rank_to_node
from .errors import ArgumentError
from .gpu.kernels import LAYOUT

MAX_TOPK, MAX_EXPERTS = api_checks.LAYOUT_MAX_TOPK, api_checks.LAYOUT_MAX_EXPERTS
MAX_RANKS = 1024


class DispatchLayout(NamedTuple):
    num_tokens_per_rank: object  # int32 [R]
    num_tokens_per_rdma_rank: object  # int32 [N], or None for one node
    num_tokens_per_expert: object  # int32 [E]
    is_token_in_rank: object  # bool [T, R]


# One token per thread. T <= THREADS runs as one block, which skips the cross-block reduction (the kernel's
# gridDim == 1 path). Measured on the H100: one block of 1024 threads for T=4096 took 42 us against 8 us for 32
# blocks of 128 (docs/performance.md), so only tiny T take that path.
THREADS = 128


@functools.cache
def _sm_count(device: int) -> int:
    import cupy

    return cupy.cuda.runtime.deviceGetAttribute(cupy.cuda.runtime.cudaDevAttrMultiProcessorCount, device)


class _Workspace:
    """Zeroed counters + ticket the kernel leaves zeroed again; one per (device, stream), because two
    launches running at once must not share them. Plus a host-mapped word for the invalid-index count."""

    def __init__(self, num_counters: int):
        import cupy

        from .memory import HostMapped

        self.counters = cupy.zeros(num_counters + 1, dtype=np.int32)  # [0] is the ticket
        self.invalid = HostMapped(64)


_workspaces: dict[tuple[int, int, int], _Workspace] = {}
_workspaces_lock = threading.Lock()


def _workspace(device: int, stream_ptr: int, num_counters: int) -> _Workspace:
    key = (device, stream_ptr, num_counters)
    ws = _workspaces.get(key)
    if ws is None:
        with _workspaces_lock:
            ws = _workspaces.setdefault(key, _Workspace(num_counters))
    return ws


def get_dispatch_layout(
    topk_idx, num_experts: int, num_ranks: int, rank_to_node=None, *, check_indices: bool = True, alloc_stream=None
) -> DispatchLayout:
    """Counts of tokens per rank / node / expert and the token-to-rank map for ``topk_idx``, on the current
    CuPy stream: the GPU layout kernel alone, without a Buffer or a group (``Buffer.get_dispatch_layout`` is
    this with the group's size and nodes, on either backend). GPU only: raises DeviceUnavailableError without one.

    Args:
        topk_idx: CuPy int64 or int32 [T, K], entries in [-1, num_experts) (-1: no selection); K in 1..32.
        num_experts: E, a multiple of ``num_ranks``, at most 8192; rank r owns experts [r·E/R, (r+1)·E/R).
        num_ranks: R, 1 to 1024.
        rank_to_node: node index of every rank (a sequence of R ints); per-node counts are returned when
            there are 2+ nodes.
        check_indices: the kernel counts out-of-range indices and the host waits for the stream to raise
            ArgumentError if there were any (entries are otherwise ignored). False makes the call fully
            asynchronous, for hot loops whose indices are known good.
        alloc_stream: allocate the outputs on this stream instead (the current one waits for it).
    Returns:
        ``DispatchLayout(num_tokens_per_rank int32 [R], num_tokens_per_rdma_rank int32 [nodes] or None for
        one node, num_tokens_per_expert int32 [E], is_token_in_rank bool [T, R])`` (CuPy arrays; a NamedTuple,
        so it unpacks like DeepEP's tuple). ``num_tokens_per_rank[j]``: tokens with at least one expert on
        rank j; ``num_tokens_per_expert[e]``: (t, k) selections of expert e.

    Example::

        import cupy
        from epkern.dispatch_layout import get_dispatch_layout

        topk_idx = cupy.asarray([[0, 5], [1, -1], [6, 7]], dtype=cupy.int64)   # T=3, K=2
        per_rank, _, per_expert, in_rank = get_dispatch_layout(topk_idx, num_experts=8, num_ranks=2)
        # per_rank [2, 2], per_expert [1, 1, 0, 0, 0, 1, 1, 1], in_rank [[1, 1], [1, 0], [0, 1]]
    """
    _cuda.require_gpu("get_dispatch_layout")
    import cupy

    num_ranks = check_int(num_ranks, "num_ranks", min_value=1, max_value=MAX_RANKS)
    topk_idx = as_device_array(topk_idx, "topk_idx")
    device = cupy.cuda.Device().id
    num_experts = api_checks.layout_topk_idx(topk_idx, num_experts, num_ranks, device)
    nodes = check_rank_to_node(rank_to_node, num_ranks)
    num_nodes = (max(nodes) + 1) if nodes else 1
    num_tokens, topk = topk_idx.shape

    node_count = num_nodes if num_nodes > 1 else 0
    defines = LAYOUT.defines(
        EPK_NUM_EXPERTS=num_experts,
        EPK_NUM_RANKS=num_ranks,
        EPK_NUM_NODES=node_count,
        EPK_TOPK=topk,
        EPK_IDX_T="int64_t" if topk_idx.dtype == np.int64 else "int32_t",
        EPK_THREADS=THREADS,
    )
    kernel = kernel_loader.get_function(LAYOUT.source, LAYOUT.name, defines)

    stream = cupy.cuda.get_current_stream()
    if alloc_stream is not None:
        alloc_stream.use()
    try:
        per_rank = cupy.empty(num_ranks, dtype=np.int32)
        per_expert = cupy.empty(num_experts, dtype=np.int32)
        per_node = cupy.empty(node_count, dtype=np.int32) if node_count else None
        in_rank = cupy.empty((num_tokens, num_ranks), dtype=cupy.bool_)
    finally:
        stream.use()
    if alloc_stream is not None and alloc_stream.ptr != stream.ptr:
        stream.wait_event(alloc_stream.record())
    rank_to_node_dev = cupy.asarray(np.asarray(nodes, dtype=np.int32)) if node_count else None

    ws = _workspace(device, stream.ptr, num_experts + num_ranks + node_count + 1)
    blocks = max(1, min(-(-num_tokens // THREADS), 2 * _sm_count(device)))
    invalid_word = ws.invalid.view(np.int32, count=1)
    if check_indices:
        invalid_word[0] = -1  # the kernel overwrites it; -1 left means it did not run
    kernel(
        (blocks,),
        (THREADS,),
        LAYOUT.pack(
            topk_idx=topk_idx,
            num_tokens=num_tokens,
            rank_to_node=rank_to_node_dev,
            num_tokens_per_rank=per_rank,
            num_tokens_per_node=per_node,
            num_tokens_per_expert=per_expert,
            is_token_in_rank=in_rank,
            ticket=ws.counters,
            counters=ws.counters.data.ptr + 4,
            invalid_out=ws.invalid.device_ptr if check_indices else 0,
        ),
    )
    if check_indices:
        _cuda.wait_stream(stream, _env.timeout_s(), "get_dispatch_layout (checking topk_idx)")
        bad = int(invalid_word[0])
        if bad != 0:
            raise ArgumentError(
                f"topk_idx: expected entries in [-1, {num_experts}), found {bad} outside that range"
                if bad > 0
                else "topk_idx: layout kernel did not report (launch failed?)"
            )
    return DispatchLayout(per_rank, per_node, per_expert, in_rank)
