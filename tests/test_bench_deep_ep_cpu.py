"""bench/bench_deep_ep.py runs (CPU backend, tiny sizes: a smoke test of the script, not a measurement)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_deep_ep_runs_and_both_apis_agree(tmp_path):
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch not installed")
    out = tmp_path / "b.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_deep_ep.py"), "--backend", "cpu", "--inprocess", "2",
           "--tokens-ht", "32", "--tokens-ll", "16", "--hidden", "256", "--experts", "16", "--topk", "4",
           "--iters", "2", "--warmup", "1", "--nvl-mb", "16", "--json", str(out)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    assert data["exact"] is True
    calls = {(r["api"], r["call"]) for r in data["rows"]}
    names = ("ht_dispatch", "ht_combine", "ll_dispatch", "ll_combine")
    assert calls == {(a, c) for a in ("cupy", "deep_ep") for c in names}
