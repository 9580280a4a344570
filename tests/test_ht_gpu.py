"""Intranode HT dispatch/combine on one GPU with in-process ranks, exact against the reference."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ht_scenarios  # noqa: E402
from epkern import Buffer  # noqa: E402
from epkern.group import run_in_process  # noqa: E402

pytestmark = pytest.mark.gpu


def _run(num_ranks, body, timeout_s=120):
    def rank_main(group):
        with Buffer(group, num_nvl_bytes=0, backend="gpu", timeout_s=20) as buf:
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


@pytest.mark.xfail(
    reason="known bug: in-process ranks on one GPU time out after the first iteration when calls run "
    "back to back without host barriers (MPS processes pass the same loop); see docs/architecture.md",
    strict=False,
)
def test_many_iterations():
    _run(8, lambda buf, g: ht_scenarios.run_ht_case(buf, g, 128, 2048, 64, 8, iterations=25))


def test_bad_inputs_keep_buffer_usable():
    _run(2, ht_scenarios.run_bad_inputs)


def test_absent_peer_raises_in_process():
    def body(group):
        with Buffer(group, backend="gpu", timeout_s=3) as buf:
            took = ht_scenarios.run_absent_peer(buf, group, absent_rank=1)
            return took

    took = run_in_process(body, 2, timeout_s=60)
    assert took[1] is None and took[0] is not None and took[0] < 10
