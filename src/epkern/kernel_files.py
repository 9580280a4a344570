"""Where the library's CUDA sources are: ``EPKERN_KERNEL_DIR``, the copy packaged in the wheel
(``epkern/kernels``), or ``<repo>/kernels`` in a source tree."""

from __future__ import annotations

from pathlib import Path

from . import _env
from .errors import KernelCompileError

_PACKAGE_KERNELS = Path(__file__).resolve().parent / "kernels"
_REPO_KERNELS = Path(__file__).resolve().parents[2] / "kernels"


def kernel_dir() -> Path:
    """Folder holding the .cu/.cuh sources: EPKERN_KERNEL_DIR, the packaged copy, or <repo>/kernels."""
    override = _env.kernel_dir()
    if override is not None:
        if not override.is_dir():
            raise KernelCompileError(f"EPKERN_KERNEL_DIR={override}: not a folder")
        return override
    for candidate in (_PACKAGE_KERNELS, _REPO_KERNELS):
        if (candidate / "epk_common.cuh").is_file():
            return candidate
    raise KernelCompileError(f"kernel sources not found in {_PACKAGE_KERNELS} or {_REPO_KERNELS}")


def kernel_sources() -> list[Path]:
    """Every compilable source (.cu) shipped with epkern (the library's kernels folder only)."""
    return sorted(kernel_dir().glob("*.cu"))
