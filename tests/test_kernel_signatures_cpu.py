"""Every kernel launch the GPU host paths make passes what the kernel's C signature takes: as many arguments,
each of the parameter's size, device arrays only where a pointer goes. The host paths run over the fake CuPy
(tests/fake_cupy.py; kernels recorded, not run), and the signatures are read from the kernel sources, so a
parameter added on one side only fails here, on a CPU, instead of as garbage arguments on a GPU."""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import pytest

import fake_cupy as F
from epkern import kernel_loader

BF16 = np.dtype(ml_dtypes.bfloat16)
EIGHT_BYTE = ("long long", "int64_t", "uint64_t", "unsigned long long")


def _params(source: str, name: str) -> list[str]:
    text = _read(source)
    m = re.search(
        r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?' + name + r"\s*\(([^)]*)\)", text
    )
    assert m, f"{name} not found in {source}"
    return [" ".join(p.split()) for p in m.group(1).split(",")]


def _read(source: str) -> str:
    (path,) = [p for p in kernel_loader.kernel_sources() if p.name == source]
    return path.read_text()


def _size_and_pointer(param: str) -> tuple[int, bool]:
    if "*" in param:
        return 8, True
    return (8 if any(t in param for t in EIGHT_BYTE) else 4), False


def _check(launch) -> None:
    source, name, _defines, _grid, _block, args = launch[:6]
    params = _params(source, name)
    assert len(args) == len(params), f"{name}: {len(args)} arguments for {len(params)} parameters {params}"
    for i, (a, p) in enumerate(zip(args, params, strict=True)):
        size, pointer = _size_and_pointer(p)
        if isinstance(a, np.generic):
            assert a.dtype.itemsize == size, f"{name} argument {i} ({p}): a {a.dtype} scalar"
        else:
            assert pointer and hasattr(a, "data"), f"{name} argument {i} ({p}): {type(a).__name__}"


@pytest.fixture
def fake(monkeypatch):
    with F.installed(monkeypatch) as launches:
        yield launches


def test_every_ht_launch_matches_its_kernel(fake):
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


@pytest.mark.parametrize("use_fp8,zero_copy,pull", [(False, False, "1"), (True, False, "0"), (False, True, "1")])
def test_every_ll_launch_matches_its_kernel(fake, monkeypatch, use_fp8, zero_copy, pull):
    import cupy

    from epkern.ll_intranode import min_num_rdma_bytes

    monkeypatch.setenv("EPKERN_LL_DISPATCH_PULL", pull)
    monkeypatch.setenv("EPKERN_LL_COMBINE_PULL", pull)
    T, H, K, E, num_max = 64, 1024, 4, 8, 64
    buf = F.fake_buffer(num_nvl_bytes=0, num_rdma_bytes=min_num_rdma_bytes(num_max, H, E), low_latency_mode=True)
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
    combine_defines = [launch[2] for launch in launched if launch[1] == "epk_ll_combine"][0]
    assert combine_defines["EPK_LL_COMBINE_PULL"] == int(zero_copy and pull == "1")
    for launch in launched:
        _check(launch)
    buf.destroy()
