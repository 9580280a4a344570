"""Host cost of one torch <-> CuPy crossing on the GPU (issue #19: the torch front end's host time per call).

Each way of making a CuPy view of a CUDA tensor, and a torch view of a CuPy array, timed alone (µs per crossing,
median of rounds of ``--n`` calls), inside a torch stream context as the front end runs them; every view is
checked to share the data pointer. Also the stream helpers the front end calls per call. One process, no MPS:
``python bench/bench_tensor_crossing.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time


def _per_call_us(fn, n: int, rounds: int) -> float:
    fn()
    runs = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(runs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    import cupy
    import torch
    import torch.utils.dlpack

    from epkern import torch_tensors

    t = torch.zeros((128, 7168), dtype=torch.int16, device="cuda")
    a = cupy.zeros((128, 7168), dtype=cupy.int16)
    side = torch.cuda.Stream()
    tb = torch.zeros((128, 7168), dtype=torch.bfloat16, device="cuda")
    made = {}  # a tensor made by to_tensor inside the call context below (crosses back as its array)

    def unowned_view():  # a CuPy view built from the tensor's pointer, holding the tensor (no DLPack)
        size = t.element_size()
        mem = cupy.cuda.UnownedMemory(t.data_ptr(), t.numel() * size, t, device_id=t.device.index)
        strides = tuple(st * size for st in t.stride())
        return cupy.ndarray(tuple(t.shape), cupy.int16, cupy.cuda.MemoryPointer(mem, 0), strides=strides)

    def external_stream():
        with cupy.cuda.ExternalStream(side.cuda_stream):
            pass

    def front_end_stream():
        with torch_tensors.torch_stream("gpu"):
            pass

    ways = {
        "torch->cupy cupy.from_dlpack(t)": lambda: cupy.from_dlpack(t),
        "torch->cupy torch_tensors.to_array": lambda: torch_tensors.to_array(t, "t", "gpu"),
        "torch->cupy torch_tensors.to_array, BF16": lambda: torch_tensors.to_array(tb, "t", "gpu"),
        "torch->cupy to_array of a to_tensor output": lambda: torch_tensors.to_array(made["t"], "t", "gpu"),
        "torch->cupy UnownedMemory view": unowned_view,
        "cupy->torch torch.from_dlpack(a)": lambda: torch.from_dlpack(a),
        "cupy->torch from_dlpack(a.__dlpack__(stream=-1))": lambda: torch.utils.dlpack.from_dlpack(
            a.__dlpack__(stream=-1)
        ),
        "cupy->torch torch_tensors.to_tensor": lambda: torch_tensors.to_tensor(a),
        "torch.cuda.current_stream()": torch.cuda.current_stream,
        "cupy.cuda.get_current_stream()": cupy.cuda.get_current_stream,
        "cupy.cuda.ExternalStream(ptr) enter+exit": external_stream,
        "torch_tensors.torch_stream('gpu') enter+exit": front_end_stream,
        "torch.cuda.is_current_stream_capturing()": torch.cuda.is_current_stream_capturing,
    }
    assert cupy.from_dlpack(t).data.ptr == t.data_ptr() == unowned_view().data.ptr
    assert torch.utils.dlpack.from_dlpack(a.__dlpack__(stream=-1)).data_ptr() == a.data.ptr
    print(f"{'crossing':<56} {'us':>7}   (one process, median of {args.rounds} x {args.n})")
    for where in ("default stream", "torch side stream"):
        ctx = torch.cuda.stream(side) if where != "default stream" else torch.cuda.stream(torch.cuda.current_stream())
        with ctx, torch_tensors.torch_stream("gpu"):
            made["t"] = torch_tensors.to_tensor(a)
            for name, fn in ways.items():
                try:
                    us = _per_call_us(fn, args.n, args.rounds)
                    print(f"{name:<56} {us:>7.2f}   [{where}]", flush=True)
                except Exception as exc:  # noqa: BLE001 - one way failing must not hide the others
                    print(f"{name:<56} failed: {type(exc).__name__}: {exc}   [{where}]", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
