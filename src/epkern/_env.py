"""Every EPKERN_* environment variable is read here, and only here.

Each accessor reads the environment when called (not at import), so tests and launchers can set a
variable after ``import epkern``. docs/environment.md lists them for users.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError

# name -> (default, one-line description); docs/environment.md is generated from the same facts.
VARIABLES: dict[str, tuple[str, str]] = {
    "EPKERN_BACKEND": ("auto", "auto | gpu | cpu: where Buffer runs; auto picks gpu when CuPy sees a device"),
    "EPKERN_RANKS_PER_NODE": (
        "",
        "split the ranks into virtual nodes of this many consecutive ranks "
        "(overrides hostnames; for tests of multi-node paths on one machine)",
    ),
    "EPKERN_HOSTNAME": ("", "node identity of this process instead of socket.gethostname()"),
    "EPKERN_TIMEOUT_S": ("30", "deadline in seconds of every device-side wait and every group operation"),
    "EPKERN_CACHE_DIR": ("~/.cache/epkern", "where compiled kernels (cubins) are cached on disk"),
    "EPKERN_NVRTC_ARCH": ("", "compile for this sm_XY instead of the current device's (e.g. sm_90)"),
    "EPKERN_KERNEL_DIR": ("", "load .cu/.cuh sources from this folder instead of the packaged ones"),
    "EPKERN_NUM_THREADS_RANKS": ("", "default number of in-process ranks for the demo and launcher"),
    "EPKERN_POISON_OUTPUTS": (
        "0",
        "1: fill every output with 0xFF bytes (NaN, -1) before the kernels write it, so rows a kernel "
        "misses show up; a debugging aid costing one fill per output (the tests turn it on)",
    ),
    "EPKERN_NUM_PROXY_THREADS": ("4", "host proxy threads draining the GPU-to-host trigger FIFOs (PROXY transport)"),
    "EPKERN_IPC": (
        "auto",
        "how processes of one node map each other's symmetric regions: vmm (cuMemCreate/cuMemMap, descriptors "
        "over Unix sockets), legacy (cudaIpcOpenMemHandle; copies into it ran at half speed on an H200), auto "
        "(vmm where every rank's driver has it)",
    ),
    "EPKERN_REUSE_DIRECT_REGIONS": (
        "0",
        "in-process ranks: 1 = a Buffer's freed symmetric region is kept and handed to the next region of the "
        "same size on that GPU (no cudaFree / cudaMalloc between Buffers; an experiment for the absent-rank "
        "failure, docs/architecture.md); 0 = freed",
    ),
    "EPKERN_LL_POLL_SLEEP_NS": (
        "auto",
        "LL kernels: nanoseconds a waiting thread sleeps (__nanosleep) between polls of a peer's signal after its "
        "first 32 polls; 0 = poll without pause; auto = 200 when ranks share a GPU (spinning warps then take "
        "issue slots and memory bandwidth from the ranks still copying), else 0. Compiled in as a define",
    ),
    "EPKERN_LL_COMBINE_SPLIT": (
        "4",
        "LL combine: up to this many warps (1..8) reduce one token when warps outnumber tokens (1 = a warp per "
        "token; 4 took combine from 218 to 161 us pipelined on 8 ranks of an H200). Compiled in as a define",
    ),
    "EPKERN_LL_FAST_HOST": (
        "3",
        "1: an LL call whose arrays (by identity) and flags repeat one of the last eight validated calls "
        "only launches (no checks, no argument packing), onto the caller's stream when it follows all of the "
        "Buffer's work; 2: the same, launched through cuLaunchKernel with the arguments packed once; 3: as 2, "
        "and a launch onto the caller's stream replays a one-kernel CUDA graph captured once; 0: every call "
        "validated (ll_plans.py)",
    ),
    "EPKERN_LL_DISPATCH_PULL": (
        "1",
        "LL dispatch: 1 = receivers pull each row from the sender's staged message (one remote read, no put "
        "into receive slots; BF16 dispatch 167 -> 106 us pipelined on 8 ranks of an H200); 0 = senders put "
        "every message into the owners' receive slots. Compiled in",
    ),
    "EPKERN_LL_COMBINE_PULL": (
        "1",
        "LL combine with zero_copy=True: 1 = owners send only each row's index and the sources read the expert "
        "outputs straight from the owners' buffers (combine 165 -> 107 us pipelined on 8 ranks of an H200); "
        "0 = owners put every row into the sources' slots. Compiled in",
    ),
    "EPKERN_LL_COMBINE_AHEAD": (
        "8",
        "LL combine: selections (1..16) whose 16-byte loads each lane issues before adding them up (1 = one "
        "selection's load at a time, as up to session C). Compiled in as a define",
    ),
    "EPKERN_LL_COPY_INFLIGHT": (
        "3",
        "LL dispatch: 16-byte loads (1..8) each lane has in flight while copying a row (staging, the "
        "receive's copy into recv_x, and the direct dispatch's BF16 puts). Compiled in as a define",
    ),
    "EPKERN_LL_DIAG": (
        "0",
        "LL dispatch diagnostics: 1 = each count signal's address and the word read back right after its store "
        "are kept in the device state (tests/ll_scenarios.ll_signal_dump prints them; the absent-rank failure, "
        "docs/architecture.md). Compiled in",
    ),
    "EPKERN_LL_POLL_RELAXED": (
        "1",
        "LL kernels: 1 = poll peers' signals with relaxed loads and acquire once the signal shows (0 = an acquire "
        "load per poll). Compiled in as a define",
    ),
}


# Variables of CUDA itself that epkern sets at import when the user has not (they act when CUDA starts).
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
    pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "").strip() or MPS_DEFAULT_PIPE
    return os.path.exists(os.path.join(pipe, "control"))


_applied: set[str] = set()


def apply_cuda_defaults() -> None:
    mps = under_mps()
    for name, (value, _why) in CUDA_DEFAULTS.items():
        if mps and name in _NOT_UNDER_MPS or name in os.environ:
            continue
        os.environ[name] = value
        _applied.add(name)


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


def timeout_s() -> float:
    raw = _raw("EPKERN_TIMEOUT_S")
    if not raw:
        return float(VARIABLES["EPKERN_TIMEOUT_S"][0])
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"EPKERN_TIMEOUT_S={raw!r}: expected a positive number of seconds") from None
    if not value > 0:
        raise ConfigError(f"EPKERN_TIMEOUT_S={raw!r}: expected a positive number of seconds")
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


def ipc_mode() -> str:
    value = (_raw("EPKERN_IPC") or "auto").lower()
    if value not in ("auto", "vmm", "legacy"):
        raise ConfigError(f"EPKERN_IPC={value!r}: expected one of auto, vmm, legacy")
    return value


def ll_poll_sleep_ns() -> int | None:
    """None for auto (the caller knows whether ranks share a GPU)."""
    raw = _raw("EPKERN_LL_POLL_SLEEP_NS") or "auto"
    if raw == "auto":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"EPKERN_LL_POLL_SLEEP_NS={raw!r}: expected auto or an integer in [0, 100000]") from None
    if not 0 <= value <= 100000:
        raise ConfigError(f"EPKERN_LL_POLL_SLEEP_NS={raw!r}: expected auto or an integer in [0, 100000]")
    return value


def _int_choice(name: str, allowed: range, expected: str) -> int:
    """A variable that takes one of a few small integers (``expected`` says which, in the error)."""
    raw = _raw(name) or VARIABLES[name][0]
    if raw not in {str(v) for v in allowed}:
        raise ConfigError(f"{name}={raw!r}: expected {expected}")
    return int(raw)


def _zero_or_one(name: str) -> int:
    return _int_choice(name, range(2), "0 or 1")


def ll_combine_split() -> int:
    return _int_choice("EPKERN_LL_COMBINE_SPLIT", range(1, 9), "an integer in 1..8")


def reuse_direct_regions() -> int:
    return _zero_or_one("EPKERN_REUSE_DIRECT_REGIONS")


def ll_combine_ahead() -> int:
    return _int_choice("EPKERN_LL_COMBINE_AHEAD", range(1, 17), "an integer in 1..16")


def ll_copy_inflight() -> int:
    return _int_choice("EPKERN_LL_COPY_INFLIGHT", range(1, 9), "an integer in 1..8")


def ll_dispatch_pull() -> int:
    return _zero_or_one("EPKERN_LL_DISPATCH_PULL")


def ll_combine_pull() -> int:
    return _zero_or_one("EPKERN_LL_COMBINE_PULL")


def ll_diag() -> int:
    return _zero_or_one("EPKERN_LL_DIAG")


def ll_fast_host() -> int:
    return _int_choice("EPKERN_LL_FAST_HOST", range(4), "0, 1, 2 or 3")


def ll_poll_relaxed() -> int:
    return _zero_or_one("EPKERN_LL_POLL_RELAXED")
