"""The CPU backend runs the public API on the reference across in-process ranks."""

import ml_dtypes
import numpy as np
import pytest

from epkern import Buffer, demo
from epkern.errors import ArgumentError
from epkern.group import run_in_process

BF16 = ml_dtypes.bfloat16


def test_demo_runs_and_validates(capsys):
    assert (
        demo.main(
            ["--ranks", "3", "--tokens", "40", "--hidden", "256", "--experts", "12", "--iters", "1", "--backend", "cpu"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "CPU backend" in out and "validated" in out


def _bad_calls(group):
    rng = np.random.default_rng(group.rank)
    x = rng.integers(-4, 5, size=(10, 256)).astype(BF16)
    idx = np.argsort(rng.random((10, 8)), axis=1)[:, :2].astype(np.int64)
    errors = []
    with Buffer(group, backend="cpu") as buf:
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, 8)
        layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        for call, match in (
            (lambda: buf.get_dispatch_layout(idx, 7), "num_experts"),
            (lambda: buf.get_dispatch_layout(idx.astype(np.float32), 8), "topk_idx"),
            (lambda: buf.get_dispatch_layout(np.full((10, 2), 9), 8), "topk_idx"),
            (
                lambda: buf.dispatch(x.astype(np.float32), topk_idx=idx, num_tokens_per_expert=np.zeros(8, np.int32)),
                "x",
            ),
            (lambda: buf.dispatch(x, topk_idx=idx[:5], **layout), "topk_idx"),
            (lambda: buf.low_latency_dispatch(x, idx, 5, 8), "num_max_dispatch_tokens_per_rank"),
            (lambda: buf.low_latency_dispatch(x, idx, 16, 8, use_ue8m0=True), "use_ue8m0"),
        ):
            with pytest.raises(ArgumentError, match=match):
                call()
            errors.append(match)
        # still usable after bad input
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, 8)
        recv = buf.dispatch(
            x, topk_idx=idx, num_tokens_per_expert=per_expert, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank
        )
        out, _, _ = buf.combine(recv[0], recv[4])
        reached = in_rank.sum(1).astype(np.float32)[:, None]
        assert np.array_equal(
            out.view(np.uint16), (np.float32(0) + x.astype(np.float32) * reached).astype(BF16).view(np.uint16)
        )
    return errors


def test_bad_arguments_named_and_buffer_stays_usable():
    results = run_in_process(_bad_calls, 2)
    assert len(results[0]) == 7


# ---- low latency: the reference's values, through every output path ----
T, H, K, E, NUM_MAX = 6, 512, 3, 8, 8


def _ll_inputs(rank):
    rng = np.random.default_rng(10 + rank)
    x = rng.integers(-8, 9, size=(T, H)).astype(BF16)
    idx = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int64)
    idx[1, 2] = -1
    w = rng.choice(np.array([0.25, 0.5, 1.0, 2.0], np.float32), size=(T, K)).astype(np.float32)
    return x, idx, w


def _ll_buffer(group, **kw):
    hint = Buffer.get_low_latency_rdma_size_hint(NUM_MAX, H, group.size, E)
    return Buffer(group, num_rdma_bytes=hint, low_latency_mode=True, backend="cpu", **kw)


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


def _ll_paths(group):
    from epkern import reference

    x, idx, _ = _ll_inputs(group.rank)
    R, e_loc, rows = group.size, E // group.size, group.size * NUM_MAX
    xs = group.allgather_object(x)
    idxs = group.allgather_object(idx)
    with _ll_buffer(group) as buf:
        for use_fp8, round_scale, use_ue8m0 in ((False, False, False), (True, False, False), (True, True, True)):
            flags = dict(use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0)
            want = reference.ll_dispatch(xs, idxs, NUM_MAX, E, **flags)[group.rank]
            fresh = buf.low_latency_dispatch(x, idx, NUM_MAX, E, **flags)
            S = (H // 512 if use_ue8m0 else H // 128) if use_fp8 else 0
            outs = dict(
                out_x=np.empty((e_loc, rows, H), np.uint8 if use_fp8 else BF16),
                out_src_info=np.empty((e_loc, rows), np.int32),
                out_layout_range=np.empty((e_loc, R), np.int64),
                out_count=np.empty(e_loc, np.int32),
            )
            if use_fp8:
                outs["out_scales"] = np.empty((e_loc, S, rows), np.int32 if use_ue8m0 else np.float32).transpose(
                    0, 2, 1
                )
            into = buf.low_latency_dispatch(x, idx, NUM_MAX, E, **flags, **outs)
            zero_copy = buf.low_latency_dispatch(x, idx, NUM_MAX, E, **flags, zero_copy_recv=True)
            assert into[0] is ((outs["out_x"], outs["out_scales"]) if use_fp8 else outs["out_x"]) or (
                into[0][0] is outs["out_x"] and into[0][1] is outs["out_scales"]
            )
            assert into[1] is outs["out_count"] and into[2].src_info is outs["out_src_info"]
            for got in (fresh, into, zero_copy):
                recv_x, count, handle = got[0], got[1], got[2]
                assert np.array_equal(count, want.recv_count)
                assert np.array_equal(handle.src_info, want.src_info)
                assert np.array_equal(handle.layout_range, want.layout_range)
                if use_fp8:
                    assert recv_x[0].dtype == np.uint8 and np.array_equal(recv_x[0], _bits(want.recv_x[0]))
                    assert recv_x[1].transpose(0, 2, 1).flags.c_contiguous
                    assert np.array_equal(recv_x[1], want.recv_x[1])
                else:
                    assert np.array_equal(_bits(recv_x), _bits(want.recv_x))
    return True


def test_ll_dispatch_outputs_are_the_references_on_every_path():
    assert run_in_process(_ll_paths, 2) == [True, True]


def _expected_ll_combine(x, idx, w, keep=None):
    """Σ_k w · 2x over selections (the stand-in expert doubles its rows), in the reference's order."""
    acc = np.zeros((T, H), np.float32)
    for k in range(K):
        sel = idx[:, k] >= 0
        if keep is not None:
            sel &= keep(idx[:, k])
        acc[sel] = (acc[sel] + (w[sel, k, None] * (x[sel].astype(np.float32) * 2)).astype(np.float32)).astype(
            np.float32
        )
    return acc.astype(BF16)


def _ll_combines(group):
    x, idx, w = _ll_inputs(group.rank)
    with _ll_buffer(group) as buf:
        recv_x, count, handle, _, hook = buf.low_latency_dispatch(
            x, idx, NUM_MAX, E, use_fp8=False, return_recv_hook=True
        )
        hook()
        with pytest.raises(ArgumentError, match="hook: a receive hook can be called once"):
            hook()
        y = (recv_x.astype(np.float32) * 2).astype(BF16)
        want = _expected_ll_combine(x, idx, w)
        plain, _, _ = buf.low_latency_combine(y, idx, w, handle)
        assert np.array_equal(_bits(plain), _bits(want))
        # zero copy: the expert outputs written into the buffer the combine reads
        zbuf = buf.get_next_low_latency_combine_buffer(handle)
        assert zbuf is buf.get_next_low_latency_combine_buffer(handle)
        zbuf[...] = y
        out = np.empty((T, H), BF16)
        zero_copy, _, _ = buf.low_latency_combine(np.zeros_like(y), idx, w, handle, zero_copy=True, out=out)
        assert zero_copy is out and np.array_equal(_bits(out), _bits(want))
        # a selection set to -1 at combine adds nothing; another expert id is refused
        some = idx.copy()
        some[:, 0] = -1
        dropped, _, _ = buf.low_latency_combine(y, some, w, handle)
        assert np.array_equal(_bits(dropped), _bits(_expected_ll_combine(x, some, w)))
        other = idx.copy()
        other[0, 1] = (other[0, 1] + 1) % E
        with pytest.raises(ArgumentError, match="topk_idx: expected the topk_idx of the low_latency_dispatch"):
            buf.low_latency_combine(y, other, w, handle)
        # cumulative statistics add the received counts
        stats = np.ones(E // group.size, np.int32)
        buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False, cumulative_local_expert_recv_stats=stats)
        assert np.array_equal(stats, 1 + count)
    return True


def test_ll_combine_plain_zero_copy_and_dropped_selections():
    assert run_in_process(_ll_combines, 2) == [True, True]


def _masked(group, who_masks):
    """The ranks in ``who_masks`` mask the other rank: nothing moves between ranks 0 and 1 either way, each rank's
    own experts still work."""
    x, idx, w = _ll_inputs(group.rank)
    e_loc = E // group.size
    with _ll_buffer(group) as buf:
        other = 1 - group.rank
        if group.rank in who_masks:
            buf.low_latency_update_mask_buffer(other, True)
        status = np.empty(group.size, np.int32)
        assert buf.low_latency_query_mask_buffer(status) is status
        assert list(status) == [int(r == other and group.rank in who_masks) for r in range(2)]
        recv_x, count, handle, _, _ = buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False)
        assert not np.any(handle.layout_range[:, other] & 0xFFFFFFFF)  # no rows from the other rank
        local = (idx >= group.rank * e_loc) & (idx < (group.rank + 1) * e_loc)
        assert int(count.sum()) == int(local.sum())
        y = (recv_x.astype(np.float32) * 2).astype(BF16)
        combined, _, _ = buf.low_latency_combine(y, idx, w, handle)
        mine = _expected_ll_combine(x, idx, w, keep=lambda g: g // e_loc == group.rank)
        assert np.array_equal(_bits(combined), _bits(mine))
        # unmasked again: everything moves
        buf.low_latency_clean_mask_buffer()
        assert list(buf.low_latency_query_mask_buffer()) == [0, 0]
        recv_x, count, handle, _, _ = buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False)
        y = (recv_x.astype(np.float32) * 2).astype(BF16)
        combined, _, _ = buf.low_latency_combine(y, idx, w, handle)
        assert np.array_equal(_bits(combined), _bits(_expected_ll_combine(x, idx, w)))
    return True


@pytest.mark.parametrize("who_masks", [(0, 1), (0,), (1,)])
def test_ll_masked_rank_contributes_nothing(who_masks):
    assert run_in_process(_masked, 2, who_masks) == [True, True]


def _mask_between(group):
    """Each rank masks the other after the dispatch: the combine leaves the masked owner's experts out."""
    x, idx, w = _ll_inputs(group.rank)
    e_loc = E // group.size
    with _ll_buffer(group) as buf:
        recv_x, _, handle, _, _ = buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False)
        buf.low_latency_update_mask_buffer(1 - group.rank, True)
        y = (recv_x.astype(np.float32) * 2).astype(BF16)
        for e in range(e_loc):  # the other rank's rows: left out entirely (NaN there must not reach it)
            lr = int(handle.layout_range[e, 1 - group.rank])
            y[e, lr >> 32 : (lr >> 32) + (lr & 0xFFFFFFFF)] = np.nan
        combined, _, _ = buf.low_latency_combine(y, idx, w, handle)
        want = _expected_ll_combine(x, idx, w, keep=lambda g: g // e_loc == group.rank)
        assert np.array_equal(_bits(combined), _bits(want))
    return True


def test_ll_mask_set_between_dispatch_and_combine():
    assert run_in_process(_mask_between, 2) == [True, True]


def test_ll_needs_the_ll_area_the_gpu_needs():
    with Buffer(None, backend="cpu") as buf:
        x, idx, _ = _ll_inputs(0)
        with pytest.raises(ArgumentError, match="num_rdma_bytes: expected at least"):
            buf.low_latency_dispatch(x, idx, NUM_MAX, E)
        with pytest.raises(ArgumentError, match="num_rdma_bytes"):
            buf.clean_low_latency_buffer(NUM_MAX, H, E)


def test_combine_buffers_alternate_like_the_gpu_sets():
    from epkern.group.base import SingleGroup

    x, idx, _ = _ll_inputs(0)
    with _ll_buffer(SingleGroup()) as buf:
        handle = buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False)[2]
        first = buf.get_next_low_latency_combine_buffer(handle)
        handle = buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False)[2]
        second = buf.get_next_low_latency_combine_buffer(handle)
        assert first is not second and first.shape == second.shape == (E, NUM_MAX, H)
        first[...] = 1
        buf.clean_low_latency_buffer(NUM_MAX, H, E)  # zeroes them and restarts from the first set
        assert not first.any()
        handle = buf.low_latency_dispatch(x, idx, NUM_MAX, E, use_fp8=False)[2]
        assert buf.get_next_low_latency_combine_buffer(handle) is first


# ---- high throughput ----
def _ht_fp8(group):
    from epkern import reference

    rng = np.random.default_rng(group.rank)
    x = rng.integers(-4, 5, size=(T, H)).astype(BF16)
    idx = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int64)
    data, scales = reference.per_token_cast_to_fp8(x)
    with Buffer(group, backend="cpu") as buf:
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
        layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        a = buf.dispatch((data, scales), topk_idx=idx, **layout)
        b = buf.dispatch((data.view(np.uint8), scales), topk_idx=idx, **layout)
        for recv in (a[0], b[0], buf.dispatch((data.view(np.uint8), scales), handle=a[4])[0]):
            assert recv[0].dtype == np.uint8 and np.array_equal(recv[0], a[0][0]) and np.array_equal(recv[1], a[0][1])
        want = reference.ht_dispatch(group.allgather_object((data, scales)), group.allgather_object(idx), E)
        assert np.array_equal(a[0][0], want[group.rank].recv_x[0].view(np.uint8))
        bad = in_rank.copy()
        bad[0] = ~bad[0]
        with pytest.raises(ArgumentError, match="is_token_in_rank: does not match topk_idx"):
            buf.dispatch(x, topk_idx=idx, **{**layout, "is_token_in_rank": bad})
        with pytest.raises(ArgumentError, match="x: expected a numpy array"):
            buf.dispatch("x", handle=a[4])
    return True


def test_ht_fp8_inputs_of_either_kind_give_uint8_outputs():
    assert run_in_process(_ht_fp8, 2) == [True, True]


def _ht_combine_buffer(group):
    from epkern import reference

    rng = np.random.default_rng(10 + group.rank)
    x = rng.integers(-8, 9, size=(T, H)).astype(BF16)
    idx = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int64)
    with Buffer(group, backend="cpu") as buf:
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
        recv_x, _, _, _, handle, _ = buf.dispatch(
            x, topk_idx=idx, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert
        )
        y = buf.get_combine_buffer(handle)
        assert y.shape == recv_x.shape and y.dtype == BF16
        y[...] = recv_x * 2  # the expert writes its output there
        got, _, _ = buf.combine(y, handle)
        ref = reference.ht_dispatch(group.allgather_object(x), group.allgather_object(idx), E)
        twice = [(r.recv_x.astype(np.float32) * 2).astype(BF16) for r in ref]
        want = reference.ht_combine(twice, [r.handle for r in ref])[group.rank][0]
        assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
        with buf.allocating_in_buffer():  # the CPU backend reads combine inputs anywhere: a no-op there
            y2 = (recv_x.astype(np.float32) * 2).astype(BF16)
        assert np.array_equal(buf.combine(y2, handle)[0].view(np.uint16), want.view(np.uint16))
        with Buffer(group, backend="cpu") as other:
            with pytest.raises(ArgumentError, match="handle"):
                other.get_combine_buffer(handle)
    return True


def test_ht_combine_buffer_holds_the_expert_output():
    assert run_in_process(_ht_combine_buffer, 2) == [True, True]


def test_check_array_refuses_an_array_on_another_device():
    """The device check reads CuPy's ``data.device_id`` (no Device object per access) and falls back to
    ``device.id``; host arrays have neither and are not device-checked."""
    import types

    from epkern._validate import check_array
    from epkern.errors import ArgumentError

    def dev_array(data_id=None, device_id=None):
        a = np.zeros((2, 3), np.float32)
        return types.SimpleNamespace(
            dtype=a.dtype, ndim=2, shape=a.shape, flags=a.flags, strides=a.strides,
            data=types.SimpleNamespace(device_id=data_id), device=types.SimpleNamespace(id=device_id),
        )  # fmt: skip

    for arr in (dev_array(data_id=1), dev_array(device_id=1)):
        with pytest.raises(ArgumentError, match="x: expected an array on device 0, got device 1"):
            check_array(arr, "x", dtypes=(np.float32,), shape=(2, 3), device=0)
    assert check_array(dev_array(data_id=0, device_id=1), "x", dtypes=(np.float32,), device=0) is not None
    assert check_array(np.zeros((2, 3), np.float32), "x", dtypes=(np.float32,), device=0) is not None
