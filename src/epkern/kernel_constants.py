"""Constants shared with the kernels, read from their one definition: ``kernels/epk_constants.cuh``.

The header is parsed once, at the first access, from :func:`epkern.kernel_files.kernel_dir`. Its form is
deliberately trivial (``constexpr int EPK_NAME = <expression>;``, expressions of integers, ``+ - * <<``,
parentheses and names defined earlier), and it is evaluated by the small parser below, never by ``eval``.

Use ``kernel_constants.get("EPK_STATE_MASK")``, ``kernel_constants.values()`` (a copy of every name and value) or
the attribute ``kernel_constants.EPK_STATE_MASK`` (also ``from epkern.kernel_constants import EPK_STATE_MASK``).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

from .errors import KernelCompileError

HEADER = "epk_constants.cuh"

_DEFINITION = re.compile(r"constexpr\s+int\s+([A-Za-z_]\w*)\s*=\s*([^;]*);")
_TOKEN = re.compile(r"\s*(?:(0[xX][0-9a-fA-F]+|\d+)|([A-Za-z_]\w*)|(<<|[-+*()]))")
_INT32 = (-(1 << 31), (1 << 31) - 1)

_values: dict[str, int] | None = None
_lock = threading.Lock()


def _tokens(expr: str, where: str) -> list[tuple[str, str | int]]:
    out: list[tuple[str, str | int]] = []
    pos = 0
    expr = expr.rstrip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None or m.end() == pos:
            raise KernelCompileError(f"{where}: cannot parse {expr[pos:]!r}")
        number, name, op = m.groups()
        if number is not None:
            if len(number) > 1 and number[0] == "0" and number[1] not in "xX":
                raise KernelCompileError(f"{where}: octal literal {number!r} (write it in decimal or hex)")
            out.append(("int", int(number, 0)))
        elif name is not None:
            out.append(("name", name))
        else:
            out.append(("op", op))
        pos = m.end()
    return out


def evaluate(expr: str, known: dict[str, int], where: str = "expression") -> int:
    """The value of ``expr`` (integers, names in ``known``, + - * <<, unary minus, parentheses; C precedence:
    << binds looser than + and -, which bind looser than *). KernelCompileError on anything else."""
    toks = _tokens(expr, where)
    pos = 0

    def peek():
        return toks[pos] if pos < len(toks) else ("end", "")

    def take(kind, value=None):
        nonlocal pos
        tok = peek()
        if tok[0] != kind or (value is not None and tok[1] != value):
            raise KernelCompileError(f"{where}: expected {value or kind} in {expr!r}, found {tok[1] or 'the end'!r}")
        pos += 1
        return tok[1]

    def shift():
        v = additive()
        while peek() == ("op", "<<"):
            take("op")
            n = additive()
            if not 0 <= n < 32:
                raise KernelCompileError(f"{where}: shift by {n} in {expr!r}")
            v <<= n
        return v

    def additive():
        v = term()
        while peek() in (("op", "+"), ("op", "-")):
            v = v + term() if take("op") == "+" else v - term()
        return v

    def term():
        v = unary()
        while peek() == ("op", "*"):
            take("op")
            v *= unary()
        return v

    def unary():
        if peek() == ("op", "-"):
            take("op")
            return -unary()
        return atom()

    def atom():
        kind, value = peek()
        if kind == "int":
            return take("int")
        if kind == "name":
            take("name")
            if value not in known:
                raise KernelCompileError(f"{where}: {value} is not defined above it")
            return known[value]
        take("op", "(")
        v = shift()
        take("op", ")")
        return v

    value = shift()
    if pos != len(toks):
        raise KernelCompileError(f"{where}: unexpected {toks[pos][1]!r} in {expr!r}")
    if not _INT32[0] <= value <= _INT32[1]:
        raise KernelCompileError(f"{where}: {expr!r} = {value} does not fit an int")
    return value


def parse(text: str, where: str = HEADER) -> dict[str, int]:
    """Every constant of a header of that form, in order. KernelCompileError on anything it does not accept."""
    body = re.sub(r"//[^\n]*", "", text)  # comments
    body = re.sub(r"^[ \t]*#pragma[ \t]+once[ \t]*$", "", body, flags=re.M)
    values: dict[str, int] = {}
    pos = 0
    for m in _DEFINITION.finditer(body):
        if body[pos : m.start()].strip():
            raise KernelCompileError(f"{where}: not a constant definition: {body[pos : m.start()].strip()[:80]!r}")
        name, expr = m.groups()
        if name in values:
            raise KernelCompileError(f"{where}: {name} defined twice")
        values[name] = evaluate(" ".join(expr.split()), values, f"{where}: {name}")
        pos = m.end()
    if body[pos:].strip():
        raise KernelCompileError(f"{where}: not a constant definition: {body[pos:].strip()[:80]!r}")
    return values


def header_path() -> Path:
    from . import kernel_files

    return kernel_files.kernel_dir() / HEADER


def _load() -> dict[str, int]:
    global _values
    if _values is None:
        with _lock:
            if _values is None:
                path = header_path()
                _values = parse(path.read_text(), str(path))
    return _values


def values() -> dict[str, int]:
    """Every constant (a copy), parsed at the first access."""
    return dict(_load())


def get(name: str) -> int:
    try:
        return _load()[name]
    except KeyError:
        raise KeyError(f"{name} is not defined in {HEADER}") from None


def __getattr__(name: str) -> int:
    if name.startswith("EPK_"):
        vals = _load()
        if name in vals:
            return vals[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
