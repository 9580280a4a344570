"""Every EPKERN_* environment variable is read here, and only here.

Each accessor reads the environment when called (not at import), so tests and launchers can set a
variable after ``import epkern``. docs/environment.md lists them for users.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from .errors import ArgumentError, ConfigError

# name -> (default, one-line description); docs/environment.md is generated from the same facts.
VARIABLES: dict[str, tuple[str, str]] = {
    "EPKERN_BACKEND": ("auto", "auto, gpu or cpu: where Buffer runs; auto picks gpu when CuPy sees a device"),
    "EPKERN_RANKS_PER_NODE": (
        "",
        "split the ranks into virtual nodes of this many consecutive ranks "
        "(overrides hostnames; for tests of multi-node paths on one machine)",
    ),
    "EPKERN_HOSTNAME": ("", "node identity of this process instead of socket.gethostname()"),
    "EPKERN_TIMEOUT_S": ("30", "deadline in seconds of every device-side wait and every group operation"),
    "EPKERN_CACHE_DIR": ("~/.cache/epkern", "where compiled kernels (cubins) are cached on disk"),
    "EPKERN_NVRTC_ARCH": ("", "compile for this sm_XY instead of the current device's (e.g. sm_90)"),
    "EPKERN_KERNEL_DIR": (
        "",
        "load .cu/.cuh sources from this folder instead of the packaged ones (for kernel development: the folder, "
        "the folders above it and its sources must be changeable by no other user, else ConfigError)",
    ),
    "EPKERN_NUM_THREADS_RANKS": ("", "default number of in-process ranks for the demo and launcher"),
    "EPKERN_POISON_OUTPUTS": (
        "0",
        "1: fill every output with 0xFF bytes (NaN, -1) before the kernels write it, so rows a kernel "
        "misses show up; a debugging aid costing one fill per output (the tests turn it on)",
    ),
    "EPKERN_NUM_PROXY_THREADS": (
        "4",
        "host proxy threads draining the GPU-to-host trigger FIFOs (PROXY transport), where Buffer(num_proxy_threads=) "
        "is not given",
    ),
    "EPKERN_LL_HYBRID": (
        "1",
        "low-latency Buffers spanning nodes: 1 reaches peers of the same node over IPC and only the others over the "
        "NIC route (RDMA or PROXY); 0 sends to every other rank over the NIC route (as "
        "allow_nvlink_for_low_latency_mode=False); every rank must agree",
    ),
    "EPKERN_IPC": (
        "auto",
        "how processes of one node map each other's symmetric regions: vmm (cuMemCreate/cuMemMap, descriptors "
        "over Unix sockets), legacy (cudaIpcOpenMemHandle; copies into it ran at half speed on an H200), auto "
        "(vmm where every rank's driver has it)",
    ),
    "EPKERN_LOG_LEVEL": (
        "",
        "DEBUG, INFO, WARNING or ERROR: print the `epkern` logger's records at this level to stderr (INFO: each "
        "kernel compile and its time; DEBUG: also disk-cache hits and module loads); unset: silent",
    ),
}


# Variables of CUDA itself that epkern sets where the user has not, never at import: when epkern is the one that
# starts CUDA in the process (its first GPU query) or makes in-process ranks before CUDA started (they act when CUDA
# starts). If something else (e.g. torch) started CUDA without them, making in-process ranks warns.
CUDA_DEFAULTS: dict[str, tuple[str, str]] = {
    "CUDA_DEVICE_MAX_CONNECTIONS": (
        "32",
        "hardware work queues per CUDA context (CUDA's default is 8): in-process ranks need one per stream, "
        "or one rank's stream wait can hold back a peer's kernel (a deadlock until the device deadline). "
        "Not set under CUDA MPS (a control socket in CUDA_MPS_PIPE_DIRECTORY, default /tmp/nvidia-mps): "
        "measured on the H200, 8 MPS clients with 32 each got cudaErrorDevicesUnavailable, 4 got "
        "cudaErrorMemoryAllocation at context creation; with CUDA's 8, all 8 ran",
    ),
    "CUDA_MODULE_LOADING": (
        "EAGER",
        "load a module's kernels when the module is loaded (CUDA's default, LAZY, loads each at its first launch, "
        "which can wait for the kernels running in the context: with in-process ranks, a peer's spinning kernel; "
        "measured on the H100: a rank's first use of a CuPy kernel stalled until the device deadline)",
    ),
}


# Set only outside MPS: the MPS server shares a fixed pool of hardware channels among all its clients.
_NOT_UNDER_MPS = {"CUDA_DEVICE_MAX_CONNECTIONS"}
MPS_DEFAULT_PIPE = "/tmp/nvidia-mps"


def under_mps() -> bool:
    """Whether CUDA in this process will connect to an MPS server: its pipe directory
    (``CUDA_MPS_PIPE_DIRECTORY``, else /tmp/nvidia-mps) holds the control daemon's socket. Decided before CUDA
    starts; a pipe directory named without a daemon behind it does not count (CUDA then runs without MPS)."""
    return os.path.exists(os.path.join(mps_pipe_directory(), "control"))


def mps_pipe_directory() -> str:
    """Where CUDA looks for the MPS control daemon: ``CUDA_MPS_PIPE_DIRECTORY``, else /tmp/nvidia-mps."""
    return os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "").strip() or MPS_DEFAULT_PIPE


def cuda_variables() -> dict[str, str | None]:
    """The values of the CUDA variables epkern sets when unset (CUDA_DEFAULTS), None where unset."""
    return {name: os.environ.get(name) for name in CUDA_DEFAULTS}


_applied: set[str] = set()


def _unset_defaults() -> list[str]:
    """The CUDA_DEFAULTS epkern would set now: those the user left unset (CUDA_DEVICE_MAX_CONNECTIONS not under
    MPS)."""
    mps = under_mps()
    return [n for n in CUDA_DEFAULTS if n not in os.environ and not (mps and n in _NOT_UNDER_MPS)]


def apply_cuda_defaults() -> None:
    """Set the CUDA_DEFAULTS the user left unset (CUDA_DEVICE_MAX_CONNECTIONS not under MPS)."""
    for name in _unset_defaults():
        os.environ[name] = CUDA_DEFAULTS[name][0]
        _applied.add(name)


def prepare_cuda_for_in_process_ranks() -> None:
    """What in-process ranks on a GPU need of CUDA (CUDA_DEFAULTS), set just before they are made; a warning
    naming the variables when CUDA already started in this process without them (then they cannot act)."""
    from . import _cuda_driver

    missing = _unset_defaults()
    if not missing:
        return
    if _cuda_driver.initialised():
        import warnings

        text = (
            f"CUDA started in this process before epkern's in-process ranks were made, without {', '.join(missing)} "
            f"({', '.join(f'{n}={CUDA_DEFAULTS[n][0]}' for n in missing)}): in-process ranks may then wait on "
            "each other until the device deadline. Set them before CUDA starts (docs/environment.md)."
        )
        logging.getLogger("epkern").warning(text)
        warnings.warn(text, RuntimeWarning, stacklevel=3)
        return
    apply_cuda_defaults()


def child_environment(env: dict) -> dict:
    """``env`` without the CUDA defaults epkern set in this process (a user's own values stay): a child
    process decides them again at its own import, e.g. under an MPS daemon this process started after its
    import (epkern-launch --mps), where 32 connections would keep the clients from starting."""
    return {k: v for k, v in env.items() if not (k in _applied and v == CUDA_DEFAULTS[k][0])}


def _raw(name: str) -> str:
    assert name in VARIABLES, name
    return os.environ.get(name, "").strip()


def _positive_int(name: str) -> int | None:
    raw = _raw(name)
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a positive integer") from None
    if value <= 0:
        raise ConfigError(f"{name}={raw!r}: expected a positive integer")
    return value


def backend() -> str:
    value = _raw("EPKERN_BACKEND").lower() or "auto"
    if value not in ("auto", "gpu", "cpu"):
        raise ConfigError(f"EPKERN_BACKEND={value!r}: expected one of auto, gpu, cpu")
    return value


def ranks_per_node() -> int | None:
    return _positive_int("EPKERN_RANKS_PER_NODE")


def hostname_override() -> str | None:
    return _raw("EPKERN_HOSTNAME") or None


MAX_TIMEOUT_S = 86400.0
"""Longest deadline accepted (a day): deadlines become int64 nanoseconds on the device, and an infinite or NaN
one would switch them off."""


def _timeout_problem(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"expected a number of seconds, got {type(value).__name__}"
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT_S):
        return f"expected a finite number of seconds in (0, {MAX_TIMEOUT_S:g}], got {value!r}"
    return None


def check_timeout(value, name: str = "timeout_s") -> float:
    """``value`` as float seconds, or ArgumentError naming ``name``: finite, positive, at most a day."""
    problem = _timeout_problem(value)
    if problem:
        raise ArgumentError(f"{name}: {problem}")
    return float(value)


def timeout_s() -> float:
    raw = _raw("EPKERN_TIMEOUT_S")
    if not raw:
        return float(VARIABLES["EPKERN_TIMEOUT_S"][0])
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"EPKERN_TIMEOUT_S={raw!r}: expected a positive number of seconds") from None
    problem = _timeout_problem(value)
    if problem:
        raise ConfigError(f"EPKERN_TIMEOUT_S={raw!r}: {problem}")
    return value


def cache_dir() -> Path:
    return Path(_raw("EPKERN_CACHE_DIR") or VARIABLES["EPKERN_CACHE_DIR"][0]).expanduser()


def nvrtc_arch() -> str | None:
    raw = _raw("EPKERN_NVRTC_ARCH")
    if raw and not (raw.startswith("sm_") and raw[3:].rstrip("a").isdigit()):
        raise ConfigError(f"EPKERN_NVRTC_ARCH={raw!r}: expected sm_<digits>, e.g. sm_90")
    return raw or None


def kernel_dir() -> Path | None:
    raw = _raw("EPKERN_KERNEL_DIR")
    return Path(raw) if raw else None


def num_thread_ranks() -> int | None:
    return _positive_int("EPKERN_NUM_THREADS_RANKS")


def poison_outputs() -> bool:
    return _zero_or_one("EPKERN_POISON_OUTPUTS") == 1


def num_proxy_threads() -> int:
    value = _positive_int("EPKERN_NUM_PROXY_THREADS")
    return int(VARIABLES["EPKERN_NUM_PROXY_THREADS"][0]) if value is None else value


def ll_hybrid() -> bool:
    return _zero_or_one("EPKERN_LL_HYBRID") == 1


def ipc_mode() -> str:
    value = (_raw("EPKERN_IPC") or "auto").lower()
    if value not in ("auto", "vmm", "legacy"):
        raise ConfigError(f"EPKERN_IPC={value!r}: expected one of auto, vmm, legacy")
    return value


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level() -> int | None:
    """The ``logging`` level EPKERN_LOG_LEVEL names, or None when unset (epkern then logs nowhere)."""
    raw = _raw("EPKERN_LOG_LEVEL").upper()
    if not raw:
        return None
    if raw not in _LOG_LEVELS:
        raise ConfigError(f"EPKERN_LOG_LEVEL={raw!r}: expected one of {', '.join(_LOG_LEVELS)}")
    return getattr(logging, raw)


def set_variables() -> dict[str, str]:
    """Every EPKERN_* variable set in the environment, known to epkern or not (a typo), by name."""
    return {name: value for name, value in sorted(os.environ.items()) if name.startswith("EPKERN_")}


def refusal(name: str) -> str | None:
    """Why epkern refuses the current value of ``name`` (the ConfigError its accessor raises), None if it takes
    it or ``name`` has no checked value."""
    accessor = _ACCESSORS.get(name)
    try:
        if accessor is not None:
            accessor()
    except ConfigError as exc:
        return str(exc)
    return None


def _zero_or_one(name: str) -> int:
    raw = _raw(name) or VARIABLES[name][0]
    if raw not in ("0", "1"):
        raise ConfigError(f"{name}={raw!r}: expected 0 or 1")
    return int(raw)


_ACCESSORS = {
    "EPKERN_BACKEND": backend,
    "EPKERN_RANKS_PER_NODE": ranks_per_node,
    "EPKERN_TIMEOUT_S": timeout_s,
    "EPKERN_NVRTC_ARCH": nvrtc_arch,
    "EPKERN_NUM_THREADS_RANKS": num_thread_ranks,
    "EPKERN_POISON_OUTPUTS": poison_outputs,
    "EPKERN_NUM_PROXY_THREADS": num_proxy_threads,
    "EPKERN_LL_HYBRID": ll_hybrid,
    "EPKERN_IPC": ipc_mode,
    "EPKERN_LOG_LEVEL": log_level,
}


def markdown() -> str:
    """docs/environment.md, generated from VARIABLES and CUDA_DEFAULTS (tests/test_env.py checks it is current)."""
    lines = [
        "# Environment variables",
        "",
        "<!-- generated by `python -m epkern._env > docs/environment.md`; edit src/epkern/_env.py instead -->",
        "",
        "Every variable epkern reads starts with `EPKERN_` and is read in one place, `src/epkern/_env.py`, when it "
        "is needed (not at import), so it can be set after `import epkern`. They are for deployment and debugging; "
        "tuning goes through typed objects, not the environment. A bad value raises `epkern.ConfigError` naming the "
        "variable.",
        "",
        "| variable | default | meaning |",
        "|---|---|---|",
    ]
    for name, (default, why) in VARIABLES.items():
        lines.append(f"| `{name}` | {f'`{default}`' if default else '(unset)'} | {why} |")
    lines += [
        "",
        "## CUDA variables epkern sets",
        "",
        "`import epkern` sets nothing. epkern sets these, where they are unset (a value you set wins), when it is "
        "the one that starts CUDA in the process (its first GPU query) and when it makes in-process ranks "
        "(`run_in_process`, `make_thread_groups`) before CUDA started: they act only when CUDA starts, and only "
        "in-process ranks need them. If CUDA was started without them (by torch or CuPy), making in-process ranks "
        "warns: set them in the environment, or let epkern make the first CUDA call.",
        "",
        "| variable | value | why |",
        "|---|---|---|",
    ]
    for name, (value, why) in CUDA_DEFAULTS.items():
        lines.append(f"| `{name}` | `{value}` | {why} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
