"""CPU checks of the LL GPU path's pure-Python parts: the LL area layout against the size hint, the constants
Python takes from kernels/epk_constants.cuh, argument validation that needs no GPU, the handle, and a numpy model
of the kernels' protocol (slot order, block packing, combine addressing) against the reference."""

import types

import ml_dtypes
import numpy as np
import pytest

from epkern import kernel_constants, reference
from epkern.errors import ArgumentError
from epkern.gpu import runtime
from epkern.gpu.ll import layout as L
from epkern.gpu.ll.dispatch import check_common
from epkern.gpu.ll.engine import GpuLLHandle, LLEngine

BF16 = ml_dtypes.bfloat16


@pytest.mark.parametrize("num_max", [1, 7, 64, 128, 1024])
@pytest.mark.parametrize("hidden", [128, 256, 384, 512, 2048, 4096, 7168, 8192])
@pytest.mark.parametrize("num_experts", [1, 2, 3, 8, 64, 256, 288, 8192])
def test_layout_fits_size_hint(num_max, hidden, num_experts):
    lay = L.ll_layout(num_max, hidden, num_experts)
    hint = reference.get_low_latency_rdma_size_hint(num_max, hidden, 1, num_experts)
    assert L.min_num_rdma_bytes(num_max, hidden, num_experts) <= hint
    stride = L.set_stride_of(L.ll_area_bytes(hint, True))
    assert lay.per_set <= stride, (lay, stride)
    for off in (lay.signal_bytes, lay.send_off, lay.recv_off, lay.per_set, stride):
        assert off % 16 == 0
    slot = 16 + 2 * hidden
    assert lay.signal_bytes >= 4 * num_experts
    send = lay.recv_off - lay.send_off
    assert send >= num_max * slot and send >= num_experts * num_max * 2 * hidden  # staging; zero-copy buffer
    recv = lay.per_set - lay.recv_off
    assert recv >= num_experts * num_max * slot and recv >= num_experts * num_max * 2 * hidden
    # the largest FP8 message (header + e4m3 row + float32 scales, padded to 16) fits a slot
    assert 16 + -(-(hidden + 4 * (hidden // 128)) // 16) * 16 <= slot


def test_area_only_when_asked():
    assert L.ll_area_bytes(0, False) == 0
    assert L.ll_area_bytes(0, True) == 0
    assert L.ll_area_bytes(1000, False) == 1024
    assert L.set_stride_of(1024) == 512


def test_every_error_phase_of_the_kernels_has_a_description():
    """Each EPK_ERR_PHASE_* of the header is named by the runtime (HT) or the LL layout (LL), and the LL phases the
    Buffer survives are the LL ones that say so."""
    c = kernel_constants.values()
    phases = {v for k, v in c.items() if k.startswith("EPK_ERR_PHASE_")}
    assert phases == set(runtime.PHASES) | set(L.LL_PHASES) and not set(runtime.PHASES) & set(L.LL_PHASES)
    assert L.LL_TIMEOUT_PHASES == {c["EPK_ERR_PHASE_LL_DISPATCH_RECV"], c["EPK_ERR_PHASE_LL_COMBINE_RECV"]}
    assert L.LL_BAD_INDEX_PHASE == c["EPK_ERR_PHASE_LL_BAD_INDEX"]
    assert L.STATE_WORDS == c["EPK_STATE_WORDS"] and L.STATE_MASK == c["EPK_STATE_MASK"]
    assert runtime.CTRL_BYTES == c["EPK_CTRL_BYTES"] == 1 << 17


def _engine(num_ranks=4, num_rdma_bytes=0, low_latency_mode=True):
    ll_bytes = L.ll_area_bytes(num_rdma_bytes, low_latency_mode)
    rt = types.SimpleNamespace(num_ranks=num_ranks, ll_bytes=ll_bytes)
    eng = LLEngine.__new__(LLEngine)  # the size checks only: no device state
    eng.rt, eng.sizes = rt, {}
    return eng


def test_size_state_names_num_rdma_bytes():
    hint = reference.get_low_latency_rdma_size_hint(128, 7168, 4, 32)
    st = _engine(num_rdma_bytes=hint).size_state(128, 7168, 32)
    assert st.layout.per_set <= st.stride and not st.agreed
    with pytest.raises(ArgumentError, match=rf"num_rdma_bytes: .*{hint}"):
        _engine(num_rdma_bytes=hint // 2).size_state(128, 7168, 32)
    with pytest.raises(ArgumentError, match="num_rdma_bytes: .*low_latency_mode"):
        _engine(num_rdma_bytes=0).size_state(128, 7168, 32)


def test_common_checks():
    f = _engine()
    assert check_common(f, 1024, 8) == (1024, 8)
    with pytest.raises(ArgumentError, match="num_max_dispatch_tokens_per_rank"):
        check_common(f, 1025, 8)
    with pytest.raises(ArgumentError, match="num_max_dispatch_tokens_per_rank"):
        check_common(f, 0, 8)
    with pytest.raises(ArgumentError, match="num_experts"):
        check_common(f, 8, 6)
    with pytest.raises(ArgumentError, match="num_experts"):
        check_common(f, 8, 8196)
    with pytest.raises(ArgumentError, match="group"):
        check_common(_engine(num_ranks=64), 8, 64)


def test_handle_unpacks_like_deepep():
    lay = L.ll_layout(8, 128, 4)
    h = GpuLLHandle("src", "range", 8, 128, 4, lay)
    assert tuple(h) == ("src", "range", 8, 128, 4) and len(h) == 5 and h[1] == "range"


# ---- a numpy model of the kernels' protocol ----
def _model_dispatch(xs, idxs, num_max, num_experts, rng):
    """What ll_dispatch.cu produces: per sender and expert, slots in an arbitrary (atomic) order; receiver
    blocks packed by source rank ascending with begin = sum of lower ranks' counts."""
    R = len(xs)
    e_loc, H = num_experts // R, xs[0].shape[1]
    slots = {}  # (g, s) -> list of source tokens in slot order
    for s, idx in enumerate(idxs):
        sel = [(t, int(g)) for t in range(idx.shape[0]) for g in idx[t] if g >= 0]
        rng.shuffle(sel)  # warps race for slots
        for t, g in sel:
            slots.setdefault((g, s), []).append(t)
    out = []
    for d in range(R):
        recv_x = np.zeros((e_loc, R * num_max, H), BF16)
        src_info = np.full((e_loc, R * num_max), -1, np.int32)
        layout = np.zeros((e_loc, R), np.int64)
        count = np.zeros(e_loc, np.int32)
        for e in range(e_loc):
            begin = 0
            for s in range(R):
                toks = slots.get((d * e_loc + e, s), [])
                layout[e, s] = (begin << 32) | len(toks)
                src_info[e, begin : begin + len(toks)] = toks
                recv_x[e, begin : begin + len(toks)] = xs[s][toks]
                begin += len(toks)
            count[e] = begin
        out.append((recv_x, count, src_info, layout))
    return out


def _model_combine(ys, model, idxs, ws, num_max, num_experts):
    """What ll_combine.cu computes: owner d sends row (e, i) of source s to slot [g][t] of s; s sums over k."""
    R = len(ys)
    e_loc, H = num_experts // R, ys[0].shape[2]
    slots = [np.zeros((num_experts, num_max, H), BF16) for _ in range(R)]
    for d, (_, _, src_info, layout) in enumerate(model):
        for e in range(e_loc):
            for s in range(R):
                b, c = int(layout[e, s] >> 32), int(layout[e, s] & 0xFFFFFFFF)
                for i in range(b, b + c):
                    slots[s][d * e_loc + e, src_info[e, i]] = ys[d][e, i]
    outs = []
    for s in range(R):
        T, K = idxs[s].shape
        acc = np.zeros((T, H), np.float32)
        for k in range(K):
            for t in range(T):
                g = idxs[s][t, k]
                if g >= 0:
                    p = (ws[s][t, k] * slots[s][g, t].astype(np.float32)).astype(np.float32)
                    acc[t] = (acc[t] + p).astype(np.float32)
        outs.append(acc.astype(BF16))
    return outs


@pytest.mark.parametrize("seed", range(4))
def test_protocol_model_matches_reference(seed):
    rng = np.random.default_rng(seed)
    R, E, K, H, num_max = 4, 16, 4, 128, 24
    tokens = [num_max, 0, 5, 17]
    xs = [rng.integers(-16, 17, size=(t, H)).astype(BF16) for t in tokens]
    idxs = []
    for t in tokens:
        idx = np.argsort(rng.random((t, E)), axis=1)[:, :K].astype(np.int64)  # distinct experts per token
        idx[rng.random((t, K)) < 0.2] = -1
        idxs.append(idx)
    ws = [rng.choice(np.array([0.25, 0.5, 1.0, 2.0], np.float32), size=(t, K)) for t in tokens]
    want = reference.ll_dispatch(xs, idxs, num_max, E)
    model = _model_dispatch(xs, idxs, num_max, E, rng)
    for d in range(R):
        recv_x, count, src_info, layout = model[d]
        got = reference.canonicalize_ll_recv(recv_x, count, src_info, layout, R)
        ref = reference.canonicalize_ll_recv(
            want[d].recv_x, want[d].recv_count, want[d].src_info, want[d].layout_range, R
        )
        assert np.array_equal(got.layout_range, ref.layout_range)
        assert np.array_equal(count, want[d].recv_count)
        for e in range(E // R):
            assert np.array_equal(got.src_info[e], ref.src_info[e])
            assert np.array_equal(got.recv_x[e].view(np.uint16), ref.recv_x[e].view(np.uint16))
    # combine: expert outputs that differ per expert, laid out as each model rank received
    ys = [(m[0].astype(np.float32) * (1 + d)).astype(BF16) for d, m in enumerate(model)]
    handles = [reference.LLHandle(m[2], m[3], num_max, E, H) for m in model]
    expect = reference.ll_combine(ys, handles, idxs, ws)
    got = _model_combine(ys, model, idxs, ws, num_max, E)
    for s in range(R):
        assert np.array_equal(got[s].view(np.uint16), expect[s].view(np.uint16))
