"""allgather_bytes for n threads of one process, one callable per rank (the NIC tests' stand-in for a group)."""

from __future__ import annotations

import threading


def threaded_allgathers(n: int, timeout_s: float = 10.0):
    slots: list = [None] * n
    barrier = threading.Barrier(n, timeout=timeout_s)

    def make(rank):
        def allgather(data: bytes) -> list[bytes]:
            slots[rank] = bytes(data)
            barrier.wait()
            out = list(slots)
            barrier.wait()
            return out

        return allgather

    return [make(r) for r in range(n)]
