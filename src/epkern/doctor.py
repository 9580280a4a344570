"""What epkern sees on this machine, and whether a dispatch/combine round trip works here.

    python -m epkern.doctor [--json] [--no-smoke] [--timeout SECONDS]
    epkern doctor [--json] [--no-smoke] [--timeout SECONDS]

Sections: versions, GPUs (and the links between them, from NVML when ``pynvml`` is installed), CUDA MPS,
RDMA, the kernel cache, the EPKERN_* variables that are set, and a smoke test (one HT and one LL
dispatch/combine on 2 in-process ranks, GPU if there is one, else CPU, checked exactly against
:mod:`epkern.reference`, under a timeout). Works without a GPU, rdma-core or MPI; a section that fails reports
its own error and the others go on. Exit code 0 when the smoke test passed, 1 otherwise. docs/doctor.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable

from . import _cuda, _env
from .errors import EpkernError

SMOKE_TIMEOUT_S = 120.0


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


def _try(fn: Callable, *args):
    """fn(*args), or the text of the exception it raised."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - the doctor reports every failure instead of raising it
        return f"unavailable ({_error(exc)})"


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


# --------------------------------------------------------------------------------------------- versions


def versions() -> dict:
    from . import __version__

    out = {"epkern": __version__, "python": f"{platform.python_version()} ({sys.executable})"}
    for dist, module in (("numpy", "numpy"), ("ml_dtypes", "ml_dtypes"), ("cffi", "cffi")):
        out[dist] = _try(lambda m: __import__(m).__version__, module)
    try:
        import cupy

        out["cupy"] = cupy.__version__
    except Exception as exc:  # noqa: BLE001 - ImportError, or a CuPy that fails to initialise
        out["cupy"] = f"not importable ({_error(exc)}); the GPU backend and kernel compiles need it"
    out["nvrtc"] = _try(_nvrtc_version)
    if _cuda.gpu_available():
        import cupy

        out["cuda_runtime"] = _try(lambda: _cuda_version(cupy.cuda.runtime.runtimeGetVersion()))
        out["cuda_driver"] = _try(lambda: _cuda_version(cupy.cuda.runtime.driverGetVersion()))
        out["driver_vs_nvrtc"] = _try(_driver_vs_nvrtc)
    else:
        out["cuda_driver"] = "no GPU"
    return out


def _nvrtc_version() -> str:
    from . import kernel_loader

    return ".".join(map(str, kernel_loader.nvrtc_version()))


def _driver_vs_nvrtc() -> str:
    import cupy

    from . import kernel_loader

    check = getattr(_cuda, "check_driver_for_nvrtc", None)
    if check is None:
        return "not checked (this epkern has no driver check)"
    check(int(cupy.cuda.runtime.driverGetVersion()), kernel_loader.nvrtc_version())
    return "ok: the driver loads what NVRTC compiles"


# --------------------------------------------------------------------------------------------- GPUs

_TOPOLOGY_LEVELS = {0: "same board", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}


def gpus() -> dict:
    count = _cuda.device_count()
    if count == 0:
        try:
            _cuda.require_gpu("epkern's GPU backend")
            why = "no GPU"
        except Exception as exc:  # noqa: BLE001 - DeviceUnavailableError: its message says why
            why = str(exc)
        return {"count": 0, "why": why, "topology": _try(_nvml_topology, [])}
    import cupy

    devices = {}
    bus_ids = []
    for i in range(count):
        try:
            p = cupy.cuda.runtime.getDeviceProperties(i)
            name = p["name"].decode() if isinstance(p["name"], bytes) else str(p["name"])
            devices[str(i)] = (
                f"{name}, {p['totalGlobalMem'] / 2**30:.1f} GiB, compute capability {p['major']}.{p['minor']}"
            )
            bus_ids.append(cupy.cuda.runtime.deviceGetPCIBusId(i))
        except Exception as exc:  # noqa: BLE001
            devices[str(i)] = f"unavailable ({_error(exc)})"
            bus_ids.append(None)
    return {"count": count, "devices": devices, "topology": _try(_nvml_topology, bus_ids)}


def _nvml_topology(bus_ids: list) -> dict | str:
    """The link between each pair of GPUs (CUDA order, matched to NVML by PCI bus id)."""
    try:
        import pynvml
    except ImportError:
        return "pynvml is not installed (pip install nvidia-ml-py): no NVLink/PCIe topology"
    pynvml.nvmlInit()
    try:
        out = {"nvml_driver": _try(lambda: _text(pynvml.nvmlSystemGetDriverVersion()))}
        handles = [pynvml.nvmlDeviceGetHandleByPciBusId(b) if b else None for b in bus_ids]
        if len(handles) < 2:
            out["links"] = f"none to report ({len(handles)} GPU)"
        for i in range(len(handles)):
            for j in range(i + 1, len(handles)):
                if handles[i] is None or handles[j] is None:
                    continue
                out[f"{i}-{j}"] = _try(_pair_link, pynvml, handles[i], handles[j])
        return out
    finally:
        pynvml.nvmlShutdown()


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _pair_link(nvml, a, b) -> str:
    if nvml.nvmlDeviceGetP2PStatus(a, b, nvml.NVML_P2P_CAPS_INDEX_NVLINK) == nvml.NVML_P2P_STATUS_OK:
        links = 0
        for link in range(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18)):
            try:
                links += nvml.nvmlDeviceGetNvLinkState(a, link) == nvml.NVML_FEATURE_ENABLED
            except nvml.NVMLError:
                break
        return f"NVLink, {links} links"
    level = nvml.nvmlDeviceGetTopologyCommonAncestor(a, b)
    return f"PCIe, {_TOPOLOGY_LEVELS.get(int(level), f'level {level}')}"


# --------------------------------------------------------------------------------------------- MPS, RDMA, cache


def mps() -> dict:
    out = {"under_mps": _env.under_mps(), "pipe_directory": _env.mps_pipe_directory()}
    for name, value in _env.cuda_variables().items():
        out[name] = "(unset)" if value is None else value
    return out


_PORT_STATES = {0: "NOP", 1: "DOWN", 2: "INIT", 3: "ARMED", 4: "ACTIVE", 5: "ACTIVE_DEFER"}
_LINK_LAYERS = {0: "unspecified", 1: "InfiniBand", 2: "Ethernet"}


def rdma() -> dict:
    from . import _verbs_cffi

    ok, why = _verbs_cffi.rdma_available()
    out = {"available": ok, "detail": why}
    if ok:
        out["devices"] = {name: _try(_port_report, _verbs_cffi, name) for name in _verbs_cffi.device_list()}
    return out


def _port_report(verbs, name: str) -> str:
    with verbs.open_device(name) as ctx:
        attr = verbs.query_port(ctx, 1)
        state = _PORT_STATES.get(attr.state, str(attr.state))
        layer = _LINK_LAYERS.get(attr.link_layer, str(attr.link_layer))
        return f"port 1 {state}, {layer}, mlx5 {'yes' if ctx.is_mlx5 else 'no'}"


def kernel_cache() -> dict:
    folder = _env.cache_dir() / "cubin"
    if not folder.is_dir():
        return {"path": str(folder), "cubins": 0, "bytes": 0, "note": "does not exist yet (nothing compiled)"}
    files = [p for p in folder.glob("*.cubin") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    out = {"path": str(folder), "cubins": len(files), "bytes": size, "size": f"{size / 2**20:.1f} MiB"}
    from . import kernel_loader

    try:
        kernel_loader.private_cache_folder()
        out["private"] = "yes (this user's, writable by no one else)"
    except EpkernError as exc:
        out["private"] = f"NO: {exc}"
    return out


# --------------------------------------------------------------------------------------------- environment


def environment() -> dict:
    """Every EPKERN_* variable that is set, with a note where epkern does not know it or refuses its value."""
    out = {}
    for name, value in _env.set_variables().items():
        if name not in _env.VARIABLES:
            out[name] = f"{value!r}  (not an epkern variable: a typo?)"
            continue
        why = _env.refusal(name)
        out[name] = repr(value) + (f"  (refused: {why})" if why else "")
    return out or {"set": "none (every variable at its default: docs/environment.md)"}


# --------------------------------------------------------------------------------------------- smoke test


def smoke(timeout_s: float = SMOKE_TIMEOUT_S) -> dict:
    """One HT and one LL round trip on 2 in-process ranks, in a thread the doctor stops waiting for after
    ``timeout_s``."""
    from . import doctor_smoke

    try:
        from .buffer import resolve_backend

        backend = resolve_backend("auto")
    except Exception as exc:  # noqa: BLE001
        return {"passed": False, "error": f"no backend: {_error(exc)}"}
    box: dict = {}

    def body():
        try:
            box["parts"] = doctor_smoke.run(backend, timeout_s)
        except BaseException as exc:  # noqa: BLE001 - reported below
            box["error"] = _error(exc)

    start = time.perf_counter()
    thread = threading.Thread(target=body, name="epkern-doctor-smoke", daemon=True)
    thread.start()
    thread.join(timeout_s)
    out = {"backend": backend, "ranks": doctor_smoke.NUM_RANKS, "seconds": round(time.perf_counter() - start, 2)}
    if thread.is_alive():
        return {**out, "passed": False, "timed_out": True, "error": f"did not finish within {timeout_s:g} s"}
    if "error" in box:
        return {**out, "passed": False, "error": box["error"]}
    parts = box["parts"]
    return {**out, "passed": all(v == "ok" for v in parts.values()), **parts}


# --------------------------------------------------------------------------------------------- report

SECTIONS: dict[str, Callable[[], dict]] = {
    "versions": versions,
    "gpus": gpus,
    "mps": mps,
    "rdma": rdma,
    "kernel_cache": kernel_cache,
    "environment": environment,
}


def collect(run_smoke: bool = True, timeout_s: float = SMOKE_TIMEOUT_S) -> dict:
    """The report as a dict of sections (each a dict; ``{"error": ...}`` when the section itself failed)."""
    report = {}
    for name, fn in SECTIONS.items():
        try:
            report[name] = fn()
        except Exception as exc:  # noqa: BLE001 - one section's failure is its own line
            report[name] = {"error": _error(exc)}
    if run_smoke:
        try:
            report["smoke"] = smoke(timeout_s)
        except Exception as exc:  # noqa: BLE001
            report["smoke"] = {"passed": False, "error": _error(exc)}
    else:
        report["smoke"] = {"passed": None, "skipped": "--no-smoke"}
    return report


def format_text(report: dict) -> str:
    lines = ["epkern doctor"]
    for section, values in report.items():
        lines.append(f"[{section}]")
        lines += _format_items(values, "  ")
    return "\n".join(lines) + "\n"


def _format_items(values, indent: str) -> list[str]:
    if not isinstance(values, dict):
        return [f"{indent}{values}"]
    width = max((len(str(k)) for k in values), default=0)
    lines = []
    for key, value in values.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            lines += _format_items(value, indent + "  ")
        else:
            lines.append(f"{indent}{str(key) + ':':{width + 1}} {value}")
    return lines


def main(argv=None, prog: str = "python -m epkern.doctor", exit_if_stuck: bool = False) -> int:
    p = argparse.ArgumentParser(prog=prog, description="Report what epkern sees here and run a smoke test.")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-smoke", action="store_true", help="skip the smoke test (exit code 1)")
    p.add_argument("--timeout", type=float, default=SMOKE_TIMEOUT_S, help="smoke test limit, seconds")
    ns = p.parse_args(argv)
    report = collect(run_smoke=not ns.no_smoke, timeout_s=ns.timeout)
    if ns.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(format_text(report), end="")
    code = 0 if report["smoke"].get("passed") else 1
    if exit_if_stuck and report["smoke"].get("timed_out"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # the smoke thread is stuck (in a kernel or a collective): do not wait for it at exit
    return code


if __name__ == "__main__":
    raise SystemExit(main(exit_if_stuck=True))
