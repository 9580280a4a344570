"""The GPU backend of ``epkern.Buffer``: a runtime and the two engines built over it (HT and LL).

Methods take the public Buffer's arguments positionally, in the public order (buffer.py holds the signatures,
defaults and docstrings; tests/test_backend_parity.py checks the CPU backend answers the same calls).
"""

from __future__ import annotations

from .. import api_checks
from ..errors import ArgumentError
from .ht import HtEngine
from .ll import prepared
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
        if group.num_nodes != 1:
            raise ArgumentError(
                f"group: the GPU Buffer supports ranks on one node so far (got {group.num_nodes} nodes); "
                "use backend='cpu'"
            )
        if group.size > MAX_RANKS:
            raise ArgumentError(f"group: intranode kernels support up to {MAX_RANKS} ranks, got {group.size}")
        tuning = options.tuning or Tuning()
        self.rt = Runtime(
            group,
            options.num_nvl_bytes,
            options.num_rdma_bytes,
            options.low_latency_mode,
            options.timeout_s,
            options.poison,
        )
        import cupy

        try:
            with cupy.cuda.Device(self.rt.device):
                self.ht = HtEngine(self.rt, tuning.ht)
                self.ll = LLEngine(self.rt, tuning.ll)
            self.ll_masks = LLMasks(self.ll)
            self._ll_dispatch = LLDispatch(self.ll)
            self._ll_combine = LLCombine(self.ll)
            group.barrier()
        except BaseException:
            with cupy.cuda.Device(self.rt.device):
                self.rt.release()  # no kernel ran on it: nothing to wait for
            raise

    # ---- lifecycle and settings ----
    def destroy(self) -> None:
        self.ll.plans.clear()  # the replay plans hold the caller's arrays
        self.ll.sizes.clear()  # and the cached views into the LL area (the memory lives while the caller's do)
        self.rt.destroy()

    def check(self) -> None:
        self.rt.check_usable()

    def set_num_sms(self, num_sms) -> None:
        self.ht.set_num_sms(num_sms)

    def get_config(self):
        return self.ht.get_config()

    # ---- high throughput ----
    def get_dispatch_layout(self, *args):
        return self.ht.get_dispatch_layout(*args)

    def dispatch(self, *args):
        return self.ht.dispatch(*args)

    def combine(self, *args):
        return self.ht.combine(*args)

    # ---- low latency ----
    def low_latency_dispatch(self, *args):
        return self._ll_dispatch(*args)

    def low_latency_combine(self, *args):
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
        return prepared.prepare_dispatch(self.ll, call, args, kwargs)

    def prepare_low_latency_combine(self, call, args, kwargs):
        return prepared.prepare_combine(self.ll, call, args, kwargs)
