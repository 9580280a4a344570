"""torch tensors through the native API (issue #19, item 5): the same calls with torch tensors and with the
backend's own arrays give identical results, as torch tensors of DeepEP's dtypes, with no copy at the crossing.
CPU backend here; the GPU cases (CUDA tensors, CuPy arrays) are marked gpu."""

import contextlib
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from epkern import Buffer, reference
from epkern.errors import ArgumentError
from epkern.group import run_in_process

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from deep_ep_scenarios import to_numpy as _np  # noqa: E402  (numpy / torch, made without epkern's helpers)
from deep_ep_scenarios import to_tensor as _t  # noqa: E402
from epkern import torch_tensors  # noqa: E402

BF16 = ml_dtypes.bfloat16
R, T, H, E, K = 2, 24, 256, 8, 3
BACKENDS = ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)]


def _inputs(rank):
    rng = np.random.default_rng(100 + rank)
    x = rng.integers(-8, 9, size=(T, H)).astype(BF16)
    idx = np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int64)
    idx[rng.random((T, K)) < 0.1] = -1
    w = rng.integers(1, 4, size=(T, K)).astype(np.float32)
    return x, idx, w


def _arrays(backend):
    """numpy -> the backend's array type."""
    if backend == "cpu":
        return lambda a: a
    import cupy

    return cupy.asarray


def _host(a):
    """A backend array or a tensor as numpy."""
    if isinstance(a, torch.Tensor):
        return _np(a)
    return a if isinstance(a, np.ndarray) else a.get()


def _same(a, b):
    a, b = _host(a), _host(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(a.view(np.uint8), b.view(np.uint8))


def _ht_round(buf, rank, conv):
    x, idx, w = _inputs(rank)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(conv(idx), E)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        conv(x), topk_idx=conv(idx), topk_weights=conv(w), num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
    )  # fmt: skip
    out, out_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w)
    cached, none_idx, _, _, _, _ = buf.dispatch(conv(x), handle=handle)
    assert none_idx is None
    return dict(per_rank=per_rank, in_rank=in_rank, recv_x=recv_x, recv_idx=recv_idx, recv_w=recv_w, counts=counts,
                out=out, out_w=out_w, cached=cached)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_ht_with_torch_tensors_equals_arrays(backend):
    device = "cuda" if backend == "gpu" else "cpu"

    def body(group):
        with Buffer(group, backend=backend) as buf:
            want = _ht_round(buf, group.rank, _arrays(backend))
            got = _ht_round(buf, group.rank, lambda a: _t(a, device))
        for key, value in want.items():
            if key == "counts":
                assert got[key] == value
                continue
            assert isinstance(got[key], torch.Tensor) and got[key].device.type == device, key
            _same(got[key], value)
        assert got["recv_x"].dtype == torch.bfloat16 and got["out"].dtype == torch.bfloat16
        assert got["in_rank"].dtype == torch.bool and got["recv_idx"].dtype == torch.int64
        return True

    assert run_in_process(body, R) == [True] * R


def test_ht_fp8_pair_crosses_as_float8():
    def body(group):
        x, idx, _ = _inputs(group.rank)
        data, scales = reference.per_token_cast_to_fp8(x)
        with Buffer(group, backend="cpu") as buf:
            per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
            layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
            want = buf.dispatch((data, scales), topk_idx=idx, **layout)[0]
            pair = (torch.from_numpy(data.view(np.uint8).copy()).view(torch.float8_e4m3fn), torch.from_numpy(scales))
            got = buf.dispatch(pair, topk_idx=_t(idx), **layout)[0]
        assert got[0].dtype == torch.float8_e4m3fn and got[1].dtype == torch.float32
        _same(_np(got[0]), want[0].view(np.uint8))
        _same(_np(got[1]), want[1])
        return True

    assert run_in_process(body, R) == [True] * R


def _by_source(recv_x, count, src_info):
    """Each expert's received rows in the order of their source (token, rank) word: on the GPU rows land in
    arrival order, which differs between two calls."""
    x, n, src = _host(recv_x), _host(count), _host(src_info)
    return np.concatenate([x[e, np.argsort(src[e, : n[e]], kind="stable")] for e in range(x.shape[0])])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ll_with_torch_tensors_equals_arrays(backend):
    num_max = 32
    device = "cuda" if backend == "gpu" else "cpu"

    def round_(buf, rank, conv):
        x, idx, w = _inputs(rank)
        recv_x, count, handle, _, _ = buf.low_latency_dispatch(conv(x), conv(idx), num_max, E, use_fp8=False)
        out, _, _ = buf.low_latency_combine(recv_x, conv(idx), conv(w), handle)
        return recv_x, count, out, handle.src_info

    def body(group):
        nbytes = Buffer.get_low_latency_rdma_size_hint(num_max, H, R, E)
        with Buffer(group, num_rdma_bytes=nbytes, low_latency_mode=True, backend=backend) as buf:
            want = round_(buf, group.rank, _arrays(backend))
            got = round_(buf, group.rank, lambda a: _t(a, device))
            mask = buf.low_latency_query_mask_buffer(torch.zeros(R, dtype=torch.int32, device=device))
        for g in got[:3]:
            assert isinstance(g, torch.Tensor) and g.device.type == device
        _same(_by_source(*got[:2], got[3]), _by_source(*want[:2], want[3]))
        _same(got[1], want[1])
        _same(got[2], want[2])
        assert isinstance(mask, torch.Tensor) and mask.tolist() == [0] * R
        return True

    assert run_in_process(body, R) == [True] * R


def test_the_crossing_copies_nothing():
    for t in (torch.arange(12, dtype=torch.int64).reshape(3, 4), torch.ones(5, 8, dtype=torch.bfloat16),
              torch.zeros(4, 16, dtype=torch.uint8).view(torch.float8_e4m3fn)):  # fmt: skip
        arr = torch_tensors.to_array(t, "x", "cpu")
        assert arr.ctypes.data == t.data_ptr() and arr.nbytes == t.numel() * t.element_size()
        back = torch_tensors.to_tensor(arr, fp8=t.dtype == torch.float8_e4m3fn)
        assert back.data_ptr() == t.data_ptr() and back.dtype == t.dtype and back.shape == t.shape
    # a transposed view (LL FP8 scales are one) keeps its strides
    base = np.arange(24, dtype=np.float32).reshape(2, 3, 4).transpose(0, 2, 1)
    back = torch_tensors.to_tensor(base)
    assert back.data_ptr() == base.ctypes.data and back.stride() == tuple(s // 4 for s in base.strides)


def test_in_call_crossings_over_the_fake_cupy(monkeypatch):
    """The GPU backend's crossings inside a call, over the fake CuPy with CPU tensors (its arrays are host memory):
    a CuPy array built from the tensor's pointer and strides, BF16 / FP8 as epkern's BF16 / uint8 directly; a tensor
    made by to_tensor crosses back as the array it was made from while it still views it unchanged. The real
    crossing runs in test_the_crossing_copies_nothing_on_the_gpu."""
    import fake_cupy as F
    from epkern.api_checks import BF16

    with F.installed(monkeypatch):
        import cupy

        # contiguous tensors only: the fake's views over memory ignore strides (the GPU test has strided ones)
        cases = [
            (torch.arange(-6, 6, dtype=torch.int16).reshape(3, 4).view(torch.bfloat16), BF16, torch.int16),
            (torch.arange(64, dtype=torch.uint8).reshape(4, 16).view(torch.float8_e4m3fn), np.uint8, torch.uint8),
            (torch.arange(48, dtype=torch.int32).reshape(6, 8), np.int32, None),
            (torch.rand(7) > 0.5, np.bool_, None),
            (torch.empty(0, 4, dtype=torch.int64), np.int64, None),
        ]
        for t, dtype, bits in cases:
            arr = torch_tensors._cupy_view(t)
            assert arr.dtype == np.dtype(dtype) and arr.shape == tuple(t.shape)
            if t.numel():
                assert arr.strides == tuple(st * t.element_size() for st in t.stride())
                assert arr.data.ptr == t.data_ptr()
                want = (t.view(bits) if bits is not None else t).numpy()
                assert np.array_equal(cupy.asnumpy(arr).view(want.dtype), want)
        depth = torch_tensors._in_call.depth
        torch_tensors._in_call.depth = 1  # as inside torch_stream
        try:
            arr = cupy.asarray(np.arange(-6, 6, dtype=np.int16).view(BF16).reshape(3, 4))
            back = torch_tensors.to_tensor(arr)
            assert back.dtype == torch.bfloat16 and back.data_ptr() == arr.data.ptr
            assert torch_tensors._made_from(back) is arr
            assert torch_tensors._in_call_array(back) is arr  # what to_array returns inside a call
            assert torch_tensors._made_from(back.view(torch.int16)) is None  # another tensor: crossed anew
            assert torch_tensors._made_from(torch.zeros(3, 4)) is None
            moved = torch_tensors.to_tensor(arr)
            moved.set_(torch.zeros(3, 4, dtype=torch.bfloat16))  # its memory replaced in place
            assert torch_tensors._made_from(moved) is None
            reshaped = torch_tensors.to_tensor(arr)
            reshaped.resize_(4, 3)  # its shape changed in place
            assert torch_tensors._made_from(reshaped) is None
            restrided = torch_tensors.to_tensor(arr)
            restrided.as_strided_((3, 4), (1, 3))  # its strides changed in place
            assert torch_tensors._made_from(restrided) is None
            fp8 = cupy.asarray(np.arange(32, dtype=np.uint8).reshape(2, 16))
            back8 = torch_tensors.to_tensor(fp8, fp8=True)
            assert back8.dtype == torch.float8_e4m3fn and torch_tensors._made_from(back8) is fp8
            assert torch_tensors._in_call_array(back8) is fp8
            fresh = torch_tensors._in_call_array(torch.arange(12, dtype=torch.int32).reshape(3, 4))
            assert fresh.shape == (3, 4) and fresh.dtype == np.int32  # not made by to_tensor: a new view
        finally:
            torch_tensors._in_call.depth = depth


@pytest.mark.gpu
@pytest.mark.parametrize("in_call", [False, True])
def test_the_crossing_copies_nothing_on_the_gpu(in_call):
    """Both ways are views: same pointer, shape, strides and values, for contiguous, transposed, sliced, bool and
    empty tensors; writes show through. ``in_call``: inside ``torch_stream``, as epkern's calls convert (the CuPy
    side built from the tensor's pointer and strides, the torch side from a capsule without stream handshake);
    outside it, through DLPack's ordered exchange."""
    import cupy

    with torch_tensors.torch_stream("gpu") if in_call else contextlib.nullcontext():
        _crossing_checks(cupy)


def _crossing_checks(cupy):
    base = torch.arange(48, dtype=torch.int32, device="cuda").reshape(6, 8)
    for t in (torch.arange(12, dtype=torch.int64, device="cuda").reshape(3, 4),
              torch.ones(5, 8, dtype=torch.bfloat16, device="cuda"),
              torch.zeros(4, 16, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn),
              base.t(), base[1:5:2, 3:], torch.rand(7, device="cuda") > 0.5,
              torch.rand(3, 5, device="cuda").t(), torch.empty(0, 4, dtype=torch.int64, device="cuda")):  # fmt: skip
        arr = torch_tensors.to_array(t, "x", "gpu")
        assert arr.shape == tuple(t.shape) and arr.strides == tuple(st * t.element_size() for st in t.stride())
        if t.numel():
            assert arr.data.ptr == t.data_ptr()
            flat = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
            flat = flat.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else flat
            assert np.array_equal(cupy.asnumpy(arr.view(flat.cpu().numpy().dtype)), flat.cpu().numpy())
        back = torch_tensors.to_tensor(arr, fp8=t.dtype == torch.float8_e4m3fn)
        assert back.dtype == t.dtype and back.shape == t.shape and back.stride() == t.stride()
        if t.numel():
            assert back.data_ptr() == t.data_ptr()
        again = torch_tensors.to_array(back, "x", "gpu")  # inside a call: the array it was made from
        assert (again is arr) == bool(torch_tensors._in_call.depth)
    arr = torch_tensors.to_array(base, "x", "gpu")
    arr[2, 3] = -5  # a write through the CuPy view shows in the tensor
    torch.cuda.synchronize()
    assert base[2, 3].item() == -5


@pytest.mark.gpu
def test_calls_follow_torch_current_stream():
    """x written on a torch side stream after a 0.1 s GPU sleep: a call under that stream must read it after the
    write (CuPy's stream would not wait for it), and its outputs are ready on that stream."""

    def body(group):
        x, idx, w = _inputs(group.rank)
        with Buffer(group, backend="gpu") as buf:
            want = _ht_round(buf, group.rank, _arrays("gpu"))
            side = torch.cuda.Stream()
            with torch.cuda.stream(side):
                src = _t(x, "cuda")
                xt = torch.zeros_like(src)
                torch.cuda._sleep(200_000_000)
                xt.copy_(src)
                # _ht_round draws the same inputs again: its x (the only BF16 [T, H]) becomes xt
                got = _ht_round(buf, group.rank, lambda a: xt if a.dtype == BF16 else _t(a, "cuda"))
            side.synchronize()
        for key in ("recv_x", "out", "cached"):
            _same(got[key], want[key])
        return True

    assert run_in_process(body, R) == [True] * R


@pytest.mark.gpu
def test_prepared_ll_calls_with_tensors_follow_torch_stream():
    """Prepared LL calls given CUDA tensors, run under a torch side stream whose x is written after a 0.2 s GPU
    sleep: every run (the first through the Buffer, the replays straight to the engine) reads x after the write and
    returns tensors equal to the direct calls' outputs."""
    num_max = 32

    def body(group):
        x, idx, w = _inputs(group.rank)
        nbytes = Buffer.get_low_latency_rdma_size_hint(num_max, H, R, E)
        with Buffer(group, num_rdma_bytes=nbytes, low_latency_mode=True, backend="gpu") as buf:
            xs, idxs, ws = _t(x, "cuda"), _t(idx, "cuda"), _t(w, "cuda")
            outs = dict(
                out_x=torch.empty(E // R, R * num_max, H, dtype=torch.bfloat16, device="cuda"),
                out_src_info=torch.empty(E // R, R * num_max, dtype=torch.int32, device="cuda"),
                out_layout_range=torch.empty(E // R, R, dtype=torch.int64, device="cuda"),
                out_count=torch.empty(E // R, dtype=torch.int32, device="cuda"),
            )
            want_x, want_count, handle, _, _ = buf.low_latency_dispatch(xs, idxs, num_max, E, use_fp8=False)
            want_rows, want_count = _by_source(want_x, want_count, handle.src_info), _np(want_count).copy()
            want_out = _np(buf.low_latency_combine(want_x, idxs, ws, handle)[0]).copy()
            side = torch.cuda.Stream()
            xt = torch.zeros_like(xs)
            dispatch = buf.prepare_low_latency_dispatch(xt, idxs, num_max, E, use_fp8=False, **outs)
            combine = None
            for i in range(3):
                with torch.cuda.stream(side):
                    xt.zero_()
                    torch.cuda._sleep(200_000_000)
                    xt.copy_(xs)
                    recv_x, count, h, _, _ = dispatch()
                    if combine is None:
                        combine = buf.prepare_low_latency_combine(recv_x, idxs, ws, h)
                    out = combine()[0]
                side.synchronize()
                assert all(isinstance(t, torch.Tensor) for t in (recv_x, count, out)), i
                _same(count, want_count)
                _same(_by_source(recv_x, count, h.src_info), want_rows)
                _same(out, want_out)
        return True

    assert run_in_process(body, R) == [True] * R


def test_wrong_tensors_name_the_argument():
    def body(group):
        x, idx, w = _inputs(group.rank)
        with Buffer(group, backend="cpu") as buf:
            with pytest.raises(ArgumentError, match="topk_idx: expected a CPU tensor"):
                buf.get_dispatch_layout(torch.zeros(T, K, dtype=torch.int64, device="meta"), E)
            with pytest.raises(ArgumentError, match="^x: expected dtype bfloat16"):
                buf.low_latency_dispatch(_t(x).to(torch.float16), _t(idx), 32, E)
            with pytest.raises(ArgumentError, match="^x: "):
                buf.low_latency_dispatch(_t(x).to(torch.float8_e5m2), _t(idx), 32, E)
            per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(_t(idx), E)
            assert isinstance(per_rank, torch.Tensor)  # and the Buffer still works
        return True

    assert run_in_process(body, R) == [True] * R


def test_no_torch_import_without_tensors():
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, epkern\n"
        "from epkern.group import run_in_process\n"
        "def body(g):\n"
        "    with epkern.Buffer(g, backend='cpu') as b:\n"
        "        b.get_dispatch_layout(np.zeros((4, 2), np.int64), 4)\n"
        "run_in_process(body, 2)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_receive_hook_runs_on_torch_stream_when_called(monkeypatch):
    """A call's receive hook, called later (e.g. under a torch side stream), runs with torch's current stream at
    that time as CuPy's, as the call did: torch's reads of recv_count on that stream then follow the receive (seen
    on the H100: recv_count read as zeros when the hook ran on CuPy's default stream). The hook's kept inputs stay."""
    entered = []

    @contextlib.contextmanager
    def recording(backend):
        entered.append(backend)
        yield

    monkeypatch.setattr(torch_tensors, "torch_stream", recording)
    seen = []

    def hook():
        seen.append(len(entered))

    hook.inputs = ("x", "topk_idx")
    wrapped = torch_tensors._outputs((np.zeros(2, np.int32), hook), "gpu")[1]
    assert entered == [] and wrapped.inputs == ("x", "topk_idx")
    wrapped()
    assert seen == [1] and entered == ["gpu"]


def test_cupy_view_describes_the_tensor_memory(monkeypatch):
    """The CuPy view made inside a call (``_cupy_view``) from a tensor's pointer, shape and strides covers exactly
    the tensor's elements: rebuilt over the base tensor's memory from what it handed CuPy, it equals the tensor
    (contiguous, transposed, sliced with steps, one element), and its byte range lies inside the base."""
    import types

    made = {}

    class Memory:
        def __init__(self, ptr, size, owner, device_id=None):
            made.update(ptr=ptr, size=size, owner=owner)

    class Pointer:
        def __init__(self, mem, offset):
            made["offset"] = offset

    class Array:
        def __init__(self, shape, dtype, memptr, strides=None):
            made.update(shape=shape, dtype=dtype, strides=strides)

    cuda = types.SimpleNamespace(UnownedMemory=Memory, MemoryPointer=Pointer)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=cuda, ndarray=Array))
    base = torch.arange(96, dtype=torch.int32).reshape(8, 12)
    flat = base.numpy().reshape(-1)
    for t in (base, base.t(), base[1:7:2, 3:11:3], base[2:3, 5:6], base[:, 4], base.t()[::3]):
        torch_tensors._cupy_view(t)
        assert made["owner"] is t and made["offset"] == 0 and made["dtype"] == np.int32
        start = (made["ptr"] - base.data_ptr()) // 4
        assert 0 <= start and made["ptr"] + made["size"] <= base.data_ptr() + base.numel() * 4
        view = np.lib.stride_tricks.as_strided(flat[start:], shape=made["shape"], strides=made["strides"])
        assert np.array_equal(view, t.numpy())
        last = made["ptr"] + sum((n - 1) * s for n, s in zip(made["shape"], made["strides"], strict=True))
        assert last + 4 == made["ptr"] + made["size"]  # the extent ends at the last element


def test_ll_calls_with_new_tensors_each_time_are_rebound_and_keep_nothing(monkeypatch):
    """DeepEP's way (epkern.deep_ep): new output tensors every call. Each crossing makes new CuPy views, so identity
    plans could never match: none is made (it would keep the call's tensors alive), and the calls after the first
    are rebound to its validated launch (gpu/ll/rebind.py). Over the fake CuPy with CPU tensors, as below."""
    import gc
    import weakref

    import fake_cupy as F
    from epkern.gpu.ll.layout import min_num_rdma_bytes

    with F.installed(monkeypatch) as launches:
        monkeypatch.setattr(torch_tensors, "torch_stream", _fake_torch_stream([]))
        monkeypatch.setattr(torch_tensors, "to_array", lambda t, name, backend: torch_tensors._in_call_array(t))
        num_max, T, K, Hs, Es = 16, 8, 2, 128, 8
        buf = F.fake_buffer(num_nvl_bytes=0, num_rdma_bytes=min_num_rdma_bytes(num_max, Hs, Es), low_latency_mode=True)
        idx = torch.stack([torch.randperm(Es)[:K] for _ in range(T)])
        w = torch.ones(T, K)
        probes = []
        for _ in range(4):
            x = torch.ones(T, Hs, dtype=torch.bfloat16)
            outs = dict(
                out_x=torch.empty(Es, num_max, Hs, dtype=torch.bfloat16),
                out_src_info=torch.empty(Es, num_max, dtype=torch.int32),
                out_layout_range=torch.empty(Es, 1, dtype=torch.int64),
                out_count=torch.empty(Es, dtype=torch.int32),
            )
            recv, count, handle, _, _ = buf.low_latency_dispatch(x, idx, num_max, Es, use_fp8=False, **outs)
            assert isinstance(recv, torch.Tensor) and recv.data_ptr() == outs["out_x"].data_ptr()
            out = torch.empty(T, Hs, dtype=torch.bfloat16)
            got = buf.low_latency_combine(torch.ones(Es, num_max, Hs, dtype=torch.bfloat16), idx, w, handle, out=out)
            assert got[0].data_ptr() == out.data_ptr()
            probes.append(weakref.ref(outs["out_x"]))
        eng = buf._backend.ll
        assert eng.rebound == eng.replays == 2 * 3 and len(eng.plans) == 0
        del x, outs, recv, count, handle, out, got
        launches.clear()  # the fake's record of the launches holds the validated calls' arrays
        gc.collect()
        assert all(p() is None for p in probes), "a plan keeps a call's output tensor alive"
        buf.destroy()


def _fake_torch_stream(entered):
    """torch_stream without CUDA: records the outermost entries (a nested one is a no-op) and marks the crossings as
    inside a call."""

    @contextlib.contextmanager
    def on_torch(backend):
        if torch_tensors._in_call.depth:
            yield
            return
        entered.append(backend)
        depth, torch_tensors._in_call.depth = torch_tensors._in_call.depth, 1
        try:
            yield
        finally:
            torch_tensors._in_call.depth = depth

    return on_torch


def test_prepared_ll_calls_given_tensors_run_on_torch_stream_and_return_tensors(monkeypatch):
    """prepare_low_latency_* given torch tensors: every run — the first, through the Buffer, and the replays, which go
    straight to the engine — is ordered on torch's current stream and returns torch tensors (over the fake CuPy, with
    CPU tensors standing in for CUDA ones: their memory is what the fake's arrays view)."""
    import fake_cupy as F
    from epkern.gpu.ll.layout import min_num_rdma_bytes

    entered = []
    with F.installed(monkeypatch):
        monkeypatch.setattr(torch_tensors, "torch_stream", _fake_torch_stream(entered))
        monkeypatch.setattr(torch_tensors, "to_array", lambda t, name, backend: torch_tensors._in_call_array(t))
        num_max, T, K, Hs, Es = 16, 8, 2, 128, 8
        buf = F.fake_buffer(num_nvl_bytes=0, num_rdma_bytes=min_num_rdma_bytes(num_max, Hs, Es), low_latency_mode=True)
        x = torch.ones(T, Hs, dtype=torch.bfloat16)
        idx = torch.stack([torch.randperm(Es)[:K] for _ in range(T)])
        w = torch.ones(T, K)
        outs = dict(
            out_x=torch.empty(Es, num_max, Hs, dtype=torch.bfloat16),
            out_src_info=torch.empty(Es, num_max, dtype=torch.int32),
            out_layout_range=torch.empty(Es, 1, dtype=torch.int64),
            out_count=torch.empty(Es, dtype=torch.int32),
        )
        y, out = torch.ones(Es, num_max, Hs, dtype=torch.bfloat16), torch.empty(T, Hs, dtype=torch.bfloat16)
        dispatch = buf.prepare_low_latency_dispatch(x, idx, num_max, Es, use_fp8=False, **outs)
        handle = None
        for i in range(3):
            recv, count, h, _, _ = dispatch()
            assert isinstance(recv, torch.Tensor) and isinstance(count, torch.Tensor), i
            assert recv.data_ptr() == outs["out_x"].data_ptr() and count.data_ptr() == outs["out_count"].data_ptr()
            if handle is None:
                handle = h
                combine = buf.prepare_low_latency_combine(y, idx, w, handle, out=out)
            got = combine()[0]
            assert isinstance(got, torch.Tensor) and got.data_ptr() == out.data_ptr(), i
        assert buf._backend.ll.replays == 4  # runs 2 and 3 of each replayed
        assert len(entered) == 6 and set(entered) == {"gpu"}  # every run on torch's stream, once
        buf.destroy()
