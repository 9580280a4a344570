"""LL buffer maintenance (methods of GpuBuffer): zeroing the LL area, the rank mask (DeepEP's
low_latency_update / query / clean_mask_buffer) and the raise-once path of a silent peer."""

from __future__ import annotations

import numpy as np

from ._validate import check_int
from .errors import ArgumentError, TimeoutError
from .ll_layout import LL_BAD_INDEX_PHASE, LL_PHASES, STATE_COUNTER, STATE_MASK, STATE_SLOT, STATE_WORDS


# The LL state is written and read here by plain copies and memsets, never by a CuPy elementwise kernel: the
# first use of such a kernel compiles and loads a module, and these calls run where peers' kernels may be
# spinning in the same context (the raise-once path right after a deadline; docs/architecture.md, Known problems).
def _set_state_words(self, start: int, count: int, value: int) -> None:
    """ll_state[start : start + count] = value (0 or 1), on the current stream, without a kernel."""
    import cupy

    stream = cupy.cuda.get_current_stream().ptr
    dst = self.ll_state.data.ptr + 4 * start
    if value == 0:
        cupy.cuda.runtime.memsetAsync(dst, 0, 4 * count, stream)
        return
    src = self._ll_one.data.ptr
    for i in range(count):
        cupy.cuda.runtime.memcpyAsync(dst + 4 * i, src, 4, cupy.cuda.runtime.memcpyDeviceToDevice, stream)


def _copy_state_words(self, dst, start: int, count: int) -> None:
    """dst (contiguous int32 [count]) = ll_state[start : start + count], on the current stream, without a kernel."""
    import cupy

    cupy.cuda.runtime.memcpyAsync(
        dst.data.ptr,
        self.ll_state.data.ptr + 4 * start,
        4 * count,
        cupy.cuda.runtime.memcpyDeviceToDevice,
        cupy.cuda.get_current_stream().ptr,
    )


def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank, hidden, num_experts):
    """Zero the LL area and the call counters on every rank (collective). Not needed between calls (signals
    carry the call's tag); use it after a failure or to bring a masked rank back (then unmask it)."""
    import cupy

    from .ll_intranode import _check_common, _plan

    self._check_usable()
    num_max, num_experts = _check_common(self, num_max_dispatch_tokens_per_rank, num_experts)
    hidden = check_int(hidden, "hidden", min_value=128)
    if hidden % 128:
        raise ArgumentError(f"hidden: expected a multiple of 128, got {hidden}")
    _plan(self, num_max, hidden, num_experts)
    with self.on_comm_stream():
        self.comm_stream.synchronize()
        self.group.barrier()  # no peer still writes into our area
        if self.ll_bytes:
            cupy.cuda.runtime.memsetAsync(self.region.ptr + self.ll_offset, 0, self.ll_bytes, self.comm_stream.ptr)
        _set_state_words(self, STATE_COUNTER, STATE_MASK - STATE_COUNTER, 0)
        _set_state_words(self, STATE_SLOT, STATE_WORDS - STATE_SLOT, 0)
        self.comm_stream.synchronize()
        self.group.barrier()  # every rank restarts from call 0 together
    self._ll_sends = 0
    self._ll_plans.clear()


def low_latency_update_mask_buffer(self, rank_to_mask, mask=False):
    """Mask (``mask=True``) or unmask a rank: LL calls skip a masked rank at every send and wait."""
    self._check_usable()
    r = check_int(rank_to_mask, "rank_to_mask", min_value=0, max_value=self.num_ranks - 1)
    with self.on_comm_stream():
        _set_state_words(self, STATE_MASK + r, 1, 1 if mask else 0)


def low_latency_query_mask_buffer(self, mask_status=None):
    """int32 [R]: 1 where a rank is masked. Written into ``mask_status`` (int32 [R] device array) if given."""
    import cupy

    from .ll_intranode import _check_out

    self._check_usable()
    R = self.num_ranks
    if mask_status is not None:
        mask_status = _check_out(mask_status, "mask_status", (np.int32,), (R,), self.device)
    with self.on_comm_stream():
        status = mask_status if mask_status is not None else cupy.empty(R, np.int32)  # _check_out: contiguous
        _copy_state_words(self, status, STATE_MASK, R)
    cupy.cuda.get_current_stream().wait_event(self.comm_stream.record())
    return status


def low_latency_clean_mask_buffer(self):
    """Unmask every rank."""
    self._check_usable()
    with self.on_comm_stream():
        _set_state_words(self, STATE_MASK, self.num_ranks, 0)


def raise_recoverable(self) -> None:
    """Called by GpuBuffer._raise_recorded for an LL error the Buffer survives: clear the record, mask the
    silent peer (the kernel did too) and raise once."""
    rec = self.error_record
    code, rank, phase, peer, seen, expected = (int(v) for v in rec[1:7])
    rec[1:7] = 0
    rec[0] = 0  # released last: a later kernel may claim it again
    what = LL_PHASES.get(phase, f"phase {phase}")
    if phase == LL_BAD_INDEX_PHASE:
        raise ArgumentError(
            f"topk_idx: rank {rank}: entry {seen} outside [-1, {expected}) in an earlier low_latency_dispatch "
            "(ignored by the kernel; that call's outputs lack those selections)"
        )
    if 0 <= peer < self.num_ranks:
        with self.on_comm_stream():
            _set_state_words(self, STATE_MASK + peer, 1, 1)
    raise TimeoutError(
        f"rank {rank}: {what}: peer {peer} did not answer within {self.timeout_s:g} s (tag seen {seen}, "
        f"expected {expected}); peer {peer} is now masked (low_latency_query_mask_buffer) and this call's "
        "outputs are not valid"
    )
