"""Low-latency (LL) decode loop: low_latency_dispatch -> stand-in experts -> low_latency_combine, every step into
the same preallocated arrays (``out_*`` for the dispatch, ``out=`` for the combine), each result compared exactly
with numpy.

    python examples/ll_decode_loop.py [--ranks 2] [--backend auto|cpu|gpu] [--steps 5] [--graph-steps 5]

Repeated calls with the same arrays are what a decode loop does: on the GPU backend every repeat replays the first
call's validated launch. On the GPU the loop then captures one dispatch + expert + combine step into a CUDA graph
(``stream.begin_capture()``) and replays it on new inputs copied into the captured arrays: no Python per step. The
CPU backend has no streams to capture, so it skips the graph part and says so.

The ranks are in-process (``epkern.group.run_in_process``). The stand-in expert scales each received row by its
global expert id + 1 in float32 and rounds to BF16; inputs are small integers and power-of-two gate weights, so
the combine's weighted sum is exact and the check is equality. Prints what it checked; exits 1 on a mismatch.
"""

import argparse
import sys

import ml_dtypes
import numpy as np

import epkern
from epkern.group import run_in_process

BF16 = ml_dtypes.bfloat16  # epkern's BF16; FP8 data crosses the API as uint8 e4m3 bytes
T, H, K, EXPERTS_PER_RANK = 16, 256, 4, 4  # decode tokens per rank, hidden size (multiple of 128), top-k
NUM_MAX = 32  # num_max_dispatch_tokens_per_rank: the same on every rank, >= T


def make_inputs(rank, num_experts, step):
    """Rank ``rank``'s tokens at decode step ``step`` (every rank can rebuild every other's)."""
    rng = np.random.default_rng([step, rank, 7])
    x = rng.integers(-8, 9, size=(T, H)).astype(BF16)
    topk_idx = np.argsort(rng.random((T, num_experts)), axis=1)[:, :K].astype(np.int64)
    topk_idx[rng.random((T, K)) < 0.1] = -1
    weights = rng.choice(np.float32([0.5, 1.0, 2.0]), size=(T, K))
    return x, topk_idx, weights


def expected(x, topk_idx, weights):
    """low_latency_combine(expert(low_latency_dispatch(x))) in numpy: sum_k w_k * BF16((e_k + 1) * x), in float32."""
    acc = np.zeros(x.shape, np.float32)
    for k in range(K):
        sel = topk_idx[:, k] >= 0
        scale = (topk_idx[sel, k] + 1).astype(np.float32)[:, None]
        acc[sel] += weights[sel, k, None] * (x[sel].astype(np.float32) * scale).astype(BF16).astype(np.float32)
    return acc.astype(BF16)


def gpu_scale_kernel():
    """y = BF16(float32(x) * s) on BF16 arrays seen as uint16 (round to nearest even): one CuPy kernel, no
    temporaries, so it can sit inside a captured graph."""
    import cupy

    return cupy.ElementwiseKernel(
        "uint16 x, float32 s",
        "uint16 y",
        """
        unsigned int u = __float_as_uint(__uint_as_float(((unsigned int)x) << 16) * s);
        y = (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
        """,
        "epkern_example_scale_bf16",
    )


def decode(group, backend="auto", steps=5, graph_steps=5):
    """``steps`` eager decode steps, then (GPU) ``graph_steps`` replays of a captured step; returns report lines."""
    R, rank = group.size, group.rank
    num_experts = EXPERTS_PER_RANK * R
    e_loc, rows = EXPERTS_PER_RANK, R * NUM_MAX
    rdma_bytes = epkern.Buffer.get_low_latency_rdma_size_hint(NUM_MAX, H, R, num_experts)
    lines = []
    with epkern.Buffer(group, num_rdma_bytes=rdma_bytes, low_latency_mode=True, backend=backend) as buf:
        gpu = buf.backend == "gpu"
        if gpu:
            import cupy

            xp, to_host = cupy, cupy.asnumpy
        else:
            xp, to_host = np, np.asarray
        # Every array the loop touches, allocated once: inputs, dispatch outputs, expert outputs, combine output.
        x = xp.zeros((T, H), BF16)
        topk_idx = xp.full((T, K), -1, np.int64)
        weights = xp.zeros((T, K), np.float32)
        outs = dict(
            out_x=xp.zeros((e_loc, rows, H), BF16),
            out_src_info=xp.zeros((e_loc, rows), np.int32),
            out_layout_range=xp.zeros((e_loc, R), np.int64),
            out_count=xp.zeros((e_loc,), np.int32),
        )
        y = xp.zeros((e_loc, rows, H), BF16)
        out = xp.zeros((T, H), BF16)
        scale = xp.asarray((rank * e_loc + 1 + np.arange(e_loc, dtype=np.float32)).reshape(e_loc, 1, 1))
        if gpu:
            kernel = gpu_scale_kernel()
            kernel(y.view(np.uint16), scale, y.view(np.uint16))  # load it now, not while peers' kernels spin
            stream = cupy.cuda.get_current_stream()
            stream.synchronize()
        group.barrier()

        def load(step):
            x_np, idx_np, w_np = make_inputs(rank, num_experts, step)
            for dst, src in ((x, x_np), (topk_idx, idx_np), (weights, w_np)):  # into the same arrays
                if gpu:
                    dst.set(src)  # a host-to-device copy on the current stream
                else:
                    np.copyto(dst, src)
            return x_np, idx_np, w_np

        def step_calls():
            """One decode step; everything lands in the preallocated arrays (capturable on the GPU)."""
            recv_x, recv_count, handle, _, _ = buf.low_latency_dispatch(
                x, topk_idx, NUM_MAX, num_experts, use_fp8=False, **outs
            )
            if gpu:  # stand-in experts: row * (global expert id + 1), rows past recv_count are scaled too (unused)
                kernel(recv_x.view(np.uint16), scale, y.view(np.uint16))
            else:
                y[...] = (recv_x.astype(np.float32) * scale).astype(BF16)
            buf.low_latency_combine(y, topk_idx, weights, handle, out=out)
            return handle

        def verify(step, what, x_np, idx_np, w_np):
            if gpu:
                stream.synchronize()
            all_idx = np.stack([make_inputs(src, num_experts, step)[1] for src in range(R)])
            want_counts = [int((all_idx == rank * e_loc + e).sum()) for e in range(e_loc)]
            where = f"rank {rank} {what} {step}"
            got_counts = to_host(outs["out_count"]).tolist()
            if got_counts != want_counts:
                raise AssertionError(f"{where}: recv_count {got_counts}, want {want_counts}")
            if not np.array_equal(to_host(out).astype(np.float32), expected(x_np, idx_np, w_np).astype(np.float32)):
                raise AssertionError(f"{where}: combined_x differs from numpy")
            return want_counts

        for step in range(steps):
            data = load(step)
            step_calls()
            counts = verify(step, "step", *data)
        lines.append(
            f"rank {rank}: {steps} eager decode steps into the same out_* / out= arrays; recv_count and combined_x "
            f"equal numpy (last step's recv_count {counts})"
        )

        if not gpu:
            lines.append(f"rank {rank}: CUDA graph part skipped: the {buf.backend} backend has no streams to capture")
            return lines
        stream.begin_capture()
        step_calls()
        graph = stream.end_capture()
        for step in range(steps, steps + graph_steps):
            data = load(step)
            graph.launch(stream)
            verify(step, "graph replay", *data)
        group.barrier()
        lines.append(f"rank {rank}: {graph_steps} replays of a captured dispatch + expert + combine equal numpy")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2, help="in-process ranks (default 2)")
    p.add_argument("--backend", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--steps", type=int, default=5, help="eager decode steps")
    p.add_argument("--graph-steps", type=int, default=5, help="replays of the captured step (GPU backend)")
    args = p.parse_args(argv)
    backend = epkern.buffer.resolve_backend(args.backend)
    print(
        f"ll_decode_loop: {args.ranks} in-process ranks, {backend} backend, T={T} H={H} K={K} "
        f"experts={EXPERTS_PER_RANK * args.ranks} num_max={NUM_MAX}, BF16 dispatch"
    )
    try:
        results = run_in_process(decode, args.ranks, backend, args.steps, args.graph_steps)
    except AssertionError as exc:
        print(f"MISMATCH: {exc}")
        return 1
    for lines in results:
        print("\n".join(lines))
    print(f"OK: LL decode loop exact on {args.ranks} ranks ({backend} backend)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
