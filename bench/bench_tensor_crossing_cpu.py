"""Host cost of the torch front end's crossings inside a call, on a CPU (issue #19), over the fake CuPy of the
tests (tests/fake_cupy.py: host memory stands in for device memory) with CPU tensors posing as CUDA ones. It
measures epkern's own Python around the crossing, not CuPy's or torch's on a GPU machine
(bench/bench_tensor_crossing.py measures those): use it to compare changes to ``epkern.torch_tensors``.

    python3 bench/bench_tensor_crossing_cpu.py [--n 20000]
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=20000)
    args = p.parse_args(argv)
    import pytest
    import torch

    import fake_cupy as F

    class CudaLike(torch.Tensor):  # to_array's device check only: the memory is host memory under the fake
        is_cuda = True
        __torch_function__ = torch._C._disabled_torch_function_impl  # as fast as a plain tensor

    with pytest.MonkeyPatch.context() as mp, F.installed(mp):
        import cupy

        from epkern import torch_tensors
        from epkern.api_checks import BF16

        torch_tensors._in_call.depth = 1  # as inside a call (torch_stream)
        t = torch.zeros(4096, 7168, dtype=torch.bfloat16).as_subclass(CudaLike)
        arr = cupy.asarray(np.zeros((512, 7168), np.int16).view(BF16))
        made = torch_tensors.to_tensor(arr).as_subclass(CudaLike)
        made.__dict__.update(torch_tensors.to_tensor(arr).__dict__)  # as_subclass makes a new object
        ways = {
            "to_array, a BF16 tensor": lambda: torch_tensors.to_array(t, "x", "gpu"),
            "to_array, a tensor made by to_tensor": lambda: torch_tensors.to_array(made, "x", "gpu"),
            "to_tensor, a BF16 array": lambda: torch_tensors.to_tensor(arr),
        }
        for name, fn in ways.items():
            print(f"{name:<40} {timeit.timeit(fn, number=args.n) / args.n * 1e6:7.2f} us per call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
