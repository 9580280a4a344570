"""Where the library's CUDA sources are: ``EPKERN_KERNEL_DIR``, the copy packaged in the wheel
(``epkern/kernels``), or ``<repo>/kernels`` in a source tree."""

from __future__ import annotations

from pathlib import Path

from . import _env, _trust
from .errors import ConfigError, KernelCompileError

_PACKAGE_KERNELS = Path(__file__).resolve().parent / "kernels"
_REPO_KERNELS = Path(__file__).resolve().parents[2] / "kernels"


def kernel_dir() -> Path:
    """Folder holding the .cu/.cuh sources: EPKERN_KERNEL_DIR, the packaged copy, or <repo>/kernels."""
    override = _env.kernel_dir()
    if override is not None:
        if not override.is_dir():
            raise KernelCompileError(f"EPKERN_KERNEL_DIR={override}: not a folder")
        # Sources compiled from there run on the GPU: only a folder (and sources) no other user can change.
        problem = _trust.folder_problem(override) or next(
            (f"{p} is {why}" for p in sorted(override.glob("*.cu*")) if (why := _file_problem(p))), None
        )
        if problem:
            raise ConfigError(f"EPKERN_KERNEL_DIR={override}: refused, {problem}")
        return override
    for candidate in (_PACKAGE_KERNELS, _REPO_KERNELS):
        if (candidate / "epk_common.cuh").is_file():
            return candidate
    raise KernelCompileError(f"kernel sources not found in {_PACKAGE_KERNELS} or {_REPO_KERNELS}")


def _file_problem(path: Path) -> str | None:
    import os

    return _trust.ownership_problem(os.lstat(path), allow_root=True)


def kernel_sources() -> list[Path]:
    """Every compilable source (.cu) shipped with epkern (the library's kernels folder only)."""
    return sorted(kernel_dir().glob("*.cu"))
