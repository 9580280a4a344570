"""Posting send work requests and polling completions with standard verbs (any provider: mlx5, rxe, ...).

``ibv_post_send`` and ``ibv_poll_cq`` are static inline functions of verbs.h, not exported symbols: they call
through the context's ops table (``qp->context->ops.post_send``, ``cq->context->ops.poll_cq``). In ABI mode we call
the same two function pointers. :func:`post_send` posts a chain of :class:`SendRequest` (made by
:func:`rdma_write` and :func:`fetch_add`) with ONE call; :func:`poll_cq` returns plain :class:`WorkCompletion`
records, and :meth:`WorkCompletion.check` raises :class:`WorkCompletionError` (a :class:`VerbsError` quoting
``ibv_wc_status_str``) for a failed one.
"""

from __future__ import annotations

import errno as _errno
import operator
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ArgumentError
from ._cdef import CONSTANTS as _C
from ._handles import CompletionQueue, QueuePair
from ._library import RdmaUnavailableError, VerbsError, get_ffi, verbs_lib

MAX_MESSAGE_BYTES = (1 << 31) - 1  # an RDMA message is below 2 GiB (max_msg_sz is at most 2^31 on every provider)
MAX_POLL = 4096

IBV_WR_RDMA_WRITE = _C["IBV_WR_RDMA_WRITE"]
IBV_WR_ATOMIC_FETCH_AND_ADD = _C["IBV_WR_ATOMIC_FETCH_AND_ADD"]
_OPCODE_NAMES = {IBV_WR_RDMA_WRITE: "RDMA_WRITE", IBV_WR_ATOMIC_FETCH_AND_ADD: "FETCH_AND_ADD"}


def enum_name(enum: str, value: int) -> str:
    """The cdef's name of ``value`` in ``enum`` (e.g. ``enum_name("ibv_wc_status", 10)`` is
    ``"IBV_WC_REM_ACCESS_ERR"``), or ``"<enum> <value>"`` for a value the cdef does not declare."""
    return get_ffi().typeof(f"enum {enum}").elements.get(value, f"{enum} {value}")


def _uint(name: str, value: object, bits: int) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        raise ArgumentError(f"{name}: expected an integer, got {type(value).__name__}") from None
    if isinstance(value, bool) or not 0 <= v < 1 << bits:
        raise ArgumentError(f"{name}: expected an unsigned {bits}-bit integer, got {value!r}")
    return v


@dataclass(frozen=True)
class SendRequest:
    """One send work request, validated by :func:`rdma_write` / :func:`fetch_add` (make it through them).

    RDMA WRITE: ``length`` bytes from ``local_addr`` (``lkey``) to ``remote_addr`` (``rkey``); ``inline`` copies the
    bytes into the work queue at post time (no ``lkey`` needed). FETCH_AND_ADD: ``add`` to the 8 bytes at
    ``remote_addr``; the old value lands at ``local_addr`` (8 bytes, ``lkey``). ``signaled``: a completion is
    generated on success (failures always generate one)."""

    opcode: int
    wr_id: int
    local_addr: int
    lkey: int
    length: int
    remote_addr: int
    rkey: int
    add: int = 0
    signaled: bool = False
    inline: bool = False

    @property
    def kind(self) -> str:
        return _OPCODE_NAMES[self.opcode]


def rdma_write(
    wr_id: int,
    local_addr: int,
    lkey: int,
    length: int,
    remote_addr: int,
    rkey: int,
    *,
    signaled: bool = False,
    inline: bool = False,
) -> SendRequest:
    """An RDMA WRITE request (see :class:`SendRequest`); ``length`` may be 0 (a write that moves no byte)."""
    length = _uint("length", length, 32)
    if length > MAX_MESSAGE_BYTES:
        raise ArgumentError(f"length: {length} bytes exceeds the largest RDMA message ({MAX_MESSAGE_BYTES})")
    local_addr, remote_addr = _uint("local_addr", local_addr, 64), _uint("remote_addr", remote_addr, 64)
    if local_addr + length > 1 << 64 or remote_addr + length > 1 << 64:
        raise ArgumentError(f"length: {length} bytes from 0x{local_addr:x} / to 0x{remote_addr:x} pass 2^64")
    return SendRequest(
        IBV_WR_RDMA_WRITE,
        _uint("wr_id", wr_id, 64),
        local_addr,
        _uint("lkey", lkey, 32),
        length,
        remote_addr,
        _uint("rkey", rkey, 32),
        signaled=bool(signaled),
        inline=bool(inline),
    )


def fetch_add(
    wr_id: int, result_addr: int, lkey: int, remote_addr: int, rkey: int, add: int, *, signaled: bool = False
) -> SendRequest:
    """A 64-bit FETCH_AND_ADD request: ``add`` (mod 2^64) to the word at ``remote_addr``, old value to
    ``result_addr``. Both addresses must be 8-byte aligned."""
    result_addr, remote_addr = _uint("result_addr", result_addr, 64), _uint("remote_addr", remote_addr, 64)
    for name, addr in (("result_addr", result_addr), ("remote_addr", remote_addr)):
        if addr % 8:
            raise ArgumentError(f"{name}: 0x{addr:x} is not 8-byte aligned (atomics work on aligned 64-bit words)")
    return SendRequest(
        IBV_WR_ATOMIC_FETCH_AND_ADD,
        _uint("wr_id", wr_id, 64),
        result_addr,
        _uint("lkey", lkey, 32),
        8,
        remote_addr,
        _uint("rkey", rkey, 32),
        add=_uint("add", add, 64),
        signaled=bool(signaled),
    )


def build_send_wrs(requests: Sequence[SendRequest], max_inline_data: int = 0):
    """(``struct ibv_send_wr[]``, ``struct ibv_sge[]``) chained in order; both must outlive the post call."""
    if isinstance(requests, SendRequest) or not len(requests):
        raise ArgumentError("requests: expected a non-empty sequence of SendRequest")
    ffi = get_ffi()
    n = len(requests)
    wrs = ffi.new("struct ibv_send_wr[]", n)
    sges = ffi.new("struct ibv_sge[]", n)
    signaled, inline = _C["IBV_SEND_SIGNALED"], _C["IBV_SEND_INLINE"]
    for i, r in enumerate(requests):
        if not isinstance(r, SendRequest):
            raise ArgumentError(f"requests[{i}]: expected a SendRequest, got {type(r).__name__}")
        if r.inline and r.length > max_inline_data:
            raise ArgumentError(
                f"requests[{i}]: inline write of {r.length} bytes, the QP takes at most {max_inline_data} inline"
            )
        wr = wrs[i]
        wr.wr_id = r.wr_id
        wr.next = wrs + (i + 1) if i + 1 < n else ffi.NULL
        wr.opcode = r.opcode
        wr.send_flags = (signaled if r.signaled else 0) | (inline if r.inline else 0)
        if r.length:  # a zero-length write carries no scatter/gather entry
            sges[i].addr, sges[i].length, sges[i].lkey = r.local_addr, r.length, r.lkey
            wr.sg_list, wr.num_sge = sges + i, 1
        if r.opcode == IBV_WR_ATOMIC_FETCH_AND_ADD:
            wr.wr.atomic.remote_addr, wr.wr.atomic.rkey = r.remote_addr, r.rkey
            wr.wr.atomic.compare_add = r.add
        else:
            wr.wr.rdma.remote_addr, wr.wr.rdma.rkey = r.remote_addr, r.rkey
    return wrs, sges


def post_send(qp: QueuePair, requests: Sequence[SendRequest]) -> None:
    """Post ``requests`` on ``qp`` as one chained list with ONE ``ibv_post_send`` (one doorbell on hardware).

    A refusal raises :class:`VerbsError` naming the first request not posted; the ones before it were posted."""
    if not isinstance(qp, QueuePair):
        raise ArgumentError(f"qp: expected a QueuePair, got {type(qp).__name__}")
    ptr = qp._require()
    wrs, _sges = build_send_wrs(requests, qp.max_inline_data)
    ffi = get_ffi()
    bad = ffi.new("struct ibv_send_wr **")
    rc = ptr.context.ops.post_send(ptr, wrs, bad)
    if rc != 0:
        err = rc if rc > 0 else (-rc if rc < -1 else _errno.EINVAL)
        i = int(bad[0] - wrs) if bad[0] != ffi.NULL else None
        which = (
            f"request {i} of {len(requests)} ({requests[i].kind}, wr_id {requests[i].wr_id}) and those after it"
            if i is not None and 0 <= i < len(requests)
            else f"the chain of {len(requests)} requests (the provider named none)"
        )
        raise VerbsError("ibv_post_send", err, f"qpn {qp.qp_num}: {which} not posted")


@dataclass(frozen=True)
class WorkCompletion:
    """One ``struct ibv_wc`` as plain values. ``opcode`` and ``byte_len`` mean something only when ``ok``."""

    wr_id: int
    status: int
    opcode: int
    qp_num: int
    vendor_err: int
    byte_len: int

    @property
    def ok(self) -> bool:
        return self.status == _C["IBV_WC_SUCCESS"]

    @property
    def status_name(self) -> str:
        return enum_name("ibv_wc_status", self.status)

    @property
    def opcode_name(self) -> str:
        return enum_name("ibv_wc_opcode", self.opcode)

    def check(self) -> WorkCompletion:
        """Itself when it succeeded; else raise :class:`WorkCompletionError`."""
        if not self.ok:
            raise WorkCompletionError(self)
        return self


# ibv_wc_status_str's texts, for when libibverbs cannot be loaded (a completion from a test's fake provider on a
# machine without rdma-core must still explain itself rather than fail while raising).
_STATUS_TEXT = (
    "success", "local length error", "local QP operation error", "local EE context operation error",
    "local protection error", "Work Request Flushed Error", "memory management operation error", "bad response error",
    "local access error", "remote invalid request error", "remote access error", "remote operation error",
    "transport retry counter exceeded", "RNR retry counter exceeded", "local RDD violation error",
    "remote invalid RD request", "aborted error", "invalid EE context number", "invalid EE context state",
    "fatal error", "response timeout error", "general error", "TM error",
)  # fmt: skip


def status_text(status: int) -> str:
    """``ibv_wc_status_str(status)``; the same text from a table when libibverbs is not there."""
    try:
        return get_ffi().string(verbs_lib().ibv_wc_status_str(status)).decode(errors="replace")
    except RdmaUnavailableError:
        return _STATUS_TEXT[status] if 0 <= status < len(_STATUS_TEXT) else f"unknown status {status}"


class WorkCompletionError(VerbsError):
    """A work request completed in error; ``completion`` is its :class:`WorkCompletion`, the message quotes
    ``ibv_wc_status_str``."""

    def __init__(self, completion: WorkCompletion):
        self.completion = c = completion
        text = status_text(c.status)
        super().__init__(
            "ibv_poll_cq",
            _errno.EIO,
            message=(
                f"work request {c.wr_id} on qpn {c.qp_num} completed with {c.status_name} ({text}), "
                f"vendor_err 0x{c.vendor_err:x}"
            ),
        )


def poll_cq(cq: CompletionQueue, max_entries: int = 16) -> list[WorkCompletion]:
    """Up to ``max_entries`` completions from ``cq`` (oldest first; ``[]`` when none is ready). Does not raise for
    failed completions: check ``ok`` or call ``check()``."""
    if not isinstance(cq, CompletionQueue):
        raise ArgumentError(f"cq: expected a CompletionQueue, got {type(cq).__name__}")
    max_entries = _uint("max_entries", max_entries, 32)
    if not 1 <= max_entries <= MAX_POLL:
        raise ArgumentError(f"max_entries: expected 1..{MAX_POLL}, got {max_entries}")
    ptr = cq._require()
    wc = get_ffi().new("struct ibv_wc[]", max_entries)
    n = ptr.context.ops.poll_cq(ptr, max_entries, wc)
    if n < 0:
        raise VerbsError("ibv_poll_cq", _errno.EIO, f"the provider returned {n} (CQ of {cq.cqe} entries)")
    return [
        WorkCompletion(int(w.wr_id), int(w.status), int(w.opcode), int(w.qp_num), int(w.vendor_err), int(w.byte_len))
        for w in (wc[i] for i in range(n))
    ]
