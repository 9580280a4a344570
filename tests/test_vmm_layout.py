"""epkern.memory.vmm binds the CUDA driver's VMM calls with ctypes, so nothing checks its structs and
prototypes at build time: this test compiles a C program against the cuda.h epkern ships with (the
nvidia-cuda-runtime wheel) that (1) type-checks every bound function against the prototype the ctypes
binding assumes, (2) refuses a function that cuda.h redirects to a versioned symbol (the ctypes name would
then bind the old ABI), and (3) prints the struct sizes, field offsets and enum values to compare with ctypes."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from epkern.kernel_loader import include_dirs
from epkern.memory import vmm

PROTOTYPES = {  # the C prototype each ctypes signature in vmm.SIGNATURES stands for
    "cuMemGetAllocationGranularity": (
        "CUresult (*)(size_t *, const CUmemAllocationProp *, CUmemAllocationGranularity_flags)"
    ),
    "cuMemCreate": (
        "CUresult (*)(CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *, unsigned long long)"
    ),
    "cuMemExportToShareableHandle": (
        "CUresult (*)(void *, CUmemGenericAllocationHandle, CUmemAllocationHandleType, unsigned long long)"
    ),
    "cuMemImportFromShareableHandle": "CUresult (*)(CUmemGenericAllocationHandle *, void *, CUmemAllocationHandleType)",
    "cuMemAddressReserve": "CUresult (*)(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long)",
    "cuMemMap": "CUresult (*)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long)",
    "cuMemSetAccess": "CUresult (*)(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t)",
    "cuMemUnmap": "CUresult (*)(CUdeviceptr, size_t)",
    "cuMemAddressFree": "CUresult (*)(CUdeviceptr, size_t)",
    "cuMemRelease": "CUresult (*)(CUmemGenericAllocationHandle)",
    "cuGetErrorName": "CUresult (*)(CUresult, const char **)",
}

LAYOUT = [  # (C expression, value from the ctypes side)
    ("sizeof(CUmemAllocationProp)", ctypes.sizeof(vmm._AllocationProp)),
    ("offsetof(CUmemAllocationProp, requestedHandleTypes)", vmm._AllocationProp.requestedHandleTypes.offset),
    ("offsetof(CUmemAllocationProp, location)", vmm._AllocationProp.location.offset),
    ("offsetof(CUmemAllocationProp, win32HandleMetaData)", vmm._AllocationProp.win32HandleMetaData.offset),
    ("offsetof(CUmemAllocationProp, allocFlags)", vmm._AllocationProp.allocFlags.offset),
    ("sizeof(CUmemLocation)", ctypes.sizeof(vmm._Location)),
    ("offsetof(CUmemLocation, id)", vmm._Location.id.offset),
    ("sizeof(CUmemAccessDesc)", ctypes.sizeof(vmm._AccessDesc)),
    ("offsetof(CUmemAccessDesc, flags)", vmm._AccessDesc.flags.offset),
    ("sizeof(CUmemGenericAllocationHandle)", ctypes.sizeof(ctypes.c_ulonglong)),
    ("sizeof(CUdeviceptr)", ctypes.sizeof(ctypes.c_ulonglong)),
    ("(long long)CU_MEM_ALLOCATION_TYPE_PINNED", vmm._CU_MEM_ALLOCATION_TYPE_PINNED),
    ("(long long)CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR", vmm._CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
    ("(long long)CU_MEM_LOCATION_TYPE_DEVICE", vmm._CU_MEM_LOCATION_TYPE_DEVICE),
    ("(long long)CU_MEM_ALLOC_GRANULARITY_RECOMMENDED", vmm._CU_MEM_ALLOC_GRANULARITY_RECOMMENDED),
    ("(long long)CU_MEM_ACCESS_FLAGS_PROT_READWRITE", vmm._CU_MEM_ACCESS_FLAGS_PROT_READWRITE),
]


def test_every_binding_has_a_prototype_of_the_same_shape():
    """Same functions, same number of parameters, pointers where ctypes passes pointers."""
    assert set(PROTOTYPES) == set(vmm.SIGNATURES)
    for name, argtypes in vmm.SIGNATURES.items():
        params = [p.strip() for p in PROTOTYPES[name].split("(*)(", 1)[1].rstrip(")").split(",")]
        assert len(params) == len(argtypes), name
        for param, t in zip(params, argtypes, strict=True):
            is_ptr = t is ctypes.c_void_p or t is ctypes.c_char_p or issubclass(t, ctypes._Pointer)
            assert is_ptr == ("*" in param), f"{name}: {param} vs {t}"


def _cuda_h() -> Path:
    for d in include_dirs():
        if (Path(d) / "cuda.h").is_file():
            return Path(d)
    pytest.skip("no cuda.h next to the CUDA headers epkern compiles against")


def test_ctypes_bindings_match_cuda_h(tmp_path):
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc!r} not found)")
    inc = _cuda_h()
    checks = []
    for name, proto in PROTOTYPES.items():
        checks.append(f'#ifdef {name}\n#error "{name} is a macro in cuda.h (a versioned symbol)"\n#endif')
        checks.append(f"static {proto.replace('(*)', f'(*check_{name})', 1)} = {name};")
    prints = "\n".join(f'  printf("%lld\\n", (long long)({expr}));' for expr, _ in LAYOUT)
    src = tmp_path / "vmm_layout.c"
    src.write_text(
        "#include <stddef.h>\n#include <stdio.h>\n#include <cuda.h>\n"
        + "\n".join(checks)
        + f"\nint main(void) {{\n{prints}\n  return 0;\n}}\n"
    )
    exe = tmp_path / "vmm_layout"
    # -c first: the prototypes are checked by the compiler, no libcuda needed to link the layout printer
    build = subprocess.run(
        [cc, "-std=c11", "-Werror=incompatible-pointer-types", f"-I{inc}", "-c", str(src), "-o", str(exe) + ".o"],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    layout_src = tmp_path / "layout_only.c"
    layout_src.write_text(
        f"#include <stddef.h>\n#include <stdio.h>\n#include <cuda.h>\nint main(void) {{\n{prints}\n  return 0;\n}}\n"
    )
    build = subprocess.run(
        [cc, "-std=c11", f"-I{inc}", str(layout_src), "-o", str(exe)], capture_output=True, text=True
    )
    assert build.returncode == 0, build.stderr
    got = [int(v) for v in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()]
    mismatches = [(expr, c, py) for (expr, py), c in zip(LAYOUT, got, strict=True) if c != py]
    assert not mismatches, f"ctypes layout differs from cuda.h (expr, C, ctypes): {mismatches}"
