"""Run a function on in-process ranks from the command line.

    epkern-launch -n 4 [--ranks-per-node 2] [--timeout 30] package.module:function [ARG ...]
    epkern-launch -n 4 path/to/script.py:function [ARG ...]

Calls ``function(group, *ARGS)`` (ARGS as strings) on each rank, one thread per rank (see
:func:`epkern.group.run_in_process`), and prints each rank's result that is not None. ``-n`` defaults to
``EPKERN_NUM_THREADS_RANKS``. For several processes use ``mpiexec -n N python script.py`` with
``epkern.group.as_group(None)`` instead.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="epkern-launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-n", "--ranks", type=int, default=None, help="number of in-process ranks")
    p.add_argument("--ranks-per-node", type=int, default=None, help="virtual nodes of this many ranks")
    p.add_argument("--timeout", type=float, default=None, help="deadline of each collective, seconds")
    p.add_argument("target", help="MODULE:FUNCTION or FILE.py:FUNCTION")
    p.add_argument("args", nargs=argparse.REMAINDER)
    ns = p.parse_args(argv)
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
