"""HT dispatch and combine across nodes (issue #18; docs/architecture.md, "Internode HT"): a token crosses the
network once per destination node, to the rank of that node with its source's local index, which writes it into its
final place in each destination of its node over IPC. Destinations on the source's own node get their rows over IPC
directly. Combine runs the streams backwards: one partial per message.

- Memory: the HT RDMA area (``Runtime.ht_area_*``, ``num_rdma_bytes``; layout in ht_inter_layout.py) registered on
  this rank's NIC with one QP per rank of another node: an ``RdmaTransport`` (the RDMA route's host side: QP table,
  completion poller, quiesce) over that area instead of the LL area. The kernels post their own WQEs.
- Flow of a non-cached dispatch: ``ht_inter_notify`` (counts of every rank: IPC stores to this node, one WRITE + an
  inline flag to each other rank; send slots for every rank, message order per node) -> the host reads the receive
  count and allocates outputs -> ``ht_inter_dispatch`` (sender, forwarder and copier blocks; ht_inter_dispatch.cu).
- Handle: the intranode handle's fields plus ``node_tokens`` / ``node_counts`` (what the streams replay in a cached
  dispatch) and ``fwd_slots`` (the row slots of each message this rank forwarded: what combine reduces).
- Combine: ``ht_inter_combine`` sends each forwarded message's partial (its node's returned rows, BF16) back to the
  source, which adds the partials of each node in ascending order (reference.ht_combine's two-level order).

Exact on an H100 over the emulated NIC (session O: every in-process internode test, MPS processes at 2 x 2, 2 x 4,
2 x 8 and 8 x 1); never run on a real NIC or across GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import api_checks
from .. import kernel_constants as K
from .._validate import as_device_array, check_array
from ..errors import ArgumentError
from . import ht_inter_layout as lay
from .ht import HtHandle, notify_result
from .ht_outputs import combine_outputs, dispatch_outputs, work_arrays
from .kernels import HT_INTER_COMBINE, HT_INTER_DISPATCH, HT_INTER_NOTIFY
from .ll import nic_link
from .ll.layout import ROUTE_IPC, ROUTE_RDMA

_OUT_EXPERTS, _OUT_SHAPE = K.get("EPK_HT_INTER_OUT_EXPERTS"), K.get("EPK_HT_INTER_OUT_SHAPE")
_OUT_BAD, _OUT_NODES = K.get("EPK_HT_INTER_OUT_BAD_INDEX"), K.get("EPK_HT_INTER_OUT_NODES")
_OUT_LAYOUT_OK = K.get("EPK_HT_INTER_OUT_LAYOUT_OK")
MAX_NODES = lay.MAX_NODES
THREADS = 256  # per block of the dispatch and combine kernels across nodes (HtInter.blocks_per_sm)


@dataclass
class HtInterHandle(HtHandle):
    """An intranode handle plus the streams of this dispatch: ``node_tokens`` int32 [N, T] (the token of message i
    to node n), ``node_counts`` int32 [16] (messages sent to each node, then forwarded from each node)."""

    node_tokens: object = None
    node_counts: object = None
    node_slot: object = None  # int32 [T, N]: the message index of token t to node n (-1: none); for combine
    fwd_slots: object = None  # int32 [N, fwd_cap, 8]: the row slots of each message this rank forwarded
    fwd_cap: int = 0


class HtInter:
    """HT across nodes for one rank of a Buffer: the node map and the RDMA transport over the HT area."""

    def __init__(self, rt, real_nic=None, transport_factory=None):
        import cupy

        from .ll.rdma import RDMA_PHASES, RING_WQES, RdmaTransport

        self.rt = rt
        node_of = tuple(rt.group.node_of_rank)
        self.nodes = lay.nodes_of(node_of, rt.rank)
        with cupy.cuda.Device(rt.device):  # the node map as the kernels read it (ht_inter.cuh load_nodes)
            self.node_of = cupy.asarray(np.asarray(self.nodes.node_of, dtype=np.int32))
            self.peer_of_node = cupy.asarray(np.asarray(self.nodes.peers, dtype=np.int32))
        routes = [ROUTE_IPC if node_of[p] == node_of[rt.rank] else ROUTE_RDMA for p in range(rt.num_ranks)]
        make = transport_factory or RdmaTransport
        # Every chunk's tail and every credit is signaled (the LL route signals once per call and peer): a CQ as
        # deep as the send ring cannot overrun however far the poller falls behind (wait_sq_space bounds what is
        # outstanding by the ring; the emulated NIC faults a QP whose CQ overruns).
        self.transport = make(
            rt, routes, real_nic=real_nic, area=(rt.ht_area_offset, rt.ht_area_bytes), cq_slots=RING_WQES
        )
        rt.register_phases(RDMA_PHASES)
        rt.describe_peer = self.describe_peer
        self.host_copies = real_nic is None  # the emulated NIC: its copies are host CUDA calls (complete())

    def complete(self, captured: bool) -> None:
        """Over the emulated NIC an eager call ends once its kernels have, as the LL NIC routes' (nic_link's
        wait_for_call: a host CUDA call of this process that waits for running kernels, a cudaMalloc of the next
        call's arrays or a module load, would hold up the NIC's copies these kernels wait for). Not inside a capture
        (no host wait can be captured): replays run as LL's over NIC routes do (docs/architecture.md, Known
        problems)."""
        if self.host_copies and not captured:
            nic_link.wait_for_call(self.rt)

    def describe_peer(self, peer: int) -> str:
        """For a timeout naming ``peer``: what this rank's NIC did for it (a rank of another node), and any NIC
        failure of this rank (a faulted QP stops what it carries: the waits of peers then expire)."""
        t = self.transport
        text = t.describe(peer) if 0 <= peer < self.rt.num_ranks and peer in getattr(t, "qps", {}) else ""
        errors = t.poller.errors if getattr(t, "poller", None) is not None else []
        return text or ("this rank's NIC: " + "; ".join(errors) if errors else "")

    def min_blocks(self) -> int:
        """A sender and a forwarder block per node, and at least one copier (ht_inter_dispatch.cu)."""
        return 2 * self.nodes.num_nodes + 1

    def grid(self, blocks: int, what: str) -> int:
        """Blocks of a dispatch / combine launch: ArgumentError when the ranks sharing this GPU could not all be
        resident at once (two THREADS-wide blocks per SM are guaranteed: HtInter.blocks_per_sm), since their blocks
        wait on each other (one rank per GPU always fits: 2 x 16 + 1 blocks)."""
        blocks = max(blocks, self.min_blocks())
        rt = self.rt
        if rt.ranks_per_gpu * blocks > 2 * rt.num_device_sms:
            raise ArgumentError(
                f"{what}: {rt.ranks_per_gpu} ranks on this GPU x {blocks} blocks ({self.nodes.num_nodes} nodes need "
                f"{self.min_blocks()}) exceed the {2 * rt.num_device_sms} that can be resident at once; use fewer "
                "virtual nodes or fewer ranks per GPU"
            )
        return blocks

    @staticmethod
    def blocks_per_sm(tun) -> int:
        """EPK_MIN_BLOCKS of the kernels across nodes, whose blocks are THREADS wide: at least 2, so that every block
        of every rank sharing a GPU is resident at once (their roles wait on each other across ranks). 8 ranks as 8
        nodes launch 17 blocks each: 136, more than the 132 SMs of an H100 hold at one 512-thread block of 96
        registers per SM; two 256-thread blocks per SM keep the 96 registers (no spills) and hold 264."""
        return max(tun.blocks_per_sm, 2)

    def dispatch(self, engine, a):
        """``a``: HtEngine.dispatch's validated arguments (a SimpleNamespace)."""
        rt, N, R = self.rt, self.nodes.num_nodes, self.rt.num_ranks
        T, topk, hidden, row_bytes = a.T, a.topk, a.hidden, a.row_bytes
        scale_cols = hidden // 128 if a.scales is not None else 0
        if not a.cached:
            rdma = a.num_tokens_per_rdma_rank
            if rdma is None:
                raise ArgumentError("num_tokens_per_rdma_rank: required across nodes unless a cached handle is given")
            rdma = as_device_array(rdma, "num_tokens_per_rdma_rank")
            check_array(rdma, "num_tokens_per_rdma_rank", dtypes=(np.int32,), shape=(N,), device=rt.device)
        rings = lay.rings(rt.ht_area_bytes, N, lay.dispatch_msg_bytes(topk, scale_cols, row_bytes), 0, "dispatch")
        blocks = self.grid(a.blocks, "dispatch")
        tun = engine.tuning
        common = dict(
            peers=rt.peer_table,
            area_offset=rt.ht_area_offset,
            qps=self.transport.table_ptr,
            node_of=self.node_of,
            peer_of_node=self.peer_of_node,
        )
        compute = rt.begin(a.previous_event, a.async_finish, a.allocate_on_comm_stream)
        with rt.on_comm_stream():
            if not a.cached:
                E = a.num_tokens_per_expert.shape[0]
                rank_prefix, send_slot, node_slot, node_tokens, node_counts = work_arrays(
                    rt,
                    [(R, R), (T, R), (T, N), (N, max(T, 1)), (2 * MAX_NODES,)],
                    np.int32,
                    compute,
                    a.captured,
                    zeroed=(4,),
                )
                call = rt.next_call()
                rt.notify_out[0] = 0
                rt.launch(
                    HT_INTER_NOTIFY,
                    HT_INTER_NOTIFY.defines(EPK_NUM_RANKS=R, EPK_NUM_NODES=N),
                    1,
                    1024,
                    HT_INTER_NOTIFY.pack(
                        dry_run=0,
                        rank=rt.rank,
                        call=call,
                        num_tokens=T,
                        num_tokens_per_rank=a.num_tokens_per_rank,
                        num_tokens_per_rdma_rank=rdma,
                        num_tokens_per_expert=a.num_tokens_per_expert,
                        is_token_in_rank=a.is_token_in_rank,
                        rank_prefix_matrix=rank_prefix,
                        send_slot=send_slot,
                        node_slot=node_slot,
                        node_tokens=node_tokens,
                        node_counts=node_counts,
                        topk_idx=a.topk_idx,
                        topk=topk,
                        num_experts=E,
                        row_bytes=row_bytes,
                        scale_cols=scale_cols,
                        host_out=rt.notify_out_ptr,
                        **common,
                        **rt.deadline(),
                    ),
                )
                if a.num_worst_tokens:
                    num_recv, per_expert, out_rows = -1, [], a.num_worst_tokens
                    # a message carries a row for at least one of the node's ranks: at most L x their rows
                    fwd_cap = self.nodes.per_node * a.num_worst_tokens
                else:
                    rt.wait_host_word(rt.notify_out, call, "dispatch notify")
                    if not int(rt.notify_out[_OUT_LAYOUT_OK]):
                        raise ArgumentError(
                            "num_tokens_per_rdma_rank: differs from the tokens per node that is_token_in_rank gives "
                            "(every rank refuses this dispatch)"
                        )
                    num_recv, per_expert = notify_result(
                        rt, topk, E // R, a.expert_alignment, _OUT_EXPERTS, _OUT_SHAPE, _OUT_BAD
                    )
                    out_rows = num_recv
                    fwd_cap = int(rt.notify_out[_OUT_NODES + MAX_NODES : _OUT_NODES + MAX_NODES + N].max())
                fwd_cap = max(fwd_cap, 1)
                (fwd_slots,) = work_arrays(rt, [(N, fwd_cap, lay.SLOTS_PER_MSG)], np.int32, compute, a.captured)
                is_token_in_rank = a.is_token_in_rank
            else:
                h = a.handle
                rank_prefix, send_slot, is_token_in_rank = h.rank_prefix_matrix, h.send_slot, h.is_token_in_rank
                node_tokens, node_counts, out_rows = h.node_tokens, h.node_counts, h.num_out_rows
                fwd_slots, fwd_cap = None, 0  # the streams carry the same messages: combine keeps the first's
            out = dispatch_outputs(
                rt, out_rows, a.data, a.scales, topk, a.cached, a.num_worst_tokens, compute,
                a.allocate_on_comm_stream, captured=a.captured,
            )  # fmt: skip
            defines = HT_INTER_DISPATCH.defines(
                EPK_NUM_RANKS=R,
                EPK_NUM_NODES=N,
                EPK_TOPK=topk,
                EPK_ROW_BYTES=row_bytes,
                EPK_SCALE_COLS=scale_cols,
                EPK_NUM_LOCAL_EXPERTS=(a.num_tokens_per_expert.shape[0] // R) if not a.cached else 1,
                EPK_WITH_META=0 if a.cached else 1,
                EPK_THREADS=THREADS,
                EPK_MIN_BLOCKS=self.blocks_per_sm(tun),
                EPK_UNROLL=tun.dispatch_unroll,
            )
            ptr = lambda arr: arr.data.ptr if arr is not None else 0  # noqa: E731
            args = HT_INTER_DISPATCH.pack(
                dry_run=0,
                rank=rt.rank,
                call=rt.next_call(),
                num_tokens=T,
                x=a.data,
                x_scales=a.scales,
                topk_idx=None if a.cached else a.topk_idx,
                topk_weights=None if a.cached else a.topk_weights,
                send_slot=send_slot,
                node_tokens=node_tokens,
                node_counts=node_counts,
                fwd_slots=fwd_slots,
                fwd_cap=fwd_cap,
                # num_worst_tokens: the kernel reads notify's checks (the host did not wait for them)
                notify_out=rt.notify_out_ptr if not a.cached and a.num_worst_tokens else None,
                ring_offset=rings.offset,
                ring=rings.ring,
                chunk=rings.chunk,
                out_x=ptr(out.x),
                out_scales=ptr(out.scales),
                out_idx=ptr(out.idx),
                out_weights=ptr(out.weights),
                out_src=ptr(out.src),
                out_rows=out_rows,
                ticket=rt.tickets.data.ptr,
                **common,
                **rt.deadline(),
            )
            rt.launch(HT_INTER_DISPATCH, defines, blocks, THREADS, args)
        self.complete(a.captured)
        event = rt.end(compute, a.async_finish)
        recv_x = (out.x, out.scales) if a.scales is not None else out.x
        if a.cached:
            return recv_x, None, None, None, a.handle, event
        handle = HtInterHandle(
            rank_prefix, send_slot, is_token_in_rank, out.src, num_recv, out_rows, T, hidden, topk, out.keep,
            node_tokens=node_tokens, node_counts=node_counts, node_slot=node_slot, fwd_slots=fwd_slots,
            fwd_cap=fwd_cap,
        )  # fmt: skip
        api_checks.stamp(handle, rt)
        weights = out.weights if a.topk_weights is not None else None
        return recv_x, out.idx, weights, per_expert, handle, event

    def combine(self, engine, x, handle, topk_weights, biases, blocks, previous_event, async_finish, on_comm, captured):
        """HtEngine.combine's validated arguments: the partials of each node, reduced at the source
        (ht_inter_combine.cu)."""

        from . import ht_replay

        rt, N = self.rt, self.nodes.num_nodes
        api_checks.own_handle(handle, HtInterHandle, rt, "dispatch")
        T, K, hidden = handle.num_tokens, handle.topk, x.shape[1]
        msg = lay.combine_msg_bytes(K, hidden)
        rings = lay.rings(rt.ht_area_bytes, N, msg, 1, "combine")
        grid = self.grid(blocks, "combine")
        tun = engine.tuning
        compute = rt.begin(previous_event, async_finish, on_comm)
        with rt.on_comm_stream():
            x, topk_weights, keep = ht_replay.combine_inputs_in_region(rt, x, topk_weights, captured)
            out, out_w, _ = combine_outputs(rt, T, K, hidden, topk_weights is not None, compute, on_comm, captured)
            # the partials of other nodes, in order, and the per-node progress
            (scratch,) = work_arrays(rt, [(max(1, N * T * msg),)], np.uint8, compute, captured)
            (copied,) = work_arrays(rt, [(MAX_NODES,)], np.int32, compute, captured, zeroed=(0,))
            defines = HT_INTER_COMBINE.defines(
                EPK_NUM_RANKS=rt.num_ranks,
                EPK_NUM_NODES=N,
                EPK_TOPK=K,
                EPK_HIDDEN=hidden,
                EPK_HAS_WEIGHTS=int(topk_weights is not None),
                EPK_THREADS=THREADS,
                EPK_MIN_BLOCKS=self.blocks_per_sm(tun),
            )
            args = HT_INTER_COMBINE.pack(
                dry_run=0,
                rank=rt.rank,
                call=rt.next_call(),
                num_tokens=T,
                in_x=x.data.ptr,
                in_weights=topk_weights.data.ptr if topk_weights is not None else 0,
                send_slot=handle.send_slot,
                node_slot=handle.node_slot,
                fwd_slots=handle.fwd_slots,
                fwd_cap=handle.fwd_cap,
                node_counts=handle.node_counts,
                bias0=biases[0] if biases else None,
                bias1=biases[1] if len(biases) > 1 else None,
                peers=rt.peer_table,
                area_offset=rt.ht_area_offset,
                qps=self.transport.table_ptr,
                node_of=self.node_of,
                peer_of_node=self.peer_of_node,
                ring_offset=rings.offset,
                ring=rings.ring,
                chunk=rings.chunk,
                scratch=scratch,
                copied=copied,
                out_x=out,
                out_weights=out_w,
                ticket=rt.tickets.data.ptr + 4,
                **rt.deadline(),
            )
            rt.launch(HT_INTER_COMBINE, defines, grid, THREADS, args)
        self.complete(captured)
        event = rt.end(compute, async_finish)
        del keep, scratch, copied  # the stream orders their reuse after the kernel
        return out, out_w, event

    def close(self, raise_errors: bool = True) -> None:
        self.transport.close(raise_errors=raise_errors)
