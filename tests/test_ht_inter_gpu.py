"""HT dispatch/combine across virtual nodes (issue #18) on one GPU with in-process ranks over the emulated NIC, exact
against the reference (tests/ht_inter_scenarios.py), with the NIC counters as the design says. Written with the
kernels; all pass on an H100 (session O, docs/journal.md)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ht_inter_scenarios as S  # noqa: E402
import ht_scenarios  # noqa: E402
from epkern import Buffer  # noqa: E402
from epkern.gpu import ht_inter_layout as lay  # noqa: E402
from epkern.group import run_in_process  # noqa: E402

pytestmark = pytest.mark.gpu

SPLITS = [(8, 4), (8, 2), (8, 1), (4, 2), (2, 1)]  # (ranks, ranks per node)


def _run(num_ranks, ranks_per_node, body, hidden=2048, topk=8, ring=256, timeout_s=300, buffer_timeout_s=30):
    nodes = num_ranks // ranks_per_node
    area = lay.area_bytes_hint(hidden, topk, nodes, ring=ring)

    def rank_main(group):
        with Buffer(group, num_nvl_bytes=64 << 20, num_rdma_bytes=area, backend="gpu", timeout_s=buffer_timeout_s) as b:
            return body(b, group)

    return run_in_process(rank_main, num_ranks, timeout_s=timeout_s, ranks_per_node=ranks_per_node)


@pytest.mark.parametrize("num_ranks,ranks_per_node", SPLITS)
@pytest.mark.parametrize("routing", ["random", "skewed", "empty_rank", "none"])
def test_routings(num_ranks, ranks_per_node, routing):
    _run(num_ranks, ranks_per_node, lambda b, g: S.run_inter_case(b, g, 300, 2048, 8 * num_ranks, 4, routing))


@pytest.mark.parametrize("tokens", [0, 1, [0, 5, 1, 33, 0, 2, 7, 1]])
def test_tiny(tokens):
    _run(8, 2, lambda b, g: S.run_inter_case(b, g, tokens, 2048, 32, 4))


def test_ring_smaller_than_a_call_wraps_and_waits_for_credit():
    """ring = 4 messages (chunks of 4): 300 tokens wrap every ring many times in both directions."""
    _run(8, 4, lambda b, g: S.run_inter_case(b, g, 300, 2048, 32, 4), ring=4)


def test_fp8_and_worst_tokens():
    _run(8, 4, lambda b, g: S.run_inter_case(b, g, 300, 2048, 32, 8, fp8=True))
    _run(8, 2, lambda b, g: S.run_inter_case(b, g, 100, 2048, 32, 4, num_worst_tokens=800, count=False))


def test_hidden_7168_top8():
    _run(8, 4, lambda b, g: S.run_inter_case(b, g, 257, 7168, 64, 8), hidden=7168)


def test_hundred_alternating_iterations():
    _run(8, 4, lambda b, g: S.run_alternating(b, g, 100), timeout_s=900)


@pytest.mark.parametrize("num_ranks,ranks_per_node", [(8, 4), (4, 1)])
def test_graph_capture_replays(num_ranks, ranks_per_node):
    """HT across nodes in a CUDA graph (dispatch with num_worst_tokens, cached dispatch, combine of a fresh output),
    replayed on fresh inputs, exact (written in session O; not run on a GPU yet)."""
    _run(num_ranks, ranks_per_node, lambda b, g: ht_scenarios.run_ht_graph(b, g))


def test_bad_inputs_name_the_argument_and_the_buffer_goes_on():
    """ht_scenarios.run_bad_inputs across nodes, the tokens per node included (written in session O; not run on a
    GPU yet)."""
    _run(4, 2, ht_scenarios.run_bad_inputs)


def test_mismatched_calls_are_refused_and_the_streams_stay_in_step():
    _run(4, 2, lambda b, g: S.run_mismatched(b, g))


def test_an_absent_remote_rank_makes_the_others_raise_within_the_deadline():
    took = []

    def body(b, g):
        t = S.run_absent_peer(b, g, absent_rank=g.size - 1)
        if t is not None:
            took.append(t)

    _run(8, 4, body, buffer_timeout_s=3)
    assert len(took) == 7 and max(took) < 3 + 5, took


@pytest.mark.parametrize("ranks_per_node", [8, 4])
def test_sixteen_ranks(ranks_per_node):
    """2 nodes of 8 (the shape of a real two-node cluster) and 4 of 4, as 16 in-process ranks on one GPU."""
    _run(16, ranks_per_node, lambda b, g: S.run_inter_case(b, g, 64, 2048, 64, 4), timeout_s=600)
