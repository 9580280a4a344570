"""The CPU backend runs the public API on the reference across in-process ranks."""

import ml_dtypes
import numpy as np
import pytest

from epkern import Buffer, demo
from epkern.errors import ArgumentError
from epkern.group import run_in_process

BF16 = ml_dtypes.bfloat16


def test_demo_runs_and_validates(capsys):
    assert (
        demo.main(
            ["--ranks", "3", "--tokens", "40", "--hidden", "256", "--experts", "12", "--iters", "1", "--backend", "cpu"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "CPU backend" in out and "validated" in out


def _bad_calls(group):
    rng = np.random.default_rng(group.rank)
    x = rng.integers(-4, 5, size=(10, 256)).astype(BF16)
    idx = np.argsort(rng.random((10, 8)), axis=1)[:, :2].astype(np.int64)
    errors = []
    with Buffer(group, backend="cpu") as buf:
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, 8)
        layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        for call, match in (
            (lambda: buf.get_dispatch_layout(idx, 7), "num_experts"),
            (lambda: buf.get_dispatch_layout(idx.astype(np.float32), 8), "topk_idx"),
            (lambda: buf.get_dispatch_layout(np.full((10, 2), 9), 8), "topk_idx"),
            (
                lambda: buf.dispatch(x.astype(np.float32), topk_idx=idx, num_tokens_per_expert=np.zeros(8, np.int32)),
                "x",
            ),
            (lambda: buf.dispatch(x, topk_idx=idx[:5], **layout), "topk_idx"),
            (lambda: buf.low_latency_dispatch(x, idx, 5, 8), "num_max_dispatch_tokens_per_rank"),
            (lambda: buf.low_latency_dispatch(x, idx, 16, 8, use_ue8m0=True), "use_ue8m0"),
        ):
            with pytest.raises(ArgumentError, match=match):
                call()
            errors.append(match)
        # still usable after bad input
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, 8)
        recv = buf.dispatch(
            x, topk_idx=idx, num_tokens_per_expert=per_expert, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank
        )
        out, _, _ = buf.combine(recv[0], recv[4])
        reached = in_rank.sum(1).astype(np.float32)[:, None]
        assert np.array_equal(
            out.view(np.uint16), (np.float32(0) + x.astype(np.float32) * reached).astype(BF16).view(np.uint16)
        )
    return errors


def test_bad_arguments_named_and_buffer_stays_usable():
    results = run_in_process(_bad_calls, 2)
    assert len(results[0]) == 7
