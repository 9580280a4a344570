"""The mpi4py group backend under ``mpiexec -n 4`` (the mpich wheel's hydra launcher)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.mpi

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "mpi_group_worker.py"


def _mpiexec() -> str | None:
    # Prefer the one next to this interpreter (a venv's bin/), then PATH.
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def _rank_env(**extra) -> dict:
    """The ranks' environment: this one without EPKERN_* variables, the tree's src/ first, then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPKERN_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def _run(mode: str, env_extra: dict[str, str] | None = None, mpmd_hosts: bool = False, survivors=range(4)):
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("mpiexec not found (pip install 'epkern[mpi]' puts one next to the venv's python)")
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py not installed")
    env = _rank_env(**(env_extra or {}))
    if mpmd_hosts:  # per-rank EPKERN_HOSTNAME through MPMD segments
        cmd = [mpiexec]
        for host in ("hostA", "hostB"):
            cmd += ["-n", "2", "-env", "EPKERN_HOSTNAME", host, sys.executable, str(WORKER), mode, ":"]
        cmd = cmd[:-1]
    else:
        cmd = [mpiexec, "-n", "4", sys.executable, str(WORKER), mode]
    if shutil.which("timeout"):
        cmd = ["timeout", "120", *cmd]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=150)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for r in survivors:
        assert f"OK rank {r}" in proc.stdout, out
    return proc.stdout


def test_mpi_group_one_host():
    _run("plain")


def test_mpi_group_virtual_nodes():
    _run("virtual", {"EPKERN_RANKS_PER_NODE": "2"})


def test_mpi_group_hostnames_per_rank():
    _run("hosts", mpmd_hosts=True)


def test_silent_rank_raises_on_the_others_who_carry_on():
    """A rank that stops answering: the others raise GroupError naming it within EPKERN_TIMEOUT_S + 2 s (not a
    hang), then form a group of themselves."""
    out = _run("silent", {"EPKERN_TIMEOUT_S": "3"})
    assert out.count("rank 2 did not reach barrier #") == 3, out


def test_a_rank_making_its_group_late_is_not_waited_for():
    out = _run("late", {"EPKERN_TIMEOUT_S": "2"}, survivors=(0, 1, 2))
    assert out.count("raised after") >= 3, out


@pytest.mark.parametrize("scenario", ["ht_dispatch_silent", "ht_combine_silent", "late_buffer"])
def test_fault_scenarios_on_the_cpu_backend(scenario):
    """tests/fault_injection.py (the GPU fault scenarios) on the CPU backend: a silent or late rank 3 makes the
    others raise GroupError naming it within the deadline + 2 s; every rank prints PASS."""
    mpiexec = _mpiexec()
    if mpiexec is None or importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpiexec or mpi4py not installed")
    env = _rank_env(EPKERN_TIMEOUT_S="2")
    cmd = [mpiexec, "-n", "4", sys.executable, str(ROOT / "tests" / "fault_injection.py"), scenario, "cpu"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=150)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # ranks print concurrently: lines may interleave, so find the verdicts anywhere in the output
    assert sorted(re.findall(rf"PASS {scenario} rank (\d)", proc.stdout)) == list("0123"), out
    assert "FAIL " not in proc.stdout, out


def _open_mpi_recovery():
    """Open MPI's launcher with the option that keeps a job alive when a rank dies, or None (MPICH's hydra kills
    the survivors even with -disable-auto-cleanup: src/epkern/group/mpi.py)."""
    for exe in ("mpirun.openmpi", "orterun", "mpirun"):
        path = shutil.which(exe)
        if path is None:
            continue
        version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"(?:Open MPI|OpenRTE)\D*(\d+)\.", version)
        if m:
            return [path, "--with-ft", "ulfm"] if int(m.group(1)) >= 5 else [path, "--enable-recovery"]
    return None


@pytest.mark.parametrize("scenario", ["kill_ht_dispatch", "kill_ht_combine", "kill_ll_dispatch"])
def test_killed_rank_survivors_raise_and_carry_on(scenario):
    """tests/fault_injection.py's kill scenarios on the CPU backend under Open MPI (a launcher that keeps the job
    alive): rank 3 SIGKILLed while the others are in the call; they raise GroupError naming it within the deadline
    + 2 s, destroy the Buffer, make a group of themselves and run exact HT and LL rounds."""
    launcher = _open_mpi_recovery()
    if launcher is None or importlib.util.find_spec("mpi4py") is None:
        pytest.skip("no Open MPI launcher (apt-get install openmpi-bin) or no mpi4py")
    env = _rank_env(EPKERN_TIMEOUT_S="2", MPI4PY_MPIABI="openmpi")  # the mpi4py wheel: load Open MPI's libmpi
    cmd = [*launcher, "--oversubscribe", "-n", "4"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    for name in ("PYTHONPATH", "EPKERN_TIMEOUT_S", "MPI4PY_MPIABI"):
        cmd += ["-x", name]
    cmd += [sys.executable, str(ROOT / "tests" / "fault_injection.py"), scenario, "cpu"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=150)
    out = proc.stdout + proc.stderr
    verdicts = re.findall(rf"(PASS|FAIL) {scenario} rank (\d)", proc.stdout)
    assert sorted(verdicts) == [("PASS", r) for r in "012"], out
    assert proc.stdout.count("survivors' group: exact HT and LL rounds") == 3, out


def test_mpi_group_bad_ranks_per_node_fails_on_every_rank():
    _run("bad-rpn", {"EPKERN_RANKS_PER_NODE": "3"})


def test_launch_procs_runs_a_function_per_process(tmp_path):
    import re

    # epkern-launch --procs runs the mpiexec on PATH; each rank then needs mpi4py for as_group(None).
    if shutil.which("mpiexec") is None:
        pytest.skip("mpiexec not found on PATH (pip install 'epkern[mpi]' and put the venv's bin/ on PATH)")
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py not installed (pip install 'epkern[mpi]')")
    script = tmp_path / "job.py"
    script.write_text("def main(group, word):\n    return f'{word} {group.rank}/{group.size}'\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    res = subprocess.run(
        [sys.executable, "-m", "epkern.launch", "--procs", "-n", "3", f"{script}:main", "hi"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    # ranks print concurrently: lines may interleave, so find the reports anywhere in the output
    assert sorted(re.findall(r"rank \d: hi \d/3", res.stdout)) == [f"rank {r}: hi {r}/3" for r in range(3)]
