"""Loading libibverbs / libmlx5 and checking what their calls return: the one ``cffi.FFI`` (the cdef parsed on
first use), the dlopen'ed libraries (opened on first use), and the two errors every binding raises —
:class:`VerbsError` for a failed call, :class:`RdmaUnavailableError` for a missing library or device."""

from __future__ import annotations

import errno as _errno
import os
import threading
from typing import Any

from ..errors import DeviceUnavailableError, EpkernError
from ._cdef import CDEF, MLX5_FUNCTIONS, VERBS_FUNCTIONS
from ._cdef import CONSTANTS as _C

LIBIBVERBS = "libibverbs.so.1"
LIBMLX5 = "libmlx5.so.1"


def flag_mask(*names: str) -> int:
    """The OR of the named cdef constants (``IBV_QP_*`` attribute masks, ``IBV_ACCESS_*`` flags)."""
    m = 0
    for name in names:
        m |= _C[name]
    return m


class RdmaUnavailableError(DeviceUnavailableError):
    """libibverbs/libmlx5 cannot be loaded, or no (matching) RDMA device exists; the message says which."""


class VerbsError(EpkernError, OSError):
    """A verbs call failed; ``errno`` holds the error number and the message names the call. ``message``
    replaces the generic text where the errno says less than the cause (a failed work completion)."""

    def __init__(self, call: str, err: int, detail: str = "", *, message: str | None = None):
        text = os.strerror(err) if err else "unknown error (errno not set)"
        name = _errno.errorcode.get(err, str(err))
        msg = message or f"{call} failed: {name} ({text})" + (f"; {detail}" if detail else "")
        super().__init__(err, msg)
        self.call = call

    def __str__(self) -> str:
        return self.args[1]


# --------------------------------------------------------------------------------------------- loading

_lock = threading.Lock()
_ffi: Any = None
_libs: dict[str, Any] = {}


def get_ffi() -> Any:
    """The ABI-mode ``cffi.FFI`` holding the cdef (parsed on first call; opens no library)."""
    global _ffi
    with _lock:
        if _ffi is None:
            try:
                import cffi
            except ImportError as e:  # pragma: no cover - cffi is a dependency
                raise RdmaUnavailableError(f"the cffi package is not installed ({e})") from None
            ffi = cffi.FFI()
            ffi.cdef(CDEF + VERBS_FUNCTIONS + MLX5_FUNCTIONS)
            _ffi = ffi
        return _ffi


def _load(soname: str, package_hint: str) -> Any:
    ffi = get_ffi()
    with _lock:
        lib = _libs.get(soname)
        if lib is None:
            try:
                lib = ffi.dlopen(soname)
            except OSError as e:
                raise RdmaUnavailableError(
                    f"{soname} could not be loaded ({e}); install rdma-core ({package_hint})"
                ) from None
            _libs[soname] = lib
        return lib


def verbs_lib() -> Any:
    """The dlopen'ed libibverbs (loaded on first call)."""
    return _load(LIBIBVERBS, "Debian/Ubuntu: libibverbs1")


def mlx5_lib() -> Any:
    """The dlopen'ed libmlx5 (loaded on first call)."""
    verbs_lib()
    return _load(LIBMLX5, "Debian/Ubuntu: ibverbs-providers")


def check_ptr(call: str, ptr: Any, detail: str = "") -> Any:
    ffi = get_ffi()
    if ptr == ffi.NULL:
        raise VerbsError(call, ffi.errno, detail)
    return ptr


def check_rc(call: str, rc: int, detail: str = "") -> None:
    # verbs calls return 0, or an errno value (some return -1 and set errno).
    if rc != 0:
        err = rc if rc > 0 else (-rc if rc < -1 else get_ffi().errno)
        raise VerbsError(call, err, detail)
