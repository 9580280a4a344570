"""Every kernel source compiles to an sm_90 cubin with NVRTC, on a machine without a GPU; each reads exactly the
defines it declares and fails to compile without any of them; the disk cache is keyed by what a cubin depends on."""

import re
import shutil
from pathlib import Path

import pytest

from epkern import kernel_constants, kernel_loader
from epkern.errors import KernelCompileError

ROOT = Path(__file__).resolve().parents[1]
BENCH_KERNELS = ROOT / "bench" / "kernels"
TEST_KERNELS = ROOT / "tests" / "kernels"

# The defines each compilable source reads, all required (a kernel has no fallback defaults). Library sources by
# name, the benchmarks' and tests' own sources by path.
DEFINES = {
    "ll_dispatch.cu": (
        "EPK_NUM_RANKS",
        "EPK_HIDDEN",
        "EPK_TOPK",
        "EPK_USE_FP8",
        "EPK_ROUND_SCALE",
        "EPK_USE_UE8M0",
        "EPK_THREADS",
        "EPK_LL_PULL",
        "EPK_LL_DIRECT",
        "EPK_POLL_SLEEP_NS",
        "EPK_LL_NIC",
    ),
    "ll_combine.cu": (
        "EPK_NUM_RANKS",
        "EPK_HIDDEN",
        "EPK_TOPK",
        "EPK_THREADS",
        "EPK_LL_COMBINE_PULL",
        "EPK_POLL_SLEEP_NS",
        "EPK_LL_NIC",
    ),
    "ht_dispatch.cu": (
        "EPK_NUM_RANKS",
        "EPK_TOPK",
        "EPK_ROW_BYTES",
        "EPK_SCALE_COLS",
        "EPK_NUM_LOCAL_EXPERTS",
        "EPK_WITH_META",
        "EPK_THREADS",
        "EPK_MIN_BLOCKS",
        "EPK_PROBE",
        "EPK_UNROLL",
    ),
    "ht_combine.cu": (
        "EPK_NUM_RANKS",
        "EPK_TOPK",
        "EPK_HIDDEN",
        "EPK_HAS_WEIGHTS",
        "EPK_THREADS",
        "EPK_MIN_BLOCKS",
        "EPK_PROBE",
        "EPK_UNROLL",
        "EPK_LOADS_FIRST",
    ),
    "ht_notify.cu": ("EPK_NUM_RANKS",),
    "ht_inter_notify.cu": ("EPK_NUM_RANKS", "EPK_NUM_NODES"),
    "ht_inter_dispatch.cu": (
        *("EPK_NUM_RANKS", "EPK_NUM_NODES", "EPK_TOPK", "EPK_ROW_BYTES", "EPK_SCALE_COLS", "EPK_NUM_LOCAL_EXPERTS"),
        *("EPK_WITH_META", "EPK_THREADS", "EPK_MIN_BLOCKS", "EPK_UNROLL"),
    ),
    "ht_inter_combine.cu": (
        *("EPK_NUM_RANKS", "EPK_NUM_NODES", "EPK_TOPK", "EPK_HIDDEN", "EPK_HAS_WEIGHTS", "EPK_THREADS"),
        "EPK_MIN_BLOCKS",
    ),
    "layout.cu": ("EPK_NUM_EXPERTS", "EPK_NUM_RANKS", "EPK_NUM_NODES", "EPK_TOPK", "EPK_IDX_T", "EPK_THREADS"),
    "nic_fetch_add.cu": (),
    BENCH_KERNELS / "bench_copy_patterns.cu": (
        "EPK_NUM_RANKS",
        "EPK_ROW_BYTES",
        "EPK_THREADS",
        "EPK_UNROLL",
        "EPK_STORE_CS",
        "EPK_LOADS_FIRST",
    ),
    BENCH_KERNELS / "bench_p2p.cu": (),
    TEST_KERNELS / "rdma_selftest.cu": (),
    TEST_KERNELS / "ht_stream_selftest.cu": (),
}


def _rows(source, *rows, **common):
    """One specimen per row: the row's values for the first len(row) defines of ``source``, then ``common``."""
    keys = DEFINES[source]
    return [{**dict(zip(keys, row, strict=False)), **common} for row in rows]


# (ranks, hidden, top-k, FP8, round_scale, UE8M0): typical DeepEP shapes (BF16 / FP8 / UE8M0) and the extremes
# (1 rank, H=128, top-32, 32 ranks).
LL_DISPATCH_SHAPES = (
    (8, 7168, 8, 1, 0, 0),
    (8, 7168, 8, 0, 0, 0),
    (4, 4096, 16, 1, 1, 1),
    (1, 128, 32, 1, 1, 0),
    (32, 384, 1, 0, 0, 0),
)
LL = dict(EPK_THREADS=512, EPK_LL_NIC=0)
PROXY = dict(EPK_THREADS=512, EPK_LL_NIC=2)  # a Buffer with a PROXY route (issue #17): pushed modes only
RDMA = dict(EPK_THREADS=512, EPK_LL_NIC=3)  # ... with an RDMA route (GPU-written WQEs): pushed modes only

SPECIMENS = {
    "ht_notify.cu": [dict(EPK_NUM_RANKS=8), dict(EPK_NUM_RANKS=1)],
    "ht_inter_notify.cu": _rows("ht_inter_notify.cu", (8, 2), (8, 4), (8, 8), (2, 2), (6, 3), (16, 2), (128, 16)),
    # (ranks, nodes, top-k, row bytes, scale columns, local experts, with meta, threads, min blocks, unroll): the
    # issue's 2 x 4 BF16 shape, FP8 on 4 x 2, cached on 8 x 1, the smallest
    "ht_inter_dispatch.cu": _rows(
        "ht_inter_dispatch.cu",
        (8, 2, 8, 14336, 0, 32, 1, 512, 1, 4),
        (8, 4, 8, 7168, 56, 32, 1, 512, 1, 4),
        (8, 8, 8, 14336, 0, 32, 0, 256, 2, 4),
        (8, 8, 8, 14336, 0, 32, 1, 256, 2, 4),
        (2, 2, 1, 16, 0, 1, 1, 128, 1, 1),
        (16, 2, 8, 14336, 0, 16, 1, 256, 2, 4),  # 2 nodes of 8
        (128, 16, 8, 7168, 56, 2, 1, 256, 2, 4),  # the limits
    ),
    # (ranks, nodes, top-k, hidden, weights, threads, min blocks)
    "ht_inter_combine.cu": _rows(
        "ht_inter_combine.cu",
        (8, 2, 8, 7168, 1, 256, 2),
        (8, 8, 8, 7168, 0, 256, 2),
        (2, 2, 1, 8, 1, 128, 1),
        (16, 2, 8, 7168, 1, 256, 2),
        (128, 16, 8, 7168, 1, 256, 2),
    ),
    # (ranks, top-k, row bytes, scale columns, local experts, with meta, threads, min blocks, probe, unroll)
    "ht_dispatch.cu": _rows(
        "ht_dispatch.cu",
        (8, 8, 14336, 0, 32, 1, 512, 2, 0, 4),
        (3, 32, 7168, 56, 1, 0, 512, 1, 0, 4),
        (8, 8, 14336, 0, 32, 1, 512, 2, 1, 4),  # the probe build (GpuBuffer.ht_probe)
    ),
    # (ranks, top-k, hidden, weights, threads, min blocks, probe, unroll, loads first): the default shape, a
    # 2-blocks/SM one, the smallest, and the probe build
    "ht_combine.cu": _rows(
        "ht_combine.cu",
        (8, 8, 7168, 1, 512, 1, 0, 1, 1),
        (8, 8, 7168, 1, 512, 2, 0, 2, 0),
        (2, 1, 8, 0, 512, 1, 0, 2, 1),
        (8, 8, 7168, 1, 512, 1, 1, 1, 1),
    ),
    "nic_fetch_add.cu": [dict()],
    # (experts, ranks, nodes, top-k, index type, threads)
    "layout.cu": _rows(
        "layout.cu",
        (256, 8, 0, 8, "int64_t", 128),
        (1024, 64, 8, 16, "int32_t", 256),
        (3, 3, 0, 1, "int64_t", 32),
    ),
    # LL: as the default (pulled) dispatch, the pushed one (EPKERN_LL_DISPATCH_PULL=0) and the direct one
    # (zero_copy_recv), with and without a sleep between polls.
    "ll_dispatch.cu": [
        *_rows("ll_dispatch.cu", *LL_DISPATCH_SHAPES, **LL, EPK_LL_PULL=1, EPK_LL_DIRECT=0, EPK_POLL_SLEEP_NS=0),
        *_rows("ll_dispatch.cu", (8, 7168, 8, 0, 0, 0), **LL, EPK_LL_PULL=1, EPK_LL_DIRECT=0, EPK_POLL_SLEEP_NS=100),
        *_rows("ll_dispatch.cu", *LL_DISPATCH_SHAPES, **LL, EPK_LL_PULL=0, EPK_LL_DIRECT=0, EPK_POLL_SLEEP_NS=200),
        *_rows(
            "ll_dispatch.cu",
            *LL_DISPATCH_SHAPES,
            (8, 7168, 8, 1, 1, 1),
            **LL,
            EPK_LL_PULL=1,
            EPK_LL_DIRECT=1,
            EPK_POLL_SLEEP_NS=0,
        ),
        *_rows("ll_dispatch.cu", *LL_DISPATCH_SHAPES, **PROXY, EPK_LL_PULL=0, EPK_LL_DIRECT=0, EPK_POLL_SLEEP_NS=200),
        *_rows("ll_dispatch.cu", (8, 7168, 8, 1, 0, 0), **PROXY, EPK_LL_PULL=0, EPK_LL_DIRECT=0, EPK_POLL_SLEEP_NS=0),
        *_rows("ll_dispatch.cu", *LL_DISPATCH_SHAPES, **RDMA, EPK_LL_PULL=0, EPK_LL_DIRECT=0, EPK_POLL_SLEEP_NS=200),
    ],
    # (ranks, hidden, top-k): pushed and pulled (zero-copy, EPKERN_LL_COMBINE_PULL=1); top-6 loads fewer
    # selections ahead than the kernel's 8.
    "ll_combine.cu": [
        *_rows(
            "ll_combine.cu",
            (8, 7168, 8),
            (1, 128, 32),
            (32, 8192, 1),
            (4, 1024, 6),
            **LL,
            EPK_LL_COMBINE_PULL=0,
            EPK_POLL_SLEEP_NS=0,
        ),
        *_rows("ll_combine.cu", (8, 7168, 8), **LL, EPK_LL_COMBINE_PULL=0, EPK_POLL_SLEEP_NS=200),
        *_rows("ll_combine.cu", (8, 7168, 8), **LL, EPK_LL_COMBINE_PULL=1, EPK_POLL_SLEEP_NS=0),
        *_rows("ll_combine.cu", (4, 2048, 4), **LL, EPK_LL_COMBINE_PULL=1, EPK_POLL_SLEEP_NS=200),
        *_rows(
            "ll_combine.cu",
            (8, 7168, 8),
            (1, 128, 32),
            (4, 1024, 6),
            (2, 7168, 8),
            **PROXY,
            EPK_LL_COMBINE_PULL=0,
            EPK_POLL_SLEEP_NS=200,
        ),
        *_rows(
            "ll_combine.cu",
            (8, 7168, 8),
            (1, 128, 32),
            (2, 7168, 8),
            **RDMA,
            EPK_LL_COMBINE_PULL=0,
            EPK_POLL_SLEEP_NS=200,
        ),
    ],
    # (ranks, row bytes, threads, unroll, streaming stores, loads first)
    BENCH_KERNELS / "bench_copy_patterns.cu": _rows(
        BENCH_KERNELS / "bench_copy_patterns.cu", (8, 14336, 512, 4, 1, 1), (2, 16, 1024, 1, 0, 0)
    ),
    BENCH_KERNELS / "bench_p2p.cu": [dict()],
    TEST_KERNELS / "rdma_selftest.cu": [dict()],
    TEST_KERNELS / "ht_stream_selftest.cu": [dict()],
}


def _name(source) -> str:
    return source.name if isinstance(source, Path) else source


def test_every_source_has_specimens():
    library = {p.name for p in kernel_loader.kernel_sources()}
    assert library, "no kernel sources found"
    assert library == {s for s in SPECIMENS if isinstance(s, str)}, "library sources without compile specimens"
    others = {*BENCH_KERNELS.glob("*.cu"), *TEST_KERNELS.glob("*.cu")}
    assert others == {s for s in SPECIMENS if isinstance(s, Path)}, "bench / test sources without specimens"
    assert set(DEFINES) == set(SPECIMENS)


def test_only_library_kernels_in_the_library_folder():
    """Benchmark and self-test kernels live beside their users, not in the shipped folder."""
    names = {p.name for p in kernel_loader.kernel_dir().glob("*.cu")}
    assert not {n for n in names if n.startswith("bench_") or "selftest" in n}, names


def test_specimens_give_exactly_the_defines():
    for source, specimens in SPECIMENS.items():
        for defines in specimens:
            assert set(defines) == set(DEFINES[source]), (source, defines)


_COMMENTS = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)


@pytest.mark.parametrize("source", list(DEFINES), ids=_name)
def test_sources_read_exactly_their_defines(source):
    """Every EPK_* macro that a source and its headers use but neither define nor take from epk_constants.cuh is
    in the source's define list, and every listed define is used."""
    free = _free_defines(kernel_loader.included_files(source))
    assert free == set(DEFINES[source]), f"read but not listed: {free - set(DEFINES[source])}; listed, unused: " + str(
        set(DEFINES[source]) - free
    )


def _free_defines(paths) -> set[str]:
    text = "\n".join(_COMMENTS.sub("", p.read_text()) for p in paths)
    used = set(re.findall(r"\bEPK_[A-Z0-9_]+\b", text))
    return used - set(re.findall(r"#\s*define\s+(EPK_[A-Z0-9_]+)", text)) - set(kernel_constants.values())


@pytest.mark.parametrize("header", sorted(p.name for p in kernel_loader.kernel_dir().glob("*.cuh")))
def test_every_header_is_whole(header):
    """A header compiles on its own, twice included (guarded), given only the defines it reads (values from a
    specimen of a kernel that includes it)."""
    lib = kernel_loader.kernel_dir()
    needs = _free_defines(kernel_loader.included_files(lib / header))
    users = [s for s in SPECIMENS if isinstance(s, str) and lib / header in kernel_loader.included_files(s)]
    # a kernel that sets one of them itself (the internode kernels' EPK_PROBE 0) does not pass it: another user does
    users = [u for u in users if needs <= set(SPECIMENS[u][0])] or users
    values = SPECIMENS[users[0]][0] if users else {}
    assert needs <= set(values), f"{header} reads {needs - set(values)}, which no kernel including it defines"
    defines = {k: values[k] for k in needs}
    nvrtc = kernel_loader._nvrtc()
    src = f'#include "{header}"\n#include "{header}"\nextern "C" __global__ void k() {{}}\n'
    prog = nvrtc.createProgram(src, str(lib / f"only_{header}.cu"), [], [])
    try:
        try:
            nvrtc.compileProgram(prog, kernel_loader.compile_options("sm_90", defines))
        except nvrtc.NVRTCError:
            pytest.fail(nvrtc.getProgramLog(prog))
    finally:
        nvrtc.destroyProgram(prog)


EVERY_SPECIMEN = pytest.mark.parametrize(
    "source,defines",
    [(s, d) for s, ds in SPECIMENS.items() for d in ds],
    ids=lambda v: _name(v) if isinstance(v, str | Path) else "-".join(str(x) for x in v.values()),
)


@EVERY_SPECIMEN
def test_compiles_to_sm90_cubin(source, defines):
    cubin = kernel_loader.compile_cubin(source, defines, arch="sm_90")
    assert cubin[:4] == b"\x7fELF", "NVRTC did not return an ELF cubin"
    assert len(cubin) > 1000


MISSING = [(s, name) for s, names in DEFINES.items() for name in names]


@pytest.mark.parametrize("source,missing", MISSING, ids=lambda v: _name(v))
def test_missing_define_fails_to_compile(source, missing):
    defines = {k: v for k, v in SPECIMENS[source][0].items() if k != missing}
    with pytest.raises(KernelCompileError, match=f'"{missing} must be defined"'):
        kernel_loader.compile_cubin(source, defines, arch="sm_90")


def test_a_constant_is_not_a_define():
    """A define named like a constant of epk_constants.cuh (EPK_CTRL_BYTES was a define) is refused by name."""
    spec = {**SPECIMENS["ht_notify.cu"][0], "EPK_CTRL_BYTES": 1 << 17}
    with pytest.raises(KernelCompileError, match="EPK_CTRL_BYTES is a constant of epk_constants.cuh"):
        kernel_loader.compile_cubin("ht_notify.cu", spec, arch="sm_90")


# Specimens known to spill, with why that is accepted (ptxas targets 64 registers for 512-thread blocks here).
SPILL_ALLOWED = {
    # the copy-pattern sweep's deepest unroll: the benchmark measures exactly this trade-off
    "bench_copy_patterns.cu": lambda d: d.get("EPK_UNROLL") == 4,
    # 8 bytes at the widest group (32 ranks, top-1): the extreme of the supported range, not a hot configuration;
    # and 12-28 bytes at top-k >= 16 with the combine split frozen at 4: exactly what ran, and was measured, before
    # the freeze (EPKERN_LL_COMBINE_SPLIT=4 was the default; the specimens then compiled split 1)
    "ll_combine.cu": lambda d: d["EPK_NUM_RANKS"] == 32 or d["EPK_TOPK"] >= 16,
    # the direct dispatch's FP8 cast: 16-24 bytes at some shapes (its put already keeps two loads in flight, not
    # three; BF16 does not spill). Measured on the H200 as part of the direct dispatch's numbers.
    "ll_dispatch.cu": lambda d: d.get("EPK_LL_DIRECT") == 1 and d["EPK_USE_FP8"] == 1,
}
# The NIC builds (EPK_LL_NIC=2 PROXY / 3 RDMA, issue #17; never the IPC-only kernels, which compile exactly as
# before): a few bytes around the trigger push / WQE post, outside the copy loops. Not measured on a GPU yet.
_SPILL_ALLOWED_IPC = dict(SPILL_ALLOWED)
SPILL_ALLOWED = {
    name: (lambda d, f=f: d.get("EPK_LL_NIC", 0) != 0 or f(d)) if name.startswith("ll_") else f
    for name, f in _SPILL_ALLOWED_IPC.items()
}


def _spill_params():
    for source, specimens in SPECIMENS.items():
        for d in specimens:
            yield pytest.param(source, d)


@pytest.mark.parametrize(
    "source,defines",
    list(_spill_params()),
    ids=lambda v: _name(v) if isinstance(v, str | Path) else "-".join(str(x) for x in v.values()),
)
def test_no_register_spills(source, defines):
    """Spilled registers go through local memory inside the copy loops: every specimen fits its registers but
    the SPILL_ALLOWED ones (a 4-deep copy unroll in ll_dispatch.cu spilled, a 3-deep one did not)."""
    report = kernel_loader.ptxas_report(source, defines, arch="sm_90")
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert spills, report
    name = _name(source)
    if name in SPILL_ALLOWED and SPILL_ALLOWED[name](defines):
        return
    assert all(st == "0" and ld == "0" for st, ld in spills), report


def test_compile_error_carries_log(tmp_path, monkeypatch):
    (tmp_path / "epk_common.cuh").write_text("#pragma once\n")
    (tmp_path / "broken.cu").write_text('extern "C" __global__ void k() { this_is_not_declared(); }\n')
    monkeypatch.setenv("EPKERN_KERNEL_DIR", str(tmp_path))
    with pytest.raises(KernelCompileError, match="this_is_not_declared"):
        kernel_loader.compile_cubin("broken.cu", {}, arch="sm_90")


def test_ptx_target_refused():
    with pytest.raises(KernelCompileError, match="sm_XY"):
        kernel_loader.compile_cubin("layout.cu", SPECIMENS["layout.cu"][0], arch="compute_90")


def test_source_forms(tmp_path):
    with pytest.raises(KernelCompileError, match="absolute"):
        kernel_loader.compile_cubin(Path("bench/kernels/bench_p2p.cu"), {}, arch="sm_90")
    with pytest.raises(KernelCompileError, match="absolute Path"):
        kernel_loader.compile_cubin("../bench/kernels/bench_p2p.cu", {}, arch="sm_90")
    with pytest.raises(KernelCompileError, match="no kernel source"):
        kernel_loader.compile_cubin("no_such_kernel.cu", {}, arch="sm_90")
    with pytest.raises(KernelCompileError, match="no kernel source"):
        kernel_loader.compile_cubin(tmp_path / "missing.cu", {}, arch="sm_90")


def test_source_elsewhere_includes_its_folder_then_the_library(tmp_path, monkeypatch):
    """A source outside the library includes the library's headers, a header beside it first; the working
    directory is never searched."""
    (tmp_path / "mine.cuh").write_text("#pragma once\nconstexpr int kMine = 7;\n")
    (tmp_path / "k.cu").write_text(
        '#include "epk_common.cuh"\n#include "mine.cuh"\n'
        'static_assert(kMine == 7 && EPK_CTRL_BYTES == (1 << 17), "headers");\n'
        'extern "C" __global__ void k(int *p) { *p = kMine + static_cast<int>(epk::now_ns()); }\n'
    )
    decoy = tmp_path / "cwd"
    decoy.mkdir()
    for name in ("epk_common.cuh", "mine.cuh", "ht_common.cuh"):
        (decoy / name).write_text('#error "the working directory was searched"\n')
    monkeypatch.chdir(decoy)
    assert kernel_loader.compile_cubin(tmp_path / "k.cu", {}, arch="sm_90")[:4] == b"\x7fELF"
    assert kernel_loader.compile_cubin("ht_notify.cu", SPECIMENS["ht_notify.cu"][0], arch="sm_90")[:4] == b"\x7fELF"
    # a header beside the source comes before the library's of the same name
    (tmp_path / "epk_constants.cuh").write_text("#pragma once\nconstexpr int EPK_CTRL_BYTES = 5;\n")
    (tmp_path / "k2.cu").write_text('#include "epk_constants.cuh"\nstatic_assert(EPK_CTRL_BYTES == 5, "mine");\n')
    assert kernel_loader.compile_cubin(tmp_path / "k2.cu", {}, arch="sm_90")[:4] == b"\x7fELF"
    assert kernel_loader.included_files(tmp_path / "k2.cu") == [tmp_path / "k2.cu", tmp_path / "epk_constants.cuh"]


def test_included_files_are_transitive_and_only_those():
    lib = kernel_loader.kernel_dir()
    names = [p.name for p in kernel_loader.included_files("ll_dispatch.cu")]
    assert names[0] == "ll_dispatch.cu"
    assert set(names) == {
        "ll_dispatch.cu",
        "epk_common.cuh",
        "epk_constants.cuh",
        "ll_common.cuh",
        "ll_route.cuh",
        "ll_dispatch_common.cuh",
        "ll_dispatch_direct.cuh",
        "mlx5_wqe.cuh",
        "proxy_fifo.cuh",
    }
    assert {p.name for p in kernel_loader.included_files("ht_notify.cu")} == {
        "ht_notify.cu",
        "epk_common.cuh",
        "epk_constants.cuh",
        "ht_common.cuh",
    }
    bench = kernel_loader.included_files(BENCH_KERNELS / "bench_copy_patterns.cu")
    assert bench == [BENCH_KERNELS / "bench_copy_patterns.cu", lib / "epk_common.cuh", lib / "epk_constants.cuh"]


def _copy_kernels(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "kernels"
    shutil.copytree(kernel_loader.kernel_dir(), folder)
    monkeypatch.setenv("EPKERN_KERNEL_DIR", str(folder))
    return folder


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_cache_key_covers_the_source_and_its_headers_only(tmp_path, monkeypatch):
    folder = _copy_kernels(tmp_path, monkeypatch)
    spec = SPECIMENS["ll_combine.cu"][0]

    def key():
        return kernel_loader.cache_key("ll_combine.cu", spec, "sm_90")

    first = key()
    assert key() == first
    for unrelated in ("ll_dispatch.cu", "ll_dispatch_direct.cuh", "ht_common.cuh", "layout.cu", "nic_fetch_add.cu"):
        _append(folder / unrelated, "// edited\n")
        assert key() == first, f"editing {unrelated} changed ll_combine.cu's key"
    (folder / "new_kernel.cu").write_text('extern "C" __global__ void k() {}\n')
    assert key() == first
    keys = {first}
    for included in ("epk_constants.cuh", "ll_route.cuh", "ll_common.cuh", "ll_combine.cu", "mlx5_wqe.cuh"):
        _append(folder / included, "// edited\n")
        assert key() not in keys, f"editing {included} did not change the key"
        keys.add(key())
    assert kernel_loader.cache_key("ll_combine.cu", {**spec, "EPK_TOPK": 4}, "sm_90") not in keys
    assert kernel_loader.cache_key("ll_combine.cu", spec, "sm_100") not in keys


def test_cache_key_of_a_source_elsewhere(tmp_path, monkeypatch):
    folder = _copy_kernels(tmp_path, monkeypatch)
    mine = tmp_path / "bench"
    mine.mkdir()
    src = mine / "bench_copy_patterns.cu"
    shutil.copy(BENCH_KERNELS / "bench_copy_patterns.cu", src)
    spec = SPECIMENS[BENCH_KERNELS / "bench_copy_patterns.cu"][0]
    first = kernel_loader.cache_key(src, spec, "sm_90")
    _append(folder / "ht_common.cuh", "// edited\n")  # a library header it does not include
    (mine / "other.cu").write_text("// a neighbour\n")
    assert kernel_loader.cache_key(src, spec, "sm_90") == first
    _append(folder / "epk_common.cuh", "// edited\n")  # a library header it includes
    assert kernel_loader.cache_key(src, spec, "sm_90") != first


def test_disk_cache_reuses_cubin(tmp_path, monkeypatch):
    monkeypatch.setenv("EPKERN_CACHE_DIR", str(tmp_path))
    spec = SPECIMENS["layout.cu"][0]
    first = kernel_loader.cubin_path("layout.cu", spec, "sm_90")
    mtime = first.stat().st_mtime_ns
    again = kernel_loader.cubin_path("layout.cu", spec, "sm_90")
    assert again == first and again.stat().st_mtime_ns == mtime
    other = kernel_loader.cubin_path("layout.cu", {**spec, "EPK_TOPK": 4}, "sm_90")
    assert other != first
    bench = kernel_loader.cubin_path(BENCH_KERNELS / "bench_p2p.cu", {}, "sm_90")
    assert bench.name.startswith("bench_p2p-sm_90-") and bench.is_file()
