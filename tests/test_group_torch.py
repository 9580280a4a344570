"""The torch.distributed group backend: 2 processes on gloo (skipped where torch is not installed)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "torch_group_worker.py"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")


def test_torch_group_two_processes_gloo(tmp_path):
    world = 2
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EPKERN_", "PMI", "OMPI_", "MPI_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    init_file = tmp_path / "rendezvous"
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), str(world), str(init_file)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=90)
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"rank {r} exited {p.returncode}:\n{out}"
        assert f"OK rank {r}" in out, out


def test_as_group_none_with_torchrun_env_but_no_init(monkeypatch):
    import torch.distributed as dist

    from epkern.errors import GroupError
    from epkern.group import as_group

    if dist.is_initialized():
        pytest.skip("torch.distributed already initialised in this process")
    for name in (
        "PMI_SIZE",
        "PMI_RANK",
        "PMIX_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_RANK",
        "MPI_LOCALNRANKS",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(GroupError, match="init_process_group"):
        as_group(None)
