"""The package's shape, checked on every CI run: no import cycle between epkern's modules (imports inside
functions count too), no module much past 500 lines, every public Buffer method documented, and the environment
variables' doc generated from the code."""

from __future__ import annotations

import ast
from pathlib import Path

import epkern
from epkern import _env

SRC = Path(epkern.__file__).resolve().parent
ROOT = Path(__file__).resolve().parents[1]  # the source tree (also when epkern is an installed wheel)
MAX_LINES = 520  # "about 500": a module past this is doing more than one job


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The epkern modules ``path`` imports (absolute and relative, anywhere in the file)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("epkern")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("epkern"):
                continue
            subs = {f"{mod}.{a.name}" for a in node.names} & modules  # "from . import x": the module x
            found |= subs
            if len(subs) < len(node.names):  # names defined in mod itself
                found.add(mod)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in SRC.rglob("*.py") if "kernels" not in p.relative_to(SRC).parts[:1]}
    graph = {}
    for name, path in files.items():
        deps = {d for d in _imports(path, set(files)) if d in files and d != name}
        # importing a.b.c runs a/__init__ and a/b/__init__ first: those are edges too, but an __init__ that imports
        # nothing of its children cannot close a cycle, so the edges above suffice for epkern's light __init__s
        graph[name] = deps
    return graph


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d) :] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_modules_stay_small():
    big = {
        str(p.relative_to(SRC.parent)): n
        for p in SRC.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES and "kernels" not in p.relative_to(SRC).parts[:1]
    }
    assert not big, f"modules past {MAX_LINES} lines: {big}"


def test_environment_doc_is_generated_from_the_code():
    # about a dozen (13 since EPKERN_LL_HYBRID, which issue #17 asks for: DeepEP's switch of hybrid LL routes)
    assert len(_env.VARIABLES) <= 13
    doc = (ROOT / "docs" / "environment.md").read_text()
    assert doc == _env.markdown(), "docs/environment.md is stale: python -m epkern._env > docs/environment.md"


def test_every_public_buffer_method_has_a_docstring():
    missing = [
        name
        for name, member in vars(epkern.Buffer).items()
        if callable(member) and not name.startswith("_") and not (getattr(member, "__doc__", None) or "").strip()
    ]
    assert not missing, missing
