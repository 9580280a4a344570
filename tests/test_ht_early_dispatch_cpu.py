"""A non-cached HT dispatch launches its copy before the host waits for the counts (gpu/ht_outputs.py), over the fake
CuPy: the copy's outputs are a reservation in the shared heap, the host keeps what the counts say and returns the rest
at once; refusals after the launch leave the Buffer usable and the heap as it was. Kernels do not run here (the GPU
suites check the rows)."""

from __future__ import annotations

import ctypes
import gc

import numpy as np
import pytest

import fake_cupy as F
from epkern import kernel_constants as K
from epkern.errors import ArgumentError
from epkern.gpu.kernels import HT_DISPATCH, HT_NOTIFY
from epkern.memory.heap import ALIGN, HeapExhaustedError

T, H, TOPK, E = 64, 1024, 4, 8


def _words(args):
    a = {name: args[HT_NOTIFY.index(name)] for name, _ in HT_NOTIFY.args}
    return (ctypes.c_int32 * K.get("EPK_HT_NOTIFY_WORDS")).from_address(int(a["host_out"])), int(a["call"])


class CountsAfterTheCopy:
    """ht_notify's host words as the one-rank emulation leaves them, except the call number (which tells the host the
    counts are in): written only when the dispatch kernel is launched. A host that waits before launching the copy
    never sees it. ``edit(words)`` changes the words first (a bad index, a peer's other shape)."""

    def __init__(self, edit=None, on_dispatch=None):
        self.edit, self.on_dispatch, self.pending = edit, on_dispatch, None
        self.dispatch_args = []

    def notify(self, args):
        F.emulate_ht_notify_one_rank(args)
        words, call = _words(args)
        if self.edit is not None:
            self.edit(words)
        words[0] = 0
        self.pending = (words, call)

    def dispatch(self, args):
        self.dispatch_args.append(args)
        if self.on_dispatch is not None:
            self.on_dispatch()
        if self.pending is not None:
            words, call = self.pending
            words[0] = call
            self.pending = None

    def kernels(self):
        return {"epk_ht_notify": self.notify, "epk_ht_dispatch": self.dispatch}


def _arg(args, name):
    return args[HT_DISPATCH.index(name)]


def _dispatch(buf, inputs=None, **kw):
    return F.full_dispatch(buf, inputs or F.ht_inputs(T, H, TOPK, E), **kw)


def _warm(buf, em, inputs=None, rows=T):
    """A first use of the dispatch kernel's specialisation (num_worst_tokens: no count to wait for): the early launch
    is only for a warm specialisation (a first use is collective, and only a call the counts accept may reach it)."""
    _dispatch(buf, inputs, num_worst_tokens=rows)
    em.dispatch_args.clear()
    gc.collect()


def test_the_copy_starts_before_the_host_waits_for_the_counts(monkeypatch):
    em = CountsAfterTheCopy()
    with F.installed(monkeypatch, emulate=em.kernels()):
        buf = F.fake_buffer(timeout_s=0.3)
        heap = buf._backend.rt.heap
        _warm(buf, em)
        gc.disable()
        try:
            recv_x, recv_idx, recv_w, counts, handle, _ = _dispatch(buf, expert_alignment=24)
            assert recv_x.shape == (T, H) and recv_idx.shape == (T, TOPK) and recv_w.shape == (T, TOPK)
            assert handle.num_recv_tokens == T and handle.num_out_rows == T and handle.recv_src_idx.shape == (T,)
            assert counts == [48] * E
            (args,) = em.dispatch_args
            # the copy was told the reservation's rows (more than it receives), and wrote where the outputs are
            assert int(_arg(args, "out_rows")) > T
            for name, a in (("out_x", recv_x), ("out_idx", recv_idx), ("out_weights", recv_w)):
                assert F.addr(_arg(args, name)) == a.data.ptr, name
            assert F.addr(_arg(args, "out_src")) == handle.recv_src_idx.data.ptr
            assert int(_arg(args, "out_scales")) == 0  # BF16
            # only the outputs stay allocated: the reservation's tails went back to the heap in the call
            exact = sum(-(-n // ALIGN) * ALIGN for n in (T * H * 2, T * TOPK * 8, T * TOPK * 4, T * 4))
            assert heap.in_use == exact
            del recv_x, recv_idx, recv_w, handle, args, a  # (a: the loop's last array)
            em.dispatch_args.clear()
            assert heap.in_use == 0 and heap.largest_free() == heap.nbytes
        finally:
            gc.enable()
        buf.destroy()


def test_fp8_outputs_come_from_the_reservation(monkeypatch):
    em = CountsAfterTheCopy()
    with F.installed(monkeypatch, emulate=em.kernels()):
        import cupy  # the fake's

        buf = F.fake_buffer(timeout_s=0.3)
        inputs = F.ht_inputs(T, H, TOPK, E)
        x = (cupy.asarray(np.ones((T, H), np.uint8)), cupy.asarray(np.ones((T, H // 128), np.float32)))
        _dispatch(buf, inputs, x=x, num_worst_tokens=T)  # the FP8 specialisation's first use
        em.dispatch_args.clear()
        (data, scales), *_ = _dispatch(buf, inputs, x=x)
        assert data.shape == (T, H) and data.dtype == np.uint8 and scales.shape == (T, H // 128)
        (args,) = em.dispatch_args
        assert F.addr(_arg(args, "out_x")) == data.data.ptr and F.addr(_arg(args, "out_scales")) == scales.data.ptr
        buf.destroy()


def test_poisoned_outputs_are_filled_before_the_copy(monkeypatch):
    em = CountsAfterTheCopy()
    with F.installed(monkeypatch, emulate=em.kernels()):
        buf = F.fake_buffer(timeout_s=0.3)
        _warm(buf, em)
        buf._backend.rt.poison = True
        recv_x, recv_idx, recv_w, _, handle, _ = _dispatch(buf)
        for a in (recv_x.view(np.uint8), recv_idx.view(np.uint8), recv_w.view(np.uint8)):
            assert (a._a == 0xFF).all()  # the fake's copy writes nothing: every kept byte is the poison
        buf.destroy()


def _bad_index(words):
    at = K.get("EPK_HT_NOTIFY_BAD_INDEX")
    words[at], words[at + 1] = 3, E + 5  # entry [0, 2] = E + 5


def _other_shape(words):
    at = K.get("EPK_HT_NOTIFY_SHAPE")
    words[at : at + 4] = [1, 1, 2, TOPK]  # "rank 0" called with top-2


@pytest.mark.parametrize("edit, match", [(_bad_index, r"entry \[0, 2\]"), (_other_shape, "differs from rank 0")])
def test_a_call_the_counts_refuse_leaves_the_buffer_usable(monkeypatch, edit, match):
    """The copy already ran on every rank when the counts refuse the call: the host waits for it, clears the shape
    record the copy left (where it did), raises ArgumentError, and the heap and the Buffer are as before."""
    em = CountsAfterTheCopy()
    with F.installed(monkeypatch, emulate=em.kernels()) as launches:
        buf = F.fake_buffer(timeout_s=0.3)
        heap = buf._backend.rt.heap
        _warm(buf, em)
        launches.clear()
        if edit is _other_shape:  # the copy's own report of the peer's other shape, as ht_dispatch.cu makes it
            em.on_dispatch = lambda: F.record_kernel_error(buf, 1, K.get("EPK_ERR_PHASE_HT_SHAPE"), 0, H, H)
        em.edit = edit
        with pytest.raises(ArgumentError, match=match):
            _dispatch(buf)
        assert [launch[1] for launch in F.real_launches(launches)] == ["epk_ht_notify", "epk_ht_dispatch"]
        em.dispatch_args.clear()
        gc.collect()
        assert heap.in_use == 0
        assert int(buf._backend.rt.error_record[0]) == 0
        em.edit = em.on_dispatch = None
        recv_x, *_ = _dispatch(buf)  # usable
        assert recv_x.shape == (T, H)
        buf.destroy()


def test_outputs_larger_than_the_heap_raise_heap_exhausted(monkeypatch):
    em = CountsAfterTheCopy()
    with F.installed(monkeypatch, emulate=em.kernels()):
        buf = F.fake_buffer(num_nvl_bytes=(T // 2) * (H * 2 + TOPK * 12 + 4) + 8 * ALIGN, timeout_s=0.3)
        heap = buf._backend.rt.heap
        _warm(buf, em, rows=T // 4)
        with pytest.raises(HeapExhaustedError, match=f"receives {T} rows"):
            _dispatch(buf)
        (args,) = em.dispatch_args
        assert T // 2 <= int(_arg(args, "out_rows")) < T  # the copy could not write past what was reserved
        del args
        em.dispatch_args.clear()
        gc.collect()
        assert heap.in_use == 0
        buf.destroy()


def test_in_process_ranks_size_their_outputs_from_the_counts(monkeypatch):
    """In-process ranks take outputs from CuPy's pool (no shared heap): the host waits for the counts first."""
    with F.installed(monkeypatch, emulate={"epk_ht_notify": F.emulate_ht_notify_one_rank}) as launches:
        buf = F.fake_buffer(processes=False)
        recv_x, *_ = _dispatch(buf)
        dispatch = [launch for launch in F.real_launches(launches) if launch[1] == "epk_ht_dispatch"]
        assert recv_x.shape == (T, H) and int(_arg(dispatch[0][5], "out_rows")) == T
        assert buf._backend.rt.heap.in_use == 0
        buf.destroy()


def test_a_first_use_waits_for_the_counts_first(monkeypatch):
    """A specialisation's first use is collective (a dry run, a sync, a barrier on every rank): a rank must reach it
    only for a call every rank accepts, so the first dispatch of a shape reads the counts before it launches."""
    em = CountsAfterTheCopy()
    with F.installed(
        monkeypatch, emulate={"epk_ht_notify": F.emulate_ht_notify_one_rank, "epk_ht_dispatch": em.dispatch}
    ):
        buf = F.fake_buffer()
        for first in (True, False):
            recv_x, *_ = _dispatch(buf)
            (args,) = em.dispatch_args
            em.dispatch_args.clear()
            assert recv_x.shape == (T, H) and (int(_arg(args, "out_rows")) == T) == first
        buf.destroy()


def test_many_early_dispatches_keep_the_heap_exact(monkeypatch):
    """Early dispatches of random sizes, a random subset of their outputs kept alive: every kept output lies in its
    own heap range (no overlap, nothing counted twice), the heap's in-use bytes are the live outputs' blocks, and
    once everything is dropped the heap is one free range again."""
    import random

    em = CountsAfterTheCopy()
    with F.installed(monkeypatch, emulate=em.kernels()):
        buf = F.fake_buffer(num_nvl_bytes=24 << 20, timeout_s=0.3)
        heap = buf._backend.rt.heap
        rng = random.Random()
        sizes = [rng.randrange(1, 200) for _ in range(30)]
        for n in sorted(set(sizes)):  # first uses (num_worst_tokens), so every call below goes early
            _warm(buf, em, F.ht_inputs(n, H, TOPK, E), rows=n)
        live = []
        for n in sizes:
            recv_x, recv_idx, recv_w, _, handle, _ = _dispatch(buf, F.ht_inputs(n, H, TOPK, E))
            assert int(_arg(em.dispatch_args[-1], "out_rows")) >= n and recv_x.shape == (n, H)
            em.dispatch_args.clear()
            live.append((recv_x, recv_idx, recv_w, handle))
            del recv_x, recv_idx, recv_w, handle  # only `live` holds outputs
            if rng.random() < 0.4:
                live.pop(rng.randrange(len(live)))
            blocks = {id(b): b for out in live for b in out[3].keep}.values()
            spans = sorted((b.offset, b.offset + b.nbytes) for b in blocks)
            assert all(a1 <= b0 for (_, a1), (b0, _) in zip(spans, spans[1:], strict=False)), "overlapping outputs"
            assert heap.in_use == sum(b.nbytes for b in blocks)
        live.clear()
        del blocks
        gc.collect()
        assert heap.in_use == 0 and heap.largest_free() == heap.nbytes
        buf.destroy()
