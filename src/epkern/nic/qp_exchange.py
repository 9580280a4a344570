"""Connecting QPs across ranks: the table of :class:`~epkern._verbs_cffi.PeerInfo` (``table[peer][i]``: this
rank's QP ``i`` towards ``peer``) encoded as one byte string, allgathered, decoded and checked for matching
pairs."""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

from .. import _verbs_cffi as V
from .observation import NicError

_PRESENT = struct.Struct("<B")
_REC = 1 + V.PeerInfo.size()


def encode_peer_table(table: Sequence[Sequence[V.PeerInfo | None]]) -> bytes:
    """``table[peer][i]``: this rank's QP ``i`` towards ``peer`` (None: no QP). One byte string to allgather."""
    k = max((len(row) for row in table), default=0)
    out = bytearray()
    for row in table:
        for i in range(k):
            info = row[i] if i < len(row) else None
            out += (
                (_PRESENT.pack(0) + bytes(V.PeerInfo.size())) if info is None else (_PRESENT.pack(1) + info.to_bytes())
            )
    return struct.pack("<II", len(table), k) + bytes(out)


def decode_peer_table(data: bytes) -> list[list[V.PeerInfo | None]]:
    data = bytes(data)
    n, k = struct.unpack_from("<II", data, 0)
    if len(data) != 8 + n * k * _REC:
        raise NicError(f"peer table of {len(data)} bytes does not hold {n} x {k} records")
    rows = []
    for p in range(n):
        row = []
        for i in range(k):
            off = 8 + (p * k + i) * _REC
            present = data[off]
            row.append(V.PeerInfo.from_bytes(data[off + 1 : off + _REC]) if present else None)
        rows.append(row)
    return rows


def exchange_peer_info(
    allgather_bytes: Callable[[bytes], list[bytes]], rank: int, table: Sequence[Sequence[V.PeerInfo | None]]
) -> list[list[V.PeerInfo | None]]:
    """Allgather every rank's table; returns ``remote[peer][i]``: the info of ``peer``'s QP ``i`` towards ``rank``
    (what this rank's QP ``i`` towards ``peer`` connects to). Checks that QPs come in matching pairs."""
    blobs = allgather_bytes(encode_peer_table(table))
    remote: list[list[V.PeerInfo | None]] = []
    for p, blob in enumerate(blobs):
        theirs = decode_peer_table(blob)
        if len(theirs) != len(blobs):
            raise NicError(f"rank {p} sent a peer table for {len(theirs)} ranks, the group has {len(blobs)}")
        row = theirs[rank]
        mine = table[p] if p < len(table) else []
        for i in range(max(len(row), len(mine))):
            a = mine[i] if i < len(mine) else None
            b = row[i] if i < len(row) else None
            if (a is None) != (b is None):
                raise NicError(f"rank {rank} qp {i} towards rank {p}: only one side has a QP")
        remote.append(row)
    return remote
