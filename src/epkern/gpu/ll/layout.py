"""Layout and limits of the low-latency (LL) kernels: the LL area inside the symmetric region, the device state
words and the error-record phases. The numbers are kernels/epk_constants.cuh's (read by kernel_constants)."""

from __future__ import annotations

from dataclasses import dataclass

from ... import kernel_constants as K

# Limits of the kernels.
MAX_NUM_MAX = K.get("EPK_LL_MAX_NUM_MAX")  # tokens per rank: the count field of a signal has 11 bits
MAX_TOPK = K.get("EPK_LL_MAX_TOPK")
MAX_EXPERTS = K.get("EPK_LL_MAX_EXPERTS")
MAX_RANKS = K.get("EPK_LL_MAX_RANKS")  # one lane per source rank in the receive phase
THREADS = K.get("EPK_LL_THREADS")

# Device state words (int32).
STATE_MAX_RANKS = K.get("EPK_STATE_MAX_RANKS")
STATE_COUNTER = K.get("EPK_STATE_COUNTER")
STATE_TICKET = K.get("EPK_STATE_TICKET")
STATE_MASK = K.get("EPK_STATE_MASK")
STATE_ROUTE = K.get("EPK_STATE_ROUTE")
STATE_SLOT = K.get("EPK_STATE_SLOT")
STATE_DONE = K.get("EPK_STATE_DONE")
STATE_PAIR = K.get("EPK_STATE_PAIR")
STATE_WORDS = K.get("EPK_STATE_WORDS")
ROUTE_NONE, ROUTE_IPC = K.get("EPK_ROUTE_NONE"), K.get("EPK_ROUTE_IPC")
ROUTE_PROXY, ROUTE_RDMA = K.get("EPK_ROUTE_PROXY"), K.get("EPK_ROUTE_RDMA")
STATE_PROXY_FIFOS = K.get("EPK_STATE_PROXY_FIFOS")
STATE_PROXY_CAPACITY = K.get("EPK_STATE_PROXY_CAPACITY")
STATE_PROXY_TABLE = K.get("EPK_STATE_PROXY_TABLE")
STATE_RDMA_TABLE = K.get("EPK_STATE_RDMA_TABLE")
RDMA_QP_BYTES = K.get("EPK_RDMA_QP_BYTES")
PROXY_MAX_FIFOS = K.get("EPK_PROXY_MAX_FIFOS")

PHASE_SEND, PHASE_RECV = K.get("EPK_PHASE_SEND"), K.get("EPK_PHASE_RECV")

# Error-record phases of the LL kernels (added to the runtime's phases).
LL_PHASES = {
    K.get("EPK_ERR_PHASE_LL_DISPATCH_RECV"): "low-latency dispatch (waiting for a peer's token count)",
    K.get("EPK_ERR_PHASE_LL_LOCAL_SENDS"): "low-latency dispatch (waiting for this rank's own sends to finish)",
    K.get("EPK_ERR_PHASE_LL_COMBINE_RECV"): "low-latency combine (waiting for a peer's expert outputs)",
    K.get("EPK_ERR_PHASE_LL_BAD_INDEX"): "low-latency dispatch (a topk_idx entry outside [-1, num_experts))",
    K.get("EPK_ERR_PHASE_LL_BAD_HANDLE"): "low-latency combine (the handle's layout_range / src_info is out of range)",
    K.get("EPK_ERR_PHASE_LL_ROUTE"): "low-latency (no implemented route to a peer)",
    K.get("EPK_ERR_PHASE_LL_OVERFLOW"): (
        "low-latency dispatch (an expert selected more than num_max_dispatch_tokens_per_rank times)"
    ),
}
# A silent peer: raise once, mask it, stay usable.
LL_TIMEOUT_PHASES = frozenset({K.get("EPK_ERR_PHASE_LL_DISPATCH_RECV"), K.get("EPK_ERR_PHASE_LL_COMBINE_RECV")})
LL_BAD_INDEX_PHASE = K.get("EPK_ERR_PHASE_LL_BAD_INDEX")  # bad topk_idx values: ArgumentError, stay usable
LL_RECOVERABLE_PHASES = LL_TIMEOUT_PHASES | {LL_BAD_INDEX_PHASE}


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


@dataclass(frozen=True)
class LLLayout:
    """Offsets inside one LL buffer set (bytes; kernels/ll_common.cuh). ``per_set`` is what one set needs."""

    num_max: int
    hidden: int
    num_experts: int
    signal_bytes: int
    send_off: int
    recv_off: int
    per_set: int

    @property
    def slot_bytes(self) -> int:  # dispatch message slot: 16-byte header + the BF16 row (FP8 fits too)
        return 16 + 2 * self.hidden


def ll_layout(num_max: int, hidden: int, num_experts: int) -> LLLayout:
    """Signals (4·E bytes) and the direct dispatch's fill counters (4·E), send region (dispatch staging
    num_max · (16 + 2H), or the zero-copy combine buffer E · num_max · 2H), receive region (E · num_max ·
    (16 + 2H): dispatch slots; combine slots of 2H fit; the direct dispatch's outputs). Each region 16-byte
    aligned. Never more than half of ``get_low_latency_rdma_size_hint``."""
    slot = 16 + 2 * hidden
    signal = _align(8 * num_experts, 16)  # the signals, then the direct dispatch's fill counters
    send = _align(max(num_max * slot, num_experts * num_max * 2 * hidden), 16)
    recv = _align(num_experts * num_max * slot, 16)
    return LLLayout(num_max, hidden, num_experts, signal, signal, signal + send, signal + send + recv)


@dataclass(frozen=True)
class DirectRecvLayout:
    """Where the direct dispatch (``zero_copy_recv``) keeps one call's outputs, as byte offsets from the start of
    the set's receive region (kernels/ll_dispatch_direct.cuh computes the same): recv_x [E_loc, R·num_max, H]
    (BF16, or e4m3 bytes), the scales (column-major [E_loc, S, R·num_max]), src_info, layout_range, count."""

    x_off: int
    scales_off: int
    src_off: int
    layout_off: int
    count_off: int
    end: int


def direct_recv_layout(lay: LLLayout, num_ranks: int) -> DirectRecvLayout:
    e_loc, rows = lay.num_experts // num_ranks, num_ranks * lay.num_max
    scales_off = _align(e_loc * rows * lay.hidden, 16)  # FP8: after the e4m3 rows, within the BF16 rows' size
    # The handle's arrays past E·num_max·2H, where no combine writes (its slots and row lists lie before): a
    # combine that runs in this set (two calls later) leaves the handle of this dispatch intact.
    src_off = _align(e_loc * rows * lay.hidden * 2, 16)
    layout_off = _align(src_off + e_loc * rows * 4, 16)
    count_off = _align(layout_off + e_loc * num_ranks * 8, 16)
    end = count_off + e_loc * 4
    if end > lay.per_set - lay.recv_off:  # cannot happen (the receive region holds R·num_max slots of 16 + 2H)
        raise AssertionError(f"direct dispatch outputs ({end} bytes) exceed the receive region")
    return DirectRecvLayout(0, scales_off, src_off, layout_off, count_off, end)


def ll_area_bytes(num_rdma_bytes: int, low_latency_mode: bool) -> int:
    """Bytes of the LL area in the symmetric region (0: no LL area)."""
    return _align(num_rdma_bytes, 256) if (low_latency_mode or num_rdma_bytes > 0) else 0


def set_stride_of(ll_bytes: int) -> int:
    """Bytes per buffer set for an LL area of ``ll_bytes`` (two sets, each 16-byte aligned)."""
    return ll_bytes // 2 // 16 * 16


def min_num_rdma_bytes(num_max: int, hidden: int, num_experts: int) -> int:
    """The smallest ``num_rdma_bytes`` that holds both sets for these sizes."""
    return 2 * ll_layout(num_max, hidden, num_experts).per_set
