"""DeepEP V1's Python API on epkern, for PyTorch code (issue #19): ``from epkern import deep_ep`` in place of
``import deep_ep``, and the rest of the code stays.

Names, signatures, defaults and return tuples are DeepEP's: ``Buffer``, ``Config``, ``EventOverlap``,
``topk_idx_t``. Tensors cross without copies (``epkern.torch_tensors``); on the GPU every call is ordered on torch's
current stream as DeepEP orders it (the Buffer's communication stream waits for it, or for ``previous_event``;
without ``async_finish`` the current stream waits for the call). Handles are DeepEP's tuples (indexable, same
order; the HT tuple holds epkern's fields where DeepEP's have no counterpart, see :class:`Buffer`) and only the
Buffer that made one accepts it.

What differs, and why:

- ``get_local_buffer_tensor`` raises NotImplementedError: epkern's kernels own the layout of the Buffer's memory;
  the zero-copy combine buffer is ``get_next_low_latency_combine_buffer``.
- ``num_qps_per_rank``, ``use_fabric``, ``enable_shrink`` are accepted and unused (no RDMA path yet; no fabric
  memory; masks are always available). ``allow_mnnvl=True`` is refused (no multi-node NVLink support).
- ``explicitly_destroy=False``: memory is freed at ``destroy()`` or at exit, as DeepEP's destructor does.
- The group may also be an epkern group (in-process ranks, mpi4py) and ``backend="cpu"`` runs the same calls on
  CPU tensors (epkern's CPU backend): the tests here use that.
"""

from __future__ import annotations

import torch

from . import torch_tensors
from .buffer import Buffer as _NativeBuffer
from .config import Config
from .errors import ArgumentError, EpkernError
from .events import EventHandle

__all__ = ["Buffer", "Config", "EventOverlap", "topk_idx_t"]

topk_idx_t = torch.int64


def _on_torch_stream(backend: str):
    return torch_tensors._torch_stream(backend)


class EventOverlap:
    """DeepEP's event wrapper: ``current_stream_wait()`` makes torch's current stream wait for the call;
    ``with event: ...`` runs the block and then waits (DeepEP's overlap idiom). ``extra_tensors`` stay alive with
    the event (DeepEP keeps tensors of an asynchronous call this way)."""

    def __init__(self, event: EventHandle | None = None, extra_tensors: tuple | None = None, backend: str = "cpu"):
        self.event = event
        self.extra_tensors = extra_tensors
        self._backend = backend

    def current_stream_wait(self) -> None:
        if self.event is not None:
            with _on_torch_stream(self._backend):
                self.event.current_stream_wait()

    def synchronize(self) -> None:
        """The host waits for the call (epkern's own: raises the call's failure, bounded by the deadline)."""
        if self.event is not None:
            self.event.synchronize()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.current_stream_wait()


class _HandleTuple(tuple):
    """A DeepEP handle tuple that also carries epkern's handle (``native``) and the Buffer that made it."""

    native: object
    owner: object

    def __new__(cls, items, native, owner):
        obj = super().__new__(cls, items)
        obj.native, obj.owner = native, owner
        return obj


def _tensor(arr):
    return None if arr is None else torch_tensors.to_tensor(arr)


class Buffer:
    """DeepEP's ``deep_ep.Buffer`` (V1, intranode and low-latency) on an epkern Buffer.

    The HT handle is DeepEP's 6-tuple ``(rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix,
    recv_src_idx, is_token_in_rank, send_head)``: epkern has no channels, so the two channel matrices are None, and
    ``send_head`` holds epkern's send slots (int32 [T, R]: the row of each token in each destination's output, -1
    if not sent). The LL handle is DeepEP's 5-tuple ``(src_info, layout_range, num_max_dispatch_tokens_per_rank,
    hidden, num_experts)``.
    """

    num_sms: int = 20

    def __init__(
        self,
        group,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        use_fabric: bool = False,
        explicitly_destroy: bool = False,
        enable_shrink: bool = False,
        comm=None,
        *,
        backend: str | None = None,
        timeout_s: float | None = None,
    ):
        if use_fabric:
            raise ArgumentError("use_fabric: expected False (epkern does not allocate fabric memory)")
        self._buf = _NativeBuffer(
            group,
            num_nvl_bytes,
            num_rdma_bytes,
            low_latency_mode,
            num_qps_per_rank,
            allow_nvlink_for_low_latency_mode,
            allow_mnnvl,
            comm,
            backend=backend,
            timeout_s=timeout_s,
        )
        self.group = group
        self.rank = self._buf.rank
        self.group_size = self._buf.group_size
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self.backend = self._buf.backend

    # ---- lifetime and configuration ----
    def destroy(self) -> None:
        """Free the Buffer (collective)."""
        self._buf.destroy()

    @staticmethod
    def is_sm90_compiled() -> bool:
        """True: epkern compiles its kernels for the GPU it runs on (NVRTC, at first use)."""
        return True

    @classmethod
    def set_num_sms(cls, new_num_sms: int) -> None:
        """SMs of the HT kernels for the configs ``get_dispatch_config`` / ``get_combine_config`` return."""
        Config(num_sms=new_num_sms)  # validates
        cls.num_sms = new_num_sms

    @classmethod
    def get_dispatch_config(cls, num_ranks: int) -> Config:
        return Config(num_sms=cls.num_sms)

    @classmethod
    def get_combine_config(cls, num_ranks: int) -> Config:
        return Config(num_sms=cls.num_sms)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts) -> int:
        return _NativeBuffer.get_low_latency_rdma_size_hint(
            num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts
        )

    @staticmethod
    def capture() -> EventOverlap:
        """An event at this point of torch's current stream (CPU: already complete)."""
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return EventOverlap(EventHandle(None))
        import cupy

        with _on_torch_stream("gpu"):
            return EventOverlap(EventHandle(cupy.cuda.get_current_stream().record()), backend="gpu")

    def get_comm_stream(self):
        """The Buffer's communication stream as a ``torch.cuda.ExternalStream`` (GPU backend)."""
        if self.backend != "gpu":
            raise EpkernError("get_comm_stream: the CPU backend has no CUDA stream")
        stream = self._buf._backend.rt.comm_stream
        return torch.cuda.ExternalStream(stream.ptr)

    def get_local_buffer_tensor(self, dtype, size=None, offset=0, use_rdma_buffer=False):
        raise NotImplementedError(
            "get_local_buffer_tensor: epkern's kernels own the layout of the Buffer's memory; for a zero-copy "
            "combine use get_next_low_latency_combine_buffer(handle)"
        )

    # ---- helpers ----
    def _event(self, event, async_finish, extra) -> EventOverlap:
        return EventOverlap(event, tuple(t for t in extra if t is not None) if async_finish else None, self.backend)

    @staticmethod
    def _native_event(previous_event):
        if previous_event is None:
            return None
        if isinstance(previous_event, EventOverlap):
            return previous_event.event
        raise ArgumentError(f"previous_event: expected an EventOverlap, got {type(previous_event).__name__}")

    def _native_handle(self, handle, kind: str):
        if handle is None:
            return None
        if isinstance(handle, _HandleTuple) and handle.owner is self:
            return handle.native
        if isinstance(handle, _HandleTuple):
            raise ArgumentError(f"handle: this {kind} handle was made by another Buffer")
        raise ArgumentError(f"handle: expected the {kind} handle a dispatch of this Buffer returned")

    def _ht_handle(self, native) -> _HandleTuple:
        if self.backend == "gpu":
            fields = (native.rank_prefix_matrix, native.recv_src_idx, native.is_token_in_rank, native.send_slot)
        else:
            own = native.own
            fields = (own.rank_prefix_matrix, own.src_idx, own.is_token_in_rank, own.send_slot)
        rank_prefix, src_idx, in_rank, send_slot = (_tensor(f) for f in fields)
        return _HandleTuple((rank_prefix, None, None, src_idx, in_rank, send_slot), native, self)

    def _ll_handle(self, native) -> _HandleTuple:
        items = (_tensor(native.src_info), _tensor(native.layout_range), *tuple(native)[2:])
        return _HandleTuple(items, native, self)

    # ---- high throughput ----
    def get_dispatch_layout(
        self, topk_idx, num_experts, previous_event=None, async_finish=False, allocate_on_comm_stream=False
    ):
        per_rank, per_rdma, per_expert, in_rank, event = self._buf.get_dispatch_layout(
            topk_idx, num_experts, self._native_event(previous_event), async_finish, allocate_on_comm_stream
        )
        return per_rank, per_rdma, per_expert, in_rank, self._event(event, async_finish, (topk_idx,))

    def dispatch(
        self,
        x,
        handle=None,
        num_tokens_per_rank=None,
        num_tokens_per_rdma_rank=None,
        is_token_in_rank=None,
        num_tokens_per_expert=None,
        topk_idx=None,
        topk_weights=None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Config | None = None,
        previous_event=None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        config = self.get_dispatch_config(self.group_size) if config is None else config
        recv_x, recv_idx, recv_w, counts, native, event = self._buf.dispatch(
            x,
            self._native_handle(handle, "dispatch"),
            num_tokens_per_rank,
            num_tokens_per_rdma_rank,
            is_token_in_rank,
            num_tokens_per_expert,
            topk_idx,
            topk_weights,
            expert_alignment,
            num_worst_tokens,
            config,
            self._native_event(previous_event),
            async_finish,
            allocate_on_comm_stream,
        )
        out_handle = handle if handle is not None else self._ht_handle(native)
        xs = x if isinstance(x, tuple) else (x,)
        rx = recv_x if isinstance(recv_x, tuple) else (recv_x,)
        return recv_x, recv_idx, recv_w, counts, out_handle, self._event(event, async_finish, (*xs, *rx))

    def combine(
        self,
        x,
        handle,
        topk_weights=None,
        bias=None,
        config: Config | None = None,
        previous_event=None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        config = self.get_combine_config(self.group_size) if config is None else config
        combined, combined_w, event = self._buf.combine(
            x,
            self._native_handle(handle, "dispatch"),
            topk_weights,
            bias,
            config,
            self._native_event(previous_event),
            async_finish,
            allocate_on_comm_stream,
        )
        return combined, combined_w, self._event(event, async_finish, (x, combined))

    # ---- low latency ----
    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank, hidden, num_experts) -> None:
        self._buf.clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden, num_experts)

    def low_latency_dispatch(
        self,
        x,
        topk_idx,
        num_max_dispatch_tokens_per_rank,
        num_experts,
        cumulative_local_expert_recv_stats=None,
        dispatch_wait_recv_cost_stats=None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ):
        recv_x, recv_count, native, event, hook = self._buf.low_latency_dispatch(
            x,
            topk_idx,
            num_max_dispatch_tokens_per_rank,
            num_experts,
            cumulative_local_expert_recv_stats,
            dispatch_wait_recv_cost_stats,
            use_fp8,
            round_scale,
            use_ue8m0,
            async_finish,
            return_recv_hook,
        )
        rx = recv_x if isinstance(recv_x, tuple) else (recv_x,)
        return recv_x, recv_count, self._ll_handle(native), self._event(event, async_finish, (x, *rx)), hook

    def low_latency_combine(
        self,
        x,
        topk_idx,
        topk_weights,
        handle,
        use_logfmt: bool = False,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out=None,
        combine_wait_recv_cost_stats=None,
    ):
        combined, event, hook = self._buf.low_latency_combine(
            x,
            topk_idx,
            topk_weights,
            self._native_handle(handle, "low-latency dispatch"),
            use_logfmt,
            zero_copy,
            async_finish,
            return_recv_hook,
            out,
            combine_wait_recv_cost_stats,
        )
        return combined, self._event(event, async_finish, (x, combined)), hook

    def get_next_low_latency_combine_buffer(self, handle):
        native = self._native_handle(handle, "low-latency dispatch")
        return torch_tensors.to_tensor(self._buf.get_next_low_latency_combine_buffer(native))

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        self._buf.low_latency_update_mask_buffer(rank_to_mask, mask)

    def low_latency_query_mask_buffer(self, mask_status) -> None:
        self._buf.low_latency_query_mask_buffer(mask_status)

    def low_latency_clean_mask_buffer(self) -> None:
        self._buf.low_latency_clean_mask_buffer()
