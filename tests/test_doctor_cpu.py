"""epkern doctor on a machine without a GPU (or with one): every section present, the smoke test passes on the
backend there is, and a missing CuPy, a missing rdma-core, a failing section or a stuck smoke test each become
a line of the report instead of an exception."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import types

import pytest

from epkern import _cuda, cli, doctor, doctor_smoke, kernel_loader
from epkern._verbs_cffi import _library
from epkern.errors import KernelCompileError

SECTIONS = ["versions", "gpus", "mps", "rdma", "kernel_cache", "environment", "smoke"]
BACKEND = "gpu" if _cuda.gpu_available() else "cpu"


def test_text_report_and_exit_code():
    done = subprocess.run(
        [sys.executable, "-m", "epkern.doctor"], capture_output=True, text=True, timeout=300, env=_clean_env()
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for section in SECTIONS:
        assert f"[{section}]" in done.stdout
    assert "backend:" in done.stdout and BACKEND in done.stdout
    assert "passed:" in done.stdout and "True" in done.stdout
    assert done.stderr == ""


def test_json_report(capsys):
    assert cli.main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report) == SECTIONS
    smoke = report["smoke"]
    assert smoke["passed"] is True and smoke["backend"] == BACKEND and smoke["ranks"] == 2
    assert smoke["ht_dispatch_combine"] == "ok" and smoke["ll_dispatch_combine"] == "ok"
    assert report["versions"]["epkern"] and report["versions"]["numpy"]
    assert isinstance(report["gpus"]["count"], int)
    assert "path" in report["kernel_cache"] and "under_mps" in report["mps"]
    assert "available" in report["rdma"] and report["rdma"]["detail"]


def test_no_smoke_exits_1(capsys):
    assert doctor.main(["--no-smoke"]) == 1
    assert "skipped" in capsys.readouterr().out


def test_without_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    monkeypatch.setitem(sys.modules, "cupy_backends", None)
    monkeypatch.setattr(_cuda, "_probe", lambda: (0, "CuPy cannot be imported (test)"))

    def no_nvrtc():
        raise KernelCompileError("cannot import CuPy's NVRTC bindings: test")

    monkeypatch.setattr(kernel_loader, "_nvrtc", no_nvrtc)
    report = doctor.collect(timeout_s=60)
    assert report["versions"]["cupy"].startswith("not importable")
    assert "NVRTC" in report["versions"]["nvrtc"]
    assert report["gpus"]["count"] == 0 and "CuPy cannot be imported" in report["gpus"]["why"]
    assert report["smoke"]["passed"] is True and report["smoke"]["backend"] == "cpu"


def test_without_rdma_core(monkeypatch):
    monkeypatch.setattr(_library, "LIBIBVERBS", "libibverbs-not-installed.so.1")
    monkeypatch.setattr(_library, "_libs", {})
    rdma = doctor.rdma()
    assert rdma["available"] is False and "could not be loaded" in rdma["detail"], rdma


def test_rdma_devices_and_ports(monkeypatch):
    import epkern._verbs_cffi as verbs

    class Ctx:
        is_mlx5 = True

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(verbs, "rdma_available", lambda: (True, "1 RDMA device(s): mlx5_0"))
    monkeypatch.setattr(verbs, "device_list", lambda: ["mlx5_0"])
    monkeypatch.setattr(verbs, "open_device", lambda name: Ctx())
    monkeypatch.setattr(verbs, "query_port", lambda ctx, port: types.SimpleNamespace(state=4, link_layer=1))
    assert doctor.rdma()["devices"] == {"mlx5_0": "port 1 ACTIVE, InfiniBand, mlx5 yes"}


def test_a_failing_section_is_its_own_error(monkeypatch):
    def broken():
        raise RuntimeError("boom")

    monkeypatch.setitem(doctor.SECTIONS, "rdma", broken)
    report = doctor.collect(run_smoke=False)
    assert report["rdma"] == {"error": "RuntimeError: boom"}
    assert "epkern" in report["versions"]
    assert "error: RuntimeError: boom" in doctor.format_text(report)


def test_stuck_smoke_test_times_out(monkeypatch):
    monkeypatch.setattr(doctor_smoke, "run", lambda backend, timeout_s: time.sleep(3))
    start = time.monotonic()
    smoke = doctor.smoke(timeout_s=0.2)
    assert time.monotonic() - start < 2
    assert smoke["passed"] is False and smoke["timed_out"] is True


def test_wrong_result_fails_the_smoke_test(monkeypatch, capsys):
    real = doctor_smoke.Buffer.low_latency_combine

    def off_by_one(self, *args, **kwargs):  # a backend that gets one value wrong
        out, event, hook = real(self, *args, **kwargs)
        out = out.copy()
        out[0, 0] += 1
        return out, event, hook

    monkeypatch.setattr(doctor_smoke.Buffer, "low_latency_combine", off_by_one)
    assert doctor.main(["--json"]) == 1
    smoke = json.loads(capsys.readouterr().out)["smoke"]
    assert smoke["ht_dispatch_combine"] == "ok"
    assert "LL combined x: values differ" in smoke["ll_dispatch_combine"]


def test_environment_lists_set_variables(monkeypatch):
    monkeypatch.setenv("EPKERN_TIMEOUT_S", "soon")
    monkeypatch.setenv("EPKERN_BACKNED", "cpu")
    env = doctor.environment()
    assert "refused" in env["EPKERN_TIMEOUT_S"] and "not an epkern variable" in env["EPKERN_BACKNED"]


def test_nvml_topology_with_a_stand_in_pynvml(monkeypatch):
    class NVMLError(Exception):
        pass

    fake = types.SimpleNamespace(
        NVMLError=NVMLError,
        NVML_P2P_CAPS_INDEX_NVLINK=3,
        NVML_P2P_STATUS_OK=0,
        NVML_FEATURE_ENABLED=1,
        NVML_NVLINK_MAX_LINKS=4,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlSystemGetDriverVersion=lambda: "580.65",
        nvmlDeviceGetHandleByPciBusId=lambda bus: bus,
        # GPUs a and b share NVLink; c is across the host bridge
        nvmlDeviceGetP2PStatus=lambda a, b, cap: 0 if {a, b} == {"a", "b"} else 1,
        nvmlDeviceGetNvLinkState=lambda h, link: 1,
        nvmlDeviceGetTopologyCommonAncestor=lambda a, b: 30,
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    topo = doctor._nvml_topology(["a", "b", "c"])
    assert topo == {"nvml_driver": "580.65", "0-1": "NVLink, 4 links", "0-2": "PCIe, PHB", "1-2": "PCIe, PHB"}


def test_cli(monkeypatch, capsys):
    import epkern.launch

    seen = []
    monkeypatch.setattr(epkern.launch, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["launch", "-n", "2", "m:f", "x"]) == 0 and seen == [["-n", "2", "m:f", "x"]]
    assert cli.main(["nonsense"]) == 2
    assert cli.main([]) == 2
    assert cli.main(["--version"]) == 0
    assert "epkern doctor" in capsys.readouterr().out


def _clean_env():
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("EPKERN_")}


@pytest.fixture(autouse=True)
def _no_epkern_variables(monkeypatch):
    for name in [n for n in __import__("os").environ if n.startswith("EPKERN_")]:
        monkeypatch.delenv(name)
