from pathlib import Path

import pytest

from epkern import _env
from epkern.errors import ConfigError

DOC = Path(__file__).resolve().parents[1] / "docs" / "environment.md"


def test_every_variable_documented():
    text = DOC.read_text()
    for name in _env.VARIABLES:
        assert f"`{name}`" in text, f"{name} missing from docs/environment.md"


def test_only_env_module_reads_epkern_variables():
    src = Path(__file__).resolve().parents[1] / "src" / "epkern"
    for path in src.rglob("*.py"):
        if path.name == "_env.py":
            continue
        text = path.read_text()
        assert 'os.environ.get("EPKERN_' not in text and 'getenv("EPKERN_' not in text, path


@pytest.mark.parametrize(
    "name,value,accessor",
    [
        ("EPKERN_TIMEOUT_S", "-1", _env.timeout_s),
        ("EPKERN_TIMEOUT_S", "soon", _env.timeout_s),
        ("EPKERN_RANKS_PER_NODE", "0", _env.ranks_per_node),
        ("EPKERN_BACKEND", "tpu", _env.backend),
        ("EPKERN_NVRTC_ARCH", "compute_90", _env.nvrtc_arch),
        ("EPKERN_POISON_OUTPUTS", "yes", _env.poison_outputs),
    ],
)
def test_bad_values_name_the_variable(monkeypatch, name, value, accessor):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        accessor()


def test_defaults(monkeypatch):
    for name in _env.VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert _env.timeout_s() == 30.0
    assert _env.backend() == "auto"
    assert _env.ranks_per_node() is None
    assert _env.nvrtc_arch() is None
    assert _env.poison_outputs() is False


def test_cuda_defaults_documented_and_respect_the_user(monkeypatch):
    text = DOC.read_text()
    for name, (value, _why) in _env.CUDA_DEFAULTS.items():
        assert f"`{name}` | `{value}`" in text
        monkeypatch.setenv(name, "1")
        _env.apply_cuda_defaults()
        import os

        assert os.environ[name] == "1"


@pytest.mark.parametrize("named", [True, False])
def test_connections_left_to_cuda_under_mps(monkeypatch, tmp_path, named):
    """Under MPS, CUDA_DEVICE_MAX_CONNECTIONS stays unset (32 per client exhausted the MPS server's channels
    with 8 processes on the H200); outside MPS it is set. MPS is recognised by the control daemon's socket in
    the pipe directory (CUDA_MPS_PIPE_DIRECTORY, else the default); a named directory without it is not MPS."""
    import os

    for name in _env.CUDA_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    if named:
        monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(pipe))
        monkeypatch.setattr(_env, "MPS_DEFAULT_PIPE", str(tmp_path / "absent"))
    else:
        monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
        monkeypatch.setattr(_env, "MPS_DEFAULT_PIPE", str(pipe))
    assert not _env.under_mps()  # no daemon behind the directory yet
    (pipe / "control").touch()
    assert _env.under_mps()
    _env.apply_cuda_defaults()
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ
    assert os.environ["CUDA_MODULE_LOADING"] == "EAGER"
    (pipe / "control").unlink()
    assert not _env.under_mps()
    _env.apply_cuda_defaults()
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "32"


def test_child_environment_drops_only_the_defaults_epkern_set(monkeypatch, tmp_path):
    import os

    for name in _env.CUDA_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(_env, "_applied", set())
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.setattr(_env, "MPS_DEFAULT_PIPE", str(tmp_path))  # no daemon
    monkeypatch.setenv("CUDA_MODULE_LOADING", "LAZY")  # the user's own value
    _env.apply_cuda_defaults()
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "32" and os.environ["CUDA_MODULE_LOADING"] == "LAZY"
    child = _env.child_environment(dict(os.environ))
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in child and child["CUDA_MODULE_LOADING"] == "LAZY"
    assert child["PATH"] == os.environ["PATH"]


def test_import_sets_no_cuda_variable():
    """import epkern changes nothing for the process (issue #20, finding 5): PyTorch's or CUDA's defaults stay."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in _env.CUDA_DEFAULTS}
    code = f"import os, epkern; print([n for n in {list(_env.CUDA_DEFAULTS)!r} if n in os.environ])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_in_process_ranks_set_the_cuda_defaults_before_cuda_starts(monkeypatch, tmp_path):
    import os

    from epkern import _cuda_driver
    from epkern.group import make_thread_groups

    for name in _env.CUDA_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.setattr(_env, "MPS_DEFAULT_PIPE", str(tmp_path))  # no MPS daemon
    monkeypatch.setattr(_cuda_driver, "initialised", lambda: False)
    make_thread_groups(2)
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "32" and os.environ["CUDA_MODULE_LOADING"] == "EAGER"


def test_in_process_ranks_warn_when_cuda_started_without_them(monkeypatch, tmp_path):
    import os

    from epkern import _cuda_driver
    from epkern.group import make_thread_groups

    for name in _env.CUDA_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CUDA_MODULE_LOADING", "EAGER")
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.setattr(_env, "MPS_DEFAULT_PIPE", str(tmp_path))
    monkeypatch.setattr(_cuda_driver, "initialised", lambda: True)
    with pytest.warns(RuntimeWarning, match=r"CUDA started .* without CUDA_DEVICE_MAX_CONNECTIONS \("):
        make_thread_groups(2)
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ  # too late to act: left unset, not pretended


def test_cuda_initialised_probe_without_a_driver(monkeypatch):
    import ctypes.util

    from epkern import _cuda_driver

    if ctypes.util.find_library("cuda"):
        pytest.skip("this machine has a CUDA driver")
    monkeypatch.setattr(_cuda_driver, "_lib", None)
    assert _cuda_driver.initialised() is False
