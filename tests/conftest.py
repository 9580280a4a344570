import os

import pytest

# Outputs are filled with 0xFF before every kernel, so a row a kernel misses fails the exact comparison
# (subprocesses inherit it; tests/ht_mpi_worker.py sets it too, for mpiexec launchers that drop it).
os.environ.setdefault("EPKERN_POISON_OUTPUTS", "1")

from epkern import _cuda


def pytest_collection_modifyitems(config, items):
    if _cuda.gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    """Name the threads still alive when the session ends (after a GPU file, session P saw 72 x "Error in
    sys.excepthook" at interpreter exit: daemon threads raising during finalisation)."""
    import sys
    import threading

    alive = sorted(t.name for t in threading.enumerate() if t is not threading.main_thread())
    if alive:
        print(f"\nconftest: {len(alive)} threads alive at the session's end: {', '.join(alive[:40])}", file=sys.stderr)
