"""Every kernel source compiles to an sm_90 cubin with NVRTC, on a machine without a GPU."""

import re

import pytest

from epkern import kernel_loader
from epkern.errors import KernelCompileError

# Each .cu file with the specialisations worth compiling in CI: small, typical and extreme ones.
CTRL = {"EPK_CTRL_BYTES": 1 << 17}
HT_COMBINE_KEYS = (
    "EPK_NUM_RANKS",
    "EPK_TOPK",
    "EPK_HIDDEN",
    "EPK_HAS_WEIGHTS",
    "EPK_MIN_BLOCKS",
    "EPK_UNROLL",
    "EPK_LOADS_FIRST",
)
LL_DISPATCH_KEYS = ("EPK_NUM_RANKS", "EPK_HIDDEN", "EPK_TOPK", "EPK_USE_FP8", "EPK_ROUND_SCALE", "EPK_USE_UE8M0")
# (ranks, hidden, top-k, FP8, round_scale, UE8M0)
LL_DISPATCH_SHAPES = (
    (8, 7168, 8, 1, 0, 0),
    (8, 7168, 8, 0, 0, 0),
    (4, 4096, 16, 1, 1, 1),
    (1, 128, 32, 1, 1, 0),
    (32, 384, 1, 0, 0, 0),
)


def _specimens(keys, *rows, **extra):
    """One specimen per row of values for ``keys``, at 512 threads, with ``extra`` defines and the control area."""
    return [dict(zip(keys, row, strict=True), EPK_THREADS=512, **extra, **CTRL) for row in rows]


SPECIMENS = {
    "ht_notify.cu": [
        dict(EPK_NUM_RANKS=8, EPK_NUM_LOCAL_EXPERTS=32, **CTRL),
        dict(EPK_NUM_RANKS=1, EPK_NUM_LOCAL_EXPERTS=1024, **CTRL),
    ],
    "ht_dispatch.cu": [
        dict(
            EPK_NUM_RANKS=8,
            EPK_TOPK=8,
            EPK_ROW_BYTES=14336,
            EPK_SCALE_COLS=0,
            EPK_NUM_LOCAL_EXPERTS=32,
            EPK_WITH_META=1,
            EPK_THREADS=512,
            EPK_MIN_BLOCKS=2,
            EPK_UNROLL=4,
            **CTRL,
        ),
        dict(
            EPK_NUM_RANKS=3,
            EPK_TOPK=32,
            EPK_ROW_BYTES=7168,
            EPK_SCALE_COLS=56,
            EPK_NUM_LOCAL_EXPERTS=1,
            EPK_WITH_META=0,
            EPK_THREADS=512,
            EPK_MIN_BLOCKS=1,
            EPK_UNROLL=4,
            **CTRL,
        ),
    ],
    # the default shape, a 2-blocks/SM one, and the smallest
    "ht_combine.cu": _specimens(
        HT_COMBINE_KEYS, (8, 8, 7168, 1, 1, 1, 1), (8, 8, 7168, 1, 2, 2, 0), (2, 1, 8, 0, 1, 2, 1)
    ),
    "bench_copy_patterns.cu": [
        dict(
            EPK_NUM_RANKS=8,
            EPK_ROW_BYTES=14336,
            EPK_THREADS=512,
            EPK_UNROLL=4,
            EPK_STORE_CS=1,
            EPK_LOADS_FIRST=1,
            **CTRL,
        ),
        dict(
            EPK_NUM_RANKS=2, EPK_ROW_BYTES=16, EPK_THREADS=1024, EPK_UNROLL=1, EPK_STORE_CS=0, EPK_LOADS_FIRST=0, **CTRL
        ),
    ],
    "rdma_selftest.cu": [dict()],
    "nic_fetch_add.cu": [dict()],
    "bench_p2p.cu": [dict()],
    "layout.cu": [
        dict(
            EPK_NUM_EXPERTS=256,
            EPK_NUM_RANKS=8,
            EPK_NUM_NODES=0,
            EPK_TOPK=8,
            EPK_IDX_T="int64_t",
            EPK_THREADS=128,
        ),
        dict(
            EPK_NUM_EXPERTS=1024,
            EPK_NUM_RANKS=64,
            EPK_NUM_NODES=8,
            EPK_TOPK=16,
            EPK_IDX_T="int32_t",
            EPK_THREADS=256,
        ),
        dict(
            EPK_NUM_EXPERTS=3,
            EPK_NUM_RANKS=3,
            EPK_NUM_NODES=0,
            EPK_TOPK=1,
            EPK_IDX_T="int64_t",
            EPK_THREADS=32,
        ),
    ],
    # LL: typical DeepEP shapes (BF16 / FP8 / UE8M0), and the extremes (1 rank, H=128, top-32, 32 ranks), as the
    # default (pulled) dispatch and as the pushed one (EPKERN_LL_DISPATCH_PULL=0).
    "ll_dispatch.cu": [
        *_specimens(LL_DISPATCH_KEYS, *LL_DISPATCH_SHAPES),
        *_specimens(LL_DISPATCH_KEYS, (8, 7168, 8, 0, 0, 0), EPK_POLL_SLEEP_NS=100, EPK_POLL_RELAXED=1),
        *_specimens(LL_DISPATCH_KEYS, (8, 7168, 8, 1, 1, 1), (1, 128, 32, 0, 0, 0)),
        *_specimens(LL_DISPATCH_KEYS, *LL_DISPATCH_SHAPES, EPK_LL_PULL=0, EPK_POLL_SLEEP_NS=200, EPK_POLL_RELAXED=1),
        # rows copied with more loads in flight (EPKERN_LL_COPY_INFLIGHT), BF16 and FP8
        *_specimens(LL_DISPATCH_KEYS, (8, 7168, 8, 0, 0, 0), (8, 7168, 8, 1, 1, 1), EPK_LL_COPY_INFLIGHT=6),
        *_specimens(LL_DISPATCH_KEYS, (2, 256, 4, 0, 0, 0), EPK_LL_COPY_INFLIGHT=1),
        *_specimens(LL_DISPATCH_KEYS, (4, 2048, 4, 0, 0, 0), EPK_LL_DIAG=1),  # the absent-rank diagnostics
        # the direct dispatch (zero_copy_recv)
        *_specimens(LL_DISPATCH_KEYS, *LL_DISPATCH_SHAPES, (8, 7168, 8, 1, 1, 1), EPK_LL_DIRECT=1),
        *_specimens(LL_DISPATCH_KEYS, (8, 7168, 8, 0, 0, 0), EPK_LL_DIRECT=1, EPK_LL_COPY_INFLIGHT=6),
    ],
    "ll_combine.cu": [
        dict(EPK_NUM_RANKS=8, EPK_HIDDEN=7168, EPK_TOPK=8, EPK_THREADS=512, **CTRL),
        dict(EPK_NUM_RANKS=1, EPK_HIDDEN=128, EPK_TOPK=32, EPK_THREADS=512, **CTRL),
        dict(EPK_NUM_RANKS=32, EPK_HIDDEN=8192, EPK_TOPK=1, EPK_THREADS=512, **CTRL),
        dict(
            EPK_NUM_RANKS=8,
            EPK_HIDDEN=7168,
            EPK_TOPK=8,
            EPK_THREADS=512,
            EPK_POLL_SLEEP_NS=200,
            EPK_POLL_RELAXED=1,
            EPK_LL_COMBINE_SPLIT=4,
            **CTRL,
        ),
        # one selection's load at a time (EPKERN_LL_COMBINE_AHEAD=1, the code up to session C) and a partial last
        # chunk of loads (top-6 with 4 ahead)
        dict(EPK_NUM_RANKS=8, EPK_HIDDEN=7168, EPK_TOPK=8, EPK_THREADS=512, EPK_LL_COMBINE_AHEAD=1, **CTRL),
        dict(EPK_NUM_RANKS=4, EPK_HIDDEN=1024, EPK_TOPK=6, EPK_THREADS=512, EPK_LL_COMBINE_AHEAD=4, **CTRL),
        # the pulled zero-copy combine (EPKERN_LL_COMBINE_PULL=1)
        dict(EPK_NUM_RANKS=8, EPK_HIDDEN=7168, EPK_TOPK=8, EPK_THREADS=512, EPK_LL_COMBINE_PULL=1, **CTRL),
        dict(
            EPK_NUM_RANKS=4,
            EPK_HIDDEN=2048,
            EPK_TOPK=4,
            EPK_THREADS=512,
            EPK_LL_COMBINE_PULL=1,
            EPK_LL_COMBINE_SPLIT=4,
            EPK_POLL_SLEEP_NS=200,
            EPK_POLL_RELAXED=1,
            **CTRL,
        ),
    ],
}


def test_every_source_has_specimens():
    names = {p.name for p in kernel_loader.kernel_sources()}
    assert names, "no kernel sources found"
    assert names == set(SPECIMENS), f"sources without compile specimens: {names - set(SPECIMENS)}"


EVERY_SPECIMEN = pytest.mark.parametrize(
    "source,defines",
    [(s, d) for s, ds in SPECIMENS.items() for d in ds],
    ids=lambda v: v if isinstance(v, str) else "-".join(str(x) for x in v.values()),
)


@EVERY_SPECIMEN
def test_compiles_to_sm90_cubin(source, defines):
    cubin = kernel_loader.compile_cubin(source, defines, arch="sm_90")
    assert cubin[:4] == b"\x7fELF", "NVRTC did not return an ELF cubin"
    assert len(cubin) > 1000


# Specimens known to spill, with why that is accepted (ptxas targets 64 registers for 512-thread blocks here).
SPILL_ALLOWED = {
    # the copy-pattern sweep's deepest unroll: the benchmark measures exactly this trade-off
    "bench_copy_patterns.cu": lambda d: d.get("EPK_UNROLL") == 4,
    # 8 bytes at the widest group (32 ranks, top-1): the extreme of the supported range, not a hot configuration
    "ll_combine.cu": lambda d: d["EPK_NUM_RANKS"] == 32,
    # the direct dispatch's FP8 cast: 16-24 bytes at some shapes (its put already keeps two loads in flight, not
    # three; BF16 does not spill). Measured on the H200 as part of the direct dispatch's numbers.
    "ll_dispatch.cu": lambda d: d.get("EPK_LL_DIRECT") == 1 and d["EPK_USE_FP8"] == 1,
}


@EVERY_SPECIMEN
def test_no_register_spills(source, defines):
    """Spilled registers go through local memory inside the copy loops: every specimen fits its registers but
    the SPILL_ALLOWED ones (a 4-deep copy unroll in ll_dispatch.cu spilled, a 3-deep one did not)."""
    report = kernel_loader.ptxas_report(source, defines, arch="sm_90")
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert spills, report
    if source in SPILL_ALLOWED and SPILL_ALLOWED[source](defines):
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


def test_disk_cache_reuses_cubin(tmp_path, monkeypatch):
    monkeypatch.setenv("EPKERN_CACHE_DIR", str(tmp_path))
    spec = SPECIMENS["layout.cu"][0]
    first = kernel_loader.cubin_path("layout.cu", spec, "sm_90")
    mtime = first.stat().st_mtime_ns
    again = kernel_loader.cubin_path("layout.cu", spec, "sm_90")
    assert again == first and again.stat().st_mtime_ns == mtime
    other = kernel_loader.cubin_path("layout.cu", {**spec, "EPK_TOPK": 4}, "sm_90")
    assert other != first
