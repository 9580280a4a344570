"""The examples in examples/ run on the CPU backend: each script as a subprocess (exit code and what it printed),
the notebook through nbclient (or, without it, its code cells as one script); a broken expert makes a script exit
1; README.md's "Using it" snippet is the core of examples/ht_train_step.py. The same runs on the GPU backend are
marked gpu (they run where CuPy sees a GPU)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TIMEOUT_S = 300


def _env(backend: str = "cpu") -> dict:
    env = dict(os.environ)
    env["EPKERN_BACKEND"] = backend
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    return env


def _run(*argv: str, code: str | None = None, backend: str = "cpu") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code, *argv] if code is not None else [sys.executable, *argv]
    return subprocess.run(
        cmd, cwd=EXAMPLES, env=_env(backend), capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


BACKENDS = ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ranks", [2, 3])
def test_ht_train_step(ranks, backend):
    out = _ok(_run("ht_train_step.py", "--backend", backend, "--ranks", str(ranks), "--steps", "2", backend=backend))
    assert f"{ranks} in-process ranks, {backend} backend" in out
    for rank in range(ranks):
        for step in range(2):
            assert f"rank {rank} step {step}: received" in out
    assert out.count("combined_x, combined weights and grad_x equal numpy") == 2 * ranks
    assert f"OK: 2 HT train steps exact on {ranks} ranks ({backend} backend)" in out


def test_ht_train_step_default_runs_two_ranks():
    out = _ok(_run("ht_train_step.py", "--backend", "cpu"))
    assert "2 in-process ranks" in out and "OK: 3 HT train steps exact on 2 ranks" in out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ranks", [2, 3])
def test_ll_decode_loop(ranks, backend):
    out = _ok(_run("ll_decode_loop.py", "--backend", backend, "--ranks", str(ranks), "--steps", "3", backend=backend))
    assert f"{ranks} in-process ranks, {backend} backend" in out
    assert out.count("3 eager decode steps into the same out_* / out= arrays") == ranks
    if backend == "cpu":
        assert out.count("CUDA graph part skipped: the cpu backend has no streams to capture") == ranks
    else:
        assert out.count("CUDA graph part skipped") == 0
    assert f"OK: LL decode loop exact on {ranks} ranks ({backend} backend)" in out


# A module-level patch before main(): the examples look their helpers up at call time.
_BROKEN = {
    "ht_train_step": "orig = m.expert\nm.expert = lambda x, *a: orig(x * 2, *a)",
    "ll_decode_loop": "orig = m.expected\nm.expected = lambda x, *a: orig(x + 1, *a)",
}


@pytest.mark.parametrize("name", sorted(_BROKEN))
def test_mismatch_exits_nonzero(name):
    code = f"import sys\nimport {name} as m\n{_BROKEN[name]}\nsys.exit(m.main(sys.argv[1:]))"
    proc = _run("--backend", "cpu", "--steps", "1", code=code)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "MISMATCH: rank" in proc.stdout and "differs from numpy" in proc.stdout


def test_readme_snippet_is_the_core_of_ht_train_step():
    source = (EXAMPLES / "ht_train_step.py").read_text()
    core = source.split('# ---- core (README.md "Using it" shows this part verbatim) ----\n')[1]
    core = core.split("# ---- end of core ----")[0].rstrip() + "\n"
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Using it")[1].split("\n## ")[0]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert snippet.startswith(core), "README's Using it snippet is not examples/ht_train_step.py's core"
    # ... and it runs as it is (the lines after the core launch it on 2 in-process ranks).
    out = _ok(_run(code=snippet))
    assert "rank 1 step 2: received" in out and "grad_x equal numpy" in out


def _notebook_text(nb_cells) -> str:
    """What the code cells printed (streams) and returned (their text/plain results)."""
    outputs = [o for c in nb_cells if c["cell_type"] == "code" for o in c.get("outputs", [])]
    return "".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", "")) for o in outputs)


def _check_notebook_output(text: str, backend: str) -> None:
    assert ("CPU backend" if backend == "cpu" else "GPU backend") in text
    assert "HT: combine(dispatch(x)) exact on all" in text
    assert "LL: low_latency_combine(low_latency_dispatch(x)) exact on all" in text
    assert "ArgumentError: topk_idx:" in text


def test_notebook_is_committed_with_its_outputs():
    cells = json.loads((EXAMPLES / "in_process_ranks.ipynb").read_text())["cells"]
    code_cells = [c for c in cells if c["cell_type"] == "code"]
    assert code_cells and all(c["outputs"] for c in code_cells)
    _check_notebook_output(_notebook_text(cells), "cpu")


def test_notebook_runs_on_cpu(monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="nbformat not installed: the notebook is not executed")
    nbclient = pytest.importorskip("nbclient", reason="nbclient not installed: the notebook is not executed")
    pytest.importorskip("ipykernel", reason="ipykernel not installed: the notebook is not executed")
    for name, value in _env().items():
        monkeypatch.setenv(name, value)
    nb = nbformat.read(EXAMPLES / "in_process_ranks.ipynb", as_version=4)  # run in memory; the file keeps its outputs
    nbclient.NotebookClient(
        nb, timeout=TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}}
    ).execute()
    _check_notebook_output(_notebook_text(nb.cells), "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_notebook_code_as_a_script(backend):
    """The notebook's code cells in order as one script (what runs where nbclient is not installed)."""
    cells = json.loads((EXAMPLES / "in_process_ranks.ipynb").read_text())["cells"]
    code = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    _check_notebook_output(_ok(_run(code=code, backend=backend)), backend)
