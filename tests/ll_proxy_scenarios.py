"""LL over the NIC routes (issue #17): the cases both the in-process tests (tests/test_ll_gpu.py) and the MPS worker
(tests/ll_mpi_worker.py --proxy=RPN / --rdma=RPN) run on virtual nodes, for the PROXY route (``kind`` ROUTE_PROXY)
and the RDMA route (ROUTE_RDMA). PROXY first ran on the H200 (2026-12-07): exact as 8 MPS processes (--proxy=4,
--proxy-nohybrid=2) and 2 or 4 in-process ranks; run_proxy_back_to_back passed as MPS processes. RDMA first ran on the
H100 (session K): exact as 8 MPS processes (--rdma=4, --rdma-nohybrid=2) and 2 or 4 in-process ranks."""

from __future__ import annotations

import numpy as np

import ll_scenarios
from epkern.gpu.ll.layout import ROUTE_IPC, ROUTE_PROXY

# Every flag the NIC routes support (zero_copy_recv is refused there), one case each.
PROXY_CASES = (
    dict(),
    dict(routing="skewed"),
    dict(routing="none"),
    dict(use_fp8=True),
    dict(use_fp8=True, round_scale=True, use_ue8m0=True),
    dict(zero_copy=True),
    dict(hook=True, zero_copy=True, prealloc=True),
    dict(hook=True, use_fp8=True, prealloc=True, stats=True),
    dict(async_finish=True, stats=True),
)


def check_routes(buf, group, hybrid: bool, kind: int = ROUTE_PROXY) -> list[int]:
    """The agreed routes: IPC to the same node (hybrid) and to itself, the NIC route `kind` to the rest; a QP per NIC
    peer only (no NIC traffic between ranks of one node in hybrid mode). Returns the remote peers."""
    nodes, r = group.node_of_rank, group.rank
    want = [ROUTE_IPC if p == r or (hybrid and nodes[p] == nodes[r]) else kind for p in range(group.size)]
    be = buf._backend
    assert list(be.ll.routes) == want, (r, be.ll.routes, want)
    remote = [p for p, k in enumerate(want) if k == kind]
    assert (be.nic_routes is not None) == bool(remote) and (not remote or sorted(be.nic_routes.qps) == remote)
    assert be.ll.dispatch_pull == 0 and be.ll.combine_pull == 0
    return remote


def run_proxy_cases(buf, group, hybrid: bool, num_tokens=90, hidden=2048, topk=8, num_max=128, kind=ROUTE_PROXY):
    check_routes(buf, group, hybrid, kind)
    for case in PROXY_CASES:
        ll_scenarios.run_ll_case(buf, group, num_tokens, hidden, 8 * group.size, topk, num_max=num_max, **case)
    ll_scenarios.run_ll_case(buf, group, [0, 1, 5, num_max][: group.size] + [3] * max(0, group.size - 4), hidden,
                             8 * group.size, 4, num_max=num_max)  # fmt: skip


def run_proxy_counters(
    buf, group, hybrid: bool, num_tokens=64, hidden=2048, topk=4, num_max=128, seed=7, kind=ROUTE_PROXY
):
    """One BF16 dispatch + combine; each remote peer's QP counters (one QP per peer) grow by exactly the WRITEs
    of the protocol: dispatch = one message (16 + 2H bytes) per selection owned by the peer, combine = one row
    (2H bytes) per selection of the peer's tokens owned here, and the signals: PROXY one 4-byte WRITE per count /
    flag (e_loc each call; doorbells at most WQEs, one per proxy burst per QP, one CQE per doorbell); RDMA one WRITE
    of the e_loc staged words per call, the call's only signaled WQE (exactly 2 CQEs) and its only doorbell (1 or 2
    seen: doorbell words stored between two of the NIC's scans count once). No errors."""
    remote = check_routes(buf, group, hybrid, kind)
    proxy = buf._backend.nic_routes
    R, r = group.size, group.rank
    E = 8 * R
    e_loc = E // R
    group.barrier()
    before = proxy.counters()
    ll_scenarios.run_ll_case(buf, group, num_tokens, hidden, E, topk, num_max=num_max, seed=seed)
    group.barrier()  # every peer received this rank's count and flags: its triggers were all executed
    for qp in proxy.qps.values():
        assert qp.nic.wait_idle(10.0)
    after = proxy.counters()
    _, idxs, *_ = ll_scenarios.group_reference(seed, R, num_tokens, hidden, E, topk, num_max)
    for p in remote:
        sent = int(np.sum((idxs[r] >= p * e_loc) & (idxs[r] < (p + 1) * e_loc)))
        returned = int(np.sum((idxs[p] >= r * e_loc) & (idxs[p] < (r + 1) * e_loc)))
        d = {k: after[p][k] - before[p][k] for k in after[p]}
        signals = 2 * e_loc if kind == ROUTE_PROXY else 2
        wqes = sent + returned + signals
        nbytes = sent * (16 + 2 * hidden) + returned * 2 * hidden + 8 * e_loc
        assert d["wqes"] == wqes and d["bytes"] == nbytes, (r, p, d, wqes, nbytes)
        if kind == ROUTE_PROXY:
            assert 1 <= d["doorbells"] <= wqes and d["cqes"] <= d["doorbells"] and d["errors"] == 0, (r, p, d)
        else:
            assert 1 <= d["doorbells"] <= 2 and d["cqes"] == 2 and d["errors"] == 0, (r, p, d)
    proxy.check()


def run_proxy_back_to_back(buf, group, replays=100):
    """Dispatch + combine pairs issued back to back, no host wait between the two calls (run_graph_replays without
    the capture: the pair whose dispatch timed out on PROXY peers' counts on the first GPU run), plain, prepared and
    zero-copy; then a captured pair replayed ``replays`` times and a zero-copy one 30 times (first run exact over
    both NIC routes: 8 MPS processes, H100, session L)."""
    ll_scenarios.run_graph_replays(buf, group, replays, graph=False)
    ll_scenarios.run_graph_replays(buf, group, 30, graph=False, prepared=True)
    ll_scenarios.run_graph_replays(buf, group, 30, graph=False, zero_copy=True)
    ll_scenarios.run_graph_replays(buf, group, replays)
    ll_scenarios.run_graph_replays(buf, group, 30, zero_copy=True)


_DUMPED = []


def dump_nic_state(buf, group):
    """Diagnostics after a failure of in-process ranks: every thread's stack once per process (where each NIC and
    proxy thread is: in a CUDA copy, idle, or gone), then this rank's NIC side per peer (what its NIC executed, its
    QPs' doorbell records against what they consumed)."""
    import faulthandler
    import sys

    if not _DUMPED:
        _DUMPED.append(True)
        faulthandler.dump_traceback(file=sys.stdout, all_threads=True)
    t = buf._backend.nic_routes
    if t is None:
        return
    nic = t.nic
    lines = [
        f"DIAG rank {group.rank} NIC pending={len(getattr(nic, '_pending', []))} busy={getattr(nic, '_busy', None)}"
    ]
    for p, qp in t.qps.items():
        from epkern.nic import wqe as W

        lines.append(
            f"  peer {p}: {t.describe(p)}; consumed {qp.consumed}, dbrec {W.decode_dbrec(qp.dbrec)}, state {qp.state}"
        )
    print("\n".join(lines), flush=True)
