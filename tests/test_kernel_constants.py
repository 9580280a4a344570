"""kernels/epk_constants.cuh, the one definition of the constants that Python and CUDA share, read by
epkern.kernel_constants without a GPU: every constant parsed, the values the kernels compile with, a strict parser."""

import importlib
import re
import shutil

import pytest

from epkern import kernel_constants, kernel_loader
from epkern.errors import KernelCompileError

HEADER = kernel_loader.kernel_dir() / "epk_constants.cuh"

# The values the Python side mirrored before (ll_layout.py, config.py, gpu_buffer.PHASES).
KNOWN = {
    "EPK_CTRL_BYTES": 1 << 17,
    "EPK_HT_MAX_PEERS": 8,
    "EPK_HT_MAX_LOCAL_EXPERTS": 1024,
    "EPK_ERROR_RECORD_BYTES": 32,
    "EPK_HT_CTRL_COUNTER_AT": 66688,
    "EPK_LL_MAX_NUM_MAX": 1024,
    "EPK_LL_MAX_TOPK": 32,
    "EPK_LL_MAX_EXPERTS": 8192,
    "EPK_LL_MAX_RANKS": 32,
    "EPK_LL_THREADS": 512,
    "EPK_LL_MAX_SELECTIONS": 1024 * 32,
    "EPK_STATE_MAX_RANKS": 1024,
    "EPK_STATE_COUNTER": 0,
    "EPK_STATE_TICKET": 1,
    "EPK_STATE_PROXY_FIFOS": 2,
    "EPK_STATE_PROXY_CAPACITY": 3,
    "EPK_STATE_PROXY_TABLE": 4,
    "EPK_STATE_RDMA_TABLE": 6,
    "EPK_RDMA_QP_BYTES": 64,
    "EPK_PROXY_MAX_FIFOS": 64,
    "EPK_STATE_MASK": 64,
    "EPK_STATE_ROUTE": 64 + 1024,
    "EPK_STATE_SLOT": 64 + 2 * 1024,
    "EPK_STATE_DONE": 64 + 2 * 1024 + 8192,
    "EPK_STATE_PAIR": 64 + 2 * 1024 + 2 * 8192,
    "EPK_STATE_BEGIN": 64 + 2 * 1024 + 3 * 8192,
    "EPK_STATE_BEGIN_TAG": 64 + 2 * 1024 + 4 * 8192,
    "EPK_STATE_SLOT_OF": 64 + 2 * 1024 + 5 * 8192,
    "EPK_STATE_WORDS": 64 + 2 * 1024 + 5 * 8192 + 1024 * 32,
    "EPK_ROUTE_NONE": 0,
    "EPK_ROUTE_IPC": 1,
    "EPK_ROUTE_PROXY": 2,
    "EPK_ROUTE_RDMA": 3,
    "EPK_PHASE_SEND": 1,
    "EPK_PHASE_RECV": 2,
    "EPK_ERR_CODE_TIMEOUT": 1,
    "EPK_ERR_CODE_BAD_INDEX": 2,
    "EPK_ERR_CODE_OVERFLOW": 3,
    "EPK_ERR_PHASE_HT_NOTIFY": 1,
    "EPK_ERR_PHASE_HT_DISPATCH_ADDRS": 2,
    "EPK_ERR_PHASE_HT_DISPATCH_DONE": 3,
    "EPK_ERR_PHASE_HT_COMBINE_ADDRS": 4,
    "EPK_ERR_PHASE_HT_COMBINE_DONE": 5,
    "EPK_ERR_PHASE_HT_DISPATCH_OVERFLOW": 6,
    "EPK_ERR_PHASE_LL_DISPATCH_RECV": 7,
    "EPK_ERR_PHASE_LL_LOCAL_SENDS": 8,
    "EPK_ERR_PHASE_LL_COMBINE_RECV": 9,
    "EPK_ERR_PHASE_LL_BAD_INDEX": 10,
    "EPK_ERR_PHASE_LL_BAD_HANDLE": 11,
    "EPK_ERR_PHASE_LL_ROUTE": 12,
    "EPK_ERR_PHASE_LL_OVERFLOW": 13,
    "EPK_ERR_PHASE_HT_SHAPE": 14,
    "EPK_HT_NOTIFY_SHAPE": 2 + 8 + 1024,
    "EPK_HT_NOTIFY_BAD_INDEX": 2 + 8 + 1024 + 4,
    "EPK_HT_NOTIFY_WORDS": 2 + 8 + 1024 + 6,
    "EPK_HT_SHAPE_FIELDS": 5,
    # HT across nodes (issue #18)
    "EPK_HT_INTER_MAX_RANKS": 128,
    "EPK_HT_INTER_MAX_NODES": 16,
    "EPK_ERR_PHASE_HT_INTER_ORDER": 15,
    "EPK_ERR_PHASE_HT_INTER_SPACE": 0x701,
    "EPK_ERR_PHASE_HT_INTER_ARRIVAL": 0x702,
    "EPK_HT_INTER_SHAPE_FIELDS": 6,
    "EPK_HT_INTER_OUT_EXPERTS": 2 + 128,
    "EPK_HT_INTER_OUT_SHAPE": 2 + 128 + 1024,
    "EPK_HT_INTER_OUT_BAD_INDEX": 2 + 128 + 1024 + 4,
    "EPK_HT_INTER_OUT_NODES": 2 + 128 + 1024 + 6,
    "EPK_HT_INTER_OUT_LAYOUT_OK": 2 + 128 + 1024 + 6 + 32,
    "EPK_HT_NOTIFY_OUT_WORDS": 2 + 128 + 1024 + 6 + 33,
    "EPK_HT_INTER_ENTRY_BYTES": 64 + 4 * (128 + 8 + 16 + 8) + 4096,
    "EPK_HT_INTER_WORDS_BYTES": 8 * 8 * 16,
    "EPK_HT_INTER_HEADER_BYTES": 8 * 8 * 16 + 4 * 128 * (64 + 4 * (128 + 8 + 16 + 8) + 4096),
    "EPK_HT_INTER_MSG_HEADER": 16,
}


def test_every_constant_is_parsed_with_its_value():
    values = kernel_constants.values()
    declared = re.findall(r"^\s*constexpr\s+int\s+(\w+)", HEADER.read_text(), re.M)
    assert list(values) == declared
    assert values == KNOWN


def test_access_forms():
    assert kernel_constants.get("EPK_STATE_MASK") == 64
    assert kernel_constants.EPK_CTRL_BYTES == 1 << 17
    from epkern.kernel_constants import EPK_STATE_WORDS

    assert EPK_STATE_WORDS == KNOWN["EPK_STATE_WORDS"]
    with pytest.raises(KeyError, match="EPK_NO_SUCH"):
        kernel_constants.get("EPK_NO_SUCH")
    with pytest.raises(AttributeError):
        kernel_constants.EPK_NO_SUCH  # noqa: B018
    values = kernel_constants.values()
    values["EPK_STATE_MASK"] = 0  # a copy
    assert kernel_constants.get("EPK_STATE_MASK") == 64


def test_kernels_compile_with_the_parsed_values():
    """NVRTC evaluates the header as the kernels do: every parsed value, static_asserted."""
    lines = ['#include "epk_constants.cuh"', '#include "epk_common.cuh"']
    lines += [f'static_assert({name} == {value}, "{name}");' for name, value in kernel_constants.values().items()]
    lines.append('extern "C" __global__ void k() {}')
    nvrtc = kernel_loader._nvrtc()
    prog = nvrtc.createProgram("\n".join(lines) + "\n", str(kernel_loader.kernel_dir() / "constants_check.cu"), [], [])
    try:
        try:
            nvrtc.compileProgram(prog, kernel_loader.compile_options("sm_90", {}))
        except nvrtc.NVRTCError:
            pytest.fail(nvrtc.getProgramLog(prog))
    finally:
        nvrtc.destroyProgram(prog)


def test_no_kernel_keeps_its_own_copy():
    """The old per-kernel names of these values are gone (ll_common.cuh's kState*, the LL phase numbers)."""
    for path in kernel_loader.kernel_dir().glob("*.cu*"):
        text = path.read_text()
        assert not re.search(r"\bkState[A-Z]\w*\s*=|\bkPhase(DispatchRecv|LocalSends|CombineRecv)\b", text), path
        assert "/*phase=*/" not in text, path


@pytest.mark.parametrize(
    "expr,value",
    [
        ("1 << 17", 131072),
        ("0x10 + 1", 17),
        ("1 + 2 << 3", 24),  # C: + binds tighter than <<
        ("2 + 3 * 4", 14),
        ("(2 + 3) * 4", 20),
        ("-(4) * 2 + 1", -7),
        ("A * 2 - B", 7),
        (" ( ( A ) ) ", 5),
    ],
)
def test_evaluator(expr, value):
    assert kernel_constants.evaluate(expr, {"A": 5, "B": 3}) == value


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os')",
        "A.__class__",
        "C + 1",  # not defined above
        "8 / 2",
        "1 >> 2",
        "1 <<",
        "(1 + 2",
        "1 2",
        "010",  # octal in C, ten in Python
        "1 << 40",
        "2147483647 + 1",
        "1 << 32",
        "",
    ],
)
def test_evaluator_refuses(expr):
    with pytest.raises(KernelCompileError):
        kernel_constants.evaluate(expr, {"A": 5})


def test_parser_refuses_anything_else():
    ok = "#pragma once\n// c\nconstexpr int EPK_A = 2;  // x\nconstexpr int EPK_B =\n    EPK_A * 3;\n"
    assert kernel_constants.parse(ok) == {"EPK_A": 2, "EPK_B": 6}
    for bad in (
        ok + "#define EPK_C 3\n",
        ok + "constexpr long EPK_C = 1;\n",
        ok + "int x;\n",
        ok + "constexpr int EPK_A = 1;\n",  # defined twice
        ok + "constexpr int EPK_C = 1 /* block comment */;\n",
        "constexpr int EPK_B = EPK_A;\nconstexpr int EPK_A = 1;\n",  # used before its definition
    ):
        with pytest.raises(KernelCompileError):
            kernel_constants.parse(bad)


def test_parsed_once_at_first_access_from_the_kernels_folder(tmp_path, monkeypatch):
    folder = tmp_path / "kernels"
    shutil.copytree(kernel_loader.kernel_dir(), folder)
    text = (folder / "epk_constants.cuh").read_text()
    (folder / "epk_constants.cuh").write_text(text.replace("EPK_STATE_MASK = 64;", "EPK_STATE_MASK = 128;"))
    monkeypatch.setenv("EPKERN_KERNEL_DIR", str(folder))
    fresh = importlib.reload(kernel_constants)
    try:
        assert fresh._values is None  # nothing read at import
        assert fresh.get("EPK_STATE_MASK") == 128
        assert fresh.EPK_STATE_ROUTE == 128 + 1024
        (folder / "epk_constants.cuh").write_text(text)
        assert fresh.get("EPK_STATE_MASK") == 128  # parsed once
    finally:
        monkeypatch.delenv("EPKERN_KERNEL_DIR")
        importlib.reload(kernel_constants)
    assert kernel_constants.get("EPK_STATE_MASK") == 64
