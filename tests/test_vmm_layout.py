"""epkern._cuda_driver binds the CUDA driver with ctypes, so nothing checks its structs and prototypes at build
time. These tests compile C against the cuda.h epkern ships with (the nvidia-cuda-runtime wheel):

1. every bound function against the C prototype its ctypes argument types stand for (each C type is mapped to one
   ctypes type, and the sizes of the non-pointer ones are compared);
2. the symbol bound is what cuda.h's name for the call resolves to (``cuMemGetAddressRange`` is a macro for
   ``cuMemGetAddressRange_v2``: binding the plain name would get the old ABI);
3. the size and every field's offset and size of each struct, and every ``CU_*`` enum value of the module;
4. a stand-in libcuda, whose functions are defined against cuda.h's prototypes and log their arguments, is called
   through the real ctypes bindings: every wrapper, a launch, an error named by cuGetErrorName, and a vmm.Mapping.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import sysconfig
import types
from pathlib import Path

import numpy as np
import pytest

from epkern import _cuda_driver as D
from epkern.kernel_loader import include_dirs

PROTOTYPES = {  # ctypes symbol -> the C prototype its signature in D.SIGNATURES stands for
    "cuGetErrorName": "CUresult (*)(CUresult, const char **)",
    "cuLaunchKernel": (
        "CUresult (*)(CUfunction, unsigned int, unsigned int, unsigned int, unsigned int, unsigned int, "
        "unsigned int, unsigned int, CUstream, void **, void **)"
    ),
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
    "cuMemGetAddressRange_v2": "CUresult (*)(CUdeviceptr *, size_t *, CUdeviceptr)",
    "cuMemGetHandleForAddressRange": (
        "CUresult (*)(void *, CUdeviceptr, size_t, CUmemRangeHandleType, unsigned long long)"
    ),
    "cuMemHostGetDevicePointer_v2": "CUresult (*)(CUdeviceptr *, void *, unsigned int)",
    "cuCtxGetCurrent": "CUresult (*)(CUcontext *)",
    "cuGraphGetNodes": "CUresult (*)(CUgraph, CUgraphNode *, size_t *)",
    "cuGraphExecKernelNodeSetParams_v2": "CUresult (*)(CUgraphExec, CUgraphNode, const CUDA_KERNEL_NODE_PARAMS *)",
    "cuGraphLaunch": "CUresult (*)(CUgraphExec, CUstream)",
}

_P = ctypes.POINTER
C_TYPES = {  # C parameter type -> the ctypes type that passes it
    "unsigned int": ctypes.c_uint,
    "unsigned long long": ctypes.c_uint64,
    "size_t": ctypes.c_size_t,
    "CUdeviceptr": ctypes.c_uint64,
    "CUmemGenericAllocationHandle": ctypes.c_uint64,
    "CUresult": ctypes.c_int,  # enums
    "CUmemAllocationGranularity_flags": ctypes.c_int,
    "CUmemAllocationHandleType": ctypes.c_int,
    "CUmemRangeHandleType": ctypes.c_int,
    "CUfunction": ctypes.c_void_p,  # opaque handles: pointers
    "CUstream": ctypes.c_void_p,
    "void *": ctypes.c_void_p,
    "void **": _P(ctypes.c_void_p),
    "const char **": _P(ctypes.c_char_p),
    "size_t *": _P(ctypes.c_size_t),
    "CUdeviceptr *": _P(ctypes.c_uint64),
    "CUmemGenericAllocationHandle *": _P(ctypes.c_uint64),
    "const CUmemAllocationProp *": _P(D.CUmemAllocationProp),
    "const CUmemAccessDesc *": _P(D.CUmemAccessDesc),
    "CUcontext *": _P(ctypes.c_void_p),
    "CUgraph": ctypes.c_void_p,
    "CUgraphExec": ctypes.c_void_p,
    "CUgraphNode": ctypes.c_void_p,
    "CUgraphNode *": _P(ctypes.c_void_p),
    "const CUDA_KERNEL_NODE_PARAMS *": _P(D.CUDA_KERNEL_NODE_PARAMS),
}

# How C names each struct of the module (CUmemAllocFlags is the anonymous allocFlags member of CUmemAllocationProp).
STRUCTS = {"CUmemLocation": ("CUmemLocation", ""), "CUmemAllocFlags": ("CUmemAllocationProp", "allocFlags")}


def _params(proto: str) -> list[str]:
    return [p.strip() for p in proto.split("(*)(", 1)[1].rstrip(")").split(",")]


def _layout() -> list[tuple[str, int]]:
    """(C expression, the ctypes side's value): sizes of the non-pointer parameter types, every struct's size and
    each field's offset and size, every CU_* constant."""
    out = [(f"sizeof({c})", ctypes.sizeof(t)) for c, t in C_TYPES.items() if "*" not in c and t is not ctypes.c_void_p]
    for name in dir(D):
        cls = getattr(D, name)
        if not (isinstance(cls, type) and issubclass(cls, ctypes.Structure) and name.startswith("CU")):
            continue
        outer, member = STRUCTS.get(name, (name, ""))
        obj = f"((({outer} *)0)->{member})" if member else f"(*({outer} *)0)"
        base = f" - offsetof({outer}, {member})" if member else ""
        out.append((f"sizeof({obj})", ctypes.sizeof(cls)))
        for field, ftype in cls._fields_:
            path = f"{member}.{field}" if member else field
            out.append((f"offsetof({outer}, {path}){base}", getattr(cls, field).offset))
            out.append((f"sizeof({obj}.{field})", ctypes.sizeof(ftype)))
    for name in dir(D):
        if re.fullmatch(r"CU_[A-Z0-9_]+", name):
            out.append((f"(long long){name}", getattr(D, name)))
    return out


def test_every_binding_passes_the_ctypes_types_of_its_prototype():
    assert set(PROTOTYPES) == set(D.SIGNATURES)
    for name, argtypes in D.SIGNATURES.items():
        want = [C_TYPES[p] for p in _params(PROTOTYPES[name])]
        assert argtypes == want, name


def _cuda_h() -> Path:
    for d in include_dirs():
        if (Path(d) / "cuda.h").is_file():
            return Path(d)
    pytest.skip("no cuda.h next to the CUDA headers epkern compiles against")


def _cc() -> str:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc!r} not found)")
    return cc


def _build(cc: str, src: Path, out: Path, *flags: str) -> None:
    build = subprocess.run(
        [cc, "-std=c11", "-Werror=incompatible-pointer-types", f"-I{_cuda_h()}", *flags, str(src), "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr


def test_ctypes_bindings_match_cuda_h(tmp_path):
    cc = _cc()
    checks = ["#define CAT2(a, b) a##b", "#define CAT(a, b) CAT2(a, b)"]
    for name, proto in PROTOTYPES.items():
        api = re.sub(r"_v\d+$", "", name)  # the name a C caller writes
        checks.append(
            f"#define {name}_IS_BOUND 1\n#if !CAT({api}, _IS_BOUND)\n"
            f'#error "cuda.h resolves {api} to another symbol than {name}"\n#endif'
        )
        checks.append(f"static {proto.replace('(*)', f'(*check_{name})', 1)} = {name};")
    layout = _layout()
    prints = "\n".join(f'  printf("%lld\\n", (long long)({expr}));' for expr, _ in layout)
    head = "#include <stddef.h>\n#include <stdio.h>\n#include <cuda.h>\n"
    src = tmp_path / "bindings.c"
    src.write_text(head + "\n".join(checks) + "\nint main(void) { return 0; }\n")
    # -c: the prototypes are checked by the compiler; no libcuda is needed (the layout printer links none)
    _build(cc, src, tmp_path / "bindings.o", "-c")
    layout_src = tmp_path / "layout.c"
    layout_src.write_text(head + f"int main(void) {{\n{prints}\n  return 0;\n}}\n")
    _build(cc, layout_src, tmp_path / "layout")
    run = subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True, check=True)
    got = [int(v) for v in run.stdout.split()]
    mismatches = [(expr, c, py) for (expr, py), c in zip(layout, got, strict=True) if c != py]
    assert not mismatches, f"ctypes layout differs from cuda.h (expr, C, ctypes): {mismatches}"


# A libcuda whose calls log their arguments (decimal) and answer predictably; CUDA_ERROR_INVALID_VALUE where the
# arguments are not what epkern passes. Each is defined against cuda.h's own declaration.
_STAND_IN = r"""
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <cuda.h>
char fake_log[8192];
static void say(const char *fmt, ...) {
  size_t n = strlen(fake_log);
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(fake_log + n, sizeof fake_log - n, fmt, ap);
  va_end(ap);
}
#define BAD CUDA_ERROR_INVALID_VALUE
static int device_prop(const CUmemAllocationProp *p) {
  return p->type == CU_MEM_ALLOCATION_TYPE_PINNED && p->requestedHandleTypes == CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
      && p->location.type == CU_MEM_LOCATION_TYPE_DEVICE;
}
CUresult cuGetErrorName(CUresult e, const char **s) {
  if (e != BAD) return BAD;
  *s = "CUDA_ERROR_INVALID_VALUE";
  return CUDA_SUCCESS;
}
CUresult cuLaunchKernel(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx,
                        unsigned int by, unsigned int bz, unsigned int smem, CUstream s, void **params, void **extra) {
  say("cuLaunchKernel %llu %u %u %u %u %u %u %u %llu %d %llu %d\n", (unsigned long long)(uintptr_t)f, gx, gy, gz,
      bx, by, bz, smem, (unsigned long long)(uintptr_t)s, *(int32_t *)params[0], *(unsigned long long *)params[1],
      extra == NULL);
  return CUDA_SUCCESS;
}
CUresult cuMemGetAllocationGranularity(size_t *g, const CUmemAllocationProp *p, CUmemAllocationGranularity_flags o) {
  say("cuMemGetAllocationGranularity %d %d\n", p->location.id, (int)o);
  if (!device_prop(p) || o != CU_MEM_ALLOC_GRANULARITY_RECOMMENDED) return BAD;
  *g = (size_t)2 << 20;
  return CUDA_SUCCESS;
}
CUresult cuMemCreate(CUmemGenericAllocationHandle *h, size_t size, const CUmemAllocationProp *p, unsigned long long f) {
  say("cuMemCreate %zu %d %llu\n", size, p->location.id, f);
  if (!device_prop(p)) return BAD;
  *h = 0x100000000ull + size;
  return CUDA_SUCCESS;
}
CUresult cuMemExportToShareableHandle(void *out, CUmemGenericAllocationHandle h, CUmemAllocationHandleType t,
                                      unsigned long long f) {
  say("cuMemExportToShareableHandle %llu %d %llu\n", h, (int)t, f);
  *(int *)out = 9;
  return CUDA_SUCCESS;
}
CUresult cuMemImportFromShareableHandle(CUmemGenericAllocationHandle *h, void *os, CUmemAllocationHandleType t) {
  say("cuMemImportFromShareableHandle %llu %d\n", (unsigned long long)(uintptr_t)os, (int)t);
  *h = 0x200000000ull;
  return CUDA_SUCCESS;
}
CUresult cuMemAddressReserve(CUdeviceptr *p, size_t size, size_t align, CUdeviceptr addr, unsigned long long f) {
  say("cuMemAddressReserve %zu %zu %llu %llu\n", size, align, addr, f);
  *p = 0x7f0000000000ull;
  return CUDA_SUCCESS;
}
CUresult cuMemMap(CUdeviceptr p, size_t size, size_t off, CUmemGenericAllocationHandle h, unsigned long long f) {
  say("cuMemMap %llu %zu %zu %llu %llu\n", p, size, off, h, f);
  return size ? CUDA_SUCCESS : BAD;
}
CUresult cuMemSetAccess(CUdeviceptr p, size_t size, const CUmemAccessDesc *d, size_t n) {
  say("cuMemSetAccess %llu %zu %d %d %d %zu\n", p, size, (int)d->location.type, d->location.id, (int)d->flags, n);
  return CUDA_SUCCESS;
}
CUresult cuMemUnmap(CUdeviceptr p, size_t size) { say("cuMemUnmap %llu %zu\n", p, size); return CUDA_SUCCESS; }
CUresult cuMemAddressFree(CUdeviceptr p, size_t size) { say("cuMemAddressFree %llu %zu\n", p, size); return BAD; }
CUresult cuMemRelease(CUmemGenericAllocationHandle h) { say("cuMemRelease %llu\n", h); return CUDA_SUCCESS; }
CUresult cuMemGetAddressRange_v2(CUdeviceptr *base, size_t *size, CUdeviceptr p) {
  say("cuMemGetAddressRange_v2 %llu\n", p);
  *base = p & ~0xfffffull;
  *size = 1 << 20;
  return CUDA_SUCCESS;
}
CUresult cuMemGetHandleForAddressRange(void *out, CUdeviceptr p, size_t size, CUmemRangeHandleType t,
                                       unsigned long long f) {
  say("cuMemGetHandleForAddressRange %llu %zu %d %llu\n", p, size, (int)t, f);
  *(int *)out = 11;
  return CUDA_SUCCESS;
}
CUresult cuMemHostGetDevicePointer_v2(CUdeviceptr *d, void *p, unsigned int f) {
  say("cuMemHostGetDevicePointer_v2 %llu %u\n", (unsigned long long)(uintptr_t)p, f);
  *d = (CUdeviceptr)(uintptr_t)p + 0x1000;
  return CUDA_SUCCESS;
}
CUresult cuCtxGetCurrent(CUcontext *ctx) {
  say("cuCtxGetCurrent\n");
  *ctx = 0;
  return CUDA_ERROR_NOT_INITIALIZED;
}
CUresult cuGraphGetNodes(CUgraph g, CUgraphNode *nodes, size_t *n) {
  say("cuGraphGetNodes %llu %d %zu\n", (unsigned long long)(uintptr_t)g, nodes == NULL, *n);
  if (nodes != NULL && *n >= 1) nodes[0] = (CUgraphNode)(uintptr_t)0x55;
  *n = 1;
  return CUDA_SUCCESS;
}
CUresult cuGraphExecKernelNodeSetParams_v2(CUgraphExec e, CUgraphNode node, const CUDA_KERNEL_NODE_PARAMS *p) {
  say("cuGraphExecKernelNodeSetParams_v2 %llu %llu %llu %u %u %u %u %u %u %u %d %llu %d %d %d\n",
      (unsigned long long)(uintptr_t)e, (unsigned long long)(uintptr_t)node, (unsigned long long)(uintptr_t)p->func,
      p->gridDimX, p->gridDimY, p->gridDimZ, p->blockDimX, p->blockDimY, p->blockDimZ, p->sharedMemBytes,
      *(int32_t *)p->kernelParams[0], *(unsigned long long *)p->kernelParams[1], p->extra == NULL, p->kern == NULL,
      p->ctx == NULL);
  return CUDA_SUCCESS;
}
CUresult cuGraphLaunch(CUgraphExec e, CUstream s) {
  say("cuGraphLaunch %llu %llu\n", (unsigned long long)(uintptr_t)e, (unsigned long long)(uintptr_t)s);
  return CUDA_SUCCESS;
}
"""


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """The stand-in libcuda, bound by _cuda_driver's own binding; its log as a list of lines."""
    src = tmp_path / "libcuda_stand_in.c"
    src.write_text(_STAND_IN)
    so = tmp_path / "libcuda_stand_in.so"
    _build(_cc(), src, so, "-shared", "-fPIC")
    lib = D._bind(ctypes.CDLL(str(so)))
    monkeypatch.setattr(D, "_lib", lib)
    log = (ctypes.c_char * 8192).in_dll(lib, "fake_log")

    def lines():
        out = log.value.decode().splitlines()
        ctypes.memset(log, 0, 8192)
        return out

    return lines


def test_every_call_goes_through_the_real_bindings(stand_in):
    MiB, ptr, dev = 1 << 20, 0x7F0000000000, 1
    assert D.mem_get_allocation_granularity(dev) == 2 * MiB
    assert D.mem_create(4 * MiB, dev) == 0x100000000 + 4 * MiB
    assert D.mem_export_to_fd(0x100400000) == 9
    assert D.mem_import_from_fd(7) == 0x200000000
    assert D.mem_address_reserve(4 * MiB, 2 * MiB) == ptr
    D.mem_map(ptr, 4 * MiB, 0x100400000)
    D.mem_set_access_readwrite(ptr, 4 * MiB, dev)
    assert (D.mem_unmap(ptr, 4 * MiB), D.mem_address_free(ptr, 4 * MiB), D.mem_release(5)) == (0, 1, 0)
    assert D.mem_get_address_range(ptr + 0x1234) == (ptr, MiB)
    assert D.mem_get_dmabuf_fd(ptr, 2 * MiB) == 11
    assert D.mem_host_get_device_pointer(0x5000) == 0x6000
    assert D.initialised() is False  # CUDA_ERROR_NOT_INITIALIZED
    launch = D.DriverLaunch(0x77, 16, 512, (np.int32(-3), np.uint64(1 << 63)))
    launch.set(0, 4)
    launch.launch(0x99)
    graph = D.GraphLaunch(launch, types.SimpleNamespace(graph=0x33, graphExec=0x44))
    launch.set(0, 5)  # set after the graph was made: the node gets it at the launch
    graph.launch(0x98)
    assert stand_in() == [
        "cuMemGetAllocationGranularity 1 1",
        f"cuMemCreate {4 * MiB} 1 0",
        f"cuMemExportToShareableHandle {0x100400000} 1 0",
        "cuMemImportFromShareableHandle 7 1",
        f"cuMemAddressReserve {4 * MiB} {2 * MiB} 0 0",
        f"cuMemMap {ptr} {4 * MiB} 0 {0x100400000} 0",
        f"cuMemSetAccess {ptr} {4 * MiB} 1 1 3 1",
        f"cuMemUnmap {ptr} {4 * MiB}",
        f"cuMemAddressFree {ptr} {4 * MiB}",
        "cuMemRelease 5",
        f"cuMemGetAddressRange_v2 {ptr + 0x1234}",
        f"cuMemGetHandleForAddressRange {ptr} {2 * MiB} 1 0",
        f"cuMemHostGetDevicePointer_v2 {0x5000} 0",
        "cuCtxGetCurrent",
        f"cuLaunchKernel {0x77} 16 1 1 512 1 1 0 {0x99} 4 {1 << 63} 1",
        f"cuGraphGetNodes {0x33} 1 0",
        f"cuGraphGetNodes {0x33} 0 1",
        f"cuGraphExecKernelNodeSetParams_v2 {0x44} {0x55} {0x77} 16 1 1 512 1 1 0 5 {1 << 63} 1 1 1",
        f"cuGraphLaunch {0x44} {0x98}",
    ]
    with pytest.raises(D.DriverError, match=r"^cuMemMap failed: CUDA_ERROR_INVALID_VALUE \(CUresult 1\) \[0x7f"):
        D.mem_map(ptr, 0, 1)


def test_a_vmm_mapping_through_the_real_bindings(stand_in):
    from epkern.memory import vmm

    MiB, ptr = 1 << 20, 0x7F0000000000
    assert vmm.supported(1)
    m = vmm.Mapping(3 * MiB, 1)  # rounded up to the 2 MiB granularity
    assert (m.size, m.ptr, m.handle) == (4 * MiB, ptr, 0x100000000 + 4 * MiB)
    assert m.export_fd() == 9
    m.close()
    m.close()  # idempotent
    assert (m.ptr, m.handle) == (0, 0)
    peer = vmm.Mapping(MiB, 1, fd=7)
    peer.close()
    log = [line for line in stand_in() if not line.startswith("cuMemGetAllocationGranularity")]
    assert log == [
        f"cuMemCreate {4 * MiB} 1 0",
        f"cuMemAddressReserve {4 * MiB} {2 * MiB} 0 0",
        f"cuMemMap {ptr} {4 * MiB} 0 {0x100000000 + 4 * MiB} 0",
        f"cuMemSetAccess {ptr} {4 * MiB} 1 1 3 1",
        f"cuMemExportToShareableHandle {0x100000000 + 4 * MiB} 1 0",
        f"cuMemUnmap {ptr} {4 * MiB}",
        f"cuMemAddressFree {ptr} {4 * MiB}",  # refused by the stand-in: close() still releases
        f"cuMemRelease {0x100000000 + 4 * MiB}",
        "cuMemImportFromShareableHandle 7 1",
        f"cuMemAddressReserve {2 * MiB} {2 * MiB} 0 0",
        f"cuMemMap {ptr} {2 * MiB} 0 {0x200000000} 0",
        f"cuMemSetAccess {ptr} {2 * MiB} 1 1 3 1",
        f"cuMemUnmap {ptr} {2 * MiB}",
        f"cuMemAddressFree {ptr} {2 * MiB}",
        f"cuMemRelease {0x200000000}",
    ]
