"""``epkern.Buffer``: the communication buffer, DeepEP V1's ``deep_ep.Buffer`` surface.

Every public signature and docstring lives here, once; each call is forwarded to the backend chosen at
construction: ``"gpu"`` (epkern.gpu: CuPy arrays, CUDA kernels) or ``"cpu"`` (epkern.cpu_backend: numpy arrays,
the numpy reference across the group). Both take the same calls with the same arguments and return the same
shapes and dtypes; what a backend cannot do raises an error naming the backend.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

from . import _cuda, _env, reference
from ._validate import check_int
from .errors import ArgumentError, EpkernError
from .events import EventHandle
from .torch_tensors import accepts_tensors

__all__ = ["Buffer", "EventHandle", "resolve_backend"]


def resolve_backend(backend: str | None) -> str:
    choice = _env.backend() if backend is None else backend
    if choice not in ("auto", "gpu", "cpu"):
        raise ArgumentError(f"backend: expected 'auto', 'gpu' or 'cpu', got {choice!r}")
    if choice == "auto":
        return "gpu" if _cuda.gpu_available() else "cpu"
    return choice


@dataclass(frozen=True)
class BufferOptions:
    """The constructor's arguments after validation, as the backends take them."""

    num_nvl_bytes: int
    num_rdma_bytes: int
    low_latency_mode: bool
    num_qps_per_rank: int
    timeout_s: float
    poison: bool
    tuning: object
    transport: str = "auto"  # LL peers on other nodes: "auto" | "proxy" | "rdma" (gpu/ll/routes.py)
    hybrid: bool = True  # LL peers of the same node over IPC (allow_nvlink_for_low_latency_mode, EPKERN_LL_HYBRID)
    num_proxy_threads: int = 4  # PROXY route: host threads draining the trigger FIFOs (EPKERN_NUM_PROXY_THREADS)


def _one_thread_at_a_time(method):
    """A Buffer serves one thread at a time: a call while another thread is inside one of its calls raises
    (two threads' calls would interleave on one set of buffers and get each other's rows). A thread may call
    again from inside its own call (prepared calls do)."""
    name = method.__name__

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        guard = self._guard
        if not guard.acquire(blocking=False):
            if self._guard_owner == threading.get_ident():
                return method(self, *args, **kwargs)
            raise EpkernError(
                f"Buffer.{name}: another thread is inside this Buffer's {self._guard_call}; a Buffer serves one "
                "thread at a time (give each thread its own Buffer, or serialise the calls)"
            )
        self._guard_owner, self._guard_call = threading.get_ident(), name
        try:
            return method(self, *args, **kwargs)
        finally:
            self._guard_owner = None
            guard.release()

    return call


def _same_on_every_rank(group, **settings) -> None:
    """Every rank made its Buffer with the same settings (collective; every rank raises the same error): a rank
    with smaller sizes than its peers would have them write past its memory."""
    every = group.allgather_object(tuple(settings.values()))
    for i, name in enumerate(settings):
        values = [v[i] for v in every]
        if len(set(values)) > 1:
            per_rank = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
            raise ArgumentError(f"{name}: every rank of the group must pass the same value ({per_rank})")


def _as_bool(value, name: str) -> bool:
    if not isinstance(value, bool | int) or value not in (0, 1):
        raise ArgumentError(f"{name}: expected a bool, got {value!r}")
    return bool(value)


class Buffer:
    """Dispatch/combine buffer over a process group; use as a context manager or call ``destroy()``.

    Args:
        group: an epkern group (``epkern.group``), an mpi4py communicator, a torch.distributed process group, or
            None: ``comm`` if given, else the MPI world (or a group of one).
        num_nvl_bytes: bytes of the high-throughput heap shared by the ranks of a node (dispatch outputs between
            processes live there; ``Config.get_nvl_buffer_size_hint`` sizes it).
        num_rdma_bytes: bytes of the low-latency area (``Buffer.get_low_latency_rdma_size_hint`` sizes it).
        low_latency_mode: make the low-latency area (also made when ``num_rdma_bytes`` > 0).
        num_qps_per_rank: RDMA queue pairs per peer (DeepEP's; validated, used by the RDMA paths: none on one node).
        allow_nvlink_for_low_latency_mode: DeepEP's: True (default) reaches LL peers of the same node over
            NVLink/IPC and only the others over the NIC ("hybrid"); False sends to every other rank over the NIC
            route, same node or not. ``EPKERN_LL_HYBRID=0`` also turns hybrid off.
        allow_mnnvl: DeepEP's; only False (no multi-node NVLink support).
        comm: an mpi4py communicator to use when ``group`` is None.
        backend: ``"auto"`` (default: EPKERN_BACKEND, else gpu when CuPy sees a GPU), ``"gpu"`` or ``"cpu"``.
        timeout_s: deadline of every device-side wait (default EPKERN_TIMEOUT_S, 30 s): a peer that does not answer
            raises ``epkern.errors.TimeoutError`` naming rank, phase and peer instead of hanging.
        transport: how LL reaches peers over the NIC (GPU backend; the CPU backend moves everything through the
            group): ``"auto"`` (default: RDMA where both ends' NICs have GPU-writable send rings, as the emulated
            NIC has, else PROXY), ``"proxy"`` (GPU -> host FIFO -> proxy threads -> NIC; an emulated NIC per rank
            reaches the ranks of one host) or ``"rdma"`` (the kernels write the NIC's work requests and ring its
            doorbell themselves).
        num_proxy_threads: PROXY route (GPU backend): host threads posting the kernels' triggers, each remote peer
            served by one of them round-robin (default EPKERN_NUM_PROXY_THREADS, 4); more threads than remote peers
            are not made (at most one FIFO per peer).
            A group spanning nodes (``EPKERN_RANKS_PER_NODE`` makes virtual ones) needs an LL-only Buffer
            (``num_nvl_bytes=0``): high-throughput calls across nodes are not supported (issue #18).

    Example::

        with epkern.Buffer(group, num_nvl_bytes=1 << 28) as buf:
            per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, num_experts)
            recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
                x, topk_idx=topk_idx, topk_weights=w, num_tokens_per_rank=per_rank,
                is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
            y, y_w, _ = buf.combine(expert(recv_x), handle, topk_weights=recv_w)
    """

    def __init__(
        self,
        group=None,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        comm=None,
        *,
        backend: str | None = None,
        timeout_s: float | None = None,
        transport: str = "auto",
        num_proxy_threads: int | None = None,
        _tuning=None,
    ):
        from .group import as_group

        self._backend = None
        self._guard, self._guard_owner, self._guard_call = threading.Lock(), None, ""
        if group is not None and comm is not None:
            raise ArgumentError("comm: give either group or comm, not both")
        num_nvl_bytes = check_int(num_nvl_bytes, "num_nvl_bytes", min_value=0)
        num_rdma_bytes = check_int(num_rdma_bytes, "num_rdma_bytes", min_value=0)
        low_latency_mode = _as_bool(low_latency_mode, "low_latency_mode")
        num_qps_per_rank = check_int(num_qps_per_rank, "num_qps_per_rank", min_value=1)
        hybrid = _as_bool(allow_nvlink_for_low_latency_mode, "allow_nvlink_for_low_latency_mode") and _env.ll_hybrid()
        if transport not in ("auto", "proxy", "rdma"):
            raise ArgumentError(f"transport: expected 'auto', 'proxy' or 'rdma', got {transport!r}")
        if num_proxy_threads is None:
            num_proxy_threads = _env.num_proxy_threads()
        num_proxy_threads = check_int(num_proxy_threads, "num_proxy_threads", min_value=1)
        if _as_bool(allow_mnnvl, "allow_mnnvl"):
            raise ArgumentError("allow_mnnvl: only False is supported (no multi-node NVLink)")
        if timeout_s is None:
            timeout_s = _env.timeout_s()
        timeout_s = _env.check_timeout(timeout_s, "timeout_s")
        if _tuning is not None:
            from .gpu.tuning import Tuning

            if not isinstance(_tuning, Tuning):
                raise ArgumentError(f"_tuning: expected an epkern.gpu.tuning.Tuning, got {type(_tuning).__name__}")
        choice = resolve_backend(backend)
        options = BufferOptions(
            num_nvl_bytes,
            num_rdma_bytes,
            low_latency_mode,
            num_qps_per_rank,
            float(timeout_s),
            _env.poison_outputs(),
            _tuning,
            transport,
            hybrid,
            num_proxy_threads,
        )
        group = as_group(comm if group is None else group)
        _same_on_every_rank(
            group,
            backend=choice,
            num_nvl_bytes=num_nvl_bytes,
            num_rdma_bytes=num_rdma_bytes,
            low_latency_mode=low_latency_mode,
            transport=transport,
        )
        if choice == "cpu":
            from .cpu_backend import CpuBackend

            self._backend = CpuBackend(group, options)
        else:
            _cuda.require_gpu("Buffer(backend='gpu')")
            from .gpu.backend import GpuBackend

            self._backend = GpuBackend(group, options)
        self.group = group
        self.rank, self.num_ranks = group.rank, group.size
        self.group_size = group.size  # DeepEP's name
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.num_qps_per_rank = num_qps_per_rank
        self.timeout_s = float(timeout_s)
        self.backend = choice

    # ---- lifecycle ----
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()
        return False

    @_one_thread_at_a_time
    def destroy(self) -> None:
        """Free the Buffer's memory (idempotent). Collective: every rank calls it. Raises TimeoutError (and leaves
        the memory allocated) if a kernel of this Buffer never ends."""
        if self._backend is not None:
            self._backend.destroy()

    @_one_thread_at_a_time
    def check(self) -> None:
        """Raise the failure this Buffer's work recorded so far, if any, without waiting: a peer that did not
        answer within the deadline (TimeoutError naming rank, phase and peer), a device-side error, or an earlier
        failure that left the Buffer unusable (EpkernError); after :meth:`destroy`, EpkernError. GPU work still
        running is not waited for: its failure raises at the next call, at its event's ``synchronize()``, or at a
        later ``check()``.

        Example::

            recv_x, *_ , event = buf.dispatch(x, ..., async_finish=True)
            event.synchronize()   # raises this dispatch's failure, if any
            buf.check()           # or poll without waiting
        """
        self._backend.check()

    # ---- configuration ----
    @_one_thread_at_a_time
    def set_num_sms(self, num_sms: int) -> None:
        """SMs (blocks) each high-throughput kernel uses by default (at most this rank's share of the GPU)."""
        self._backend.set_num_sms(num_sms)

    @_one_thread_at_a_time
    def get_dispatch_config(self, num_ranks: int | None = None):
        """The ``Config`` of HT dispatch (its ``num_sms``: this Buffer's default)."""
        return self._backend.get_config()

    @_one_thread_at_a_time
    def get_combine_config(self, num_ranks: int | None = None):
        """The ``Config`` of HT combine (its ``num_sms``: this Buffer's default)."""
        return self._backend.get_config()

    @staticmethod
    def get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
    ) -> int:
        """Bytes of ``num_rdma_bytes`` that low-latency calls of these sizes need (both buffer sets)."""
        return reference.get_low_latency_rdma_size_hint(
            num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts
        )

    # ---- high throughput ----
    @_one_thread_at_a_time
    @accepts_tensors
    def get_dispatch_layout(
        self, topk_idx, num_experts, previous_event=None, async_finish=False, allocate_on_comm_stream=False
    ):
        """Count what a dispatch of ``topk_idx`` sends.

        Args:
            topk_idx: int64 [T, K], entries in [-1, num_experts) (-1: no selection).
            num_experts: a multiple of the number of ranks.
        Returns:
            ``(num_tokens_per_rank int32 [R], num_tokens_per_rdma_rank int32 [nodes] or None,
            num_tokens_per_expert int32 [E], is_token_in_rank bool [T, R], event)``. GPU: no host wait (as DeepEP);
            an entry outside [-1, E) is not counted, and the dispatch refuses it (the CPU backend: here already;
            a dispatch with num_worst_tokens, which waits for no counts, sends such a selection nowhere).
        """
        return self._backend.get_dispatch_layout(
            topk_idx, num_experts, previous_event, async_finish, allocate_on_comm_stream
        )

    @_one_thread_at_a_time
    @accepts_tensors
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
        config=None,
        previous_event=None,
        async_finish=False,
        allocate_on_comm_stream=False,
    ):
        """High-throughput dispatch: every token goes once to each rank holding one of its experts.

        Args:
            x: BF16 [T, H] (``ml_dtypes.bfloat16``), or the FP8 pair (e4m3 bytes as uint8 [T, H] or
                ``ml_dtypes.float8_e4m3fn``, float32 scales [T, H/128]).
            handle: a previous dispatch's handle: a cached dispatch of the same layout (no topk arguments).
            num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert: ``get_dispatch_layout``'s outputs.
            topk_idx: int64 [T, K]; topk_weights: float32 [T, K] or None.
            expert_alignment: round each expert's received count up to a multiple of this.
            num_worst_tokens: > 0 sizes the outputs to this many rows without waiting for the counts (rows past
                the real count get index -1); the count list is then empty.
            config: an ``epkern.Config`` (its ``num_sms``).
            previous_event / async_finish / allocate_on_comm_stream: DeepEP's stream semantics.
        Returns:
            ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event)``;
            a cached dispatch returns ``(recv_x, None, None, None, handle, event)``. FP8 ``recv_x`` is the pair
            (uint8 e4m3 bytes, float32 scales) on both backends.
        """
        return self._backend.dispatch(
            x,
            handle,
            num_tokens_per_rank,
            num_tokens_per_rdma_rank,
            is_token_in_rank,
            num_tokens_per_expert,
            topk_idx,
            topk_weights,
            expert_alignment,
            num_worst_tokens,
            config,
            previous_event,
            async_finish,
            allocate_on_comm_stream,
        )

    @_one_thread_at_a_time
    @accepts_tensors
    def combine(
        self,
        x,
        handle,
        topk_weights=None,
        bias=None,
        config=None,
        previous_event=None,
        async_finish=False,
        allocate_on_comm_stream=False,
    ):
        """High-throughput combine: each received row goes back to its source, where they are summed in float32
        (bias 0, bias 1, then ranks in ascending order) and rounded to BF16.

        Args:
            x: BF16 [N, H], rows as ``dispatch`` received them; handle: that dispatch's handle.
            topk_weights: float32 [N, K] or None (combined the same way). bias: None, a BF16 [T, H] or a pair.
        Returns:
            ``(combined_x BF16 [T, H], combined_topk_weights float32 [T, K] or None, event)``.
        """
        return self._backend.combine(
            x, handle, topk_weights, bias, config, previous_event, async_finish, allocate_on_comm_stream
        )

    @_one_thread_at_a_time
    @accepts_tensors
    def get_combine_buffer(self, handle):
        """Where to write the expert outputs for ``combine(x, handle)``: BF16 [N, H] (N = the dispatch's received
        rows) in the Buffer's own memory, so the combine reads it where it is. An array from anywhere else is first
        copied in (one more read and write of every row); this one is not. Each call returns a new array; it keeps
        its part of the HT area (``num_nvl_bytes``) until it is dropped."""
        return self._backend.get_combine_buffer(handle)

    def allocating_in_buffer(self):
        """A context manager: inside it the calling thread's CuPy allocations come from the Buffer's HT area, so an
        expert output made there (``with buf.allocating_in_buffer(): y = expert(recv_x)``) is read in place by
        ``combine``, as one written into ``get_combine_buffer`` is, not copied in first; what the area cannot hold
        is allocated as before. CuPy only (torch: ``get_combine_buffer`` and ``out=``); in-process ranks: no-op."""
        return self._backend.allocating_in_buffer()

    # ---- low latency ----
    @_one_thread_at_a_time
    @accepts_tensors
    def low_latency_dispatch(
        self,
        x,
        topk_idx,
        num_max_dispatch_tokens_per_rank,
        num_experts,
        cumulative_local_expert_recv_stats=None,
        dispatch_wait_recv_cost_stats=None,
        use_fp8=True,
        round_scale=False,
        use_ue8m0=False,
        async_finish=False,
        return_recv_hook=False,
        out_x=None,
        out_scales=None,
        out_src_info=None,
        out_layout_range=None,
        out_count=None,
        zero_copy_recv=False,
    ):
        """Low-latency dispatch; returns ``(recv_x, recv_count, handle, event, hook)``.

        ``x``: BF16 [T, H], T <= num_max_dispatch_tokens_per_rank, H a multiple of 128. ``topk_idx``: int64 [T, K].
        ``recv_x``: BF16 [E_loc, R·num_max, H], or with ``use_fp8`` the pair (e4m3 bytes as uint8
        [E_loc, R·num_max, H], scales): float32 [E_loc, R·num_max, H/128], or with ``use_ue8m0`` int32
        [E_loc, R·num_max, H/512]; scales are a transposed (column-major) view as in DeepEP. ``round_scale`` /
        ``use_ue8m0`` are ignored without ``use_fp8``; ``use_ue8m0`` needs ``round_scale``.
        ``recv_count``: int32 [E_loc]. ``cumulative_local_expert_recv_stats``: int32 [E_loc], added to.
        ``out_*``: preallocated outputs of exactly those shapes and dtypes (``out_scales`` as the transposed view of
        a C-contiguous [E_loc, S, R·num_max] array), so a hot loop allocates nothing; a repeated call with the
        same arrays replays the validated launch.
        ``return_recv_hook``: only the sends are issued; ``hook()`` issues the receive.
        ``zero_copy_recv`` (epkern's own, GPU backend): the outputs are views into this Buffer's LL area where each
        sender writes its rows once; read them with work enqueued before the next LL call. Not with ``out_*``.
        """
        return self._backend.low_latency_dispatch(
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
            out_x,
            out_scales,
            out_src_info,
            out_layout_range,
            out_count,
            zero_copy_recv,
        )

    @_one_thread_at_a_time
    @accepts_tensors
    def low_latency_combine(
        self,
        x,
        topk_idx,
        topk_weights,
        handle,
        use_logfmt=False,
        zero_copy=False,
        async_finish=False,
        return_recv_hook=False,
        out=None,
        combine_wait_recv_cost_stats=None,
    ):
        """Low-latency combine; returns ``(combined_x BF16 [T, H], event, hook)``.

        ``x``: BF16 [E_loc, R·num_max, H], rows as received. ``topk_idx`` int64 [T, K] and ``topk_weights``
        float32 [T, K]: the dispatch's. ``zero_copy``: the expert outputs were written into
        ``get_next_low_latency_combine_buffer(handle)`` (``x`` is checked but not read). ``out``: preallocated
        BF16 [T, H]. Tokens whose expert lives on a masked rank get nothing from that expert.
        """
        return self._backend.low_latency_combine(
            x,
            topk_idx,
            topk_weights,
            handle,
            use_logfmt,
            zero_copy,
            async_finish,
            return_recv_hook,
            out,
            combine_wait_recv_cost_stats,
        )

    @_one_thread_at_a_time
    @accepts_tensors
    def get_next_low_latency_combine_buffer(self, handle):
        """Where to write the expert outputs for ``low_latency_combine(..., zero_copy=True)``: BF16
        [E_loc, R·num_max, H] (call it after the dispatch, write, then combine with no LL call in between)."""
        return self._backend.get_next_low_latency_combine_buffer(handle)

    @_one_thread_at_a_time
    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank, hidden, num_experts) -> None:
        """Zero the LL area and the call counters on every rank (collective). Not needed between calls; use it
        after a failure or to bring a masked rank back (then unmask it)."""
        self._backend.clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden, num_experts)

    @_one_thread_at_a_time
    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Mask (``mask=True``) or unmask a rank: LL calls skip a masked rank at every send and wait."""
        self._backend.low_latency_update_mask_buffer(rank_to_mask, mask)

    @_one_thread_at_a_time
    @accepts_tensors
    def low_latency_query_mask_buffer(self, mask_status=None):
        """int32 [R]: 1 where a rank is masked; written into ``mask_status`` (int32 [R]) if given."""
        return self._backend.low_latency_query_mask_buffer(mask_status)

    @_one_thread_at_a_time
    def low_latency_clean_mask_buffer(self) -> None:
        """Unmask every rank."""
        self._backend.low_latency_clean_mask_buffer()

    @_one_thread_at_a_time
    def prepare_low_latency_dispatch(self, *args, **kwargs):
        """A callable repeating ``low_latency_dispatch(*args, **kwargs)`` with the least host work per call (give
        every ``out_*`` so repeats skip validation). Returns what low_latency_dispatch returns."""
        return self._backend.prepare_low_latency_dispatch(self.low_latency_dispatch, args, kwargs)

    @_one_thread_at_a_time
    def prepare_low_latency_combine(self, *args, **kwargs):
        """A callable repeating ``low_latency_combine(*args, **kwargs)`` (give ``out=``); the handle of any dispatch
        over the same preallocated outputs serves every repeat. Returns what low_latency_combine returns."""
        return self._backend.prepare_low_latency_combine(self.low_latency_combine, args, kwargs)
