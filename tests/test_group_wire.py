"""Objects between ranks travel as plain data (issue #20, finding 5): round trips of everything the library
sends, refusal of what it must not carry, and a peer's pickle (which would run code when loaded) is refused by
every group's allgather_object without being executed."""

from __future__ import annotations

import pickle

import ml_dtypes
import numpy as np
import pytest

from epkern.errors import ArgumentError, GroupError
from epkern.group import run_in_process, wire

RAN = []


def _evil():
    RAN.append("code from a peer ran")
    return "pwned"


class _Evil:
    def __reduce__(self):
        return (_evil, ())


VALUES = [
    None,
    True,
    False,
    0,
    -(1 << 63),
    (1 << 63) - 1,
    1 << 100,
    -(1 << 90),
    1.5,
    float("inf"),
    "",
    "héllo",
    b"",
    b"\x00\xff",
    [1, [2, (3, "x")], {}],
    ("auto", True),
    {"a": 1, 2: [None], (1, 2): b"k"},
    ("host", "0000:01:00.0"),
]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_round_trip(value):
    got = wire.decode(wire.encode(value), 0)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    "dtype", [np.int64, np.int32, np.uint8, np.float32, np.bool_, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn]
)
def test_arrays_and_scalars(dtype):
    rng = np.random.default_rng()
    arr = rng.integers(0, 2, size=(3, 0, 2) if dtype is np.uint8 else (4, 5)).astype(dtype)
    got = wire.decode(wire.encode(arr), 1)
    assert got.dtype == arr.dtype and got.shape == arr.shape and np.array_equal(got.view(np.uint8), arr.view(np.uint8))
    got[...] = 0  # a writable copy
    scalar = arr.reshape(-1)[:1].reshape(())[()] if arr.size else np.zeros((), dtype)[()]
    back = wire.decode(wire.encode(scalar), 1)
    assert isinstance(back, np.generic) and back.dtype == arr.dtype


def test_non_contiguous_array():
    arr = np.arange(24, dtype=np.int64).reshape(4, 6)[:, ::2]
    assert np.array_equal(wire.decode(wire.encode(arr), 0), arr)


@pytest.mark.parametrize("value", [object(), np.array([object()]), {1, 2}, _Evil(), np.zeros(2, "i4,f4")], ids=repr)
def test_refuses_what_is_not_plain_data(value):
    with pytest.raises(ArgumentError, match="group data"):
        wire.encode(value)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"Z",
        b"i\x00",
        b"s" + (100).to_bytes(8, "little") + b"abc",
        b"l" + (10**12).to_bytes(8, "little"),
        b"N" + b"extra",
        b"a" + (1).to_bytes(8, "little") + b"O" + (0).to_bytes(8, "little") + (0).to_bytes(8, "little"),
        b"a"
        + (5).to_bytes(8, "little")
        + b"int64"
        + (1).to_bytes(8, "little")
        + (3).to_bytes(8, "little")
        + (8).to_bytes(8, "little")
        + bytes(8),
        b"d" + (1).to_bytes(8, "little") + b"l" + (0).to_bytes(8, "little") + b"N",  # a list as a dict key
        b"l" + (1).to_bytes(8, "little") * 1 + b"l" * 40,
    ],
)
def test_malformed_bytes_raise_group_error_naming_the_rank(data):
    with pytest.raises(GroupError, match="malformed group data from rank 3"):
        wire.decode(data, 3)


def _allgather_with_a_pickling_peer(group):
    try:
        return group.allgather_object("EVIL" if group.rank == 1 else "plain")
    except GroupError as exc:
        return str(exc)


def test_a_peers_pickle_is_never_loaded(monkeypatch):
    """Rank 1 sends a pickle (as a compromised or mismatched peer would) in place of plain data."""
    encode = wire.encode
    monkeypatch.setattr(wire, "encode", lambda obj: pickle.dumps(_Evil()) if obj == "EVIL" else encode(obj))
    RAN.clear()
    out = run_in_process(_allgather_with_a_pickling_peer, 2, timeout_s=30)
    assert RAN == []
    assert out[0].startswith("malformed group data from rank 1") and out[1] == out[0], out
