"""Group logic on in-process ranks (threads), node identity, as_group, and failure/deadline behaviour."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import epkern.group.threads as threads_mod
from epkern.errors import ArgumentError, ConfigError, GroupError
from epkern.group import (
    Group,
    SingleGroup,
    ThreadGroup,
    as_group,
    make_thread_groups,
    node_map,
    run_in_process,
    wire,
)
from epkern.group.base import gpu_count
from epkern.group.nodes import node_map_from_entries

ROOT = Path(__file__).resolve().parents[1]
MPI_VARS = (
    "PMI_SIZE",
    "PMI_RANK",
    "PMIX_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_RANK",
    "MPI_LOCALNRANKS",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("EPKERN_RANKS_PER_NODE", "EPKERN_HOSTNAME", "EPKERN_TIMEOUT_S", *MPI_VARS):
        monkeypatch.delenv(name, raising=False)


def _identity(group):
    return (
        group.rank,
        group.size,
        group.node,
        group.local_rank,
        group.num_nodes,
        group.local_size,
        group.node_of_rank,
        group.local_rank_of_rank,
    )


# ---- node identity ----
def test_one_host_is_one_node():
    out = run_in_process(_identity, 4)
    for r, (rank, size, node, local, num_nodes, local_size, nodes, locals_) in enumerate(out):
        assert (rank, size, node, local, num_nodes, local_size) == (r, 4, 0, r, 1, 4)
        assert nodes == (0, 0, 0, 0) and locals_ == (0, 1, 2, 3)


def test_ranks_per_node_argument():
    out = run_in_process(_identity, 8, ranks_per_node=2)
    for r, (rank, size, node, local, num_nodes, local_size, nodes, locals_) in enumerate(out):
        assert (rank, size, node, local, num_nodes, local_size) == (r, 8, r // 2, r % 2, 4, 2)
        assert nodes == (0, 0, 1, 1, 2, 2, 3, 3)
        assert locals_ == (0, 1, 0, 1, 0, 1, 0, 1)
    g = make_thread_groups(8, ranks_per_node=2)[5]
    assert g.ranks_on_node(2) == (4, 5) and g.ranks_on_node(0) == (0, 1)
    with pytest.raises(ArgumentError, match="node"):
        g.ranks_on_node(4)


def test_ranks_per_node_env_and_argument_precedence(monkeypatch):
    monkeypatch.setenv("EPKERN_RANKS_PER_NODE", "4")
    assert make_thread_groups(8)[0].node_of_rank == (0, 0, 0, 0, 1, 1, 1, 1)
    assert make_thread_groups(8, ranks_per_node=1)[0].node_of_rank == tuple(range(8))


def test_hostname_override(monkeypatch):
    monkeypatch.setenv("EPKERN_HOSTNAME", "node-x")
    g = make_thread_groups(2)[1]
    assert g.hostnames == ("node-x", "node-x") and g.num_nodes == 1


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_invalid_ranks_per_node_env(monkeypatch, value):
    monkeypatch.setenv("EPKERN_RANKS_PER_NODE", value)
    with pytest.raises(ConfigError, match="EPKERN_RANKS_PER_NODE"):
        make_thread_groups(4)


def test_ranks_per_node_env_must_divide_size(monkeypatch):
    monkeypatch.setenv("EPKERN_RANKS_PER_NODE", "3")
    with pytest.raises(ConfigError, match=r"EPKERN_RANKS_PER_NODE=3.*size 8"):
        make_thread_groups(8)
    with pytest.raises(ConfigError, match="EPKERN_RANKS_PER_NODE"):
        run_in_process(_identity, 4)


@pytest.mark.parametrize("value", [0, -1, 2.0, "2", True])
def test_invalid_ranks_per_node_argument(value):
    with pytest.raises(ArgumentError, match="ranks_per_node"):
        make_thread_groups(4, ranks_per_node=value)


def test_ranks_per_node_argument_must_divide_size():
    with pytest.raises(ArgumentError, match=r"ranks_per_node=3.*size 4"):
        run_in_process(_identity, 4, ranks_per_node=3)


def test_node_map_by_hostname():
    m = node_map(["b", "a", "b", "c", "a"])
    assert m.node_of_rank == (0, 1, 0, 2, 1)
    assert m.local_rank_of_rank == (0, 0, 1, 0, 1)
    v = node_map(["h"] * 4, 2)
    assert v.node_of_rank == (0, 0, 1, 1) and v.host_local_rank_of_rank == (0, 1, 2, 3)


def test_node_map_from_entries_is_the_same_error_everywhere():
    assert node_map_from_entries([("a", None, None), ("b", None, None)]).node_of_rank == (0, 1)
    with pytest.raises(ConfigError, match="differs between ranks"):
        node_map_from_entries([("a", 2, None), ("a", None, None)])
    with pytest.raises(ConfigError, match="rank 1: EPKERN_RANKS_PER_NODE='x'"):
        node_map_from_entries([("a", None, None), ("a", None, "EPKERN_RANKS_PER_NODE='x': expected")])


# ---- collectives ----
def _collectives(group, rounds):
    rng = np.random.default_rng(group.rank)
    seen = []
    for step in range(rounds):
        size = int(rng.integers(0, 3)) * int(rng.integers(0, 5000))  # some empty
        mine = np.random.default_rng(1000 * step + group.rank).bytes(size)
        got = group.allgather_bytes(mine)
        seen.append(got)
        obj = {"rank": group.rank, "step": step, "arr": np.arange(group.rank + step)}
        objs = group.allgather_object(obj)
        assert [o["rank"] for o in objs] == list(range(group.size))
        assert all(np.array_equal(o["arr"], np.arange(i + step)) for i, o in enumerate(objs))
        root = step % group.size
        mine = ("payload", root, step) if group.rank == root else None
        assert group.broadcast_object(mine, root) == ("payload", root, step)
        group.barrier()
    return seen


@pytest.mark.parametrize("num_ranks", [1, 2, 5, 8])
def test_collectives_random_payloads(num_ranks):
    rounds = 20
    out = run_in_process(_collectives, num_ranks, rounds)
    assert len(out) == num_ranks
    for step in range(rounds):
        want = []
        for r in range(num_ranks):
            rng = np.random.default_rng(r)
            for _ in range(step + 1):
                size = int(rng.integers(0, 3)) * int(rng.integers(0, 5000))
            want.append(np.random.default_rng(1000 * step + r).bytes(size))
        for r in range(num_ranks):
            assert out[r][step] == want


def test_allgather_bytes_accepts_bytes_like_and_rejects_others():
    def fn(group):
        got = group.allgather_bytes(bytearray(b"ab") if group.rank else memoryview(b""))
        with pytest.raises(ArgumentError, match="data"):
            group.allgather_bytes("text")
        return got

    assert run_in_process(fn, 2) == [[b"", b"ab"]] * 2


def test_broadcast_bad_root():
    def fn(group):
        with pytest.raises(ArgumentError, match="root"):
            group.broadcast_object(1, root=group.size)
        return True

    assert run_in_process(fn, 3) == [True] * 3


def test_exchange_object_shares_the_objects_themselves():
    shared = [object() for _ in range(4)]

    def fn(group):
        got = group.exchange_object(shared[group.rank])
        assert all(a is b for a, b in zip(got, shared, strict=True))
        copies = group.allgather_object([group.rank])
        return got, copies

    out = run_in_process(fn, 4)
    assert out[0][0][2] is shared[2]
    assert out[0][1] == out[1][1] == [[0], [1], [2], [3]]
    assert out[0][1][0] is not out[1][1][0]  # allgather_object gives copies


def test_results_in_rank_order_and_kwargs():
    def fn(group, scale, *, offset):
        time.sleep(0.02 * (group.size - group.rank))  # later ranks finish first
        return group.rank * scale + offset

    assert run_in_process(fn, 5, 10, offset=1) == [1, 11, 21, 31, 41]


def test_group_properties():
    g = make_thread_groups(3, timeout_s=2.5)[1]
    assert isinstance(g, ThreadGroup) and isinstance(g, Group)
    assert g.kind == "threads" and g.is_in_process and g.timeout_s == 2.5
    assert "ThreadGroup(rank=1, size=3" in repr(g)


def test_timeout_default_from_env(monkeypatch):
    monkeypatch.setenv("EPKERN_TIMEOUT_S", "0.75")
    assert make_thread_groups(2)[0].timeout_s == 0.75


def test_devices(monkeypatch):
    ndev = gpu_count()
    groups = make_thread_groups(4)
    assert [g.device for g in groups] == [r % ndev if ndev else None for r in range(4)]
    monkeypatch.setattr(threads_mod, "gpu_count", lambda: 2)
    assert [g.device for g in make_thread_groups(5)] == [0, 1, 0, 1, 0]
    assert [g.device for g in make_thread_groups(3, devices=[1])] == [1, 1, 1]
    with pytest.raises(ArgumentError, match="devices"):
        make_thread_groups(2, devices=[2])
    with pytest.raises(ArgumentError, match="devices"):
        make_thread_groups(2, devices=[])


@pytest.mark.skipif(gpu_count() > 0, reason="checks the no-GPU error")
def test_devices_without_gpu():
    with pytest.raises(ArgumentError, match="no CUDA GPU"):
        run_in_process(_identity, 2, devices=[0])


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"num_ranks": 0}, "num_ranks"),
        ({"num_ranks": 2.0}, "num_ranks"),
        ({"num_ranks": 2, "timeout_s": 0}, "timeout_s"),
        ({"num_ranks": 2, "timeout_s": "1"}, "timeout_s"),
    ],
)
def test_launcher_argument_errors(kwargs, name):
    with pytest.raises(ArgumentError, match=name):
        run_in_process(_identity, **kwargs)


def test_fn_must_be_callable():
    with pytest.raises(ArgumentError, match="fn"):
        run_in_process(42, 2)


# ---- failures and deadlines ----
def _record_group_errors(store):
    def fn(group):
        if group.rank == 2:
            time.sleep(0.05)
            raise ValueError("rank two broke")
        try:
            group.barrier()
            group.allgather_bytes(b"x")
        except GroupError as exc:
            store[group.rank] = exc
            raise

    return fn


def test_failing_rank_reraised_and_others_get_group_error_promptly():
    errors = {}
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="rank two broke") as info:
        run_in_process(_record_group_errors(errors), 4, timeout_s=60)
    assert time.monotonic() - t0 < 5
    assert any("rank 2 of 4" in note for note in info.value.__notes__)
    assert sorted(errors) == [0, 1, 3]
    for exc in errors.values():
        assert "rank 2 raised ValueError: rank two broke" in str(exc) and "barrier #1" in str(exc)


def test_every_rank_failing_alike_is_reported_once():
    def fn(group):
        raise KeyError("same") if group.rank else KeyError("first")

    with pytest.raises(KeyError) as info:
        run_in_process(fn, 3)
    note = info.value.__notes__[-1]
    assert "raised on rank" in note and ("ranks 1, 2 raised KeyError: 'same'" in note or "raised the same" in note)


def test_rank_that_never_arrives_times_out():
    release = threading.Event()
    errors = {}

    def fn(group):
        if group.rank == 1:
            release.wait(30)  # stuck outside any collective
            return None
        try:
            group.barrier()
        except GroupError as exc:
            errors[group.rank] = exc
            raise

    t0 = time.monotonic()
    try:
        with pytest.raises(GroupError, match=r"rank 1 did not reach barrier #1 within 0.5 s") as info:
            run_in_process(fn, 3, timeout_s=0.5)
        elapsed = time.monotonic() - t0
    finally:
        release.set()
    assert elapsed < 4, elapsed  # deadline + the launcher's grace period, not 30 s
    assert any("abandoned" in note and "rank 1" in note for note in info.value.__notes__)
    assert sorted(errors) == [0, 2]


def test_rank_returning_early_fails_waiters_at_once():
    def fn(group):
        group.barrier()
        if group.rank == 3:
            return "done"
        group.allgather_object(group.rank)

    t0 = time.monotonic()
    with pytest.raises(GroupError, match=r"rank 3 returned without reaching allgather_object #2"):
        run_in_process(fn, 4, timeout_s=60)
    assert time.monotonic() - t0 < 5


def test_mismatched_collectives():
    def fn(group):
        if group.rank == 0:
            group.barrier()
        else:
            group.allgather_bytes(b"")

    with pytest.raises(GroupError, match=r"different collectives at step #1.*rank 0: barrier"):
        run_in_process(fn, 3, timeout_s=60)


def test_abort_from_a_rank():
    def fn(group):
        if group.rank == 0:
            group.abort("watchdog fired")
            return
        group.barrier()

    with pytest.raises(GroupError, match="watchdog fired"):
        run_in_process(fn, 3, timeout_s=60)


def test_collectives_after_failure_raise_immediately():
    groups = make_thread_groups(2, timeout_s=0.2)
    with pytest.raises(GroupError, match="rank 1 did not reach barrier #1 within 0.2 s"):
        groups[0].barrier()
    t0 = time.monotonic()
    with pytest.raises(GroupError, match="abandoned"):
        groups[1].barrier()
    assert time.monotonic() - t0 < 0.1


def test_make_thread_groups_with_own_threads():
    groups = make_thread_groups(3)
    out = [None] * 3

    def body(g):
        out[g.rank] = g.allgather_object(g.rank * 2)

    ts = [threading.Thread(target=body, args=(g,)) for g in groups]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    assert out == [[0, 2, 4]] * 3


# ---- as_group ----
def test_as_group_none_without_mpiexec_is_single():
    g = as_group(None)
    assert isinstance(g, SingleGroup) and g.size == 1 and g.rank == 0
    assert g.node_of_rank == (0,) and g.local_rank_of_rank == (0,) and g.num_nodes == 1 and g.local_size == 1
    assert g.allgather_bytes(b"ab") == [b"ab"] and g.allgather_object([1]) == [[1]]
    assert g.broadcast_object("x") == "x" and g.barrier() is None
    o = object()
    assert g.exchange_object(o)[0] is o
    assert g.device == (0 if gpu_count() else None)


def test_as_group_passes_groups_through():
    g = make_thread_groups(2)[0]
    assert as_group(g) is g


@pytest.mark.parametrize("bad", [object(), "world", 3, [0, 1]])
def test_as_group_rejects_other_things(bad):
    with pytest.raises(ArgumentError, match="group"):
        as_group(bad)


def test_base_class_defaults():
    class Two(Group):
        kind = "fake"

        def __init__(self, rank, box):
            self._rank, self._box = rank, box
            self._nodes = node_map(["h", "h"])

        rank = property(lambda self: self._rank)
        size = property(lambda self: 2)
        device = property(lambda self: None)

        def allgather_bytes(self, data):
            self._box[self._rank] = data
            return list(self._box)

        def barrier(self):
            pass

    box = [wire.encode("root says hi"), b""]
    g = Two(1, box)
    assert g.broadcast_object("ignored", root=0) == "root says hi"
    box[0] = pickle.dumps("root says hi")  # a peer's pickle is refused, never loaded
    with pytest.raises(GroupError, match="malformed group data from rank 0"):
        g.broadcast_object("ignored", root=0)
    with pytest.raises(GroupError, match="in-process"):
        g.exchange_object(1)


def test_import_is_light():
    code = (
        "import sys, epkern.group\n"
        "bad = [m for m in ('mpi4py', 'torch', 'cupy') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


# ---- the epkern-launch CLI ----
def test_launch_cli(tmp_path, capsys, monkeypatch):
    from epkern import launch

    script = tmp_path / "job.py"
    script.write_text("def main(group, word):\n    return f'{word} {group.rank}/{group.size} node {group.node}'\n")
    assert launch.main(["-n", "4", "--ranks-per-node", "2", f"{script}:main", "hi"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"rank {r}: hi {r}/4 node {r // 2}" for r in range(4)]
    monkeypatch.setenv("EPKERN_NUM_THREADS_RANKS", "2")
    assert launch.main([f"{script}:main", "yo"]) == 0
    assert capsys.readouterr().out.splitlines() == ["rank 0: yo 0/2 node 0", "rank 1: yo 1/2 node 0"]
    with pytest.raises(SystemExit, match="no function"):
        launch.main([f"{script}:nope"])
    with pytest.raises(SystemExit, match="MODULE:FUNCTION"):
        launch.main(["justaname"])


def test_cached_rank_streams_are_dropped_at_exit():
    """At interpreter exit the per-process rank streams are dropped by an atexit handler, before the modules are
    torn down (left to teardown, CuPy's stream destructors failed there: "Error in sys.excepthook" at the end of
    in-process GPU test files); the pools stay (freeing memory waits for the device). In a child process: it runs
    every exit handler."""
    code = (
        "import atexit, epkern.group.threads as t\n"
        "t._streams[(0, 0, 'comm')] = object(); t._pools[(0, 0)] = object()\n"
        "atexit._run_exitfuncs()\n"
        "print('left', len(t._streams), len(t._pools))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "left 0 1" in out.stdout
