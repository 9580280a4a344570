"""Run-time compilation of the CUDA sources: the library's ``kernels/`` and, by absolute path, sources beside
their users (``bench/kernels/``, ``tests/kernels/``).

NVRTC is called directly (``cupy_backends.cuda.libs.nvrtc``) so the same code path compiles on a machine
without a GPU (tests compile every source to an sm_90 cubin there) and on the GPU. A compiled cubin is
keyed by a hash of the compiled source and the headers it includes (transitively), the defines, the options,
the NVRTC version and the target; it is kept in memory per process and on disk under ``EPKERN_CACHE_DIR``, and
loaded with ``cupy.RawModule``.

A source is either the name of a file in the library's kernels folder (``"ll_dispatch.cu"``) or an absolute
:class:`pathlib.Path` to a ``.cu`` anywhere; quoted includes are looked up in the including file's folder, then
the source's folder, then the library's kernels folder (so a benchmark kernel can include ``epk_common.cuh``).

Specialisation is by preprocessor defines (``-DEPK_TOPK=8`` ...): each kernel is an ``extern "C"``
function, so names need no mangling, and the defines make loop bounds compile-time constants. A kernel reads
no define it does not require: a missing one fails to compile.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from . import _env, _log, _trust
from .errors import ConfigError, KernelCompileError
from .kernel_files import kernel_dir, kernel_sources  # noqa: F401 - re-exported: the loader's folder

Source = str | Path
"""A kernel source: a file name in :func:`kernel_dir`, or the absolute path of a .cu anywhere."""


def source_path(source: Source) -> Path:
    """The file a source names. KernelCompileError when it is not a file (or a relative Path, or a str that is
    more than a file name: sources outside the library's folder are given as absolute Paths)."""
    if isinstance(source, Path):
        if not source.is_absolute():
            raise KernelCompileError(f"kernel source {source}: a Path must be absolute")
        path = source
    elif isinstance(source, str):
        if not source or Path(source).name != source:
            raise KernelCompileError(
                f"kernel source {source!r}: a str names a file in {kernel_dir()}; pass other files as an absolute Path"
            )
        path = kernel_dir() / source
    else:
        raise KernelCompileError(f"kernel source {source!r}: expected a file name (str) or an absolute Path")
    if not path.is_file():
        raise KernelCompileError(f"no kernel source {path}")
    return path


def source_include_dirs(source: Source | None = None) -> tuple[Path, ...]:
    """The kernel folders on the include path of ``source``: its own folder, then the library's kernels folder
    (only the latter for None or a library source)."""
    lib = kernel_dir()
    if source is None:
        return (lib,)
    folder = source_path(source).parent
    return (lib,) if folder == lib else (folder, lib)


_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*(?:"([^"\n]+)"|<([^>\n]+)>)', re.M)


def included_files(source: Source) -> list[Path]:
    """The source and every header it includes, transitively, that is found in the kernel folders (as NVRTC
    looks a header up: the including file's folder first for ``"x"``, then :func:`source_include_dirs`). Headers
    found elsewhere (CUDA's, CCCL's) are not listed. Includes are followed whatever ``#if`` surrounds them."""
    path = source_path(source)
    folders = source_include_dirs(source)
    found = [path]
    todo = [path]
    while todo:
        current = todo.pop()
        for quoted, angled in _INCLUDE.findall(current.read_text()):
            where = (current.parent, *folders) if quoted else folders
            for folder in where:
                header = folder / (quoted or angled)
                if header.is_file():
                    if header not in found:
                        found.append(header)
                        todo.append(header)
                    break
    return found


@functools.cache
def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as exc:  # pragma: no cover - cupy is a hard dependency
        raise KernelCompileError(f"cannot import CuPy's NVRTC bindings: {exc}") from exc
    return nvrtc


def nvrtc_version() -> tuple[int, int]:
    return tuple(_nvrtc().getVersion())


def _site_dirs() -> list[Path]:
    return [Path(p) for p in sys.path if p and Path(p).is_dir()]


def _wheel_header_roots() -> list[Path]:
    """The CUDA header folders of the pip wheels: nvidia-cuda-runtime 13.x (``nvidia/cu13/include``) and
    nvidia-cuda-runtime-cu12 (``nvidia/cuda_runtime/include``), the one of NVRTC's major first."""
    layouts = {13: ("nvidia", "cu13", "include"), 12: ("nvidia", "cuda_runtime", "include")}
    try:
        major = nvrtc_version()[0]
    except Exception:  # noqa: BLE001 - no NVRTC: the headers are looked up all the same
        major = 13
    order = sorted(layouts, key=lambda m: m != major)
    return [site.joinpath(*layouts[m]) for site in _site_dirs() for m in order]


def _require_driver_for_nvrtc() -> None:
    """DeviceUnavailableError when this machine's GPU driver is older than NVRTC (it could not load the cubins);
    nothing without a GPU."""
    from . import _cuda

    _cuda.require_driver_for_nvrtc(nvrtc_version())


@functools.cache
def include_dirs() -> tuple[str, ...]:
    """Include paths for cuda_bf16.h / cuda_fp8.h (the nvidia-cuda-runtime wheel or a toolkit) and CCCL."""
    dirs: list[Path] = []
    header_roots = _wheel_header_roots()
    for env_name in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(env_name):
            header_roots.append(Path(os.environ[env_name]) / "include")
    header_roots.append(Path("/usr/local/cuda/include"))
    for root in header_roots:
        if (root / "cuda_bf16.h").is_file() and (root / "cuda_fp8.h").is_file():
            dirs.append(root)
            break
    else:
        raise KernelCompileError(
            "cuda_bf16.h / cuda_fp8.h not found: pip install the nvidia-cuda-runtime wheel of NVRTC's CUDA major "
            '("epkern[cuda13]" or "epkern[cuda12]") or set CUDA_PATH'
        )
    try:
        import cupy

        cccl = Path(cupy.__file__).parent / "_core" / "include" / "cupy" / "_cccl" / "libcudacxx"
        if cccl.is_dir():
            dirs.append(cccl)
    except ImportError:  # pragma: no cover
        pass
    return tuple(str(d) for d in dirs)


def device_arch(device_id: int | None = None) -> str:
    """``sm_XY`` for the given (default: current) device, or EPKERN_NVRTC_ARCH when set."""
    forced = _env.nvrtc_arch()
    if forced:
        return forced
    from . import _cuda

    _cuda.require_gpu("compiling kernels for the current device")
    import cupy

    dev = cupy.cuda.Device(device_id) if device_id is not None else cupy.cuda.Device()
    return f"sm_{dev.compute_capability}"


def _constant_names() -> set[str]:
    """The names of epk_constants.cuh (empty when the kernels folder has none, as a test's folder may not)."""
    from . import kernel_constants

    if not kernel_constants.header_path().is_file():
        return set()
    return set(kernel_constants.values())


def _define_flags(defines: Mapping[str, object]) -> list[str]:
    flags = []
    constants = _constant_names() if defines else set()
    for name, value in sorted(defines.items()):
        if not name.isidentifier():
            raise KernelCompileError(f"bad define name {name!r}")
        if name in constants:  # the macro would replace the constant's name in the header
            raise KernelCompileError(f"{name} is a constant of epk_constants.cuh (kernel_constants), not a define")
        flags.append(f"-D{name}" if value is None else f"-D{name}={value}")
    return flags


def compile_options(
    arch: str, defines: Mapping[str, object], debug: bool = False, *, source: Source | None = None
) -> list[str]:
    """NVRTC's options for ``source`` (its include folders; None: the library's folder only)."""
    opts = [f"-arch={arch}", "-std=c++17"]
    opts += [f"-I{d}" for d in (*(str(f) for f in source_include_dirs(source)), *include_dirs())]
    if debug:
        opts += ["-G", "-lineinfo"]
    else:
        opts += ["-lineinfo"]
    return opts + _define_flags(defines)


def _run_nvrtc(source: Source, options: list[str]) -> tuple[bytes, str]:
    """Compile ``source`` with ``options``: (cubin, NVRTC's log). KernelCompileError on failure."""
    path = source_path(source)
    nvrtc = _nvrtc()
    # The program is named by its absolute path: NVRTC looks up the quoted includes of a program in the folder of
    # its name, which for a bare name would be the process's working directory.
    prog = nvrtc.createProgram(path.read_text(), str(path), [], [])
    try:
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError as exc:
            log = nvrtc.getProgramLog(prog)
            raise KernelCompileError(f"NVRTC failed on {path.name} ({' '.join(options)}):\n{log}") from exc
        return nvrtc.getCUBIN(prog), nvrtc.getProgramLog(prog).rstrip("\x00")
    finally:
        nvrtc.destroyProgram(prog)


def _check_arch(arch: str) -> None:
    if not arch.startswith("sm_"):
        # compute_XY would give PTX, which a driver older than this NVRTC cannot load.
        raise KernelCompileError(f"arch={arch!r}: expected a real architecture sm_XY (a cubin), not PTX")


def compile_cubin(source: Source, defines: Mapping[str, object] | None = None, arch: str | None = None) -> bytes:
    """Compile ``source`` (a name in the library's kernels folder, or an absolute Path) to a cubin for ``arch``
    (default: the current device). No GPU needed when ``arch`` is given. Raises KernelCompileError with NVRTC's
    log on failure."""
    arch = arch or device_arch()
    _check_arch(arch)
    defines = dict(defines or {})
    start = time.perf_counter()
    cubin, log = _run_nvrtc(source, compile_options(arch, defines, source=source))
    logger = _log.get_logger()
    logger.info(
        "compiled %s for %s in %.2f s (%s)",
        _describe(source),
        arch,
        time.perf_counter() - start,
        _describe_defines(defines),
    )
    if log.strip():
        logger.debug("NVRTC log of %s:\n%s", _describe(source), log.strip())
    return cubin


def _describe(source: Source) -> str:
    """A source as the log names it: a library kernel by its file name, any other by its path."""
    return source if isinstance(source, str) else str(source)


def _describe_defines(defines: Mapping[str, object]) -> str:
    if not defines:
        return "no defines"
    return " ".join(name if value is None else f"{name}={value}" for name, value in sorted(defines.items()))


def ptxas_report(source: Source, defines: Mapping[str, object] | None = None, arch: str = "sm_90") -> str:
    """ptxas's resource report (registers, stack frame, spill stores/loads per entry function) for this
    specialisation, compiled as :func:`compile_cubin` compiles it; no GPU needed."""
    _check_arch(arch)
    options = compile_options(arch, dict(defines or {}), source=source) + ["--ptxas-options=-v"]
    return _run_nvrtc(source, options)[1]


def cache_key(source: Source, defines: Mapping[str, object], arch: str) -> str:
    """Hash of what the cubin depends on: the source and the headers it includes (paths and contents; no other
    kernel file), the options with the defines, the NVRTC version and the target."""
    h = hashlib.sha256()
    parts = [str(source_path(source)), repr(nvrtc_version()), arch, *compile_options(arch, defines, source=source)]
    for path in included_files(source):
        parts += [str(path), hashlib.sha256(path.read_bytes()).hexdigest()]
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def cubin_path(source: Source, defines: Mapping[str, object], arch: str) -> Path:
    """Disk-cached cubin for this specialisation, compiling it on a miss. One process per cache folder (so one
    rank per node, where the ranks share the folder) compiles a given cubin; the others wait on its lock file and
    load the result. Written by atomic rename, so no process reads a half-written file.

    The folder must be this user's and writable by no one else (see :func:`private_cache_folder`); a cubin is
    used only if it is a regular file of this user whose SHA-256 matches the one recorded when it was written
    (else it is compiled again)."""
    folder = private_cache_folder()
    target = folder / f"{source_path(source).stem}-{arch}-{cache_key(source, defines, arch)}.cubin"
    logger = _log.get_logger()
    if _intact(target):
        logger.debug("cubin cache hit: %s (%s) %s", _describe(source), _describe_defines(defines), target)
        return target
    with _compile_lock(target.with_suffix(".lock")) as waited:
        if _intact(target):
            logger.info("loaded %s compiled by another process (waited %.2f s)", target.name, waited)
            return target
        cubin = compile_cubin(source, defines, arch)
        _write_atomically(target.with_suffix(".sha256"), hashlib.sha256(cubin).hexdigest().encode())
        _write_atomically(target, cubin)
    logger.debug("cubin cached: %s", target)
    return target


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _intact(cubin: Path) -> bool:
    """Whether ``cubin`` is this user's regular file, writable by no one else, matching its recorded hash."""
    try:
        st = os.lstat(cubin)
    except FileNotFoundError:
        return False
    problem = _trust.ownership_problem(st, allow_root=False)
    if problem is None and not stat.S_ISREG(st.st_mode):
        problem = "not a regular file"
    if problem is None:
        try:
            recorded = cubin.with_suffix(".sha256").read_bytes().strip()
        except OSError:
            recorded = b""
        if hashlib.sha256(cubin.read_bytes()).hexdigest().encode() != recorded:
            problem = "its content does not match the hash recorded when it was written"
    if problem:
        _log.get_logger().warning("ignoring cached %s (%s): compiling it again", cubin, problem)
        cubin.unlink(missing_ok=True)
        return False
    return True


def private_cache_folder() -> Path:
    """``EPKERN_CACHE_DIR``/cubin, created 0700 if missing; ConfigError if it, the cache folder, or a folder above
    them could be changed by another user (owned by someone else than this user or root, or writable by others
    without the sticky bit, as /tmp has): kernels loaded from there would run someone else's code."""
    root = _env.cache_dir()
    folder = root / "cubin"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    problem = _trust.folder_problem(folder, own=2)
    if problem:
        raise ConfigError(
            f"EPKERN_CACHE_DIR: refusing the kernel cache {folder}: {problem}; kernels loaded from there could be "
            "another user's code. Set EPKERN_CACHE_DIR to a folder of your own (mode 0700)."
        )
    return folder


COMPILE_LOCK_WAIT_S = 600.0
"""How long a process waits for another's compile of the same cubin before compiling it itself (a compile
takes seconds; a holder that died releases its lock with it, so this only bounds a stuck compiler)."""


@contextlib.contextmanager
def _compile_lock(path: Path):
    """Exclusive ``flock`` on ``path`` for one compile; yields the seconds spent waiting for it."""
    import fcntl

    start = time.perf_counter()
    with open(path, "a+b") as f:
        locked = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except BlockingIOError:
                if time.perf_counter() - start > COMPILE_LOCK_WAIT_S:
                    _log.get_logger().warning(
                        "%s: still locked after %.0f s; compiling without it", path, COMPILE_LOCK_WAIT_S
                    )
                    break
                time.sleep(0.02)
        try:
            yield time.perf_counter() - start
        finally:
            if locked:
                fcntl.flock(f, fcntl.LOCK_UN)


_modules: dict[tuple, object] = {}
_modules_lock = threading.Lock()


def get_function(source: Source, name: str, defines: Mapping[str, object] | None = None):
    """The ``cupy.RawKernel`` for ``extern "C"`` kernel ``name`` of ``source`` (a name in the library's kernels
    folder, or an absolute Path), specialised by ``defines``, for the current device. Cached per (device, source,
    defines)."""
    from . import _cuda

    _cuda.require_gpu(f"launching kernel {name}")
    return get_module(source, defines).get_function(name)


def get_module(source: Source, defines: Mapping[str, object] | None = None):
    """The ``cupy.RawModule`` of ``source`` specialised by ``defines`` (its functions and ``__device__``
    globals), for the current device; cached like :func:`get_function`."""
    import cupy

    defines = dict(defines or {})
    device = cupy.cuda.Device().id
    key = (device, source, tuple(sorted(defines.items())))
    module = _modules.get(key)
    if module is None:
        with _modules_lock:
            module = _modules.get(key)
            if module is None:
                _require_driver_for_nvrtc()
                path = cubin_path(source, defines, device_arch(device))
                start = time.perf_counter()
                module = cupy.RawModule(path=str(path))
                _log.get_logger().debug(
                    "loaded %s on device %d in %.3f s", path.name, device, time.perf_counter() - start
                )
                _modules[key] = module
    return module
