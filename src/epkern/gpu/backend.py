"""The GPU backend of ``epkern.Buffer``: a runtime and the two engines built over it (HT and LL), and the LL
routes (ll/routes.py: chosen once here, identical on every rank) with the NIC transport (PROXY or RDMA) when a route
needs it.

Methods take the public Buffer's arguments positionally, in the public order (buffer.py holds the signatures,
defaults and docstrings; tests/test_backend_parity.py checks the CPU backend answers the same calls).
"""

from __future__ import annotations

from .. import api_checks
from ..errors import ArgumentError
from ..torch_tensors import prepared_on_torch
from . import ht_inter_layout, region_alloc
from .capture import held_only_if_captured
from .ht import HtEngine
from .ll import prepared
from .ll import routes as ll_routes
from .ll.combine import LLCombine
from .ll.dispatch import LLDispatch, check_common
from .ll.engine import LLEngine
from .ll.masks import LLMasks
from .runtime import Runtime
from .tuning import Tuning

MAX_RANKS = 8  # the intranode kernels' peer tables


class GpuBackend:
    name = "gpu"

    def __init__(self, group, options):
        self.cross_node = group.num_nodes != 1
        ll_only = options.num_nvl_bytes == 0 and (options.low_latency_mode or options.num_rdma_bytes > 0)
        # HT across nodes (issue #18) streams through an HT RDMA area of num_rdma_bytes; the
        # LL area then exists only in low_latency_mode (they are separate: the HT streams' counters live on).
        ht_across = self.cross_node and not ll_only
        if ht_across and options.num_rdma_bytes <= 0:
            raise ArgumentError(
                f"num_rdma_bytes: ranks on {group.num_nodes} nodes: high-throughput calls across nodes stream through "
                "an RDMA area; expected num_rdma_bytes > 0 (Config.get_rdma_buffer_size_hint with num_nodes), got "
                f"{options.num_rdma_bytes}"
            )
        # Across nodes the HT kernels reach only the ranks of their own node over IPC (at most 8; ht_inter_layout.py
        # checks the node map); everything else is limited by the intranode and LL peer tables.
        most = ht_inter_layout.MAX_RANKS if ht_across and not options.low_latency_mode else MAX_RANKS
        if group.size > most:
            what = "HT across nodes supports" if most != MAX_RANKS else "intranode and low-latency kernels support"
            raise ArgumentError(f"group: {what} up to {most} ranks, got {group.size}")
        tuning = options.tuning or Tuning()
        self.rt = Runtime(
            group,
            options.num_nvl_bytes,
            options.num_rdma_bytes if (not ht_across or options.low_latency_mode) else 0,
            options.low_latency_mode,
            options.timeout_s,
            options.poison,
            ht_area_bytes=options.num_rdma_bytes if ht_across else 0,
        )
        import cupy

        self.nic_routes = None  # ProxyTransport / RdmaTransport when a route goes over the NIC
        self.ht_inter = None  # ht_inter.HtInter: HT across nodes
        try:
            with cupy.cuda.Device(self.rt.device):
                routes = None
                if ht_across or self.rt.ll_bytes:  # this rank's NIC, and its maker when it is a real one
                    nic = ll_routes.local_nic(group)
                    real = ll_routes.real_nic(self.rt.rank, self.rt.device) if nic.kind == "mlx5" else None
                if ht_across:
                    from .ht_inter import HtInter

                    self.ht_inter = HtInter(self.rt, real_nic=real)
                if self.rt.ll_bytes:
                    table = ll_routes.choose(group, options.hybrid, options.transport, nic)
                    routes = table[group.rank]
                    if ll_routes.needs_nic(table):
                        self.nic_routes = _nic_transport(self.rt, table, routes, real, options.num_proxy_threads)
                self.ht = HtEngine(self.rt, tuning.ht)
                self.ht.inter = self.ht_inter
                self.ll = LLEngine(self.rt, tuning.ll, routes, self.nic_routes)
            self.ll_masks = LLMasks(self.ll)
            self._ll_dispatch = LLDispatch(self.ll)
            self._ll_combine = LLCombine(self.ll)
            group.barrier()
        except BaseException:
            with cupy.cuda.Device(self.rt.device):
                for side in self._nic_sides():
                    side.close(raise_errors=False)
                self.rt.release()  # no kernel ran on it: nothing to wait for
            raise

    # ---- lifecycle and settings ----
    def _nic_sides(self) -> list:
        """This rank's NIC transports: the LL routes' and HT-across-nodes' (each quiesced and closed alike)."""
        ht = self.ht_inter.transport if self.ht_inter is not None else None
        return [t for t in (self.nic_routes, ht) if t is not None]

    def destroy(self) -> None:
        self.ll.plans.clear()  # the replay plans hold the caller's arrays
        self.ht.clear_plans()
        self.ll.sizes.clear()  # and the cached views into the LL area (the memory lives while the caller's do)
        sides = self._nic_sides()
        if not sides:
            self.rt.destroy()
            return
        failures = []
        from .ll.nic_link import NicStillWriting

        def quiesce():  # the barrier must be reached whatever the NIC side says: its failure is raised after
            for side in sides:
                try:
                    side.quiesce()
                except NicStillWriting:
                    raise  # no barrier: peers keep their memory (they raise naming this rank), this rank keeps its own
                except Exception as exc:  # noqa: BLE001
                    failures.append(exc)

        try:
            # The NIC side drains and stops after this rank's kernels ended and before the barrier: after it,
            # peers free their memory, which this rank's NIC must not write any more.
            self.rt.destroy(quiesce=quiesce)
        finally:
            for side in sides:
                side.close(raise_errors=not failures)
        if failures:
            raise failures[0]

    def check(self) -> None:
        self.rt.check_usable()
        self._check_nic()

    def _check_nic(self) -> None:
        """A failed NIC route (NIC fault, error completion, bad trigger, deadline) is this Buffer's failure: raise
        it, naming the rank and the peer; the Buffer is unusable from then on (its FIFOs or QPs are dead)."""
        for side in self._nic_sides():
            if side.failed and not self.rt.closed:
                try:
                    side.check()
                except Exception as exc:
                    self.rt.broken = self.rt.broken or str(exc)
                    raise

    def _refuse_ht_without_memory(self, what: str) -> None:
        if self.cross_node and self.ht_inter is None:
            raise ArgumentError(
                f"{what}: high-throughput calls across nodes need num_nvl_bytes > 0 and num_rdma_bytes > 0; this "
                "Buffer was made for low-latency calls only (num_nvl_bytes=0)"
            )

    def set_num_sms(self, num_sms) -> None:
        self.ht.set_num_sms(num_sms)

    def get_config(self):
        return self.ht.get_config()

    # ---- high throughput ----
    def get_dispatch_layout(self, *args):
        return self.ht.get_dispatch_layout(*args)

    def dispatch(self, *args):
        self._refuse_ht_without_memory("dispatch")
        if self.ht_inter is not None:
            self._check_nic()
        with held_only_if_captured(self.rt):
            return self.ht.dispatch(*args)

    def combine(self, *args):
        self._refuse_ht_without_memory("combine")
        if self.ht_inter is not None:
            self._check_nic()
        with held_only_if_captured(self.rt):
            return self.ht.combine(*args)

    def get_combine_buffer(self, handle):
        self._refuse_ht_without_memory("get_combine_buffer")
        return self.ht.combine_buffer(handle)

    def allocating_in_buffer(self):
        self._refuse_ht_without_memory("allocating_in_buffer")
        return region_alloc.allocating_in_buffer(self.rt)

    # ---- low latency ----
    def low_latency_dispatch(self, *args):
        if self.nic_routes is not None:
            self._check_nic()
        return self._ll_dispatch(*args)

    def low_latency_combine(self, *args):
        if self.nic_routes is not None:
            self._check_nic()
        return self._ll_combine(*args)

    def get_next_low_latency_combine_buffer(self, handle):
        from .ll.engine import GpuLLHandle

        self.rt.check_usable()
        api_checks.own_handle(handle, GpuLLHandle, self.rt, "low_latency_dispatch")
        st = self.ll.size_state(handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts)
        return self.ll.combine_buffer(st)

    def clean_low_latency_buffer(self, num_max, hidden, num_experts) -> None:
        self.ll_masks.clean_buffer(num_max, hidden, num_experts, check_common)

    def low_latency_update_mask_buffer(self, rank_to_mask, mask) -> None:
        self.ll_masks.update(rank_to_mask, mask)

    def low_latency_query_mask_buffer(self, mask_status):
        return self.ll_masks.query(mask_status)

    def low_latency_clean_mask_buffer(self) -> None:
        self.ll_masks.clean()

    def prepare_low_latency_dispatch(self, call, args, kwargs):
        return prepared_on_torch(prepared.prepare_dispatch(self.ll, call, args, kwargs), args, kwargs, "gpu")

    def prepare_low_latency_combine(self, call, args, kwargs):
        return prepared_on_torch(prepared.prepare_combine(self.ll, call, args, kwargs), args, kwargs, "gpu")


def _nic_transport(rt, table, routes, real_nic, num_proxy_threads: int):
    """The NIC side of this rank's NIC routes: one transport per Buffer (``transport=`` is the same everywhere, so the
    table holds one NIC kind), with the error-record phases of its device waits; over a real NIC where ``real_nic``
    (its maker, routes.real_nic) is given."""
    kinds = {k for row in table for k in row}
    if ll_routes.ROUTE_RDMA in kinds:
        from .ll.rdma import RDMA_PHASES as phases
        from .ll.rdma import RdmaTransport

        made = RdmaTransport(rt, routes, real_nic=real_nic)
    else:
        from .ll.proxy import PROXY_PHASES as phases
        from .ll.proxy import ProxyTransport

        made = ProxyTransport(rt, routes, num_threads=num_proxy_threads, real_nic=real_nic)
    rt.register_phases(phases)
    return made
