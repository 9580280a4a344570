"""Every library kernel's launch description (epkern.gpu.kernels) matches its C signature — the same parameter
names in the same order, each argument of the parameter's size, pointers where pointers go — and its define list
is exactly the macros the source requires. The host paths (run over the fake CuPy, tests/fake_cupy.py; kernels
recorded, not run) launch only through those descriptions, so a parameter added on one side only fails here, on
a CPU, instead of as garbage arguments on a GPU."""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import pytest

import fake_cupy as F
from epkern import kernel_loader
from epkern.gpu import kernels as KS
from epkern.gpu.tuning import LLTuning, Tuning

BF16 = np.dtype(ml_dtypes.bfloat16)
EIGHT_BYTE = ("long long", "int64_t", "uint64_t", "unsigned long long")


def _read(source: str) -> str:
    return (kernel_loader.kernel_dir() / source).read_text()


def _params(source: str, name: str) -> list[str]:
    text = _read(source)
    m = re.search(
        r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?' + name + r"\s*\(([^)]*)\)", text
    )
    assert m, f"{name} not found in {source}"
    return [" ".join(p.split()) for p in m.group(1).split(",")]


def _size_and_pointer(param: str) -> tuple[int, bool]:
    if "*" in param:
        return 8, True
    return (8 if any(t in param for t in EIGHT_BYTE) else 4), False


@pytest.mark.parametrize("spec", KS.LIBRARY_KERNELS, ids=lambda s: s.name)
def test_description_matches_the_c_signature(spec):
    params = _params(spec.source, spec.name)
    assert len(params) == len(spec.args), f"{spec.name}: {len(spec.args)} described for {params}"
    sizes = {KS.I32: 4, KS.I64: 8, KS.U64: 8, KS.PTR: 8}
    for (name, kind), param in zip(spec.args, params, strict=True):
        c_name = re.findall(r"\w+", param)[-1]
        assert name == c_name, f"{spec.name}: argument {name!r} is {c_name!r} in the source"
        size, pointer = _size_and_pointer(param)
        assert sizes[kind] == size and (kind == KS.PTR) == pointer, f"{spec.name}: {name} is {kind}, C has {param}"


@pytest.mark.parametrize("spec", KS.LIBRARY_KERNELS, ids=lambda s: s.name)
def test_every_define_is_required_and_described(spec):
    """The kernel compiles with exactly the described defines, and without any one of them it does not."""
    sample = {
        "EPK_IDX_T": "int64_t",
        "EPK_THREADS": 512,
        "EPK_NUM_RANKS": 2,
        "EPK_NUM_EXPERTS": 16,
        "EPK_NUM_NODES": 0,
        "EPK_TOPK": 4,
        "EPK_NUM_LOCAL_EXPERTS": 8,
        "EPK_ROW_BYTES": 2048,
        "EPK_SCALE_COLS": 0,
        "EPK_WITH_META": 1,
        "EPK_MIN_BLOCKS": 1,
        "EPK_PROBE": 0,
        "EPK_UNROLL": 1,
        "EPK_HIDDEN": 1024,
        "EPK_HAS_WEIGHTS": 1,
        "EPK_LOADS_FIRST": 1,
        "EPK_USE_FP8": 0,
        "EPK_ROUND_SCALE": 0,
        "EPK_USE_UE8M0": 0,
        "EPK_LL_PULL": 1,
        "EPK_LL_DIRECT": 0,
        "EPK_POLL_SLEEP_NS": 0,
        "EPK_LL_COMBINE_PULL": 1,
        "EPK_LL_NIC": 0,
    }
    defines = {p: sample[p] for p in spec.params}
    if spec.source.startswith("ht_inter"):  # across nodes: at least two (layout.cu's 0 means "no node counts")
        defines["EPK_NUM_NODES"] = 2
    kernel_loader.compile_cubin(spec.source, defines, arch="sm_90")
    dropped = spec.params[-1]
    with pytest.raises(Exception, match=dropped):
        kernel_loader.compile_cubin(spec.source, {k: v for k, v in defines.items() if k != dropped}, arch="sm_90")


def test_pack_refuses_a_missing_or_unknown_argument():
    args = {n: 0 for n, _ in KS.HT_NOTIFY.args}
    assert len(KS.HT_NOTIFY.pack(**args)) == len(KS.HT_NOTIFY.args)
    with pytest.raises(TypeError, match="missing.*call"):
        KS.HT_NOTIFY.pack(**{k: v for k, v in args.items() if k != "call"})
    with pytest.raises(TypeError, match="defines missing"):
        KS.HT_DISPATCH.defines(EPK_NUM_RANKS=2)


@pytest.fixture
def fake(monkeypatch):
    with F.installed(monkeypatch) as launches:
        yield launches


def _check(launch) -> None:
    source, name, defines, _grid, _block, args = launch[:6]
    (spec,) = [s for s in KS.LIBRARY_KERNELS if s.name == name]
    assert source == spec.source and set(defines) == set(spec.params), (name, sorted(defines))
    assert len(args) == len(spec.args)
    for i, (a, (_, kind)) in enumerate(zip(args, spec.args, strict=True)):
        if kind == KS.PTR and not isinstance(a, np.generic):
            assert hasattr(a, "data"), (name, i, a)  # a device array: passed as its address
        else:
            assert isinstance(a, np.generic) and a.dtype.itemsize == (4 if kind == KS.I32 else 8), (name, i, a)


def test_every_ht_launch_goes_through_its_description(fake):
    buf = F.fake_buffer()
    inputs = F.ht_inputs(64, 1024, 4, 8)
    recv_x, _, recv_w, _, handle, _ = F.full_dispatch(buf, inputs, num_worst_tokens=64)
    buf.dispatch(inputs[0], handle=handle)
    buf.combine(recv_x, handle, topk_weights=recv_w)
    names = {launch[1] for launch in fake}
    assert {"epk_ht_notify", "epk_ht_dispatch", "epk_ht_combine"} <= names, names
    for launch in fake:
        _check(launch)
    buf.destroy()


@pytest.mark.parametrize("use_fp8,zero_copy,pull", [(False, False, True), (True, False, False), (False, True, True)])
def test_every_ll_launch_goes_through_its_description(fake, use_fp8, zero_copy, pull):
    import cupy

    from epkern.gpu.ll.layout import min_num_rdma_bytes

    T, H, K, E, num_max = 64, 1024, 4, 8, 64
    tuning = Tuning(ll=LLTuning(dispatch_pull=pull, combine_pull=pull))
    rdma = min_num_rdma_bytes(num_max, H, E)
    buf = F.fake_buffer(num_nvl_bytes=0, num_rdma_bytes=rdma, low_latency_mode=True, _tuning=tuning)
    x = cupy.asarray(np.ones((T, H), BF16))
    idx = cupy.asarray(np.tile(np.arange(K, dtype=np.int64), (T, 1)))
    w = cupy.asarray(np.ones((T, K), np.float32))
    recv, _, handle, _, _ = buf.low_latency_dispatch(x, idx, num_max, E, use_fp8=use_fp8)
    y = cupy.asarray(np.zeros((E, num_max, H), BF16))
    if zero_copy:
        buf.get_next_low_latency_combine_buffer(handle)
    buf.low_latency_combine(y, idx, w, handle, zero_copy=zero_copy)
    launched = [launch for launch in fake if launch[1].startswith("epk_ll_")]
    assert {launch[1] for launch in launched} == {"epk_ll_dispatch", "epk_ll_combine"}
    dispatch_defines = [launch[2] for launch in launched if launch[1] == "epk_ll_dispatch"][0]
    combine_defines = [launch[2] for launch in launched if launch[1] == "epk_ll_combine"][0]
    assert dispatch_defines["EPK_LL_PULL"] == int(pull)
    assert combine_defines["EPK_LL_COMBINE_PULL"] == int(zero_copy and pull)
    for launch in launched:
        _check(launch)
    buf.destroy()


def test_pull_follows_the_routes_by_default(fake):
    """Every peer reached by IPC: receivers pull (a one-rank group has no other peer)."""
    from epkern.gpu.ll.layout import min_num_rdma_bytes

    buf = F.fake_buffer(num_nvl_bytes=0, num_rdma_bytes=min_num_rdma_bytes(8, 128, 8), low_latency_mode=True)
    assert buf._backend.ll.dispatch_pull == 1 and buf._backend.ll.combine_pull == 1
    buf.destroy()
