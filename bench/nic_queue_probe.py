"""Does a host thread's copy on a stream of its own get through while a kernel spins waiting for it, with more work
queued behind that kernel? That is the emulated NIC's situation (its copies are CUDA work; a NIC-route LL kernel
waits for them), and the suspected cause of the NIC-route stalls (docs/architecture.md, Known problems): hardware
work queues (CUDA_DEVICE_MAX_CONNECTIONS, streams assigned round-robin) shared by the copy's stream and the
spinning kernel's stream.

For each configuration: a kernel on stream K spins (at most --spin-s) until a flag word becomes 1; behind it on K a
second kernel is queued (or not); `extra` streams are created after K and before the copy stream C (to move C's
place in the round-robin); a host thread then copies 1 into the flag on C (pageable host -> device, pinned host ->
device, or device -> device) and synchronizes C. Reported: whether the spinning kernel saw the copy ("ok") or ran
out of time ("STUCK"), and the seconds it took.

    python3 bench/nic_queue_probe.py [--extra 0-9] [--spin-s 1.0] [--priority]
    CUDA_DEVICE_MAX_CONNECTIONS=32 python3 bench/nic_queue_probe.py      # the other setting, same question
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import numpy as np

SRC = r"""
extern "C" __global__ void spin(volatile int *flag, int *seen, long long budget) {
  long long t0 = clock64();
  while (*flag == 0) {
    if (clock64() - t0 > budget) { *seen = 0; return; }
  }
  *seen = 1;
}
extern "C" __global__ void behind(int *x) { x[0] += 1; }
"""


def probe(cp, kind: str, queued: bool, extra: int, spin_s: float, priority: bool) -> dict:
    mod = cp.RawModule(code=SRC)
    spin, behind = mod.get_function("spin"), mod.get_function("behind")
    flag = cp.zeros(1, np.int32)
    seen = cp.full(1, -1, np.int32)
    scratch = cp.zeros(1, np.int32)
    one_dev = cp.ones(1, np.int32)
    pinned = cp.cuda.alloc_pinned_memory(4)
    np.frombuffer(pinned, np.int32, 1)[:] = 1
    pageable = np.ones(1, np.int32)
    clock_hz = cp.cuda.Device().attributes["ClockRate"] * 1000
    k = cp.cuda.Stream(non_blocking=True)
    keep = [cp.cuda.Stream(non_blocking=True) for _ in range(extra)]
    prio = cp.cuda.runtime.deviceGetStreamPriorityRange()[1] if priority else 0  # (least, greatest)
    c = cp.cuda.Stream(non_blocking=True, priority=prio)
    rt = cp.cuda.runtime
    spin((1,), (1,), (flag, seen, np.int64(spin_s * clock_hz)), stream=k)
    if queued:
        behind((1,), (1,), (scratch,), stream=k)
    t0 = time.monotonic()

    def nic():
        time.sleep(0.05)
        if kind == "pageable":
            rt.memcpyAsync(flag.data.ptr, pageable.ctypes.data, 4, rt.memcpyHostToDevice, c.ptr)
        elif kind == "pinned":
            rt.memcpyAsync(flag.data.ptr, pinned.ptr, 4, rt.memcpyHostToDevice, c.ptr)
        else:
            rt.memcpyAsync(flag.data.ptr, one_dev.data.ptr, 4, rt.memcpyDeviceToDevice, c.ptr)
        c.synchronize()

    th = threading.Thread(target=nic)
    th.start()
    k.synchronize()
    took = time.monotonic() - t0
    th.join()
    del keep
    return dict(kind=kind, queued=queued, extra=extra, priority=priority, ok=int(seen.get()[0]) == 1, s=round(took, 3))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--extra", default="0-9", help="streams created between K and C: a range a-b")
    ap.add_argument("--spin-s", type=float, default=1.0)
    ap.add_argument("--priority", action="store_true", help="C at the greatest stream priority")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import cupy as cp

    lo, hi = (int(v) for v in a.extra.split("-"))
    rows = []
    for kind in ("pageable", "pinned", "d2d"):
        for queued in (False, True):
            for extra in range(lo, hi + 1):
                r = probe(cp, kind, queued, extra, a.spin_s, a.priority)
                rows.append(r)
                print(
                    f"{kind:8s} queued={int(queued)} extra={extra} priority={int(a.priority)} "
                    f"{'ok' if r['ok'] else 'STUCK'} {r['s']:.3f} s",
                    flush=True,
                )
    stuck = [r for r in rows if not r["ok"]]
    conn = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "default (8)")
    print(f"SUMMARY connections={conn} priority={int(a.priority)}: {len(stuck)} of {len(rows)} stuck: "
          + " ".join(f"{r['kind']}/q{int(r['queued'])}/x{r['extra']}" for r in stuck))  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
