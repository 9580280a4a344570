"""LL buffer maintenance: zeroing the LL area, the rank mask (DeepEP's low_latency_update / query /
clean_mask_buffer) and the raise-once path of a silent peer (the LL engine's recoverable errors)."""

from __future__ import annotations

import numpy as np

from ... import api_checks
from ..._validate import as_device_array, check_int
from ...errors import ArgumentError, TimeoutError
from .layout import LL_BAD_INDEX_PHASE, LL_PHASES, STATE_COUNTER, STATE_MASK, STATE_SLOT, STATE_WORDS


class LLMasks:
    """Owned by the LL engine; writes the engine's device state words.

    The state is written and read here by plain copies and memsets, never by a CuPy elementwise kernel: the first
    use of such a kernel compiles and loads a module, and these calls run where peers' kernels may be spinning in
    the same context (the raise-once path right after a deadline; docs/architecture.md, Known problems)."""

    def __init__(self, eng):
        self.eng = eng
        eng.register_recoverable(self.raise_recoverable)

    def _set_words(self, start: int, count: int, value: int) -> None:
        """state[start : start + count] = value (0 or 1), on the current stream, without a kernel."""
        import cupy

        rt = cupy.cuda.runtime
        stream = cupy.cuda.get_current_stream().ptr
        dst = self.eng.state.data.ptr + 4 * start
        if value == 0:
            rt.memsetAsync(dst, 0, 4 * count, stream)
            return
        src = self.eng.one.data.ptr
        for i in range(count):
            rt.memcpyAsync(dst + 4 * i, src, 4, rt.memcpyDeviceToDevice, stream)

    def clean_buffer(self, num_max, hidden, num_experts, check_common) -> None:
        """Zero the LL area and the call counters on every rank (collective)."""
        import cupy

        eng = self.eng
        rt = eng.rt
        rt.check_usable()
        num_max, num_experts = check_common(eng, num_max, num_experts)
        hidden = api_checks.ll_hidden(hidden)
        eng.size_state(num_max, hidden, num_experts)
        with rt.on_comm_stream():
            rt.sync_bounded(rt.comm_stream, "clean_low_latency_buffer")
            rt.group.barrier()  # no peer still writes into our area
            if rt.ll_bytes:
                cupy.cuda.runtime.memsetAsync(rt.region.ptr + rt.ll_offset, 0, rt.ll_bytes, rt.comm_stream.ptr)
            self._set_words(STATE_COUNTER, STATE_MASK - STATE_COUNTER, 0)
            self._set_words(STATE_SLOT, STATE_WORDS - STATE_SLOT, 0)
            rt.sync_bounded(rt.comm_stream, "clean_low_latency_buffer")
            rt.group.barrier()  # every rank restarts from call 0 together
        eng.restart()

    def update(self, rank_to_mask, mask) -> None:
        rt = self.eng.rt
        rt.check_usable()
        r = check_int(rank_to_mask, "rank_to_mask", min_value=0, max_value=rt.num_ranks - 1)
        with rt.on_comm_stream():
            self._set_words(STATE_MASK + r, 1, 1 if mask else 0)

    def query(self, mask_status):
        import cupy

        rt = self.eng.rt
        rt.check_usable()
        R = rt.num_ranks
        if mask_status is not None:
            mask_status = api_checks.out_array(
                mask_status, "mask_status", (np.int32,), (R,), rt.device, as_device_array
            )
        with rt.on_comm_stream():
            status = mask_status if mask_status is not None else cupy.empty(R, np.int32)
            cupy.cuda.runtime.memcpyAsync(
                status.data.ptr,
                self.eng.state.data.ptr + 4 * STATE_MASK,
                4 * R,
                cupy.cuda.runtime.memcpyDeviceToDevice,
                cupy.cuda.get_current_stream().ptr,
            )
        cupy.cuda.get_current_stream().wait_event(rt.comm_stream.record())
        return status

    def clean(self) -> None:
        rt = self.eng.rt
        rt.check_usable()
        with rt.on_comm_stream():
            self._set_words(STATE_MASK, rt.num_ranks, 0)

    def raise_recoverable(self, code, rank, phase, peer, seen, expected) -> None:
        """An LL error the Buffer survives (the runtime cleared the record): mask the silent peer (the kernel
        did too) and raise once."""
        rt = self.eng.rt
        what = LL_PHASES.get(phase, f"phase {phase}")
        if phase == LL_BAD_INDEX_PHASE:
            raise ArgumentError(
                f"topk_idx: rank {rank}: entry {seen} outside [-1, {expected}) in this low_latency_dispatch or an "
                "earlier one that did not wait on the host (ignored by the kernel; that call's outputs lack those "
                "selections)"
            )
        if 0 <= peer < rt.num_ranks:
            with rt.on_comm_stream():
                self._set_words(STATE_MASK + peer, 1, 1)
        nic_routes = getattr(self.eng, "nic_routes", None)
        where = nic_routes.describe(peer) if nic_routes is not None else ""
        raise TimeoutError(
            f"rank {rank}: {what}: peer {peer} did not answer within {rt.timeout_s:g} s (tag seen {seen}, "
            f"expected {expected}); peer {peer} is now masked (low_latency_query_mask_buffer) and this call's "
            "outputs are not valid" + (f" [{where}]" if where else "")
        )
