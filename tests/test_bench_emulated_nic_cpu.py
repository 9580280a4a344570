"""bench/bench_emulated_nic.py runs on the CPU (host memory): a smoke test of the script, not a measurement."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_emulated_nic  # noqa: E402


def test_the_ceiling_script_executes_every_write_exactly():
    rows = bench_emulated_nic.main(["--host", "--sizes", "16,4112", "--batch", "8"])
    assert [r["size"] for r in rows] == [16, 4112] and all(r["GBps"] > 0 and r["memory"] == "host" for r in rows)
