"""The byte form of what ranks exchange through ``allgather_object`` / ``broadcast_object``: plain data only.

Peers' bytes are never unpickled (a pickle runs whatever code its author chose). This codec carries ``None``,
``bool``, ``int``, ``float``, ``str``, ``bytes``, lists, tuples, dicts of these, and numpy arrays and scalars of
plain dtypes (bool, integers, floats, complex and the ``ml_dtypes`` types such as bfloat16; never ``object``).
Decoding checks every length and raises :class:`GroupError` naming the rank the bytes came from.
"""

from __future__ import annotations

import struct

import numpy as np

from ..errors import ArgumentError, GroupError

_MAX_DEPTH = 32
_LEN = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")


def encode(obj) -> bytes:
    """``obj`` as bytes; ArgumentError for a type this codec does not carry."""
    out = bytearray()
    _encode(obj, out, 0)
    return bytes(out)


def _blob(out: bytearray, data: bytes) -> None:
    out += _LEN.pack(len(data))
    out += data


def _encode(obj, out: bytearray, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise ArgumentError(f"group data nests deeper than {_MAX_DEPTH} levels")
    if obj is None:
        out += b"N"
    elif obj is True or obj is False:
        out += b"T" if obj else b"F"
    elif isinstance(obj, int) and not isinstance(obj, np.generic):
        if -(1 << 63) <= obj < (1 << 63):
            out += b"i" + _I64.pack(obj)
        else:
            out += b"I"
            _blob(out, str(int(obj)).encode())
    elif isinstance(obj, float):
        out += b"f" + _F64.pack(obj)
    elif isinstance(obj, str):
        out += b"s"
        _blob(out, obj.encode())
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        out += b"b"
        _blob(out, bytes(obj))
    elif isinstance(obj, (list, tuple)):
        out += (b"l" if isinstance(obj, list) else b"t") + _LEN.pack(len(obj))
        for item in obj:
            _encode(item, out, depth + 1)
    elif isinstance(obj, dict):
        out += b"d" + _LEN.pack(len(obj))
        for key, value in obj.items():
            _encode(key, out, depth + 1)
            _encode(value, out, depth + 1)
    elif isinstance(obj, (np.ndarray, np.generic)):
        arr = np.asarray(obj)
        if arr.dtype.hasobject or arr.dtype.fields is not None or arr.dtype.subdtype is not None:
            raise ArgumentError(f"group data: numpy dtype {arr.dtype} is not plain data")
        out += b"a" if isinstance(obj, np.ndarray) else b"g"
        _blob(out, arr.dtype.name.encode())
        out += _LEN.pack(arr.ndim)
        for n in arr.shape:
            out += _LEN.pack(n)
        _blob(out, np.ascontiguousarray(arr).tobytes())
    else:
        raise ArgumentError(
            f"group data: {type(obj).__name__} cannot be sent to peers (plain data only: None, bool, int, float, "
            "str, bytes, list, tuple, dict, numpy arrays)"
        )


def decode(data: bytes, source_rank: int):
    """The object ``encode`` made, from bytes that came from ``source_rank``; GroupError if malformed."""
    reader = _Reader(data, source_rank)
    try:
        obj = reader.value(0)
    except GroupError:
        raise
    except (struct.error, ValueError, TypeError, UnicodeDecodeError, OverflowError) as exc:
        raise reader.error(f"{type(exc).__name__}: {exc}") from None
    if reader.pos != len(data):
        raise reader.error(f"{len(data) - reader.pos} trailing bytes")
    return obj


class _Reader:
    def __init__(self, data: bytes, source_rank: int):
        self.data, self.pos, self.source = memoryview(data), 0, source_rank

    def error(self, why: str) -> GroupError:
        return GroupError(f"malformed group data from rank {self.source} at byte {self.pos}: {why}")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.error(f"needs {n} bytes, {len(self.data) - self.pos} left")
        chunk = self.data[self.pos : self.pos + n].tobytes()
        self.pos += n
        return chunk

    def length(self) -> int:
        return _LEN.unpack(self.take(_LEN.size))[0]

    def blob(self) -> bytes:
        return self.take(self.length())

    def count(self) -> int:
        n = self.length()
        if n > len(self.data) - self.pos:  # every item takes at least one byte
            raise self.error(f"a count of {n} exceeds the bytes left")
        return n

    def value(self, depth: int):
        if depth > _MAX_DEPTH:
            raise self.error(f"nests deeper than {_MAX_DEPTH} levels")
        tag = self.take(1)
        if tag == b"N":
            return None
        if tag in (b"T", b"F"):
            return tag == b"T"
        if tag == b"i":
            return _I64.unpack(self.take(8))[0]
        if tag == b"I":
            return int(self.blob().decode("ascii"))
        if tag == b"f":
            return _F64.unpack(self.take(8))[0]
        if tag == b"s":
            return self.blob().decode()
        if tag == b"b":
            return self.blob()
        if tag in (b"l", b"t"):
            items = [self.value(depth + 1) for _ in range(self.count())]
            return items if tag == b"l" else tuple(items)
        if tag == b"d":
            out = {}
            for _ in range(self.count()):
                key = self.value(depth + 1)
                out[key] = self.value(depth + 1)
            return out
        if tag in (b"a", b"g"):
            return self.array(scalar=tag == b"g")
        raise self.error(f"unknown tag {tag!r}")

    def array(self, scalar: bool):
        import ml_dtypes  # noqa: F401 - registers bfloat16 / float8 names with numpy

        name = self.blob().decode("ascii")
        dtype = np.dtype(name)
        if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
            raise self.error(f"dtype {name} is not plain data")
        ndim = self.length()
        if ndim > 64:
            raise self.error(f"{ndim} dimensions")
        shape = tuple(self.length() for _ in range(ndim))
        raw = self.blob()
        if len(raw) != int(np.prod(shape, dtype=object)) * dtype.itemsize:
            raise self.error(f"{len(raw)} bytes do not hold a {dtype} array of shape {shape}")
        arr = np.frombuffer(raw, dtype).reshape(shape).copy()
        return arr[()] if scalar else arr
