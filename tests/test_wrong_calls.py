"""Wrong calls one after another on ONE Buffer (issue #20, fault-injection suite: at least 100 wrong calls over both
backends): every argument mistake of tests/test_backend_parity.py's list (75 cases) is made in turn on the same
Buffer; each raises ArgumentError whose message starts with the argument's name, check() stays clean, and an exact
HT and LL round trip follows the whole sweep. CPU backend on 2 in-process ranks, the GPU backend on one rank
(over the fake CuPy here; for real on a GPU machine)."""

from __future__ import annotations

import numpy as np
import pytest

import epkern
import fake_cupy as F
import test_backend_parity as P
from epkern.errors import ArgumentError
from epkern.group import run_in_process
from epkern.group.base import SingleGroup

WRONG = [
    c
    for c in P.CASES
    if isinstance(c.expect, P.Raises)
    and c.expect.kind is ArgumentError
    and c.method != "Buffer"
    and not c.destroyed
    and not c.buffer
    and "e4m3fn" not in c.id  # CuPy has no float8 arrays (parity runs these over the fake only)
]


def _sweep(c: P.Ctx, exact: bool) -> tuple[int, list[str]]:
    """Every wrong call on one Buffer, then (``exact``) a round trip compared with numpy. Returns (calls, problems)."""
    buf = c.buf = c.make_buffer()
    problems = []
    try:
        for case in WRONG:
            c.memo = {}
            args, kwargs = P.resolve(case.args, c), P.resolve(case.kwargs, c)
            c.kwargs = kwargs
            try:
                result = getattr(buf, case.method)(*args, **kwargs)
                for _ in range(case.call_result):  # prepared calls: the mistake raises when the call runs
                    result = result()
            except ArgumentError as exc:
                if not str(exc).startswith(f"{case.expect.arg}:"):
                    problems.append(f"{case.id}: message does not start with {case.expect.arg!r}: {exc}")
            except Exception as exc:  # noqa: BLE001 - reported
                problems.append(f"{case.id}: {type(exc).__name__}: {exc}")
            else:
                problems.append(f"{case.id}: accepted")
            buf.check()
        c.memo = {}
        if exact:
            problems += _round_trip(buf, c)
    finally:
        for other in c.extra:
            other.destroy()
        buf.destroy()
    return len(WRONG), problems


def _round_trip(buf, c) -> list[str]:
    host = (lambda a: a) if c.backend == "cpu" else (lambda a: a.get())
    d = c.data
    x, idx = c.dev(d["x"]), c.dev(d["idx"])
    recv_x, _, _, _, handle, _ = buf.dispatch(
        x, topk_idx=idx, num_tokens_per_rank=c.dev(d["per_rank"]), is_token_in_rank=c.dev(d["in_rank"]),
        num_tokens_per_expert=c.dev(d["per_expert"]),
    )  # fmt: skip
    combined, _, _ = buf.combine(recv_x, handle)
    reached = d["in_rank"].sum(1).astype(np.float32)[:, None]
    out = []
    if not np.array_equal(host(combined).astype(np.float32), d["x"].astype(np.float32) * reached):
        out.append("HT round trip after the sweep is not exact")
    w = np.full((P.T, P.K), 0.5, np.float32)
    recv, _, ll_handle, _, _ = buf.low_latency_dispatch(x, idx, P.NUM_MAX, P.E, use_fp8=False)
    ll_out, _, _ = buf.low_latency_combine(recv, idx, c.dev(w), ll_handle)
    sel = (d["idx"] >= 0).sum(1).astype(np.float32)[:, None]
    if not np.array_equal(host(ll_out).astype(np.float32), d["x"].astype(np.float32) * 0.5 * sel):
        out.append("LL round trip after the sweep is not exact")
    return out


def test_at_least_a_hundred_wrong_calls_over_both_backends():
    assert 2 * len(WRONG) >= 100


def test_cpu_backend_two_ranks():
    results = run_in_process(lambda g: _sweep(P._cpu_ctx(g), exact=True), 2, timeout_s=120)
    for calls, problems in results:
        assert calls == len(WRONG) and not problems, "\n".join(problems)


def test_gpu_backend_over_the_fake(monkeypatch):
    with F.installed(monkeypatch, emulate={"epk_ht_notify": F.emulate_ht_notify_one_rank}):
        P._emulate_layout_kernel(monkeypatch)
        import cupy

        hint = epkern.Buffer.get_low_latency_rdma_size_hint(P.NUM_MAX, P.H, 1, P.E)

        def make(**options):
            return F.fake_buffer(num_nvl_bytes=1 << 24, num_rdma_bytes=hint, low_latency_mode=True, **options)

        calls, problems = _sweep(P.Ctx("gpu", SingleGroup(), cupy, cupy.asarray, make), exact=False)
    assert calls == len(WRONG) and not problems, "\n".join(problems)


@pytest.mark.gpu
def test_gpu_backend_for_real():
    import cupy

    hint = epkern.Buffer.get_low_latency_rdma_size_hint(P.NUM_MAX, P.H, 1, P.E)

    def make(**options):
        return epkern.Buffer(
            SingleGroup(), backend="gpu", num_nvl_bytes=1 << 24, num_rdma_bytes=hint, low_latency_mode=True, **options
        )

    calls, problems = _sweep(P.Ctx("gpu", SingleGroup(), cupy, cupy.asarray, make), exact=True)
    assert calls == len(WRONG) and not problems, "\n".join(problems)
