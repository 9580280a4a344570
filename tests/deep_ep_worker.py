"""One rank of tests/test_deep_ep.py under torch.distributed: ``python tests/deep_ep_worker.py RANK WORLD INIT_FILE
BACKEND`` (gloo, file:// rendezvous; BACKEND cpu or gpu). The group given to ``deep_ep.Buffer`` is
``dist.group.WORLD``, as DeepEP users pass it. On a GPU every rank uses device 0 (several ranks per GPU: start MPS
first). Runs tests/deep_ep_scenarios.py's cases and tests/deep_ep_readme.py, and prints "OK rank r"."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(rank: int, world: int, init_file: str, backend: str) -> None:
    import torch
    import torch.distributed as dist

    import deep_ep_scenarios
    from epkern import Config, deep_ep
    from epkern.group import as_group

    device = "cuda" if backend == "gpu" else "cpu"
    if backend == "gpu":
        torch.cuda.set_device(0)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        group = dist.group.WORLD
        checks = as_group(group)  # the same ranks, for the scenarios' shared seed and exchanges
        nodes = checks.num_nodes  # EPKERN_RANKS_PER_NODE: virtual nodes (DeepEP's internode HT, over the emulated NIC)
        rdma = 0 if nodes == 1 else Config.get_rdma_buffer_size_hint(deep_ep_scenarios.H * 2, world, num_nodes=nodes)
        buf = deep_ep.Buffer(group, num_nvl_bytes=1 << 26, num_rdma_bytes=rdma, backend=backend)
        assert buf.group is group and buf.group_size == world
        for routing in ("random", "skewed"):
            deep_ep_scenarios.ht_case(buf, checks, routing, device)
        if backend == "gpu":
            with torch.cuda.stream(torch.cuda.Stream()):  # a torch side stream as the current stream
                deep_ep_scenarios.ht_case(buf, checks, "random", device)
            deep_ep_scenarios.ht_graph_case(buf, checks)  # torch.cuda.graph capture and replays (issue #19)
        buf.destroy()
        if nodes > 1:  # across nodes: the HT cases only (LL over NIC routes: tests/ll_mpi_worker.py)
            print(f"OK rank {rank} (HT across {nodes} nodes)", flush=True)
            return  # (the process group is destroyed below)
        num_max = 48
        nbytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(num_max, deep_ep_scenarios.H, world, 8 * world)
        buf = deep_ep.Buffer(group, num_rdma_bytes=nbytes, low_latency_mode=True, backend=backend)
        for use_fp8 in (False, True, False, True, False):  # repeats: new arrays of one layout, rebound (rebind.py)
            deep_ep_scenarios.ll_case(buf, checks, use_fp8, num_max, device)
        if backend == "gpu":
            ll = buf._buf._backend.ll
            assert ll.rebound >= 3 and len(ll.plans) == 0, (ll.rebound, len(ll.plans))  # no plan keeps tensors
        deep_ep_scenarios.ll_case(buf, checks, True, num_max, device, zero_copy=True)
        if backend == "gpu":
            with torch.cuda.stream(torch.cuda.Stream()):  # a torch side stream as the current stream
                deep_ep_scenarios.ll_case(buf, checks, False, num_max, device, zero_copy=True)
        kept = None
        if backend == "gpu":
            deep_ep_scenarios.ll_graph_case(buf, checks, num_max=num_max)  # torch.cuda.graph capture and replays
            kept = deep_ep_scenarios.local_buffer_case(buf)
        buf.destroy()
        if kept is not None:
            assert kept[16:48].tolist() == list(range(32))  # the view kept the memory past destroy()
            del kept
        import deep_ep_readme

        deep_ep_readme.run(group, checks, device)  # DeepEP's README usage, only the import changed
    finally:
        dist.destroy_process_group()
    print(f"OK rank {rank}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
