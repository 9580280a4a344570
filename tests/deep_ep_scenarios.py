"""DeepEP-style scenarios through epkern.deep_ep (issue #19), run by every rank of a group: tests/test_deep_ep.py
(in-process ranks, CPU backend) and tests/deep_ep_worker.py (processes under torch.distributed: gloo on the CPU, MPS
on a GPU).
Every rank draws all ranks' inputs from one shared seed and checks its own outputs exactly against the reference."""

from __future__ import annotations

import numpy as np

import ht_scenarios
import ll_scenarios
from epkern import deep_ep, reference
from epkern.errors import ArgumentError

BF16, FP8 = ht_scenarios.BF16, ht_scenarios.FP8
T, H, K = 40, 256, 4


def _torch():
    import torch

    return torch


def to_tensor(a, device="cpu"):
    """numpy -> torch (BF16 as torch.bfloat16), a copy made without epkern's helpers."""
    torch = _torch()
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16).to(device)
    return torch.from_numpy(a.copy()).to(device)


def to_numpy(t):
    torch = _torch()
    t = t.cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy()
    return t.numpy()


def same(got, want, what):
    ht_scenarios.assert_same(to_numpy(got), want, what)


def ht_case(buf, group, routing="random", device="cpu"):
    """Layout, dispatch, combine and an asynchronous cached dispatch; all exact; DeepEP's handle tuple. A group
    across (virtual) nodes also gets and passes the tokens per node, as DeepEP's internode mode."""
    torch = _torch()
    r, R = group.rank, buf.group_size
    E = 8 * R
    seed = ht_scenarios.shared_seed(group)
    nodes = ht_scenarios.node_map(group)
    xs, idxs, ws = ht_scenarios.make_inputs(seed, R, T, H, E, K, routing)
    ref = reference.ht_dispatch(xs, idxs, E, topk_weights=ws)
    mine = ref[r]
    x, idx, w = to_tensor(xs[r], device), to_tensor(idxs[r], device).to(deep_ep.topk_idx_t), to_tensor(ws[r], device)
    per_rank, per_rdma, per_expert, in_rank, event = buf.get_dispatch_layout(idx, E)
    assert isinstance(event, deep_ep.EventOverlap)
    if nodes is None:
        assert per_rdma is None
    else:
        want_rdma = reference.get_dispatch_layout(idxs[r], E, R, rank_to_node=nodes).num_tokens_per_rdma_rank
        same(per_rdma, want_rdma, "num_tokens_per_rdma_rank")
    recv_x, recv_idx, recv_w, counts, handle, event = buf.dispatch(
        x, topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
        is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, config=deep_ep.Buffer.get_dispatch_config(R),
    )  # fmt: skip
    assert isinstance(recv_x, torch.Tensor) and recv_x.device.type == torch.device(device).type
    same(recv_x, mine.recv_x, "recv_x")
    same(recv_idx, mine.recv_topk_idx, "recv_topk_idx")
    same(recv_w, mine.recv_topk_weights, "recv_topk_weights")
    assert counts == list(mine.num_recv_tokens_per_expert_list)
    # DeepEP's 6-tuple
    assert isinstance(handle, tuple) and len(handle) == 6 and handle[1] is None and handle[2] is None
    same(handle[0], mine.handle.rank_prefix_matrix, "handle rank_prefix_matrix")
    same(handle[3], mine.handle.src_idx, "handle recv_src_idx")
    same(handle[4], mine.handle.is_token_in_rank, "handle is_token_in_rank")
    # combine of the received rows as they are
    handles, weights = [res.handle for res in ref], [res.recv_topk_weights for res in ref]
    want = reference.ht_combine([res.recv_x for res in ref], handles, topk_weights=weights, rank_to_node=nodes)[r]
    combined, combined_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w, previous_event=deep_ep.Buffer.capture())
    same(combined, want[0], "combined_x")
    same(combined_w, want[1], "combined_topk_weights")
    y = buf.get_combine_buffer(handle)  # epkern's own: the expert output written into the Buffer
    assert isinstance(y, torch.Tensor) and y.shape == recv_x.shape and y.dtype == torch.bfloat16
    y.copy_(recv_x)
    same(buf.combine(y, handle)[0], want[0], "combined_x from get_combine_buffer")
    # cached dispatch, asynchronous, through the overlap idiom
    xs2, _, _ = ht_scenarios.make_inputs(seed + 1, R, T, H, E, K, routing)
    want2 = reference.ht_cached_dispatch(xs2, handles)[r]
    got2, none_idx, none_w, _, same_handle, event = buf.dispatch(
        to_tensor(xs2[r], device), handle=handle, async_finish=True
    )
    with event:
        pass
    assert none_idx is None and none_w is None and same_handle is handle
    same(got2, want2, "cached recv_x")


def ll_case(buf, group, use_fp8=False, num_max=48, device="cpu", zero_copy=False):
    """LL dispatch (with the recv hook) and combine; exact; DeepEP's 5-tuple handle. ``zero_copy``: the expert
    outputs are written into ``get_next_low_latency_combine_buffer`` and combined from there."""
    torch = _torch()
    r, R = group.rank, buf.group_size
    E = 8 * R
    seed = ht_scenarios.shared_seed(group)
    xs, idxs, ws = ht_scenarios.make_inputs(seed, R, T, H, E, K)
    ref = reference.ll_dispatch(xs, idxs, num_max, E, use_fp8=use_fp8)
    idx = to_tensor(idxs[r], device)
    recv_x, recv_count, handle, event, hook = buf.low_latency_dispatch(
        to_tensor(xs[r], device), idx, num_max, E, use_fp8=use_fp8, return_recv_hook=True
    )
    hook()
    mine = ref[r]
    if use_fp8:
        assert recv_x[0].dtype == torch.float8_e4m3fn and recv_x[1].dtype == torch.float32
    else:
        assert recv_x.dtype == torch.bfloat16
    same(recv_count, mine.recv_count, "recv_count")
    assert isinstance(handle, tuple) and len(handle) == 5 and tuple(handle[2:]) == (num_max, H, E)
    # the combine of BF16 expert outputs (the dequantised rows for FP8), weights as given
    if use_fp8:
        data, scales = (to_numpy(v) for v in recv_x)
        rows = data.reshape(-1, H).view(FP8)
        back = reference.per_token_cast_back(rows, np.ascontiguousarray(scales).reshape(rows.shape[0], -1))
        y = to_tensor(back.astype(BF16).reshape(data.shape), device)
    else:
        y = recv_x
    if zero_copy:
        target = buf.get_next_low_latency_combine_buffer(handle)
        assert target.shape == y.shape and target.dtype == torch.bfloat16
        target.copy_(y)
    combined, _, _ = buf.low_latency_combine(y, idx, to_tensor(ws[r], device), handle, zero_copy=zero_copy)
    # every rank's expert outputs and receive layout (the wire carries plain dtypes)
    ys = [v.view(BF16) for v in group.allgather_object(to_numpy(y).view(np.int16))]
    infos = group.allgather_object((to_numpy(handle[0]), to_numpy(handle[1])))
    layouts = [reference.LLHandle(s, lr, num_max, E, H) for s, lr in infos]
    want = reference.ll_combine(ys, layouts, idxs, ws)[r]
    same(combined, want, "combined_x")


def ll_graph_case(buf, group, replays=10, num_max=48, device="cuda"):
    """DeepEP's CUDA-graph idiom (GPU only): one LL dispatch + combine of the received rows captured with
    ``torch.cuda.graph`` on static tensors, then replayed on fresh inputs copied into them; every replay exact
    (recv_count, and the combine against the reference built from every rank's received rows)."""
    torch = _torch()
    r, R = group.rank, buf.group_size
    E = 8 * R
    seed = ht_scenarios.shared_seed(group)
    x = torch.zeros((T, H), dtype=torch.bfloat16, device=device)
    idx = torch.full((T, K), -1, dtype=deep_ep.topk_idx_t, device=device)
    w = torch.zeros((T, K), dtype=torch.float32, device=device)

    def load(it):
        xs, idxs, ws = ht_scenarios.make_inputs(seed + it, R, T, H, E, K)
        for dst, src in ((x, xs), (idx, idxs), (w, ws)):
            dst.copy_(to_tensor(src[r], device))
        return xs, idxs, ws

    def pair():
        recv_x, count, handle, _, _ = buf.low_latency_dispatch(x, idx, num_max, E, use_fp8=False)
        combined, _, _ = buf.low_latency_combine(recv_x, idx, w, handle)
        return recv_x, count, handle, combined

    load(-1)
    pair()  # eager first: kernels compiled, sizes agreed
    torch.cuda.synchronize()
    group.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        recv_x, count, handle, combined = pair()
    for it in range(replays):
        xs, idxs, ws = load(it)
        graph.replay()
        torch.cuda.synchronize()
        ref = reference.ll_dispatch(xs, idxs, num_max, E)
        got = [to_numpy(t) for t in (recv_x, count, handle[0], handle[1])]
        ll_scenarios.check_dispatch(r, R, *got, ref[r], f"rank {r} replay {it}")
        want = reference.ll_combine([res.recv_x for res in ref], ref, idxs, ws)[r]  # x times its weights' sum
        same(combined, want, f"rank {r} replay {it} combined_x")


def ht_graph_case(buf, group, replays=5, device="cuda"):
    """HT inside ``torch.cuda.graph`` where DeepEP allows it (GPU only): a dispatch with num_worst_tokens, a cached
    dispatch with its handle, the expert (a torch copy of the received rows) and the combine of that fresh output
    captured once on static tensors (the layout computed outside the graph, copied in), then replayed on fresh
    inputs; every replay exact. Across (virtual) nodes the tokens per node are captured too."""
    torch = _torch()
    r, R = group.rank, buf.group_size
    E, W = 8 * R, R * T
    seed = ht_scenarios.shared_seed(group)
    nodes = ht_scenarios.node_map(group)
    per_node = None if nodes is None else torch.zeros((group.num_nodes,), dtype=torch.int32, device=device)
    x = torch.zeros((T, H), dtype=torch.bfloat16, device=device)
    idx = torch.full((T, K), -1, dtype=deep_ep.topk_idx_t, device=device)
    w = torch.zeros((T, K), dtype=torch.float32, device=device)
    per_rank = torch.zeros((R,), dtype=torch.int32, device=device)
    per_expert = torch.zeros((E,), dtype=torch.int32, device=device)
    in_rank = torch.zeros((T, R), dtype=torch.bool, device=device)
    y = torch.zeros((W, H), dtype=torch.bfloat16, device=device)

    def load(it):
        xs, idxs, ws, host = ht_scenarios.graph_step_inputs(seed + it, r, R, T, H, E, K, nodes)
        for dst, src in zip((x, idx, w, per_rank, per_expert, in_rank, per_node), host, strict=True):
            if dst is not None:
                dst.copy_(to_tensor(np.ascontiguousarray(src), device).to(dst.dtype))
        return xs, idxs, ws

    def step():
        recv_x, recv_idx, recv_w, _, handle, _ = buf.dispatch(
            x, topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node,
            is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, num_worst_tokens=W,
        )  # fmt: skip
        again, *_ = buf.dispatch(x, handle=handle)
        y.copy_(again)  # the expert
        combined, combined_w, _ = buf.combine(y, handle, topk_weights=recv_w)
        return recv_x, recv_idx, recv_w, handle, again, combined, combined_w

    def check(it, xs, idxs, ws, got):
        recv_x, recv_idx, recv_w, handle, again, combined, combined_w = got
        outs = [to_numpy(t) for t in (handle[3], recv_x, recv_idx, recv_w, again, combined, combined_w)]
        ht_scenarios.check_graph_replay(
            r, E, W, xs, idxs, ws, outs, f"rank {r} HT graph replay {it}", rank_to_node=nodes
        )

    check(-1, *load(-1), step())  # eager first: every kernel warmed
    torch.cuda.synchronize()
    group.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = step()
    for it in range(replays):
        data = load(it)
        graph.replay()
        torch.cuda.synchronize()
        check(it, *data, got)
    group.barrier()


def local_buffer_case(buf, device="cuda"):
    """get_local_buffer_tensor (GPU): a view of the LL area, written through one view and read through another
    at an offset (the same memory, no copy); the view keeps the memory alive; a size beyond the area is refused."""
    torch = _torch()
    whole = buf.get_local_buffer_tensor(torch.int32, use_rdma_buffer=True)
    assert whole.device.type == "cuda" and whole.numel() == buf.num_rdma_bytes // 4  # DeepEP: the bytes asked for
    part = buf.get_local_buffer_tensor(torch.int32, size=(4, 8), offset=64, use_rdma_buffer=True)
    assert part.data_ptr() == whole.data_ptr() + 64 and part.shape == (4, 8)
    part.copy_(torch.arange(32, dtype=torch.int32, device=device).view(4, 8))
    assert whole[16:48].tolist() == list(range(32))
    try:
        buf.get_local_buffer_tensor(torch.int32, size=(whole.numel() + 1,), use_rdma_buffer=True)
    except ArgumentError as exc:
        assert "size:" in str(exc)
    else:
        raise AssertionError("a size beyond the LL area was accepted")
    return whole
