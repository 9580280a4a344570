"""Handing file descriptors (exported VMM allocations) to this host's peer ranks, and to no one else.

Abstract-namespace Unix sockets are visible to every local user (``/proc/net/unix`` lists their names), so a
name alone protects nothing. Each exchange therefore:

- binds a fresh random name per rank (128 bits) and closes it when the exchange ends (or fails);
- agrees a per-exchange secret over the group (a hash of every rank's 32 random bytes, sent only through the
  group's own collective);
- checks the kernel-reported credentials (``SO_PEERCRED``) on both ends before anything is sent: the other
  end must run as this process's user and, where both share a PID namespace, be the very process that the
  group announced for that rank;
- has the client prove the secret and its rank; the server hands each expected rank its descriptor once,
  drops every other connection without reading from it, and keeps serving;
- ends by a deadline, raising :class:`GroupError` that names the peer (never a raw ``OSError``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import threading
import time

from ..errors import GroupError

_ANNOUNCE = struct.Struct("<16s32sqqQQ")  # socket token, secret share, pid, uid, pid-namespace dev and inode
_HELLO = struct.Struct("<I32s")  # client's rank, the group secret
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_ACCEPT_SLICE_S = 0.05


def _pid_namespace() -> tuple[int, int]:
    try:
        st = os.stat("/proc/self/ns/pid")
        return st.st_dev, st.st_ino
    except OSError:
        return 0, 0


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected Unix socket, as the kernel reports them."""
    return _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))


class _Peer:
    def __init__(self, raw: bytes):
        token, self.share, self.pid, self.uid, dev, ino = _ANNOUNCE.unpack(raw)
        self.name = b"\0epkern-fd-" + token.hex().encode()
        self.pidns = (dev, ino)


def _credentials_problem(sock: socket.socket, peer: _Peer, me: _Peer) -> str | None:
    """Why the process at the other end of ``sock`` is not ``peer`` (None when it is)."""
    pid, uid, _ = peer_credentials(sock)
    if uid != os.geteuid() or uid != peer.uid:
        return f"pid {pid} runs as uid {uid}, not as the group's uid {peer.uid}"
    if peer.pidns == me.pidns and me.pidns != (0, 0) and pid != peer.pid:
        return f"pid {pid} is not the rank's process (pid {peer.pid})"
    return None


def share_fds(allgather_bytes, rank: int, fd: int, peers: list[int], timeout_s: float = 30.0) -> dict[int, int]:
    """Every peer's descriptor, duplicated into this process, for the ranks in ``peers`` (this host's other
    ranks), while this rank's ``fd`` goes to exactly those ranks. ``allgather_bytes(data)`` is the group's
    allgather of bytes; every rank of the group calls this (ranks with no peers too)."""
    deadline = time.monotonic() + timeout_s
    bad = [p for p in peers if isinstance(p, bool) or not isinstance(p, int) or p == rank or p < 0]
    if bad:
        raise GroupError(f"rank {rank}: peers {bad} are not other ranks of the group")
    token = os.urandom(16)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(b"\0epkern-fd-" + token.hex().encode())
        server.listen(max(8, 2 * len(peers)))
        server.settimeout(_ACCEPT_SLICE_S)
        announced = allgather_bytes(_ANNOUNCE.pack(token, os.urandom(32), os.getpid(), os.geteuid(), *_pid_namespace()))
        everyone = [_Peer(raw) for raw in announced]
        missing = [p for p in peers if p >= len(everyone)]
        if missing:
            raise GroupError(f"rank {rank}: peers {missing} are not ranks of this group of {len(everyone)}")
        secret = hashlib.sha256(b"".join(p.share for p in everyone)).digest()
        me = everyone[rank]
        serving = _Server(server, fd, secret, {r: everyone[r] for r in peers}, me, deadline)
        thread = threading.Thread(target=serving.run, name=f"epkern-fd-server-{rank}", daemon=True)
        thread.start()
        got: dict[int, int] = {}
        try:
            for peer in peers:
                got[peer] = _fetch(everyone[peer], me, rank, peer, secret, deadline)
            thread.join(max(0.0, deadline - time.monotonic()))
            serving.stop = True
            thread.join()
            if serving.unserved():
                raise GroupError(
                    f"rank {rank}: rank(s) {serving.unserved()} did not collect this rank's memory descriptor "
                    f"within {timeout_s:g} s{serving.refusals()}"
                )
        except BaseException:
            serving.stop = True
            thread.join()
            for f in got.values():
                os.close(f)
            raise
        return got
    finally:
        server.close()  # the name is gone with the socket


def _fetch(peer: _Peer, me: _Peer, rank: int, peer_rank: int, secret: bytes, deadline: float) -> int:
    """Connect to ``peer``'s socket, check that it is that rank's process, prove the secret, get its descriptor."""
    what = f"rank {rank}: receiving the memory descriptor of rank {peer_rank}"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(max(0.05, deadline - time.monotonic()))
            s.connect(peer.name)
            problem = _credentials_problem(s, peer, me)
            if problem:
                raise GroupError(f"{what}: refused, the socket's owner is not that rank ({problem})")
            s.sendall(_HELLO.pack(rank, secret))
            _, fds, _, _ = socket.recv_fds(s, 1, 1)
    except GroupError:
        raise
    except (OSError, ValueError) as exc:  # timeout, refused, reset: the peer is gone, slow or refused us
        raise GroupError(f"{what} failed: {type(exc).__name__}: {exc}") from None
    if len(fds) != 1:
        for f in fds:
            os.close(f)
        raise GroupError(f"{what}: rank {peer_rank} closed the connection without one (it refused this rank)")
    return fds[0]


class _Server:
    """Accepts connections until every expected rank has its descriptor, the deadline passes or ``stop``."""

    def __init__(self, server, fd, secret, expected: dict[int, _Peer], me: _Peer, deadline: float):
        self.server, self.fd, self.secret, self.expected, self.me = server, fd, secret, expected, me
        self.deadline = deadline
        self.served: set[int] = set()
        self.refused: list[str] = []
        self.stop = False

    def unserved(self) -> list[int]:
        return sorted(set(self.expected) - self.served)

    def refusals(self) -> str:
        if not self.refused:
            return ""
        return f"; refused {len(self.refused)} connection(s): " + "; ".join(self.refused[:4])

    def run(self) -> None:
        while not self.stop and self.unserved() and time.monotonic() < self.deadline:
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                self.refused.append(f"accept failed: {exc}")
                return
            with conn:
                try:
                    self._serve(conn)
                except (OSError, ValueError, struct.error) as exc:
                    self.refused.append(f"{type(exc).__name__}: {exc}")

    def _serve(self, conn: socket.socket) -> None:
        pid, uid, _ = peer_credentials(conn)
        if uid != os.geteuid():  # a stranger: dropped before a byte is read from it
            self.refused.append(f"pid {pid} uid {uid} (another user)")
            return
        conn.settimeout(max(0.05, min(2.0, self.deadline - time.monotonic())))
        hello = b""
        while len(hello) < _HELLO.size:
            chunk = conn.recv(_HELLO.size - len(hello))
            if not chunk:
                break
            hello += chunk
        if len(hello) != _HELLO.size:
            self.refused.append(f"pid {pid}: no hello")
            return
        rank, secret = _HELLO.unpack(hello)
        peer = self.expected.get(rank)
        if not hmac.compare_digest(secret, self.secret) or peer is None or rank in self.served:
            self.refused.append(f"pid {pid}: not an expected rank of this group")
            return
        problem = _credentials_problem(conn, peer, self.me)
        if problem:
            self.refused.append(f"claimed rank {rank}: {problem}")
            return
        socket.send_fds(conn, [b"f"], [self.fd])
        self.served.add(rank)
