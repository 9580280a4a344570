"""Fault injection on one GPU (issue #20): ``mpiexec -n 4 python tests/fault_injection.py SCENARIO [cpu]`` under MPS,
one process per rank; rank 3 misbehaves, every rank prints ``PASS|FAIL <scenario> rank <r> <seconds> s: <detail>``.
With ``cpu`` the same runs on the CPU backend (tests/test_group_mpi.py does, under the mpich wheel): there a silent
peer shows as the group's GroupError naming rank 3 (the CPU backend exchanges through the group) and memory is not
measured.

Scenarios (T = EPKERN_TIMEOUT_S, the Buffer's deadline):
- ``ht_dispatch_silent``: rank 3 skips a dispatch (sleeps T + 1 s, then rejoins for destroy): the others raise
  TimeoutError naming peer 3 within T + 2 s.
- ``ht_combine_silent``: the same with a combine (the others see it at their event's synchronize()).
- ``late_buffer``: rank 3 makes its Buffer 2T late: the others raise GroupError naming rank 3 within T + 2 s.
- ``kill_ht_dispatch``: rank 3 is SIGKILLed before a dispatch: the others raise naming peer 3 within T + 2 s, and
  destroy() frees their memory (the silent rank's process has ended). Needs a launcher that keeps the job alive when a
  rank dies (Open MPI: ``mpiexec --with-ft ulfm``; MPICH: ``-disable-auto-cleanup``).
In every scenario the device's free memory (MPS: all ranks) after destroy() is compared with before the Buffer.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ml_dtypes  # noqa: E402

from epkern import Buffer, _env  # noqa: E402
from epkern.errors import GroupError, TimeoutError  # noqa: E402
from epkern.group import MPIGroup  # noqa: E402

BF16 = ml_dtypes.bfloat16
FAULTY = 3


def _inputs(group, xp):
    T, H, E = 64, 2048, 8 * group.size
    rng = np.random.default_rng(group.rank)
    idx = np.argsort(rng.random((T, E)), axis=1)[:, :4].astype(np.int64)
    return xp.asarray(np.ones((T, H), BF16)), xp.asarray(idx), E


class _Numpy:
    """What the scenarios use of CuPy, for the CPU backend."""

    asarray = staticmethod(np.asarray)
    asnumpy = staticmethod(np.asarray)


def _round(buf, group, cupy):
    """One exact dispatch + combine (kernels loaded, every rank in step)."""
    x, idx, E = _inputs(group, cupy)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    kw = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=idx)
    recv, _, _, _, handle, _ = buf.dispatch(x, **kw)
    out, _, _ = buf.combine(recv, handle)
    want = cupy.asnumpy(in_rank).sum(1).astype(np.float32)[:, None] * np.ones((1, x.shape[1]), np.float32)
    assert np.array_equal(cupy.asnumpy(out).astype(np.float32), want), "round trip not exact"
    return kw, x


def _free_bytes(group, cupy) -> int | None:
    if cupy is _Numpy:
        group.barrier()
        return None
    cupy.get_default_memory_pool().free_all_blocks()
    cupy.cuda.Device().synchronize()
    group.barrier()
    return int(cupy.cuda.runtime.memGetInfo()[0])


def main(scenario: str, backend: str = "gpu") -> None:
    if backend == "gpu":
        import cupy
    else:
        cupy = _Numpy
    silent_error = TimeoutError if backend == "gpu" else GroupError
    timeout = _env.timeout_s()
    group = MPIGroup(timeout_s=timeout)
    rank = group.rank
    nvl = 64 << 20
    with Buffer(group, num_nvl_bytes=nvl, backend=backend, timeout_s=timeout) as warm:  # modules loaded once
        _round(warm, group, cupy)
    before = _free_bytes(group, cupy)
    start, verdict, detail = time.monotonic(), "FAIL", ""
    buf = None
    try:
        if scenario == "late_buffer":
            if rank == FAULTY:
                time.sleep(2 * timeout)
            try:
                buf = Buffer(group, num_nvl_bytes=nvl, backend=backend, timeout_s=timeout)
                detail = "made a Buffer although rank 3 was late" if rank != FAULTY else "late rank made its Buffer"
                verdict = "PASS" if rank == FAULTY else "FAIL"
            except GroupError as exc:
                took = time.monotonic() - start
                ok = rank == FAULTY or ("rank 3" in str(exc) and took < timeout + 2)
                verdict, detail = ("PASS" if ok else "FAIL"), str(exc)[:200]
            return
        buf = Buffer(group, num_nvl_bytes=nvl, backend=backend, timeout_s=timeout)
        kw, x = _round(buf, group, cupy)
        group.barrier()
        start = time.monotonic()
        if rank == FAULTY:
            if scenario.startswith("kill"):
                os.kill(os.getpid(), signal.SIGKILL)
            if scenario == "ht_combine_silent":
                buf.dispatch(x, **kw)
            time.sleep(timeout + 1)
            verdict, detail = "PASS", "silent, rejoining for destroy"
            return
        try:
            recv, _, _, _, handle, _ = buf.dispatch(x, **kw)
            if scenario == "ht_combine_silent":
                _, _, event = buf.combine(recv, handle, async_finish=True)
                event.synchronize()
            else:
                buf.check()
            detail = "no error"
        except silent_error as exc:
            took = time.monotonic() - start
            ok = ("peer 3" in str(exc) or "rank 3" in str(exc)) and took < timeout + 2
            verdict, detail = ("PASS" if ok else "FAIL"), str(exc)[:200]
    except Exception as exc:  # noqa: BLE001 - reported as the scenario's failure
        detail = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        took = time.monotonic() - start
        if buf is not None:
            try:
                buf.destroy()
            except Exception as exc:  # noqa: BLE001
                verdict, detail = "FAIL", f"destroy: {type(exc).__name__}: {exc}"[:300]
        try:
            after = _free_bytes(group, cupy) if not scenario.startswith("kill") and before is not None else None
        except GroupError:
            after = None
        memory = "n/a" if after is None else f"{(before - after) / 2**20:+.1f} MiB held"
        if after is not None and before is not None and after < before - (2 << 20):
            verdict = "FAIL"
        print(f"{verdict} {scenario} rank {rank} {took:.2f} s: {detail} [memory {memory}]", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
