"""epkern's logger: silent by default, EPKERN_LOG_LEVEL prints compiles (INFO) and cache hits (DEBUG) to stderr,
and a cached module is returned without any logging call (the per-call path)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from epkern import _env, _log, kernel_loader
from epkern.errors import ConfigError

PROBE = 'extern "C" __global__ void epk_log_probe(int* out) { out[0] = EPK_LOG_PROBE; }\n'

# Compiles a tiny kernel twice (a compile, then a disk-cache hit) to an sm_90 cubin: no GPU needed.
SCRIPT = """
import sys
import threading
import time
from pathlib import Path
from epkern import kernel_loader
source = Path(sys.argv[1])
for _ in range(2):
    kernel_loader.cubin_path(source, {"EPK_LOG_PROBE": 7}, "sm_90")
"""


def _compile_in_child(tmp_path: Path, level: str | None) -> str:
    source = tmp_path / "log_probe.cu"
    source.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "EPKERN_LOG_LEVEL"}
    env["EPKERN_CACHE_DIR"] = str(tmp_path / "cache")
    if level is not None:
        env["EPKERN_LOG_LEVEL"] = level
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(source)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    return done.stderr


def test_quiet_by_default(tmp_path):
    assert _compile_in_child(tmp_path, None) == ""
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("epkern").handlers)


def test_info_logs_the_compile_with_its_defines_and_time(tmp_path):
    err = _compile_in_child(tmp_path, "INFO")
    lines = [line for line in err.splitlines() if line]
    assert len(lines) == 1, err
    assert "INFO" in lines[0] and "compiled" in lines[0] and "log_probe.cu" in lines[0]
    assert "sm_90" in lines[0] and "EPK_LOG_PROBE=7" in lines[0] and " s (" in lines[0]


def test_debug_logs_the_disk_cache_hit(tmp_path):
    err = _compile_in_child(tmp_path, "debug")
    assert "compiled" in err and "cubin cached" in err and "cubin cache hit" in err, err


def test_in_process_records(tmp_path, monkeypatch, caplog):
    source = tmp_path / "log_probe.cu"
    source.write_text(PROBE)
    monkeypatch.setenv("EPKERN_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level(logging.DEBUG, logger="epkern"):
        kernel_loader.cubin_path(source, {"EPK_LOG_PROBE": 3}, "sm_90")
        kernel_loader.cubin_path(source, {"EPK_LOG_PROBE": 3}, "sm_90")
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "epkern"]
    assert messages[0][0] == logging.INFO and "EPK_LOG_PROBE=3" in messages[0][1]
    assert (logging.DEBUG, "cubin cache hit") in [(lvl, m[:15]) for lvl, m in messages]


def test_bad_level_names_the_variable(monkeypatch):
    monkeypatch.setenv("EPKERN_LOG_LEVEL", "loud")
    with pytest.raises(ConfigError, match="EPKERN_LOG_LEVEL"):
        _env.log_level()
    monkeypatch.setattr(_log, "_configured", False)
    with pytest.raises(ConfigError, match="EPKERN_LOG_LEVEL"):
        _log.get_logger()


def test_level_attaches_one_stderr_handler(monkeypatch):
    logger = logging.getLogger("epkern")
    monkeypatch.setattr(_log, "_configured", False)
    monkeypatch.setattr(logger, "handlers", list(logger.handlers))
    monkeypatch.setattr(logger, "level", logger.level)
    monkeypatch.setenv("EPKERN_LOG_LEVEL", "WARNING")
    for _ in range(3):
        assert _log.get_logger() is logger
    streams = [h for h in logger.handlers if type(h) is logging.StreamHandler]
    assert len(streams) == 1 and streams[0].level == logging.WARNING and logger.level == logging.WARNING


def test_cached_module_path_makes_no_logging_call(monkeypatch):
    """The per-call path (a module already loaded) neither configures nor calls the logger."""
    import cupy

    class NoLogging:
        def get_logger(self):
            raise AssertionError("a logging call on the cached-module path")

    class Device:
        id = 0

    module = object()
    monkeypatch.setattr(cupy.cuda, "Device", lambda *a: Device())
    monkeypatch.setitem(kernel_loader._modules, (0, "layout.cu", (("EPK_X", 1),)), module)
    monkeypatch.setattr(kernel_loader, "_log", NoLogging())
    assert kernel_loader.get_module("layout.cu", {"EPK_X": 1}) is module


def test_one_process_compiles_and_the_others_load_its_cubin(tmp_path):
    """Four processes ask for the same cubin at once with an empty cache: one compiles, three wait on its lock
    and load the result (so on a node, one rank compiles)."""
    source = tmp_path / "log_probe.cu"
    source.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "EPKERN_LOG_LEVEL"}
    env.update(EPKERN_CACHE_DIR=str(tmp_path / "cache"), EPKERN_LOG_LEVEL="INFO")
    script = (
        "import sys, time; from pathlib import Path; from epkern import kernel_loader\n"
        "Path(sys.argv[2]).touch()\n"
        "while not Path(sys.argv[3]).exists(): time.sleep(0.005)\n"
        "kernel_loader.cubin_path(Path(sys.argv[1]), {'EPK_LOG_PROBE': 5}, 'sm_90')\n"
    )
    go = tmp_path / "go"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(source), str(tmp_path / f"ready{i}"), str(go)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(4)) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    errs = [child.communicate(timeout=120)[1] for child in children]
    assert all(child.returncode == 0 for child in children), errs
    text = "".join(errs)
    assert text.count("compiled log_probe") + text.count(f"compiled {source}") == 1, text
    assert len(list((tmp_path / "cache" / "cubin").glob("*.cubin"))) == 1


def test_compile_lock_serialises_compiles_of_one_cubin(tmp_path, monkeypatch):
    """Deterministic form of the above: threads (each with its own lock file handle) and a slow compiler."""
    source = tmp_path / "log_probe.cu"
    source.write_text(PROBE)
    monkeypatch.setenv("EPKERN_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def slow_compile(*args):
        calls.append(args)
        time.sleep(0.3)
        return b"cubin"

    monkeypatch.setattr(kernel_loader, "compile_cubin", slow_compile)
    paths = []
    threads = [
        threading.Thread(target=lambda: paths.append(kernel_loader.cubin_path(source, {"EPK_LOG_PROBE": 1}, "sm_90")))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(calls) == 1 and len(set(paths)) == 1 and len(paths) == 4
    assert paths[0].read_bytes() == b"cubin"
