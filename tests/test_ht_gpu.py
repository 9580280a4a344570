"""Intranode HT dispatch/combine on one GPU with in-process ranks, exact against the reference."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ht_scenarios  # noqa: E402
from epkern import Buffer  # noqa: E402
from epkern.group import run_in_process  # noqa: E402

pytestmark = pytest.mark.gpu


def _run(num_ranks, body, timeout_s=120, num_nvl_bytes=0, tuning=None):
    def rank_main(group):
        with Buffer(group, num_nvl_bytes=num_nvl_bytes, backend="gpu", timeout_s=20, _tuning=tuning) as buf:
            return body(buf, group)

    return run_in_process(rank_main, num_ranks, timeout_s=timeout_s)


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
@pytest.mark.parametrize("routing", ["random", "skewed", "empty_rank", "none"])
def test_routings(num_ranks, routing):
    _run(num_ranks, lambda buf, g: ht_scenarios.run_ht_case(buf, g, 300, 2048, 8 * num_ranks, 4, routing))


@pytest.mark.parametrize("hidden", [2048, 4096, 7168])
def test_hidden_sizes(hidden):
    _run(4, lambda buf, g: ht_scenarios.run_ht_case(buf, g, 257, hidden, 64, 8))


@pytest.mark.parametrize("tokens", [0, 1, [0, 5, 1, 33]])
def test_tiny(tokens):
    _run(4, lambda buf, g: ht_scenarios.run_ht_case(buf, g, tokens, 2048, 32, 4))


def test_fp8_input():
    _run(4, lambda buf, g: ht_scenarios.run_ht_case(buf, g, 300, 2048, 32, 8, fp8=True))


def test_worst_tokens_and_alignment():
    _run(4, lambda buf, g: ht_scenarios.run_ht_case(buf, g, 100, 2048, 32, 4, num_worst_tokens=400))
    _run(4, lambda buf, g: ht_scenarios.run_ht_case(buf, g, 100, 2048, 32, 4, expert_alignment=16))


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_worst_tokens_after_other_calls_in_process(num_ranks):
    """Issue #20 finding 6: num_worst_tokens = R x 300 with in-process ranks, after other calls, on a fresh Buffer
    (reported to wait until the deadline; the same calls as MPS processes were exact)."""

    def body(buf, g):
        ht_scenarios.run_ht_case(buf, g, 300, 2048, 8 * num_ranks, 4)
        ht_scenarios.run_ht_case(buf, g, 300, 2048, 8 * num_ranks, 4, num_worst_tokens=num_ranks * 300)

    for _ in range(2):  # fresh Buffers
        _run(num_ranks, body)


def test_fresh_iterations_shape_single_call():
    _run(8, lambda buf, g: ht_scenarios.run_ht_case(buf, g, 96, 2048, 64, 8))


def test_100_back_to_back_iterations_fresh_inputs():
    _run(8, lambda buf, g: ht_scenarios.run_fresh_iterations(buf, g, 100), timeout_s=600)


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_graph_capture_replays(num_ranks):
    """Issue #19: dispatch (num_worst_tokens), cached dispatch and combine of a fresh output in a CUDA graph."""
    _run(num_ranks, lambda buf, g: ht_scenarios.run_ht_graph(buf, g), num_nvl_bytes=64 << 20)  # the heap: see there


@pytest.mark.parametrize("num_ranks", [2, 8])
def test_replays_launched_as_graphs_are_exact(num_ranks):
    """HtTuning(replay_graph=True), an experiment until its A/B: the scenario's replayed cached dispatches and combines
    go through one-kernel graphs whose node gets each call's arguments; every output exact."""
    from epkern.gpu.tuning import HtTuning, Tuning

    def body(buf, group):
        ht_scenarios.run_ht_case(buf, group, 300, 2048, 8 * num_ranks, 4, "random")
        return sum("graph" in plan.__dict__ for plan in buf._backend.ht.plans._plans.values())

    graphs = _run(num_ranks, body, tuning=Tuning(ht=HtTuning(replay_graph=True)))
    assert all(graphs), graphs


def test_bad_inputs_keep_buffer_usable():
    _run(2, ht_scenarios.run_bad_inputs)


def test_mismatched_calls_are_refused_by_every_rank():
    out = _run(2, ht_scenarios.run_mismatched_calls)
    assert all("another row size" in m for m in out), out


def test_calls_refused_by_the_counts_leave_the_buffer_usable():
    _run(2, ht_scenarios.run_refused_after_early_copy)


def test_absent_peer_raises_in_process():
    def body(group):
        with Buffer(group, backend="gpu", timeout_s=3) as buf:
            took = ht_scenarios.run_absent_peer(buf, group, absent_rank=1)
            return took

    took = run_in_process(body, 2, timeout_s=60)
    assert took[1] is None and took[0] is not None and took[0] < 10


def test_async_finish_and_previous_event():
    import cupy
    import numpy as np

    from epkern import EventHandle, reference

    def body(buf, group):
        R, T, H, E, K = group.size, 96, 2048, 32, 4
        seed = ht_scenarios.shared_seed(group)
        xs, idxs, ws = ht_scenarios.make_inputs(seed, R, T, H, E, K)
        want = reference.ht_dispatch(xs, idxs, E, topk_weights=ws)[group.rank]
        x, idx, w = cupy.asarray(xs[group.rank]), cupy.asarray(idxs[group.rank]), cupy.asarray(ws[group.rank])
        per_rank, _, per_expert, in_rank, ev = buf.get_dispatch_layout(idx, E, async_finish=True)
        assert isinstance(ev, EventHandle)
        recv_x, recv_idx, recv_w, _, handle, ev = buf.dispatch(
            x,
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=idx,
            topk_weights=w,
            previous_event=ev,
            async_finish=True,
            allocate_on_comm_stream=True,
        )
        ev.current_stream_wait()
        ht_scenarios.assert_same(cupy.asnumpy(recv_x), want.recv_x, "async recv_x")
        out, _, ev = buf.combine(recv_x, handle, previous_event=ev, async_finish=True, allocate_on_comm_stream=True)
        ev.synchronize()
        assert ev.done()
        reached = want.handle.is_token_in_rank.sum(1).astype(np.float32)[:, None]
        expect = (np.float32(0) + xs[group.rank].astype(np.float32) * reached).astype(ht_scenarios.BF16)
        ht_scenarios.assert_same(cupy.asnumpy(out), expect, "async combine")

    _run(4, body)


def test_create_destroy_repeatedly_without_leaks():
    import cupy

    from epkern.errors import EpkernError

    def body(group):
        free = []
        for _ in range(6):
            buf = Buffer(group, num_nvl_bytes=64 << 20, backend="gpu", timeout_s=20)
            ht_scenarios.run_ht_case(buf, group, 64, 2048, 16, 2)
            buf.destroy()
            buf.destroy()  # idempotent
            with pytest.raises(EpkernError, match="destroyed"):
                buf.get_dispatch_layout(cupy.zeros((1, 2), cupy.int64), 16)
            cupy.get_default_memory_pool().free_all_blocks()
            group.barrier()
            free.append(cupy.cuda.runtime.memGetInfo()[0])
        return free

    free = run_in_process(body, 2, timeout_s=300)[0]
    # after the first cycle (module loads, pools), device memory must not keep shrinking
    assert free[-1] >= free[1] - (64 << 20), [f >> 20 for f in free]


def test_demo_on_the_gpu(capsys):
    from epkern import demo

    args = ["--ranks", "4", "--tokens", "64", "--hidden", "512", "--experts", "16", "--iters", "2", "--backend", "gpu"]
    assert demo.main(args) == 0
    out = capsys.readouterr().out
    assert "GPU backend" in out and "validated" in out
