"""epkern.deep_ep, DeepEP's API on torch tensors (issue #19), in the style of DeepEP's own test programs
(tests/deep_ep_scenarios.py): random and skewed routings, cached and non-cached HT, LL with BF16 / FP8 / hook, each
exact against epkern's reference. CPU backend: in-process ranks, and processes under torch.distributed (gloo)."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import deep_ep_scenarios  # noqa: E402
from epkern import deep_ep  # noqa: E402
from epkern.errors import ArgumentError, EpkernError  # noqa: E402
from epkern.group import run_in_process  # noqa: E402

T, H, K = deep_ep_scenarios.T, deep_ep_scenarios.H, deep_ep_scenarios.K


@pytest.mark.parametrize("routing", ["random", "skewed"])
@pytest.mark.parametrize("num_ranks", [2, 4])
def test_ht_dispatch_combine_cached(num_ranks, routing):
    def body(group):
        buf = deep_ep.Buffer(group, num_nvl_bytes=1 << 24, backend="cpu")
        assert buf.group is group and buf.group_size == num_ranks and buf.rank == group.rank
        deep_ep_scenarios.ht_case(buf, group, routing)
        buf.destroy()
        return True

    assert run_in_process(body, num_ranks) == [True] * num_ranks


@pytest.mark.parametrize("use_fp8", [False, True])
def test_ll_dispatch_combine(use_fp8):
    R, num_max = 2, 48

    def body(group):
        nbytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(num_max, deep_ep_scenarios.H, R, 8 * R)
        buf = deep_ep.Buffer(group, num_rdma_bytes=nbytes, low_latency_mode=True, backend="cpu")
        deep_ep_scenarios.ll_case(buf, group, use_fp8, num_max)
        buf.destroy()
        return True

    assert run_in_process(body, R) == [True] * R


@pytest.mark.parametrize("world,ranks_per_node", [(2, None), (4, None), (4, 2)])
def test_under_torch_distributed(tmp_path, world, ranks_per_node):
    """The scenarios as processes under torch.distributed (gloo), the group a ProcessGroup as DeepEP takes it; with
    virtual nodes (EPKERN_RANKS_PER_NODE) the HT cases across nodes, as DeepEP's internode mode."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EPKERN_", "PMI", "OMPI_", "MPI_"))}
    if ranks_per_node:
        env["EPKERN_RANKS_PER_NODE"] = str(ranks_per_node)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, str(ROOT / "tests" / "deep_ep_worker.py")]
    procs = [
        subprocess.Popen([*cmd, str(r), str(world), str(tmp_path / "rendezvous"), "cpu"], env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world)
    ]  # fmt: skip
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=150)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0 and f"OK rank {r}" in out, out


def test_handles_belong_to_their_buffer_and_the_static_api():
    def body(group):
        idx = torch.zeros(T, K, dtype=torch.int64)
        a = deep_ep.Buffer(group, num_nvl_bytes=1 << 22, backend="cpu")
        b = deep_ep.Buffer(group, num_nvl_bytes=1 << 22, backend="cpu")
        layout = a.get_dispatch_layout(idx, 8)
        kw = dict(num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2])
        x = torch.ones(T, H, dtype=torch.bfloat16)
        recv_x, _, _, _, handle, _ = a.dispatch(x, topk_idx=idx, **kw)
        with pytest.raises(ArgumentError, match="another Buffer"):
            b.combine(recv_x, handle)
        with pytest.raises(ArgumentError, match="handle: expected"):
            a.combine(recv_x, tuple(handle))
        with pytest.raises(ArgumentError, match="previous_event"):
            a.combine(recv_x, handle, previous_event=object())
        with pytest.raises(ArgumentError, match="dtype: expected a torch.dtype"):
            a.get_local_buffer_tensor("bf16")
        with pytest.raises(ArgumentError, match="offset: expected a multiple of 2 bytes"):
            a.get_local_buffer_tensor(torch.bfloat16, offset=3)
        with pytest.raises(EpkernError, match="CPU backend has no device buffer memory"):
            a.get_local_buffer_tensor(torch.bfloat16)
        a.destroy(), b.destroy()
        return True

    assert run_in_process(body, 2) == [True, True]
    assert deep_ep.Buffer.is_sm90_compiled()
    old = deep_ep.Buffer.num_sms
    try:
        deep_ep.Buffer.set_num_sms(24)
        assert deep_ep.Buffer.get_dispatch_config(8).num_sms == 24 == deep_ep.Buffer.get_combine_config(8).num_sms
        with pytest.raises(ArgumentError, match="num_sms"):
            deep_ep.Buffer.set_num_sms(0)
    finally:
        deep_ep.Buffer.set_num_sms(old)
    assert isinstance(deep_ep.Buffer.capture(), deep_ep.EventOverlap)
    assert deep_ep.topk_idx_t is torch.int64 and deep_ep.Config is not None
    with pytest.raises(ArgumentError, match="use_fabric"):
        deep_ep.Buffer(None, use_fabric=True, backend="cpu")
    with pytest.raises(ArgumentError, match="explicitly_destroy: expected a bool"):
        deep_ep.Buffer(None, explicitly_destroy="yes", backend="cpu")


def test_zero_copy_combine_masks_and_event_chaining():
    """LL zero-copy combine (outputs written into get_next_low_latency_combine_buffer), DeepEP's mask calls, an
    asynchronous dispatch's EventOverlap."""
    R, num_max = 2, 48
    E = 8 * R

    def body(group):
        nbytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(num_max, H, R, E)
        buf = deep_ep.Buffer(group, num_rdma_bytes=nbytes, low_latency_mode=True, backend="cpu")
        seed = deep_ep_scenarios.ht_scenarios.shared_seed(group)
        xs, idxs, ws = deep_ep_scenarios.ht_scenarios.make_inputs(seed, R, T, H, E, K)
        x, idx, w = (deep_ep_scenarios.to_tensor(a) for a in (xs[group.rank], idxs[group.rank], ws[group.rank]))
        recv_x, _, handle, event, _ = buf.low_latency_dispatch(x, idx, num_max, E, use_fp8=False, async_finish=True)
        event.current_stream_wait()
        want, _, _ = buf.low_latency_combine(recv_x, idx, w, handle)
        # zero copy: the expert outputs written into the Buffer's next combine buffer
        recv_x, _, handle, _, _ = buf.low_latency_dispatch(x, idx, num_max, E, use_fp8=False)
        target = buf.get_next_low_latency_combine_buffer(handle)
        assert isinstance(target, torch.Tensor) and target.shape == recv_x.shape and target.dtype == torch.bfloat16
        target.copy_(recv_x)
        got, _, _ = buf.low_latency_combine(recv_x, idx, w, handle, zero_copy=True)
        deep_ep_scenarios.same(got, deep_ep_scenarios.to_numpy(want), "zero-copy combined_x")
        # masks: DeepEP writes the status into the tensor it is given
        status = torch.ones(R, dtype=torch.int32)
        buf.low_latency_query_mask_buffer(status)
        assert status.tolist() == [0] * R
        buf.low_latency_update_mask_buffer(1 - group.rank, True)
        buf.low_latency_query_mask_buffer(status)
        assert status.tolist() == [int(r != group.rank) for r in range(R)]
        buf.low_latency_clean_mask_buffer()
        buf.low_latency_query_mask_buffer(status)
        assert status.tolist() == [0] * R
        buf.destroy()
        return True

    assert run_in_process(body, R) == [True] * R


@pytest.mark.parametrize("use_fp8", [False, True])
def test_ll_outputs_come_from_torch_inside_a_graph_capture(monkeypatch, use_fp8):
    """Inside a torch.cuda.graph capture the LL outputs are torch's (its graph pool), passed to the native call as
    out_* arrays: forced here on the CPU backend (no capture without a GPU); the results stay exact."""
    made = []

    def spy(kind):
        real = getattr(deep_ep, kind)

        def outputs(buf, args):
            out = real(buf, args)
            made.append(out)
            return out

        return outputs

    monkeypatch.setattr(deep_ep, "_capturing", lambda backend: True)
    Buffer, forwarded = deep_ep.Buffer, deep_ep._forwarded
    dispatch = forwarded(
        "low_latency_dispatch", handle_out=(2, "_ll_handle"), event_at=3, outputs=spy("_ll_dispatch_outputs")
    )
    combine = forwarded("low_latency_combine", "low_latency_dispatch", event_at=1, outputs=spy("_ll_combine_outputs"))
    monkeypatch.setattr(Buffer, "low_latency_dispatch", dispatch)
    monkeypatch.setattr(Buffer, "low_latency_combine", combine)
    R, num_max = 2, 48

    def body(group):
        nbytes = Buffer.get_low_latency_rdma_size_hint(num_max, H, R, 8 * R)
        buf = Buffer(group, num_rdma_bytes=nbytes, low_latency_mode=True, backend="cpu")
        deep_ep_scenarios.ll_case(buf, group, use_fp8, num_max)
        buf.destroy()
        return True

    assert run_in_process(body, R) == [True] * R
    kinds = sorted(tuple(sorted(m)) for m in made)
    want_dispatch = tuple(sorted(["out_x", "out_src_info", "out_layout_range", "out_count"] + ["out_scales"] * use_fp8))
    assert kinds == sorted([want_dispatch] * R + [("out",)] * R), kinds


def test_every_tensor_conversion_runs_on_torch_stream(monkeypatch):
    """Every output, handle field and Buffer view becomes a torch tensor inside ``torch_stream`` (torch's current
    stream as CuPy's): outside it, DLPack orders CuPy's stream against torch's with an event — a wasted sync per
    tensor, and inside a torch.cuda.graph capture a cudaErrorStreamCaptureIsolation (seen on the H200 at the LL
    handle's fields). The CPU backend runs the same code with a recording stand-in."""
    from epkern import torch_tensors

    depth, outside = [0], []
    real_to_tensor = torch_tensors.to_tensor

    @contextlib.contextmanager
    def counting(backend):
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    def checking(arr, fp8=False):
        if depth[0] == 0:
            outside.append(tuple(arr.shape))
        return real_to_tensor(arr, fp8)

    monkeypatch.setattr(torch_tensors, "torch_stream", counting)
    monkeypatch.setattr(torch_tensors, "to_tensor", checking)

    def body(group):
        buf = deep_ep.Buffer(group, num_nvl_bytes=1 << 24, backend="cpu")
        deep_ep_scenarios.ht_case(buf, group, "random")
        buf.destroy()
        nbytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(48, H, group.size, 8 * group.size)
        buf = deep_ep.Buffer(group, num_rdma_bytes=nbytes, low_latency_mode=True, backend="cpu")
        deep_ep_scenarios.ll_case(buf, group, False, 48, zero_copy=True)
        buf.destroy()
        return True

    assert run_in_process(body, 2) == [True] * 2
    assert outside == []


def test_arguments_are_named_as_python_binds_them():
    """deep_ep names the arguments itself (no inspect.Signature.bind per call): positional and keyword arguments
    reach the native call under the right names, and the binding errors are Python's TypeErrors."""

    def body(group):
        nbytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(48, H, group.size, 8 * group.size)
        buf = deep_ep.Buffer(group, num_rdma_bytes=nbytes, low_latency_mode=True, backend="cpu")
        x = torch.ones((T, H), dtype=torch.bfloat16)
        idx = torch.arange(T * K, dtype=torch.int64).reshape(T, K) % (8 * group.size)
        a = buf.low_latency_dispatch(x, idx, 48, 8 * group.size, None, None, False)  # positional up to use_fp8
        b = buf.low_latency_dispatch(x, topk_idx=idx, num_experts=8 * group.size, num_max_dispatch_tokens_per_rank=48,
                                     use_fp8=False)  # fmt: skip
        assert a[0].dtype == b[0].dtype == torch.bfloat16 and torch.equal(a[1], b[1])
        with pytest.raises(TypeError, match="multiple values for argument 'x'"):
            buf.low_latency_dispatch(x, idx, 48, 8 * group.size, x=x)
        with pytest.raises(TypeError, match="unexpected keyword argument 'topk_index'"):
            buf.low_latency_dispatch(x, topk_index=idx, num_max_dispatch_tokens_per_rank=48, num_experts=16)
        with pytest.raises(TypeError, match="arguments besides self"):
            buf.low_latency_dispatch(*([None] * 40))
        buf.destroy()
        return True

    assert run_in_process(body, 2) == [True] * 2


@pytest.mark.parametrize("ranks_per_node", [2, 1])
def test_ht_across_virtual_nodes(ranks_per_node):
    """DeepEP's internode HT through the front end (CPU backend, 4 in-process ranks on virtual nodes): the layout
    gives the tokens per node, dispatch takes them, combine reduces in the reference's two-level order; exact."""
    from epkern import Config

    def body(group):
        rdma = Config.get_rdma_buffer_size_hint(H * 2, group.size, num_nodes=group.size // ranks_per_node)
        buf = deep_ep.Buffer(group, num_nvl_bytes=1 << 24, num_rdma_bytes=rdma, backend="cpu")
        deep_ep_scenarios.ht_case(buf, group)
        buf.destroy()
        return True

    assert run_in_process(body, 4, ranks_per_node=ranks_per_node) == [True] * 4
