"""Run a function on in-process ranks from the command line.

    epkern-launch -n 4 [--ranks-per-node 2] [--timeout 30] package.module:function [ARG ...]
    epkern-launch -n 4 path/to/script.py:function [ARG ...]

Calls ``function(group, *ARGS)`` (ARGS as strings) on each rank, one thread per rank (see
:func:`epkern.group.run_in_process`), and prints each rank's result that is not None. ``-n`` defaults to
``EPKERN_NUM_THREADS_RANKS``.

    epkern-launch --procs -n 8 [--mps] package.module:function [ARG ...]

runs the function in N processes instead (``mpiexec``; each gets ``as_group(None)``, the MPI world). With
``--mps`` the CUDA MPS daemon is started first if it is not running, so the processes share one GPU
concurrently (the way to run several ranks on a single GPU; start it before any other CUDA process).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from . import _env
from .group import run_in_process


def _load(target: str):
    where, sep, name = target.rpartition(":")
    if not sep or not where or not name:
        raise SystemExit(f"epkern-launch: expected MODULE:FUNCTION or FILE.py:FUNCTION, got {target!r}")
    if where.endswith(".py"):
        path = Path(where).resolve()
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or not path.exists():
            raise SystemExit(f"epkern-launch: no such file {where!r}")
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.parent))
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise SystemExit(f"epkern-launch: {where} has no function {name!r}")
    return fn


MPS_PIPE = "/tmp/epkern-mps-pipe"
MPS_LOG = "/tmp/epkern-mps-log"


def start_mps(env: dict) -> None:
    """Start the MPS control daemon unless one answers on the pipe directory already."""
    ctl = shutil.which("nvidia-cuda-mps-control")
    if ctl is None:
        raise SystemExit("epkern-launch: --mps needs nvidia-cuda-mps-control (NVIDIA driver tools)")
    env.setdefault("CUDA_MPS_PIPE_DIRECTORY", MPS_PIPE)
    env.setdefault("CUDA_MPS_LOG_DIRECTORY", MPS_LOG)
    for d in (env["CUDA_MPS_PIPE_DIRECTORY"], env["CUDA_MPS_LOG_DIRECTORY"]):
        os.makedirs(d, exist_ok=True)
    probe = subprocess.run([ctl], input="get_server_list\n", env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        subprocess.run([ctl, "-d"], env=env, check=True)


def mpiexec_command(num_procs: int, env: dict) -> list[str]:
    """mpiexec for MPICH (hydra) or Open MPI, forwarding the environment epkern needs. The one beside this
    interpreter first (``pip install 'epkern[mpi]'`` puts the mpich wheel's there; mpi4py then loads that MPI),
    then PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    exe = beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")
    if exe is None:
        raise SystemExit("epkern-launch: --procs needs mpiexec (pip install 'epkern[mpi]')")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    cmd = [exe, "-n", str(num_procs)]
    if "Open MPI" in version or "OpenRTE" in version:
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        for name in sorted(env):
            if name.startswith(("EPKERN_", "CUDA_", "PYTHON")):
                cmd += ["-x", name]
    return cmd


def _child(target: str, args: list[str]) -> int:
    from .group import as_group

    group = as_group(None)
    result = _load(target)(group, *args)
    if result is not None:
        print(f"rank {group.rank}: {result}", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="epkern-launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-n", "--ranks", type=int, default=None, help="number of in-process ranks")
    p.add_argument("--ranks-per-node", type=int, default=None, help="virtual nodes of this many ranks")
    p.add_argument("--timeout", type=float, default=None, help="deadline of each collective, seconds")
    p.add_argument("--procs", action="store_true", help="one process per rank under mpiexec")
    p.add_argument("--mps", action="store_true", help="with --procs: start CUDA MPS first if needed")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("target", help="MODULE:FUNCTION or FILE.py:FUNCTION")
    p.add_argument("args", nargs=argparse.REMAINDER)
    ns = p.parse_args(argv)
    if ns.child:
        return _child(ns.target, ns.args)
    if ns.procs:
        if ns.ranks is None:
            p.error("--procs needs -n/--ranks")
        env = _env.child_environment(dict(os.environ))
        if ns.mps:
            start_mps(env)
        if ns.ranks_per_node:
            env["EPKERN_RANKS_PER_NODE"] = str(ns.ranks_per_node)
        if ns.timeout:
            env["EPKERN_TIMEOUT_S"] = str(ns.timeout)
        cmd = mpiexec_command(ns.ranks, env) + [sys.executable, "-m", "epkern.launch", "--child", ns.target, *ns.args]
        return subprocess.run(cmd, env=env).returncode
    ranks = ns.ranks if ns.ranks is not None else _env.num_thread_ranks()
    if ranks is None:
        p.error("give -n/--ranks or set EPKERN_NUM_THREADS_RANKS")
    fn = _load(ns.target)
    results = run_in_process(fn, ranks, *ns.args, ranks_per_node=ns.ranks_per_node, timeout_s=ns.timeout)
    for rank, result in enumerate(results):
        if result is not None:
            print(f"rank {rank}: {result}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
