"""DeepEP V1's Python API on epkern, for PyTorch code (issue #19): ``from epkern import deep_ep`` in place of
``import deep_ep``, and the rest of the code stays.

Names, signatures, defaults and return tuples are DeepEP's: ``Buffer``, ``Config``, ``EventOverlap``,
``topk_idx_t``. Tensors cross without copies (``epkern.torch_tensors``); on the GPU every call is ordered on torch's
current stream as DeepEP orders it (the Buffer's communication stream waits for it, or for ``previous_event``;
without ``async_finish`` the current stream waits for the call). Handles are DeepEP's tuples (indexable, same
order; the HT tuple holds epkern's fields where DeepEP's have no counterpart, see :class:`Buffer`) and only the
Buffer that made one accepts it.

What differs, and why:

- ``get_combine_buffer(handle)`` is epkern's own: where to write the HT expert outputs so a combine reads them in
  place.
- ``get_local_buffer_tensor`` views the HT area (the heap of the calls' outputs) or the LL area; their layouts are
  epkern's own, not DeepEP's channel buffers. GPU backend only.
- ``num_qps_per_rank``, ``use_fabric``, ``enable_shrink`` are accepted and unused (no RDMA path yet; no fabric
  memory; masks are always available). ``allow_mnnvl=True`` is refused (no multi-node NVLink support).
- ``explicitly_destroy=False``: memory is freed at ``destroy()`` or at exit, as DeepEP's destructor does.
- The group may also be an epkern group (in-process ranks, mpi4py) and ``backend="cpu"`` runs the same calls on
  CPU tensors (epkern's CPU backend): the tests here use that.
"""

from __future__ import annotations

import functools
import inspect

import torch

from . import api_checks, torch_tensors
from ._validate import check_int
from .buffer import Buffer as _NativeBuffer
from .config import Config
from .errors import ArgumentError, EpkernError
from .events import EventHandle

__all__ = ["Buffer", "Config", "EventOverlap", "topk_idx_t"]

topk_idx_t = torch.int64


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
            with torch_tensors.torch_stream(self._backend):
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
    """A DeepEP handle tuple that also carries epkern's handle (``native``); stamped with the Buffer that made it
    (``api_checks.stamp``), as native handles are."""

    native: object

    def __new__(cls, items, native):
        obj = super().__new__(cls, items)
        obj.native = native
        return obj


def _tensor(arr):
    return None if arr is None else torch_tensors.to_tensor(arr)


def _capturing(backend: str) -> bool:
    """Whether torch's current stream is being captured into a CUDA graph (GPU backend)."""
    return backend == "gpu" and torch.cuda.is_current_stream_capturing()


_LL_OUTS = ("out_x", "out_scales", "out_src_info", "out_layout_range", "out_count")


def _ll_dispatch_outputs(buf, args) -> dict:
    """The LL dispatch's outputs from torch's allocator (inside a capture: the graph's pool, which lives as long as
    the graph); None of them when the caller gave any, or asked for views, or the sizes are wrong (the call's own
    checks then name the argument)."""
    if args["zero_copy_recv"] or any(args[n] is not None for n in _LL_OUTS):
        return {}
    x, R, E, num_max = args["x"], buf.group_size, args["num_experts"], args["num_max_dispatch_tokens_per_rank"]
    sizes_ok = isinstance(E, int) and isinstance(num_max, int) and E > 0 and E % R == 0 and num_max > 0
    if not (torch.is_tensor(x) and x.dim() == 2 and sizes_ok):
        return {}
    e_loc, rows, H, dev = E // R, R * num_max, x.shape[1], x.device
    fp8 = bool(args["use_fp8"])
    out = {
        "out_x": torch.empty((e_loc, rows, H), dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16, device=dev),
        "out_src_info": torch.empty((e_loc, rows), dtype=torch.int32, device=dev),
        "out_layout_range": torch.empty((e_loc, R), dtype=torch.int64, device=dev),
        "out_count": torch.empty((e_loc,), dtype=torch.int32, device=dev),
    }
    if fp8:  # DeepEP's column-major scales: float32 [.., H/128], or 4 UE8M0 exponents per int32 [.., H/512]
        ue8m0 = bool(args["use_ue8m0"])
        base = torch.empty((e_loc, H // (512 if ue8m0 else 128), rows), dtype=torch.int32 if ue8m0 else torch.float32,
                           device=dev)  # fmt: skip
        out["out_scales"] = base.transpose(1, 2)
    return out


def _ll_combine_outputs(buf, args) -> dict:
    x, idx = args["x"], args["topk_idx"]
    if args["out"] is not None or not (torch.is_tensor(x) and x.dim() == 3 and torch.is_tensor(idx) and idx.dim() == 2):
        return {}
    return {"out": torch.empty((idx.shape[0], x.shape[2]), dtype=torch.bfloat16, device=x.device)}


def _forwarded(
    name: str, handle_kind: str | None = None, config_of: str | None = None, *, handle_out=None, event_at, outputs=None
):
    """A DeepEP data call on the native Buffer's method ``name`` (same signature): DeepEP's handle tuples and
    ``EventOverlap`` in and out (``handle_out``: the new handle's place in the returned tuple and the Buffer method
    that wraps it; ``event_at``: the event's place), the class-level config when none is given, the call's tensors
    kept with an asynchronous call's event. ``outputs(buf, arguments)``: inside a CUDA graph capture, the outputs
    from torch's allocator (CuPy's pool would allocate memory inside the capture, which torch's capture mode
    forbids, and could reuse it once the outputs are dropped while the graph still writes it)."""
    native = getattr(_NativeBuffer, name)
    params = inspect.signature(native).parameters
    names = list(params)[1:]  # after self
    defaults = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}

    @functools.wraps(native)
    def call(self, *args, **kwargs):
        # The whole call on torch's current stream, the handle's and event's tensors too: a conversion outside it
        # would order CuPy's stream against torch's with an event (a wasted sync; inside a torch.cuda.graph capture,
        # cudaErrorStreamCaptureIsolation, seen on the H200).
        with torch_tensors.torch_stream(self.backend):
            return forward(self, *args, **kwargs)

    def forward(self, *args, **kwargs):
        # The arguments by name, as Signature.bind would give them (bind cost ~30 µs a call); a missing or unknown
        # one is the native call's TypeError.
        if len(args) > len(names):
            raise TypeError(f"{name}() takes {len(names)} arguments besides self, got {len(args)}")
        given = dict(zip(names, args, strict=False))
        for key in kwargs:
            if key in given:
                raise TypeError(f"{name}() got multiple values for argument '{key}'")
        given.update(kwargs)
        arguments = dict(given)
        if outputs is not None and _capturing(self.backend):
            arguments.update(outputs(self, {**defaults, **given}))
        if handle_kind is not None:
            arguments["handle"] = self._native_handle(given.get("handle"), handle_kind)
        if "previous_event" in given:
            arguments["previous_event"] = self._native_event(given["previous_event"])
        if config_of is not None and given.get("config") is None:
            arguments["config"] = getattr(self, config_of)(self.group_size)
        out = list(native(self._buf, **arguments))
        if handle_out is not None:
            at, wrap = handle_out
            # a cached dispatch returns the handle it was given
            out[at] = given["handle"] if given.get("handle") is not None else getattr(self, wrap)(out[at])
        async_finish = bool(given.get("async_finish", False))
        extra = tuple(torch_tensors.tensors_in([*given.values(), *out])) if async_finish else None
        out[event_at] = EventOverlap(out[event_at], extra, self.backend)
        return tuple(out)

    return call


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
        for name, value in (("use_fabric", use_fabric), ("explicitly_destroy", explicitly_destroy),
                            ("enable_shrink", enable_shrink)):  # fmt: skip
            if not isinstance(value, bool | int):
                raise ArgumentError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
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

    get_low_latency_rdma_size_hint = staticmethod(_NativeBuffer.get_low_latency_rdma_size_hint)

    @staticmethod
    def capture() -> EventOverlap:
        """An event at this point of torch's current stream (CPU: already complete)."""
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return EventOverlap(EventHandle(None))
        import cupy

        with torch_tensors.torch_stream("gpu"):
            return EventOverlap(EventHandle(cupy.cuda.get_current_stream().record()), backend="gpu")

    def get_comm_stream(self):
        """The Buffer's communication stream as a ``torch.cuda.ExternalStream`` (GPU backend)."""
        if self.backend != "gpu":
            raise EpkernError("get_comm_stream: the CPU backend has no CUDA stream")
        stream = self._buf._backend.rt.comm_stream
        return torch.cuda.ExternalStream(stream.ptr)

    def get_local_buffer_tensor(self, dtype, size=None, offset=0, use_rdma_buffer=False):
        """DeepEP's raw view of this rank's Buffer memory: the HT area (``num_nvl_bytes``) or, with
        ``use_rdma_buffer``, the LL area (their first ``num_nvl_bytes`` / ``num_rdma_bytes``, as DeepEP's), from byte
        ``offset``, as ``dtype`` elements (all that fit, or the first
        ``size``'s worth shaped as ``size``). The calls' outputs and the kernels' working data live there, so
        writing it changes them, as in DeepEP. The tensor keeps the memory alive after ``destroy()``."""
        if not isinstance(dtype, torch.dtype):
            raise ArgumentError(f"dtype: expected a torch.dtype, got {dtype!r}")
        element = torch.empty((), dtype=dtype).element_size()
        offset = check_int(offset, "offset", min_value=0)
        if offset % element:
            raise ArgumentError(f"offset: expected a multiple of {element} bytes ({dtype}), got {offset}")
        if self.backend != "gpu":
            raise EpkernError("get_local_buffer_tensor: the CPU backend has no device buffer memory")
        area = self._buf._backend.rt.raw_area(bool(use_rdma_buffer))
        # DeepEP's view spans the bytes the Buffer was asked for; epkern's area may be rounded up beyond them
        # (seen with 2 ranks on the H200: the LL area exceeded num_rdma_bytes)
        asked = self.num_rdma_bytes if use_rdma_buffer else self.num_nvl_bytes
        if 0 < asked < area.nbytes:
            area = area[:asked]
        numel = max(area.nbytes - offset, 0) // element
        need = numel if size is None else int(torch.Size(size).numel())
        if need > numel:
            what = "LL" if use_rdma_buffer else "HT"
            raise ArgumentError(
                f"size: {tuple(size)} needs {need} elements of {dtype}; the {what} area holds {numel} from "
                f"offset {offset}"
            )
        with torch_tensors.torch_stream(self.backend):
            t = torch_tensors.to_tensor(area[offset : offset + numel * element]).view(dtype)
        return t if size is None else t[:need].view(size)

    # ---- helpers ----
    @staticmethod
    def _native_event(previous_event):
        if previous_event is None:
            return None
        if isinstance(previous_event, EventOverlap):
            return previous_event.event
        raise ArgumentError(f"previous_event: expected an EventOverlap, got {type(previous_event).__name__}")

    def _native_handle(self, handle, call: str):
        if handle is None:
            return None
        api_checks.own_handle(handle, _HandleTuple, self, call)
        return handle.native

    def _ht_handle(self, native) -> _HandleTuple:
        if self.backend == "gpu":
            fields = (native.rank_prefix_matrix, native.recv_src_idx, native.is_token_in_rank, native.send_slot)
        else:
            own = native.own
            fields = (own.rank_prefix_matrix, own.src_idx, own.is_token_in_rank, own.send_slot)
        rank_prefix, src_idx, in_rank, send_slot = (_tensor(f) for f in fields)
        return api_checks.stamp(_HandleTuple((rank_prefix, None, None, src_idx, in_rank, send_slot), native), self)

    def _ll_handle(self, native) -> _HandleTuple:
        items = (_tensor(native.src_info), _tensor(native.layout_range), *tuple(native)[2:])
        return api_checks.stamp(_HandleTuple(items, native), self)

    # ---- data calls: the native methods (DeepEP's signatures, plus epkern's own optional arguments) ----
    get_dispatch_layout = _forwarded("get_dispatch_layout", event_at=4)
    dispatch = _forwarded("dispatch", "dispatch", "get_dispatch_config", handle_out=(4, "_ht_handle"), event_at=5)
    combine = _forwarded("combine", "dispatch", "get_combine_config", event_at=2)
    low_latency_dispatch = _forwarded(
        "low_latency_dispatch", handle_out=(2, "_ll_handle"), event_at=3, outputs=_ll_dispatch_outputs
    )
    low_latency_combine = _forwarded(
        "low_latency_combine", "low_latency_dispatch", event_at=1, outputs=_ll_combine_outputs
    )

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank, hidden, num_experts) -> None:
        self._buf.clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden, num_experts)

    def get_next_low_latency_combine_buffer(self, handle):
        native = self._native_handle(handle, "low_latency_dispatch")
        with torch_tensors.torch_stream(self.backend):
            return torch_tensors.to_tensor(self._buf.get_next_low_latency_combine_buffer(native))

    def get_combine_buffer(self, handle):
        """epkern's own (DeepEP has none): a BF16 [N, H] tensor in the Buffer's memory for the expert outputs, which
        ``combine(y, handle)`` then reads in place instead of copying them in first (between processes)."""
        native = self._native_handle(handle, "dispatch")
        with torch_tensors.torch_stream(self.backend):
            return torch_tensors.to_tensor(self._buf.get_combine_buffer(native))

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        self._buf.low_latency_update_mask_buffer(rank_to_mask, mask)

    def low_latency_query_mask_buffer(self, mask_status) -> None:
        self._buf.low_latency_query_mask_buffer(mask_status)

    def low_latency_clean_mask_buffer(self) -> None:
        self._buf.low_latency_clean_mask_buffer()
