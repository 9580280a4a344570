"""Quick GPU smoke check that needs no reference module: dtype support, layout vs brute force,
HT identity combine(dispatch(x)) == x * ranks reached, in-process ranks."""

import time
import traceback

import cupy
import ml_dtypes
import numpy as np

BF16 = ml_dtypes.bfloat16
for name, dt in (("bf16", BF16), ("fp8", ml_dtypes.float8_e4m3fn)):
    try:
        a = cupy.asarray(np.arange(8).astype(dt))
        print(name, "cupy ok", a.dtype, cupy.asnumpy(a)[:3])
    except Exception as exc:
        print(name, "cupy FAILED", exc)

from epkern.dispatch_layout import get_dispatch_layout  # noqa: E402

rng = np.random.default_rng()
for T, E, R, K in ((4096, 256, 8, 8), (0, 64, 8, 4), (16384, 1024, 64, 16)):
    idx = np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int64)
    idx[rng.random(idx.shape) < 0.1] = -1
    lay = get_dispatch_layout(cupy.asarray(idx), E, R)
    in_rank = np.zeros((T, R), bool)
    for k in range(K):
        sel = idx[:, k] >= 0
        in_rank[np.nonzero(sel)[0], idx[sel, k] // (E // R)] = True
    per_expert = np.bincount(idx[idx >= 0], minlength=E)
    ok = (
        np.array_equal(cupy.asnumpy(lay.is_token_in_rank), in_rank)
        and np.array_equal(cupy.asnumpy(lay.num_tokens_per_rank), in_rank.sum(0))
        and np.array_equal(cupy.asnumpy(lay.num_tokens_per_expert), per_expert)
    )
    print(f"layout T={T} E={E} R={R} K={K}: {'OK' if ok else 'MISMATCH'}")

from epkern import Buffer  # noqa: E402
from epkern.group import run_in_process  # noqa: E402


def ht(group, T, H, E, K):
    rng = np.random.default_rng(group.rank)
    x = rng.integers(-8, 9, size=(T, H)).astype(BF16)
    idx = np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int64)
    w = rng.random((T, K)).astype(np.float32)
    with Buffer(group, backend="gpu", timeout_s=10) as buf:
        xd, idd, wd = cupy.asarray(x), cupy.asarray(idx), cupy.asarray(w)
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idd, E)
        recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
            xd,
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=idd,
            topk_weights=wd,
        )
        out, out_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w)
        reached = cupy.asnumpy(in_rank).sum(1, dtype=np.float32)[:, None]
        want = (x.astype(np.float32) * reached).astype(BF16)
        ok = np.array_equal(cupy.asnumpy(out).view(np.uint16), want.view(np.uint16))
        okw = np.allclose(cupy.asnumpy(out_w), w)
        cupy.cuda.get_current_stream().synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            buf.dispatch(xd, handle=handle)
        cupy.cuda.get_current_stream().synchronize()
        return ok, okw, int(handle.num_recv_tokens), (time.perf_counter() - t0) / 5 * 1e6


for R in (2, 4, 8):
    try:
        res = run_in_process(ht, R, 512, 2048, 8 * R, 4, timeout_s=60)
        print(
            f"HT in-process R={R}: identity {[r[0] for r in res]} weights {[r[1] for r in res]} "
            f"recv {[r[2] for r in res]} cached-dispatch wall us {res[0][3]:.0f}"
        )
    except Exception:
        traceback.print_exc()
        print(f"HT in-process R={R}: FAILED")
