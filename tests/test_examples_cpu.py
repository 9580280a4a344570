"""The examples in examples/ run on the CPU backend: each script as a subprocess (exit code and what it printed),
the notebook through nbclient; a broken expert makes a script exit 1; README.md's "Using it" snippet is the core
of examples/ht_train_step.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TIMEOUT_S = 300


def _env() -> dict:
    env = dict(os.environ)
    env["EPKERN_BACKEND"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    return env


def _run(*argv: str, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code, *argv] if code is not None else [sys.executable, *argv]
    return subprocess.run(cmd, cwd=EXAMPLES, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


@pytest.mark.parametrize("ranks", [2, 3])
def test_ht_train_step(ranks):
    out = _ok(_run("ht_train_step.py", "--backend", "cpu", "--ranks", str(ranks), "--steps", "2"))
    assert f"{ranks} in-process ranks, cpu backend" in out
    for rank in range(ranks):
        for step in range(2):
            assert f"rank {rank} step {step}: received" in out
    assert out.count("combined_x, combined weights and grad_x equal numpy") == 2 * ranks
    assert f"OK: 2 HT train steps exact on {ranks} ranks (cpu backend)" in out


def test_ht_train_step_default_runs_two_ranks():
    out = _ok(_run("ht_train_step.py", "--backend", "cpu"))
    assert "2 in-process ranks" in out and "OK: 3 HT train steps exact on 2 ranks" in out


@pytest.mark.parametrize("ranks", [2, 3])
def test_ll_decode_loop(ranks):
    out = _ok(_run("ll_decode_loop.py", "--backend", "cpu", "--ranks", str(ranks), "--steps", "3"))
    assert f"{ranks} in-process ranks, cpu backend" in out
    assert out.count("3 eager decode steps into the same out_* / out= arrays") == ranks
    assert out.count("CUDA graph part skipped: the cpu backend has no streams to capture") == ranks
    assert f"OK: LL decode loop exact on {ranks} ranks (cpu backend)" in out


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


def test_notebook_runs_on_cpu(monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="nbformat not installed: the notebook is not executed")
    nbclient = pytest.importorskip("nbclient", reason="nbclient not installed: the notebook is not executed")
    pytest.importorskip("ipykernel", reason="ipykernel not installed: the notebook is not executed")
    path = EXAMPLES / "in_process_ranks.ipynb"
    saved = nbformat.read(path, as_version=4)
    code_cells = [c for c in saved.cells if c.cell_type == "code"]
    assert all(c.outputs for c in code_cells), "the notebook is committed with its outputs"
    for name, value in _env().items():
        monkeypatch.setenv(name, value)
    nb = nbformat.read(path, as_version=4)  # executed in memory; the file keeps its saved outputs
    nbclient.NotebookClient(
        nb, timeout=TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}}
    ).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "CPU backend" in text
    assert "HT: combine(dispatch(x)) exact on all 2 ranks" in text
    assert "LL: low_latency_combine(low_latency_dispatch(x)) exact on all 2 ranks" in text
    assert "ArgumentError: topk_idx:" in text
