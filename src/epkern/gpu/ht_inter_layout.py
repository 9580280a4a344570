"""HT across nodes (issue #18): the host's side of kernels/ht_inter.cuh: the node map the kernels take, the HT RDMA
area's layout (stream words, notify entries, then the dispatch and the combine rings) and a dispatch message's
size. Pure arithmetic, CPU-tested (tests/test_ht_inter_layout_cpu.py)."""

from __future__ import annotations

from dataclasses import dataclass

from .. import kernel_constants as K
from ..errors import ArgumentError

HEADER_BYTES = K.get("EPK_HT_INTER_HEADER_BYTES")  # inter::Area: words and notify entries
MSG_HEADER = K.get("EPK_HT_INTER_MSG_HEADER")
SLOTS_PER_MSG = 8  # inter::kSlotsPerMsg: a row slot per rank of the destination node
MAX_NODES = K.get("EPK_HT_INTER_MAX_NODES")
CHUNK = 32  # messages per WRITE of a stream (ht_stream.cuh send_chunk); at most the ring
MIN_RING = 2  # a ring smaller than this cannot hold a chunk and the next one's first message


MAX_RANKS = K.get("EPK_HT_INTER_MAX_RANKS")
PER_NODE = K.get("EPK_HT_MAX_PEERS")  # ranks of one node at most (IPC, HtCtrl by local index)


@dataclass(frozen=True)
class Nodes:
    """The group's node map as the kernels take it (ht_inter.cuh ``Nodes``, from two device int arrays): the node of
    every rank, and the rank of every node with this rank's local index (this rank for its own node)."""

    num_nodes: int
    per_node: int
    node: int  # this rank's
    node_of: tuple[int, ...]
    peers: tuple[int, ...]


def nodes_of(node_of_rank: tuple[int, ...], rank: int) -> Nodes:
    """ArgumentError unless every node holds the same number of ranks (a token crosses to the rank with its
    source's local index: every node must have one), at most 8 of them, on at most 16 nodes (128 ranks)."""
    R = len(node_of_rank)
    N = max(node_of_rank) + 1
    members = [[r for r in range(R) if node_of_rank[r] == n] for n in range(N)]
    sizes = {len(m) for m in members}
    if len(sizes) != 1:
        shown = ", ".join(f"node {n}: ranks {m}" for n, m in enumerate(members))
        raise ArgumentError(
            f"group: HT across nodes needs the same number of ranks on every node ({shown}); a token crosses the "
            "network to the rank with its source's local index on each node"
        )
    if len(members[0]) > PER_NODE or N > MAX_NODES or R > MAX_RANKS:
        raise ArgumentError(
            f"group: HT across nodes supports up to {PER_NODE} ranks per node, {MAX_NODES} nodes and {MAX_RANKS} "
            f"ranks; got {len(members[0])} per node on {N} nodes ({R} ranks)"
        )
    local = members[node_of_rank[rank]].index(rank)
    peers = tuple(members[n][local] for n in range(N))
    return Nodes(N, len(members[0]), node_of_rank[rank], tuple(node_of_rank), peers)


def dispatch_meta_bytes(topk: int, scale_cols: int) -> int:
    """ht_inter.cuh ``dispatch_meta_bytes``: a dispatch message's bytes before its row."""
    return -(-(MSG_HEADER + 4 * SLOTS_PER_MSG + 8 * topk + 4 * scale_cols) // 16) * 16


def dispatch_msg_bytes(topk: int, scale_cols: int, row_bytes: int) -> int:
    return dispatch_meta_bytes(topk, scale_cols) + row_bytes


def combine_msg_bytes(topk: int, hidden: int) -> int:
    """ht_inter.cuh ``combine_meta_bytes`` + the BF16 partial row: a combine message's bytes."""
    return -(-(MSG_HEADER + 4 * topk) // 16) * 16 + 2 * hidden


@dataclass(frozen=True)
class Rings:
    """One half of the area's rings (0: dispatch, 1: combine): bytes from the area's start, slots per ring, bytes
    per slot. Per node n: the receive ring at ``offset + 2 n ring msg``, the staging ring right after it."""

    offset: int
    ring: int
    msg: int
    chunk: int


def rings(area_bytes: int, num_nodes: int, msg: int, half: int, what: str) -> Rings:
    """The rings of ``half`` for messages of ``msg`` bytes; ArgumentError naming num_rdma_bytes when the area holds
    fewer than MIN_RING slots per ring."""
    span = (area_bytes - HEADER_BYTES) // 2 // 256 * 256
    ring = span // (2 * num_nodes * msg) if span > 0 else 0
    if ring < MIN_RING:
        need = HEADER_BYTES + 2 * 2 * num_nodes * msg * MIN_RING
        raise ArgumentError(
            f"{what}: num_rdma_bytes={area_bytes} holds {ring} messages of {msg} bytes per ring across "
            f"{num_nodes} nodes; at least {need} bytes are needed (more for fewer waits on the network)"
        )
    return Rings(HEADER_BYTES + half * span, ring, msg, min(CHUNK, ring))


def area_bytes_for(msg: int, num_nodes: int, ring: int) -> int:
    """num_rdma_bytes whose halves each hold ``ring`` messages of ``msg`` bytes per node and direction."""
    return HEADER_BYTES + 2 * -(-(2 * num_nodes * msg * ring) // 256) * 256


def area_bytes_hint(hidden: int, topk: int, num_nodes: int, ring: int = 1024) -> int:
    """num_rdma_bytes for rings of ``ring`` BF16 messages of ``hidden`` per node in each half."""
    return area_bytes_for(dispatch_msg_bytes(topk, 0, 2 * hidden), num_nodes, ring)
