"""The doctor's smoke test: one HT dispatch/combine and one LL dispatch/combine on in-process ranks, with
small integer-valued inputs whose every sum is exact, checked bit for bit against :mod:`epkern.reference`.
Each rank evaluates the whole group's reference from the same seeds, so no data crosses between ranks
except through the Buffer."""

from __future__ import annotations

import numpy as np

from . import reference
from .buffer import Buffer
from .group import run_in_process
from .reference import BF16

NUM_RANKS = 2
TOKENS, HIDDEN, EXPERTS, TOPK, NUM_MAX = 24, 256, 8, 2, 32


def inputs(rank: int):
    """Rank ``rank``'s (x BF16 [T, H] of small integers, topk_idx int64 [T, K] of distinct experts with a few
    -1, weights float32 [T, K] of powers of two)."""
    rng = np.random.default_rng(4242 + rank)
    x = rng.integers(-8, 9, size=(TOKENS, HIDDEN)).astype(BF16)
    idx = np.argsort(rng.random((TOKENS, EXPERTS)), axis=1)[:, :TOPK].astype(np.int64)
    idx[rng.random((TOKENS, TOPK)) < 0.1] = -1
    w = rng.choice(np.array([0.25, 0.5, 1.0, 2.0], np.float32), size=(TOKENS, TOPK)).astype(np.float32)
    return x, idx, w


def _host(a) -> np.ndarray:
    return a if isinstance(a, np.ndarray) else a.get()


def _same(got, want, what: str, problems: list) -> None:
    got, want = np.asarray(_host(got)), np.asarray(want)
    if got.shape != want.shape:
        problems.append(f"{what}: shape {got.shape}, expected {want.shape}")
    elif not np.array_equal(got.view(np.uint8), np.ascontiguousarray(want).view(np.uint8)):
        problems.append(f"{what}: values differ from the reference")


def _ht(group, backend, to_device, everyone, problems: list) -> None:
    r = group.rank
    xs, idxs, ws = (list(v) for v in zip(*everyone, strict=True))
    ref = reference.ht_dispatch(xs, idxs, EXPERTS, topk_weights=ws)
    mine = ref[r]
    with Buffer(group, backend=backend, timeout_s=group.timeout_s) as buf:
        x, idx, w = (to_device(a) for a in everyone[r])
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, EXPERTS)
        recv_x, recv_idx, recv_w, _, handle, _ = buf.dispatch(
            x,
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=idx,
            topk_weights=w,
        )
        n = mine.handle.num_recv_tokens
        _same(_host(recv_x)[:n], mine.recv_x[:n], f"rank {r} HT recv_x", problems)
        _same(_host(recv_idx)[:n], mine.recv_topk_idx[:n], f"rank {r} HT recv_topk_idx", problems)
        _same(_host(recv_w)[:n], mine.recv_topk_weights[:n], f"rank {r} HT recv_topk_weights", problems)
        group.barrier()
        combined, combined_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w)
        want_x, want_w = reference.ht_combine(
            [res.recv_x for res in ref],
            [res.handle for res in ref],
            topk_weights=[res.recv_topk_weights for res in ref],
        )[r]
        _same(combined, want_x, f"rank {r} HT combined x", problems)
        _same(combined_w, want_w, f"rank {r} HT combined weights", problems)


def _ll(group, backend, to_device, everyone, problems: list) -> None:
    r, R = group.rank, group.size
    xs, idxs, ws = (list(v) for v in zip(*everyone, strict=True))
    ref = reference.ll_dispatch(xs, idxs, NUM_MAX, EXPERTS, use_fp8=False)
    nbytes = Buffer.get_low_latency_rdma_size_hint(NUM_MAX, HIDDEN, R, EXPERTS)
    with Buffer(group, num_rdma_bytes=nbytes, low_latency_mode=True, backend=backend, timeout_s=group.timeout_s) as buf:
        x, idx, w = (to_device(a) for a in everyone[r])
        recv_x, recv_count, handle, _, _ = buf.low_latency_dispatch(x, idx, NUM_MAX, EXPERTS, use_fp8=False)
        group.barrier()  # in-process ranks: nothing of the host's runs while a peer's combine spins
        out, _, _ = buf.low_latency_combine(recv_x, idx, w, handle)
        got_x, got_count = _host(recv_x), _host(recv_count)
        got_src, got_layout = _host(handle[0]), _host(handle[1])
        _same(got_count, ref[r].recv_count, f"rank {r} LL recv_count", problems)
        if not problems:
            mine = reference.canonicalize_ll_recv(got_x, got_count, got_src, got_layout, R)
            want = reference.canonicalize_ll_recv(
                ref[r].recv_x, ref[r].recv_count, ref[r].src_info, ref[r].layout_range, R
            )
            _same(mine.layout_range, want.layout_range, f"rank {r} LL layout_range", problems)
            for e in range(len(want.src_info)):
                _same(mine.src_info[e], want.src_info[e], f"rank {r} LL expert {e} src_info", problems)
                _same(mine.recv_x[e], want.recv_x[e], f"rank {r} LL expert {e} recv_x", problems)
        want_out = reference.ll_combine([res.recv_x for res in ref], ref, idxs, ws)[r]
        _same(out, want_out, f"rank {r} LL combined x", problems)


def _rank_main(group, backend: str) -> dict:
    if backend == "gpu":
        import cupy

        to_device = cupy.asarray
    else:
        to_device = np.asarray
    everyone = [inputs(s) for s in range(group.size)]
    parts = {}
    for name, fn in (("ht", _ht), ("ll", _ll)):
        problems: list = []
        try:
            fn(group, backend, to_device, everyone, problems)
        except Exception as exc:  # noqa: BLE001 - reported as this part's failure
            problems.append(f"rank {group.rank}: {type(exc).__name__}: {exc}")
            if group.size > 1:
                raise  # the peers may be waiting in a collective: let run_in_process stop the group
        parts[name] = "; ".join(problems[:3]) or "ok"
    return parts


def run(backend: str, timeout_s: float) -> dict:
    """{"ht": "ok" or what differed, "ll": ...} over every rank. Raises what a rank raised."""
    results = run_in_process(_rank_main, NUM_RANKS, backend, timeout_s=timeout_s)
    merged = {}
    for name in ("ht", "ll"):
        bad = [res[name] for res in results if res[name] != "ok"]
        merged[f"{name}_dispatch_combine"] = "; ".join(bad) or "ok"
    return merged
