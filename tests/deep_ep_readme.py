"""DeepEP's README usage, written the way DeepEP's users write it (``group.size()``, the cached ``get_buffer``
helper, async calls chained through ``previous_event``, the recv hook), with only the import changed. Run by
tests/deep_ep_worker.py under torch.distributed; every result is checked exactly against epkern's reference."""

from __future__ import annotations

import numpy as np

import deep_ep_scenarios as S
import ht_scenarios
from epkern import reference
from epkern.deep_ep import Buffer, EventOverlap

_buffer = None
Buffer.set_num_sms(24)


def get_buffer(group, hidden_bytes):
    global _buffer
    num_nvl_bytes, num_rdma_bytes = 0, 0
    for config in (Buffer.get_dispatch_config(group.size()), Buffer.get_combine_config(group.size())):
        num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, group.size()), num_nvl_bytes)
        num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, group.size()), num_rdma_bytes)
    if (_buffer is None or _buffer.group != group or _buffer.num_nvl_bytes < num_nvl_bytes
            or _buffer.num_rdma_bytes < num_rdma_bytes):  # fmt: skip
        _buffer = Buffer(group, num_nvl_bytes, num_rdma_bytes)
    return _buffer


def get_hidden_bytes(x):
    t = x[0] if isinstance(x, tuple) else x
    return t.size(1) * max(t.element_size(), 2)


def dispatch_forward(x, topk_idx, topk_weights, num_experts, previous_event=None):
    per_rank, per_rdma_rank, per_expert, in_rank, previous_event = _buffer.get_dispatch_layout(
        topk_idx, num_experts, previous_event=previous_event, async_finish=True,
        allocate_on_comm_stream=previous_event is not None,
    )  # fmt: skip
    recv_x, recv_topk_idx, recv_topk_weights, counts, handle, event = _buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=per_rank,
        num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        previous_event=previous_event, async_finish=True, allocate_on_comm_stream=True,
    )  # fmt: skip
    return recv_x, recv_topk_idx, recv_topk_weights, counts, handle, event


def combine_forward(x, handle, previous_event=None):
    combined_x, _, event = _buffer.combine(
        x, handle, async_finish=True, previous_event=previous_event, allocate_on_comm_stream=previous_event is not None
    )
    return combined_x, event


def combine_backward(grad_combined_x, handle, previous_event=None):
    grad_x, _, _, _, _, event = _buffer.dispatch(
        grad_combined_x, handle=handle, async_finish=True, previous_event=previous_event,
        allocate_on_comm_stream=previous_event is not None,
    )  # fmt: skip
    return grad_x, event


def get_ll_buffer(group, num_max_dispatch_tokens_per_rank, hidden, num_experts):
    global _buffer
    num_rdma_bytes = Buffer.get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, group.size(),
                                                           num_experts)  # fmt: skip
    if (
        _buffer is None
        or _buffer.group != group
        or not _buffer.low_latency_mode
        or _buffer.num_rdma_bytes < num_rdma_bytes
    ):
        assert num_experts % group.size() == 0
        _buffer = Buffer(group, 0, num_rdma_bytes, low_latency_mode=True,
                         num_qps_per_rank=num_experts // group.size())  # fmt: skip
    return _buffer


def run(group, checks, backend_device):
    """The README's calls on the torch group ``group``; ``checks`` (an epkern group of the same ranks) shares the
    seed. HT forward and backward, then LL with the hook, each exact."""
    global _buffer
    r, R = group.rank(), group.size()
    E = 8 * R
    seed = ht_scenarios.shared_seed(checks)
    xs, idxs, ws = ht_scenarios.make_inputs(seed, R, S.T, S.H, E, S.K)
    ref = reference.ht_dispatch(xs, idxs, E, topk_weights=ws)
    x, idx, w = (S.to_tensor(a, backend_device) for a in (xs[r], idxs[r], ws[r]))
    buf = get_buffer(group, get_hidden_bytes(x))
    assert get_buffer(group, get_hidden_bytes(x)) is buf  # the helper keeps its Buffer
    recv_x, _, recv_w, counts, handle, event = dispatch_forward(x, idx, w, E, previous_event=Buffer.capture())
    assert isinstance(event, EventOverlap)
    event.current_stream_wait()
    S.same(recv_x, ref[r].recv_x, "README dispatch_forward recv_x")
    assert counts == list(ref[r].num_recv_tokens_per_expert_list)
    handles = [res.handle for res in ref]
    combined, event = combine_forward(recv_x, handle, previous_event=event)
    event.current_stream_wait()
    want = reference.ht_combine([res.recv_x for res in ref], handles)[r]
    S.same(combined, want[0], "README combine_forward")
    grad_x, event = combine_backward(combined, handle, previous_event=event)
    event.current_stream_wait()
    combined_all = reference.ht_combine([res.recv_x for res in ref], handles)
    want_grad = reference.ht_cached_dispatch([c[0] for c in combined_all], handles)[r]
    S.same(grad_x, want_grad, "README combine_backward")
    _buffer.destroy()
    _buffer = None
    # low latency, with the hook, as decoding does
    num_max = 48
    buf = get_ll_buffer(group, num_max, S.H, E)
    lref = reference.ll_dispatch(xs, idxs, num_max, E)
    recv_x, recv_count, handle, _, hook = buf.low_latency_dispatch(
        x, idx, num_max, E, use_fp8=False, async_finish=False, return_recv_hook=True
    )
    hook()
    S.same(recv_count, lref[r].recv_count, "README low_latency_dispatch recv_count")
    combined, _, hook = buf.low_latency_combine(recv_x, idx, w, handle, async_finish=False, return_recv_hook=True)
    hook()
    ys = [v.view(S.BF16) for v in checks.allgather_object(S.to_numpy(recv_x).view(np.int16))]
    infos = checks.allgather_object((S.to_numpy(handle[0]), S.to_numpy(handle[1])))
    layouts = [reference.LLHandle(s, lr, num_max, E, S.H) for s, lr in infos]
    S.same(combined, reference.ll_combine(ys, layouts, idxs, ws)[r], "README low_latency_combine")
    _buffer.destroy()
    _buffer = None
