"""Packaging: the light base install (the CPU backend imports no CuPy, cffi or mpi4py), the wheel's contents (the
library kernels, not bench/tests kernels; base dependencies and extras; console scripts), and kernel_loader
compiling from an installed wheel's layout. No GPU needed."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("cupy", "cupy_backends", "cffi", "mpi4py")


def _run(code: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd,
    )


def test_cpu_backend_imports_no_gpu_rdma_or_mpi_package():
    """With CuPy, cffi and mpi4py made unimportable: `import epkern` and a CPU-backend Buffer do not even try to
    import them; the demo's dispatch/LL/combine on in-process ranks runs validated; none is loaded afterwards."""
    proc = _run(
        f"""
        import sys
        HEAVY = {HEAVY!r}
        tried = []

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in HEAVY:
                    tried.append(name)
                    raise ImportError(f"{{name}} blocked by the test")
                return None

        sys.meta_path.insert(0, Block())
        import epkern
        from epkern import demo
        from epkern.group import SingleGroup

        with epkern.Buffer(SingleGroup(), backend="cpu") as buf:
            assert type(buf).__name__ == "Buffer"
        assert not tried, tried  # not even tried by the import and a CPU Buffer
        # run_in_process asks whether there is a GPU to spread its ranks over (an import of CuPy that fails here,
        # as in a base install): the demo still runs, validated, on the CPU backend.
        assert demo.main(["--ranks", "2", "--tokens", "16", "--hidden", "128", "--experts", "4", "--topk", "2",
                          "--iters", "1", "--backend", "cpu"]) == 0
        loaded = [m for m in sys.modules if m.split(".")[0] in HEAVY]
        assert set(tried) <= {{"cupy"}} and not loaded, (tried, loaded)
        print("LIGHT OK")
        """
    )
    assert proc.returncode == 0 and "LIGHT OK" in proc.stdout, proc.stdout + proc.stderr


def test_gpu_check_without_cupy_says_cpu():
    """Without CuPy (the base install), backend="auto" resolves to the CPU backend instead of failing."""
    proc = _run(
        """
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("cupy", "cupy_backends"):
                    raise ImportError("no CuPy in a base install")
                return None

        sys.meta_path.insert(0, Block())
        import epkern
        from epkern.buffer import resolve_backend

        assert not epkern.gpu_available()
        assert resolve_backend("auto") == "cpu"
        print("AUTO OK")
        """
    )
    assert proc.returncode == 0 and "AUTO OK" in proc.stdout, proc.stdout + proc.stderr


def test_epkern_is_the_installed_one():
    """The epkern under test is the one this environment installed: the wheel's files when installed from a
    wheel (CI runs the suite so), else the source tree (an editable install), never the tree shadowing a wheel."""
    import importlib.metadata

    import epkern

    here = Path(epkern.__file__).resolve()
    try:
        dist = importlib.metadata.distribution("epkern")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("epkern is not installed (imported from a path)")
    files = {str(f).replace(os.sep, "/") for f in dist.files or ()}
    if "epkern/__init__.py" in files:
        assert here == Path(dist.locate_file("epkern/__init__.py")).resolve(), here
    else:
        assert here == ROOT / "src" / "epkern" / "__init__.py", here


def test_driver_check_against_nvrtc():
    from epkern._cuda import check_driver_for_nvrtc
    from epkern.errors import DeviceUnavailableError

    for driver, nvrtc in ((13000, (13, 0)), (13020, (13, 0)), (12090, (12, 9)), (13000, (12, 9))):
        check_driver_for_nvrtc(driver, nvrtc)
    with pytest.raises(DeviceUnavailableError, match=r"CUDA 13\.0 but NVRTC is 13\.1.*nvidia-cuda-nvrtc==13\.0"):
        check_driver_for_nvrtc(13000, (13, 1))
    with pytest.raises(DeviceUnavailableError, match=r"CUDA 12\.8 but NVRTC is 13\.0.*epkern\[cuda12\]"):
        check_driver_for_nvrtc(12080, (13, 0))
    with pytest.raises(DeviceUnavailableError, match=r"CUDA 12\.4 but NVRTC is 12\.9.*nvidia-cuda-nvrtc-cu12==12\.4"):
        check_driver_for_nvrtc(12040, (12, 9))
    with pytest.raises(DeviceUnavailableError, match=r"CUDA 11\.8 but NVRTC is 12\.9.*update the NVIDIA driver"):
        check_driver_for_nvrtc(11080, (12, 9))


def test_header_roots_cover_both_wheel_layouts(monkeypatch, tmp_path):
    """kernel_loader finds cuda_bf16.h in the CUDA 13 wheel (nvidia/cu13/include) and the CUDA 12 one
    (nvidia/cuda_runtime/include), preferring NVRTC's own major."""
    from epkern import kernel_loader

    roots = {}
    for major, parts in ((13, ("cu13",)), (12, ("cuda_runtime",))):
        inc = tmp_path.joinpath("site", "nvidia", *parts, "include")
        inc.mkdir(parents=True)
        roots[major] = inc
    monkeypatch.setattr(kernel_loader, "_site_dirs", lambda: [tmp_path / "site"])
    for major in (13, 12):
        monkeypatch.setattr(kernel_loader, "nvrtc_version", lambda major=major: (major, 0))
        assert kernel_loader._wheel_header_roots() == [roots[major], roots[25 - major]]


# ----------------------------------------------------------------------------------------------- the wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of this source tree, built without build isolation (offline) into a temporary folder."""
    for module in ("build", "hatchling"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install build hatchling; the test extra has both)")
    if not (ROOT / "pyproject.toml").is_file() or not (ROOT / "kernels").is_dir():
        pytest.skip(f"no source tree at {ROOT}")
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (built,) = out.glob("epkern-*.whl")
    return built


def _metadata(names: list[str], zf: zipfile.ZipFile, file: str) -> str:
    (path,) = [n for n in names if n.endswith(f".dist-info/{file}")]
    return zf.read(path).decode()


def test_wheel_holds_the_library_kernels_only(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = _metadata(names, zf, "METADATA")
        entry_points = _metadata(names, zf, "entry_points.txt")
    library = {p.name for p in (ROOT / "kernels").iterdir() if p.suffix in (".cu", ".cuh")}
    assert "layout.cu" in library and "epk_common.cuh" in library
    packaged = {n for n in names if n.endswith((".cu", ".cuh"))}
    assert packaged == {f"epkern/kernels/{name}" for name in library}, sorted(packaged ^ library)
    assert not [n for n in names if n.startswith(("bench/", "tests/", "kernels/", "docs/"))]
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert "epkern/__init__.py" in names and "epkern/kernel_loader.py" in names

    requires = [
        line.split(":", 1)[1].strip().replace("'", '"')
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:")
    ]
    base = sorted(re.split(r"[<>=!~;\[ ]", r)[0].replace("-", "_").lower() for r in requires if "extra ==" not in r)
    assert base == ["ml_dtypes", "numpy"], requires
    extras = {line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Provides-Extra:")}
    assert {"cuda13", "cuda12", "rdma", "mpi", "test"} <= extras, extras
    assert any(r.startswith("nvidia-cuda-nvrtc==13.0.*") and 'extra == "cuda13"' in r for r in requires), requires
    assert any(r.startswith("cffi") and 'extra == "rdma"' in r for r in requires), requires
    assert "epkern = epkern.cli:main" in entry_points and "epkern-launch = epkern.launch:main" in entry_points


def test_kernel_loader_compiles_from_an_installed_wheel(wheel, tmp_path):
    """The wheel unpacked as a site folder first on PYTHONPATH: epkern is imported from there, its kernels folder
    is the packaged one, and one kernel compiles to an sm_90 cubin (NVRTC, no GPU)."""
    pytest.importorskip(
        "cupy_backends.cuda.libs.nvrtc", reason="NVRTC (CuPy) is not installed: pip install epkern[cuda13]"
    )
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    env = {k: v for k, v in os.environ.items() if k != "EPKERN_KERNEL_DIR"}
    env["PYTHONPATH"] = str(site)
    env["EPKERN_CACHE_DIR"] = str(tmp_path / "cache")
    proc = _run(
        f"""
        from pathlib import Path
        import epkern
        from epkern import kernel_loader

        site = Path({str(site)!r})
        assert Path(epkern.__file__).resolve().is_relative_to(site), epkern.__file__
        assert kernel_loader.kernel_dir() == site / "epkern" / "kernels", kernel_loader.kernel_dir()
        assert all(p.is_relative_to(site) for p in kernel_loader.included_files("ll_dispatch.cu"))
        defines = dict(EPK_NUM_EXPERTS=256, EPK_NUM_RANKS=8, EPK_NUM_NODES=0, EPK_TOPK=8, EPK_IDX_T="int64_t",
                       EPK_THREADS=128)
        path = kernel_loader.cubin_path("layout.cu", defines, "sm_90")
        assert path.read_bytes()[:4] == b"\\x7fELF", path
        print("WHEEL OK", epkern.__file__)
        """,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0 and "WHEEL OK" in proc.stdout, proc.stdout + proc.stderr
