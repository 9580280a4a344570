"""The memory-descriptor exchange hands descriptors to the group's ranks only (issue #20, finding 1).

An intruder process watches /proc/net/unix for the exchange's socket names and connects to each as soon as it
appears, posing as rank 1, while the ranks (in-process threads; their group's allgather made slow so the sockets
listen for a while) exchange descriptors of files holding rank-specific text. With the old exchange (no
credential check, no secret) the intruder got a descriptor in every attempt. Here it must get none, and the
ranks' exchange must still succeed, whether the intruder runs as another user (root only: it drops to
uid 65534) or as the same user without the group's secret."""

from __future__ import annotations

import json
import os
import socket
import struct
import tempfile
import time

import pytest

from epkern.errors import GroupError
from epkern.group import run_in_process
from epkern.memory import fd_exchange


def _intrude(write_fd: int, seconds: float, uid: int | None) -> None:
    """The intruder's body (in a forked child; stdlib only): connect to every epkern-fd socket it sees."""
    if uid is not None:
        os.setgid(uid)
        os.setuid(uid)
    seen, stolen, failures = set(), [], []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with open("/proc/net/unix") as f:
            names = [line.split()[-1] for line in f.read().splitlines()[1:] if line.split()]
        for name in names:
            if not name.startswith("@epkern-fd-") or name in seen:
                continue
            seen.add(name)
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(2)
                    s.connect(b"\0" + name[1:].encode())
                    s.sendall(struct.pack("<I32s", 1, bytes(32)))  # "rank 1", a guessed secret
                    _, fds, _, _ = socket.recv_fds(s, 1, 1)
                    for fd in fds:
                        stolen.append(os.pread(fd, 64, 0).decode(errors="replace"))
                    if not fds:
                        failures.append("closed without a descriptor")
            except OSError as exc:
                failures.append(type(exc).__name__)
        time.sleep(0.001)
    os.write(write_fd, json.dumps({"seen": sorted(seen), "stolen": stolen, "failures": failures}).encode())


def _exchange(group):
    def slow_allgather(data):
        time.sleep(0.6)  # a slow rank: the sockets listen meanwhile
        return group.allgather_bytes(data)

    with tempfile.TemporaryFile() as f:
        f.write(f"secret of rank {group.rank}".encode())
        f.flush()
        peers = [r for r in range(group.size) if r != group.rank]
        got = fd_exchange.share_fds(slow_allgather, group.rank, f.fileno(), peers, timeout_s=10)
        texts = {r: os.pread(fd, 64, 0).decode() for r, fd in got.items()}
        for fd in got.values():
            os.close(fd)
        return texts


def _run_with_intruder(uid: int | None) -> dict:
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:  # the intruder
        try:
            os.close(read_fd)
            _intrude(write_fd, 3.0, uid)
        finally:
            os._exit(0)
    os.close(write_fd)
    try:
        time.sleep(0.2)  # the intruder is watching
        out = run_in_process(_exchange, 3, timeout_s=60)
    finally:
        with os.fdopen(read_fd, "rb") as r:
            report = json.loads(r.read() or b"{}")
        os.waitpid(child, 0)
    for rank, texts in enumerate(out):
        assert texts == {r: f"secret of rank {r}" for r in range(3) if r != rank}
    return report


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the intruder as another user")
def test_another_user_gets_no_descriptor():
    report = _run_with_intruder(uid=65534)
    assert report["seen"], "the intruder saw no exchange socket: the test proves nothing"
    assert report["stolen"] == [], report
    assert len(report["failures"]) == len(report["seen"])


def test_same_user_without_the_secret_gets_no_descriptor():
    report = _run_with_intruder(uid=None)
    assert report["seen"], "the intruder saw no exchange socket: the test proves nothing"
    assert report["stolen"] == [], report


def test_a_socket_owned_by_another_process_is_not_that_rank():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        pid, uid, _ = fd_exchange.peer_credentials(a)
        assert (pid, uid) == (os.getpid(), os.geteuid())
        ns = fd_exchange._pid_namespace()
        me = fd_exchange._Peer(fd_exchange._ANNOUNCE.pack(bytes(16), bytes(32), os.getpid(), os.geteuid(), *ns))
        impostor = fd_exchange._Peer(fd_exchange._ANNOUNCE.pack(bytes(16), bytes(32), 1, os.geteuid(), *ns))
        other_user = fd_exchange._Peer(fd_exchange._ANNOUNCE.pack(bytes(16), bytes(32), os.getpid(), 12345, *ns))
        assert fd_exchange._credentials_problem(a, me, me) is None
        assert "not the rank's process (pid 1)" in fd_exchange._credentials_problem(a, impostor, me)
        assert "not as the group's uid 12345" in fd_exchange._credentials_problem(a, other_user, me)


def test_a_peer_that_never_collects_is_named(monkeypatch):
    fetch = fd_exchange._fetch

    def rank_1_stalls(peer, me, rank, peer_rank, secret, deadline):
        if rank == 1:  # rank 1 never connects to rank 0 (its own server still serves rank 0)
            time.sleep(max(0.0, deadline - time.monotonic()))
            raise GroupError("rank 1: stalled")
        return fetch(peer, me, rank, peer_rank, secret, deadline)

    monkeypatch.setattr(fd_exchange, "_fetch", rank_1_stalls)

    def fn(group):
        with tempfile.TemporaryFile() as f:
            peers = [r for r in range(group.size) if r != group.rank]
            try:
                fd_exchange.share_fds(group.allgather_bytes, group.rank, f.fileno(), peers, timeout_s=1.5)
            except GroupError as exc:
                return str(exc)
            return "ok"

    start = time.monotonic()
    out = run_in_process(fn, 2, timeout_s=60)
    assert time.monotonic() - start < 10
    assert out[0].startswith("rank 0: rank(s) [1] did not collect this rank's memory descriptor within 1.5 s"), out
    assert out[1] == "rank 1: stalled"


def test_sockets_are_gone_after_the_exchange():
    def fn(group):
        with tempfile.TemporaryFile() as f:
            peers = [r for r in range(group.size) if r != group.rank]
            for fd in fd_exchange.share_fds(group.allgather_bytes, group.rank, f.fileno(), peers, 10).values():
                os.close(fd)

    run_in_process(fn, 3, timeout_s=60)
    with open("/proc/net/unix") as f:
        assert "@epkern-fd-" not in f.read()
