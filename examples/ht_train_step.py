"""High-throughput (HT) train-step loop: get_dispatch_layout -> dispatch -> stand-in experts -> combine, then the
backward pass over the same routes (cached dispatch of the output gradient, combine of the input gradient), each
result compared exactly with numpy.

    python examples/ht_train_step.py [--ranks 2] [--backend auto|cpu|gpu] [--steps 3]

The ranks are in-process (one thread each, ``epkern.group.run_in_process``); on the GPU backend they share the
visible GPUs round-robin. Inputs are small integers and power-of-two gate weights, so every sum is exact and the
check is equality. Prints what it checked; exits 1 on a mismatch. README.md ("Using it") shows the part between
the ``core`` markers verbatim.
"""

import argparse
import sys

# ---- core (README.md "Using it" shows this part verbatim) ----
import ml_dtypes
import numpy as np

import epkern
from epkern.group import run_in_process

BF16 = ml_dtypes.bfloat16  # epkern's BF16; FP8 data crosses the API as uint8 e4m3 bytes
T, H, K, EXPERTS_PER_RANK = 128, 512, 2, 4  # tokens per rank, hidden size, top-k, experts per rank


def make_inputs(rank, num_experts, step):
    """Rank ``rank``'s batch at ``step`` (every rank can rebuild every other's): integer-valued activations x and
    output gradient g, K distinct experts per token (about 10% of the selections -1), power-of-two weights."""
    rng = np.random.default_rng([step, rank])
    x = rng.integers(-8, 9, size=(T, H)).astype(BF16)
    g = rng.integers(-4, 5, size=(T, H)).astype(BF16)
    topk_idx = np.argsort(rng.random((T, num_experts)), axis=1)[:, :K].astype(np.int64)
    topk_idx[rng.random((T, K)) < 0.1] = -1
    weights = rng.choice(np.float32([0.5, 1.0, 2.0]), size=(T, K))
    return x, g, topk_idx, weights


def expert(recv_x, recv_idx, recv_w, rank):
    """This rank's stand-in experts, gate weights applied: each received row times sum_k w_k * (global expert id + 1)
    over its selections of this rank's experts, in float32, rounded to BF16. Linear, so it is its own backward."""
    id_plus_1 = (recv_idx + rank * EXPERTS_PER_RANK + 1).astype(np.float32)  # recv_idx: local expert ids
    factor = np.where(recv_idx >= 0, recv_w * id_plus_1, np.float32(0)).sum(axis=1, dtype=np.float32)
    return (recv_x.astype(np.float32) * factor[:, None]).astype(BF16)


def expected(x, topk_idx, weights, num_ranks):
    """combine(expert(dispatch(x))) in numpy: every destination rank's BF16 row, summed in float32."""
    acc = np.zeros(x.shape, np.float32)
    for dst in range(num_ranks):
        on_dst = (topk_idx >= 0) & (topk_idx // EXPERTS_PER_RANK == dst)
        factor = np.where(on_dst, weights * (topk_idx + 1).astype(np.float32), np.float32(0)).sum(axis=1)
        acc += (x.astype(np.float32) * factor[:, None]).astype(BF16).astype(np.float32)
    return acc.astype(BF16)


def equal(a, b):
    return np.array_equal(a.astype(np.float32), b.astype(np.float32))


def check(ok, what):
    if not ok:
        raise AssertionError(what)


def train(group, backend="auto", steps=3):
    """``steps`` forward + backward passes on this rank; returns one line per step saying what was checked."""
    R, rank = group.size, group.rank
    num_experts = EXPERTS_PER_RANK * R
    nvl_bytes = epkern.Config.get_nvl_buffer_size_hint(H * 2, R, T, K)
    lines = []
    with epkern.Buffer(group, num_nvl_bytes=nvl_bytes, backend=backend) as buf:
        if buf.backend == "gpu":
            import cupy

            to_dev, to_host = cupy.asarray, cupy.asnumpy
        else:
            to_dev = to_host = np.asarray
        for step in range(steps):
            x_np, g_np, idx_np, w_np = make_inputs(rank, num_experts, step)
            x, topk_idx, weights = to_dev(x_np), to_dev(idx_np), to_dev(w_np)

            # forward: each token goes once to every rank holding one of its experts, and comes back summed
            per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, num_experts)
            recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
                x,
                topk_idx=topk_idx,
                topk_weights=weights,
                num_tokens_per_rank=per_rank,
                is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert,
            )
            recv_idx, recv_w = to_host(recv_idx), to_host(recv_w)  # the stand-in experts run on the host
            # the expert output goes straight into the Buffer (e.g. cupy.matmul(..., out=y)): combined in place
            y = buf.get_combine_buffer(handle)
            y[...] = to_dev(expert(to_host(recv_x), recv_idx, recv_w, rank))
            combined_x, combined_w, _ = buf.combine(y, handle, topk_weights=to_dev(recv_w))

            # backward: the output gradient takes the same routes (cached dispatch: handle, no layout)
            recv_g, _, _, _, _, _ = buf.dispatch(to_dev(g_np), handle=handle)
            grad_x, _, _ = buf.combine(to_dev(expert(to_host(recv_g), recv_idx, recv_w, rank)), handle)

            # checks against numpy
            all_idx = np.stack([make_inputs(src, num_experts, step)[2] for src in range(R)])
            mine = (all_idx >= 0) & (all_idx // EXPERTS_PER_RANK == rank)
            want_counts = [int((all_idx == rank * EXPERTS_PER_RANK + e).sum()) for e in range(EXPERTS_PER_RANK)]
            where = f"rank {rank} step {step}"
            check(len(recv_x) == int(mine.any(axis=2).sum()), f"{where}: received {len(recv_x)} rows")
            check(list(counts) == want_counts, f"{where}: tokens per local expert {counts}, want {want_counts}")
            got_x, got_w, got_g = to_host(combined_x), to_host(combined_w), to_host(grad_x)
            check(equal(got_x, expected(x_np, idx_np, w_np, R)), f"{where}: combined_x differs from numpy")
            check(equal(got_w, np.where(idx_np >= 0, w_np, 0)), f"{where}: combined weights differ from numpy")
            check(equal(got_g, expected(g_np, idx_np, w_np, R)), f"{where}: grad_x differs from numpy")
            lines.append(
                f"{where}: received {len(recv_x)} rows, tokens per local expert {want_counts}; combined_x, "
                "combined weights and grad_x equal numpy"
            )
    return lines


# ---- end of core ----


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2, help="in-process ranks (default 2)")
    p.add_argument("--backend", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    backend = epkern.buffer.resolve_backend(args.backend)
    print(
        f"ht_train_step: {args.ranks} in-process ranks, {backend} backend, {args.steps} steps, "
        f"T={T} H={H} K={K} experts={EXPERTS_PER_RANK * args.ranks}, BF16"
    )
    try:
        results = run_in_process(train, args.ranks, backend, args.steps)
    except AssertionError as exc:
        print(f"MISMATCH: {exc}")
        return 1
    for lines in results:
        print("\n".join(lines))
    print(f"OK: {args.steps} HT train steps exact on {args.ranks} ranks ({backend} backend)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
