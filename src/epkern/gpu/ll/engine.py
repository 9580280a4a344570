"""The low-latency (LL) engine of one Buffer: device state, the per-size states, replay plans, the hooks and
the two buffer sets; dispatch.py and combine.py are its two calls, masks.py its maintenance.

- LL area: ``num_rdma_bytes`` of the Buffer's symmetric region, at ``rt.ll_offset`` (after the control area and
  the HT heap). Two alternating buffer sets of ``stride`` bytes each; ``layout.ll_layout`` gives the offsets
  inside a set. The hot path allocates nothing when the ``out_*`` arrays are given.
- The set a call uses comes from a call counter in the device state, advanced by the kernels themselves, so a
  captured dispatch + combine pair replays correctly in a CUDA graph. The host keeps only a count of the sending
  launches it issued (``sends``), to tell a recv hook how many sends came after its own (``back``, a relative
  number that graph replay preserves), and to know which set the next call runs in.
- Masked peers are skipped at every send and wait site. A deadline expiry raises TimeoutError once (at the next
  check) and leaves that peer masked; the Buffer stays usable (masks.py).
- Two sets, as DeepEP: a call reuses the set of the call two before it, so every rank must have run that call's
  receive (its hook) before any rank issues the new one.
- Routes (routes.py) are chosen at Buffer creation: IPC, or a NIC route (PROXY or RDMA) for peers on other nodes
  (issue #17; the NIC side is the backend's ``ProxyTransport`` / ``RdmaTransport``). Pull or push is chosen from
  them: receivers pull rows from peers reached by IPC; any other route pushes. The kernels carry a NIC route's code
  only when a route needs it (``EPK_LL_NIC``), so an all-IPC Buffer runs the same kernels as before.
- NIC-route calls complete on the host before they return (eager calls; inside a CUDA graph capture there is
  nothing to wait for): such a kernel waits for the emulated NIC's copies, CUDA calls of a host thread, so nothing
  may be queued behind it, and a CUDA call elsewhere in the process that waits for running kernels (a module load,
  a free) holds those copies up until the device deadline (docs/architecture.md, Known problems). Captured pairs
  replay exact over RDMA and PROXY (8 MPS processes, H100, session L: 100 + 30 replays each).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ... import api_checks
from ...api_checks import BF16
from ...errors import ArgumentError
from ...events import EventHandle
from ...handles import DeepEPTuple
from ...torch_tensors import in_torch_call
from ..capture import capturing
from ..direct import direct_stream, end_direct
from . import nic_link
from . import plans as ll_plans
from .layout import (
    LL_PHASES,
    LL_RECOVERABLE_PHASES,
    PHASE_RECV,
    PHASE_SEND,
    ROUTE_IPC,
    ROUTE_NONE,
    ROUTE_PROXY,
    ROUTE_RDMA,
    STATE_ROUTE,
    STATE_WORDS,
    THREADS,
    LLLayout,
    direct_recv_layout,
    ll_layout,
    set_stride_of,
)


@dataclass(eq=False)
class GpuLLHandle(DeepEPTuple):
    """What low_latency_combine needs (DeepEP's handle; iterating gives DeepEP's tuple
    ``(src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts)``)."""

    src_info: object  # int32 [E_loc, R·num_max] (device)
    layout_range: object  # int64 [E_loc, R] (device)
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int
    layout: LLLayout


class SizeState:
    """Everything the engine keeps for one (num_max, hidden, num_experts): the layout of a set, whether every rank
    agreed on the sizes, and the views into the LL area (zero-copy combine buffers and zero_copy_recv outputs,
    one per set)."""

    __slots__ = ("key", "layout", "stride", "agreed", "combine_views", "recv_views")

    def __init__(self, key, layout: LLLayout, stride: int):
        self.key, self.layout, self.stride = key, layout, stride
        self.agreed = False
        self.combine_views: dict = {}  # parity -> BF16 [E_loc, R·num_max, H]
        self.recv_views: dict = {}  # (use_fp8, use_ue8m0, parity) -> the zero_copy_recv outputs


class LLEngine:
    def __init__(self, rt, tuning, routes=None, nic_routes=None):
        """``routes``: this rank's row of the agreed route table (routes.choose); None: IPC where the peer's region
        is mapped here. ``nic_routes``: the ProxyTransport or RdmaTransport serving the NIC routes (its FIFO or QP
        table goes into the device state), or None."""
        import cupy

        self.rt = rt
        self.tuning = tuning
        self.state = cupy.zeros(STATE_WORDS, dtype=np.int32)
        self.one = cupy.asarray(np.ones(1, np.int32))  # source of the state words set to 1 (masks.py)
        if routes is None:
            routes = [ROUTE_IPC if p else ROUTE_NONE for p in rt.region.peer_ptrs]
        routes = [int(r) for r in routes]
        self.routes = tuple(routes)
        # EPK_LL_NIC of this Buffer's LL kernels: the NIC route kind its peers use (one per Buffer), or 0
        self.nic_build = next((k for k in (ROUTE_PROXY, ROUTE_RDMA) if k in routes), 0)
        self.nic_routes = nic_routes  # named in a NIC peer's timeout (masks.py)
        words = np.zeros(STATE_ROUTE + rt.num_ranks, dtype=np.int32)
        words[STATE_ROUTE:] = routes
        if self.nic_build and nic_routes is not None:
            nic_routes.fill_state(words)  # its FIFO or QP table
        self.state[: len(words)] = cupy.asarray(words)  # the mask words (64..) stay 0: nobody masked
        rt.sync_bounded(cupy.cuda.get_current_stream(), "setting up the low-latency state")
        self.sends = 0  # sending launches issued (host side; the device counter is the truth)
        self.replay_on = bool(tuning.replay)
        self.plans = ll_plans.CallPlans(8)  # identity plans (plans.py)
        self.rebinds = ll_plans.CallPlans(8)  # rebinding plans (rebind.py)
        self.preparing = False  # a prepared call's first run (prepared.py): it keeps the identity plan it leaves
        self._recent: OrderedDict = OrderedDict()  # the last calls' array identities -> weak references (seen_again)
        self.sizes: dict = {}  # (num_max, hidden, num_experts) -> SizeState
        self.replays = 0  # calls served by a plan (tests check the fast path was taken)
        self.rebound = 0  # ... of them by a rebinding plan
        self.direct = 0  # ... of them launched straight onto the caller's stream
        # Pull where every peer is reached by IPC (each of them maps our area); push otherwise.
        all_ipc = all(r == ROUTE_IPC for i, r in enumerate(routes) if i != rt.rank)
        self.dispatch_pull = int(all_ipc if tuning.dispatch_pull is None else tuning.dispatch_pull)
        self.combine_pull = int(all_ipc if tuning.combine_pull is None else tuning.combine_pull)
        if not all_ipc and (self.dispatch_pull or self.combine_pull):
            raise ArgumentError("_tuning: pulled LL modes need every peer over IPC; this Buffer has NIC routes")
        sleep_ns = tuning.poll_sleep_ns
        if sleep_ns is None:  # measured on 8 ranks of one H200, docs/performance.md
            sleep_ns = 200 if rt.ranks_per_gpu > 1 else 0
        self.poll_sleep_ns = int(sleep_ns)

    def register_recoverable(self, handler) -> None:
        self.rt.register_phases(LL_PHASES, LL_RECOVERABLE_PHASES, handler)

    def issued(self) -> None:
        """A sending launch was issued (the host's count of them; the device counter is the truth)."""
        self.sends += 1

    def restart(self) -> None:
        """Every rank restarts from call 0 (after clean_low_latency_buffer): no plan survives."""
        self.sends = 0
        self.plans.clear()
        self.rebinds.clear()
        self._recent.clear()

    def blocks(self) -> int:
        # Spin-waiting kernels of every rank sharing this GPU must be resident at once: one block per SM each.
        return self.rt.sm_share

    # ---- sizes ----
    def size_state(self, num_max: int, hidden: int, num_experts: int) -> SizeState:
        key = (num_max, hidden, num_experts)
        st = self.sizes.get(key)
        if st is not None:
            return st
        rt = self.rt
        api_checks.ll_area(rt.ll_bytes, True, num_max, hidden, num_experts, rt.num_ranks)
        lay, stride = ll_layout(num_max, hidden, num_experts), set_stride_of(rt.ll_bytes)
        st = self.sizes[key] = SizeState(key, lay, stride)
        return st

    def agree(self, st: SizeState, stream) -> None:
        """First use of these sizes: every rank must use the same (one allgather). Collective."""
        if st.agreed:
            return
        if capturing(stream):
            raise ArgumentError(
                f"num_max_dispatch_tokens_per_rank: sizes {st.key} are used for the first time inside a CUDA graph "
                "capture; run one low_latency_dispatch with them before capturing (the first use is collective)"
            )
        seen = self.rt.group.allgather_object(st.key)
        if any(s != st.key for s in seen):
            raise ArgumentError(
                "num_max_dispatch_tokens_per_rank: (num_max_dispatch_tokens_per_rank, hidden, num_experts) must be "
                f"the same on all ranks, got {seen}"
            )
        st.agreed = True

    def check_nic_batch(self, num_max: int, topk: int, e_loc: int) -> None:
        """RDMA route: one call's WRITEs to one peer must fit its send ring (ArgumentError before any launch)."""
        if self.nic_build == ROUTE_RDMA and self.nic_routes is not None:
            self.nic_routes.check_batch(num_max, topk, e_loc, "num_max_dispatch_tokens_per_rank")

    def end(self, compute, async_finish: bool) -> EventHandle:
        """``rt.end`` of an LL call; over NIC routes once the call's kernels ended (nic_link.wait_for_call), unless
        the caller's stream is being captured."""
        if self.nic_build and not capturing(compute):
            nic_link.wait_for_call(self.rt)
        return self.rt.end(compute, async_finish)

    def ensure_warm(self, spec, defines: dict, stream) -> None:
        if not self.rt.is_warm(spec, defines) and capturing(stream):
            raise ArgumentError(
                f"{spec.name}: this specialisation ({defines}) is used for the first time inside a CUDA graph "
                "capture; call it once before capturing (its first launch synchronises and is collective)"
            )

    # ---- the two buffer sets ----
    def next_parity(self) -> int:
        """The buffer set (0 or 1) the next LL call runs in, as the host counts the sending calls."""
        return (self.sends + 1) & 1

    def next_set(self, stride: int) -> tuple[int, int]:
        """(parity, address) of the buffer set the next LL call runs in."""
        parity = self.next_parity()
        return parity, self.rt.region.ptr + self.rt.ll_offset + parity * stride

    def _view(self, ptr: int, nbytes: int, dtype, shape):
        import cupy

        mem = cupy.cuda.UnownedMemory(ptr, nbytes, self.rt.lease)  # the view keeps the memory, not the engine
        return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(mem, 0))

    def direct_outputs(self, st: SizeState, use_fp8: bool, use_ue8m0: bool, S: int):
        """The zero_copy_recv outputs of the call about to be issued: views into the receive region of its set
        (layout.direct_recv_layout; the direct kernel's senders write there). One set of views per set."""
        R, lay = self.rt.num_ranks, st.layout
        parity, set_ptr = self.next_set(st.stride)
        key = (use_fp8, use_ue8m0, parity)
        views = st.recv_views.get(key)
        if views is None:
            d = direct_recv_layout(lay, R)
            e_loc, rows, H = lay.num_experts // R, R * lay.num_max, lay.hidden
            base = set_ptr + lay.recv_off

            def at(off, dtype, shape):
                return self._view(base + off, int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype, shape)

            x = at(d.x_off, np.uint8 if use_fp8 else BF16, (e_loc, rows, H))
            scales = None
            if use_fp8:
                scales = at(d.scales_off, np.int32 if use_ue8m0 else np.float32, (e_loc, S, rows)).transpose(0, 2, 1)
            views = st.recv_views[key] = (
                x,
                scales,
                at(d.src_off, np.int32, (e_loc, rows)),
                at(d.layout_off, np.int64, (e_loc, R)),
                at(d.count_off, np.int32, (e_loc,)),
            )
        return views

    def combine_buffer(self, st: SizeState):
        """The send region of the set the next call will use, as BF16 [E_loc, R·num_max, H]: a zero-copy combine
        reads it in place. One array object per set, so repeated zero-copy combines replay."""
        parity, set_ptr = self.next_set(st.stride)
        view = st.combine_views.get(parity)
        if view is None:
            lay, R = st.layout, self.rt.num_ranks
            e_loc, rows = lay.num_experts // R, R * lay.num_max
            shape = (e_loc, rows, lay.hidden)
            view = st.combine_views[parity] = self._view(
                set_ptr + lay.send_off, e_loc * rows * lay.hidden * 2, BF16, shape
            )
        return view

    def check_outside_combine_slots(self, x, st: SizeState) -> bool:
        """A combine (not zero-copy) gets its peers' rows in the receive region of its set: ``x`` must not lie
        there (the zero_copy_recv output of the dispatch two LL calls back, as in two-batch overlap). Returns whether
        ``x`` lies in the other set's receive region (fine for this call, not for a replay in that set: no plan)."""
        lay = st.layout
        parity, lo = self.next_set(st.stride)
        lo += lay.recv_off
        size = lay.num_experts * lay.num_max * 2 * lay.hidden
        start, end = x.data.ptr, x.data.ptr + x.nbytes
        other = lo + (st.stride if parity == 0 else -st.stride)
        if start < lo + size and lo < end:
            raise ArgumentError(
                "x: lies in this Buffer's receive area that this combine overwrites (the zero_copy_recv output of "
                "the dispatch two LL calls back); copy it first, or write the expert outputs into "
                "get_next_low_latency_combine_buffer and combine with zero_copy=True"
            )
        return start < other + size and other < end

    # ---- launches ----
    def issue(self, spec, defines: dict, args: tuple, phase: int, back: int) -> None:
        """One validated launch of ``spec`` on the comm stream (inside ``rt.on_comm_stream``)."""
        self.rt.launch(spec, defines, self.blocks(), THREADS, ll_plans.with_phase(spec, args, phase, back))

    def first_phase(self, return_recv_hook: bool) -> int:
        return PHASE_SEND if return_recv_hook else PHASE_SEND | PHASE_RECV

    def replay(self, plan, async_finish, return_recv_hook, hook_refs: int):
        """A repeat of a validated call with the same arrays and flags: the launch only. Returns (event, hook);
        the hook keeps the plan's first ``hook_refs`` arrays (the call's inputs) alive."""
        rt = self.rt
        self.replays += 1
        phase = self.first_phase(return_recv_hook)
        compute = None if return_recv_hook or self.nic_build else direct_stream(rt, async_finish)
        if compute is not None:
            # Straight onto the caller's stream (gpu/direct.py), as a captured graph of the one launch.
            captured = capturing(compute)
            if captured or plan.graphs is None:  # a rebound call (rebind.py) launches with its own addresses
                plan.launch(phase, 0, compute.ptr)
            else:
                graph = plan.graphs.get(phase)
                if graph is None:
                    graph = plan.graphs[phase] = ll_plans.capture_launch(plan.launch, phase)
                graph.launch(compute)
            self.issued()
            self.direct += 1
            return end_direct(rt, compute, captured), None
        compute = rt.begin(None, async_finish)
        with rt.on_comm_stream():
            plan.launch(phase, 0)
            self.issued()
        event = self.end(compute, async_finish)
        hook = self.make_hook(plan.launch, *plan.refs[:hook_refs]) if return_recv_hook else None
        return event, hook

    def make_hook(self, launch, *keep):
        """The receive phase of the call just issued, for ``return_recv_hook``: finds its own call by counting
        the sends issued after it. Runs on the caller's current stream order, like any call."""
        sent_at = self.sends
        called = []
        rt = self.rt

        def hook():
            if called:
                raise ArgumentError("hook: a receive hook can be called once")
            rt.check_usable()
            called.append(True)
            compute = rt.begin(None)
            with rt.on_comm_stream():
                launch(PHASE_RECV, self.sends - sent_at)
            self.end(compute, False)

        hook.inputs = keep  # the call's inputs stay alive as long as its receive may still be enqueued
        return hook

    def validated_launcher(self, spec, defines: dict, args: tuple):
        """launch(phase, back) of a validated call through the runtime (first use warms up)."""

        def launch(phase: int, back: int) -> None:
            self.issue(spec, defines, args, phase, back)

        return launch

    def keep_plan(self, key, shapes, spec, defines, args, result, refs) -> None:
        """An identity plan of a validated call with preallocated arrays, where it pays (:meth:`seen_again`)."""
        if self.seen_again(key, refs):
            fast = ll_plans.launcher(self.rt, spec, defines, self.blocks(), THREADS, args)
            self.plans.put(key, ll_plans.Plan(shapes, fast, result, refs))

    def seen_again(self, key, refs) -> bool:
        """Whether a call on these arrays (``key``: their identities and the flags) should leave an identity plan:
        when one of the last four calls was on the same arrays, still alive (a loop over preallocated arrays, two
        alternating batches or buffer sets; its next calls replay a one-kernel graph), or a prepared call is running
        its first time (it holds its arrays and replays its plan itself). Not for calls on new arrays each time
        (DeepEP's: rebind.py serves them), whose plans would keep up to eight calls' outputs alive, nor for arrays a
        torch crossing made for the call (new CuPy views every call: their identities never repeat). The recent
        calls' arrays are held weakly: an id is theirs only while they live."""
        if self.preparing:
            return True
        if in_torch_call():
            return False
        recent = self._recent
        held = recent.get(key)
        if held is not None and all(r() is not None for r in held):
            return True
        try:
            recent[key] = tuple(weakref.ref(a) for a in refs if a is not None)
        except TypeError:  # an object without weak references: no plan
            return False
        recent.move_to_end(key)
        while len(recent) > 4:
            recent.popitem(last=False)
        return False
