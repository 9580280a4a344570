"""CPU checks of epkern._verbs_cffi: import without hardware, clean "no device" answers, and the ABI-mode cdef's
struct layouts / enum values / prototypes checked against the real rdma-core headers via an API-mode build."""

from __future__ import annotations

import ctypes.util
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

from epkern import _verbs_cffi as verbs
from epkern._verbs_cffi import _cdef, _library
from epkern.errors import EpkernError

HEADERS = ("/usr/include/infiniband/verbs.h", "/usr/include/infiniband/mlx5dv.h")


def test_import_loads_nothing():
    code = (
        "import epkern, epkern._verbs_cffi as v, epkern._verbs_cffi._library as m; "
        "assert m._ffi is None and m._libs == {}, (m._ffi, m._libs); print('ok')"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_cdef_parses_without_libraries():
    ffi = verbs.get_ffi()
    assert ffi.sizeof("struct mlx5dv_obj") == 7 * 16
    assert ffi.offsetof("struct mlx5dv_qp", "bf", "reg") > ffi.offsetof("struct mlx5dv_qp", "sq", "buf")


def _verbs_loadable() -> bool:
    try:
        verbs.verbs_lib()
    except verbs.RdmaUnavailableError:
        return False
    return True


def test_device_list_and_rdma_available():
    if not _verbs_loadable():
        with pytest.raises(verbs.RdmaUnavailableError, match="libibverbs"):
            verbs.device_list()
        ok, why = verbs.rdma_available()
        assert not ok and "libibverbs" in why
        return
    names = verbs.device_list()
    ok, why = verbs.rdma_available()
    assert isinstance(names, list) and all(isinstance(n, str) for n in names)
    if names:
        assert ok and all(n in why for n in names)
    else:
        # This machine: no RDMA device and no soft-RoCE; ibv_get_device_list fails with ENOSYS.
        assert not ok and why.startswith("no RDMA devices: "), why
        with pytest.raises(verbs.RdmaUnavailableError, match="no RDMA device|ENOSYS"):
            verbs.open_device("mlx5_0")


def test_missing_library_is_explained(monkeypatch):
    verbs.get_ffi()
    monkeypatch.setattr(_library, "LIBIBVERBS", "libepkern-does-not-exist.so.1")
    monkeypatch.setattr(_library, "_libs", {})
    with pytest.raises(verbs.RdmaUnavailableError, match="libepkern-does-not-exist.so.1 could not be loaded") as e:
        verbs.device_list()
    assert isinstance(e.value, EpkernError)
    ok, why = verbs.rdma_available()
    assert not ok and "could not be loaded" in why


def test_verbs_error_text():
    e = verbs.VerbsError("ibv_create_qp", 12, "RC")
    assert e.errno == 12 and "ENOMEM" in str(e) and "ibv_create_qp" in str(e) and isinstance(e, EpkernError)


def test_peer_info_roundtrip_and_validation():
    p = verbs.PeerInfo(lid=7, gid=bytes(range(16)), qpn=0x1234, psn=0xABCDE, mtu=5)
    data = p.to_bytes()
    assert len(data) == verbs.PeerInfo.size()
    assert verbs.PeerInfo.from_bytes(data) == p
    with pytest.raises(EpkernError, match="gid"):
        verbs.PeerInfo(lid=0, gid=b"x", qpn=1, psn=0, mtu=5)
    with pytest.raises(EpkernError, match="mtu"):
        verbs.PeerInfo(lid=0, gid=bytes(16), qpn=1, psn=0, mtu=9)
    with pytest.raises(EpkernError, match="psn"):
        verbs.PeerInfo(lid=0, gid=bytes(16), qpn=1, psn=1 << 24, mtu=5)


def test_transition_attrs_and_masks():
    consts = _cdef.CONSTANTS
    c = consts.__getitem__

    def mask(*names):
        m = 0
        for n in names:
            m |= c("IBV_QP_" + n)
        return m

    a, m = verbs.init_attr(port_num=1)
    assert a.qp_state == c("IBV_QPS_INIT") and a.port_num == 1
    assert a.qp_access_flags == verbs.DEFAULT_ACCESS
    assert not verbs.DEFAULT_ACCESS & c("IBV_ACCESS_RELAXED_ORDERING")
    assert m == mask("STATE", "PKEY_INDEX", "PORT", "ACCESS_FLAGS")

    ib_peer = verbs.PeerInfo(lid=3, gid=bytes(16), qpn=99, psn=5, mtu=c("IBV_MTU_4096"))
    a, m = verbs.rtr_attr(ib_peer)
    assert m == mask("STATE", "AV", "PATH_MTU", "DEST_QPN", "RQ_PSN", "MAX_DEST_RD_ATOMIC", "MIN_RNR_TIMER")
    assert (a.qp_state, a.dest_qp_num, a.rq_psn, a.ah_attr.dlid, a.ah_attr.is_global) == (c("IBV_QPS_RTR"), 99, 5, 3, 0)
    roce_peer = verbs.PeerInfo(lid=0, gid=bytes(range(1, 17)), qpn=99, psn=5, mtu=c("IBV_MTU_1024"))
    a, _ = verbs.rtr_attr(roce_peer, sgid_index=3)
    assert a.ah_attr.is_global == 1 and bytes(a.ah_attr.grh.dgid.raw) == roce_peer.gid
    assert a.ah_attr.grh.sgid_index == 3 and a.path_mtu == c("IBV_MTU_1024")

    a, m = verbs.rts_attr(0x42)
    assert a.qp_state == c("IBV_QPS_RTS") and a.sq_psn == 0x42
    assert m == mask("STATE", "TIMEOUT", "RETRY_CNT", "RNR_RETRY", "SQ_PSN", "MAX_QP_RD_ATOMIC")


def test_pyverbs_cross_check():
    device = pytest.importorskip("pyverbs.device", reason="pyverbs is not installed")
    if not _verbs_loadable():
        pytest.skip("libibverbs is not loadable")
    try:
        theirs = sorted(d.name.decode() for d in device.get_device_list())
    except Exception as e:  # pyverbs raises when there is no device
        theirs = []
        print("pyverbs:", e)
    assert sorted(verbs.device_list()) == theirs


# ------------------------------------------------------------------------------------- layout vs real headers


def _layout_items(ffi) -> list[tuple[str, str]]:
    """(label, C expression) for every struct/union size+alignment, every (nested) field offset and size."""
    items: list[tuple[str, str]] = []

    def walk(cname: str, ctype, prefix: str) -> None:
        for fname, field in ctype.fields:
            path = prefix + fname
            items.append((f"offsetof({cname}, {path})", f"offsetof({cname}, {path})"))
            items.append((f"sizeof({cname}.{path})", f"sizeof((({cname} *)0)->{path})"))
            if field.type.kind in ("struct", "union"):
                walk(cname, field.type, path + ".")

    _, structs, unions = ffi.list_types()
    for kind, names in (("struct", structs), ("union", unions)):
        for name in names:
            cname = f"{kind} {name}"
            ctype = ffi.typeof(cname)
            if ctype.fields is None:  # opaque: we never look inside
                continue
            items.append((f"sizeof({cname})", f"sizeof({cname})"))
            items.append((f"alignof({cname})", f"_Alignof({cname})"))
            walk(cname, ctype, "")
    for const in sorted(_cdef.CONSTANTS):
        items.append((const, f"(long long)({const})"))
    return items


def _abi_value(ffi, label: str) -> int:
    m = re.fullmatch(r"(sizeof|alignof)\(((?:struct|union) \w+)\)", label)
    if m:
        return ffi.sizeof(m[2]) if m[1] == "sizeof" else ffi.alignof(m[2])
    m = re.fullmatch(r"offsetof\(((?:struct|union) \w+), ([\w.]+)\)", label)
    if m:
        return ffi.offsetof(m[1], *m[2].split("."))
    m = re.fullmatch(r"sizeof\(((?:struct|union) \w+)\.([\w.]+)\)", label)
    if m:
        ctype = ffi.typeof(m[1])
        for part in m[2].split("."):
            ctype = dict(ctype.fields)[part].type
        return ffi.sizeof(ctype)
    return _cdef.CONSTANTS[label]


def _prototypes() -> list[tuple[str, str]]:
    """(name, C declaration of a pointer initialised with the function) for each bound function."""
    out = []
    for decl in (_cdef.VERBS_FUNCTIONS + _cdef.MLX5_FUNCTIONS).split(";"):
        decl = " ".join(decl.split())
        if not decl:
            continue
        m = re.fullmatch(r"(.*?[\s*])(\w+)\((.*)\)", decl)
        assert m, decl
        ret, name, args = m.groups()
        if name in _cdef.PROTOTYPE_EXCEPTIONS:
            continue
        out.append((name, f"{ret.strip()} (*epk_proto_{name})({args}) __attribute__((unused)) = {name};"))
    return out


def _function_pointer_fields(ffi) -> list[tuple[str, str]]:
    """(label, C static assertion) for every typed function-pointer field of the cdef's structs (the ops table's
    ``post_send`` and ``poll_cq``, which we call): its cdef type must be the header's, argument for argument."""
    out = []
    _, structs, _ = ffi.list_types()
    for name in structs:
        ctype = ffi.typeof(f"struct {name}")
        for fname, field in ctype.fields or ():
            if field.type.kind == "function":
                label = f"struct {name}.{fname}"
                check = f"__builtin_types_compatible_p(__typeof__(((struct {name} *)0)->{fname}), {field.type.cname})"
                out.append((label, f'_Static_assert({check}, "{label}: cdef type differs from the header");'))
    return out


def test_abi_layout_matches_headers(tmp_path):
    missing = [h for h in HEADERS if not os.path.exists(h)]
    if missing:
        pytest.skip(f"rdma-core headers missing: {', '.join(missing)} (apt-get install libibverbs-dev)")
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc!r} not found)")
    for lib in ("ibverbs", "mlx5"):
        if ctypes.util.find_library(lib) is None:
            pytest.skip(f"lib{lib} not found for linking (apt-get install libibverbs-dev ibverbs-providers)")
    cffi = pytest.importorskip("cffi")
    pytest.importorskip("setuptools", reason="cffi needs setuptools to compile")

    abi = verbs.get_ffi()
    items = _layout_items(abi)
    protos = _prototypes()
    fn_fields = _function_pointer_fields(abi)
    values = ",\n    ".join(expr for _, expr in items)
    source = (
        "#include <stddef.h>\n#include <infiniband/verbs.h>\n#include <infiniband/mlx5dv.h>\n"
        f"static const long long epk_values[] = {{\n    {values}\n}};\n"
        + "\n".join(decl for _, decl in protos)
        + "\n"
        + "\n".join(check for _, check in fn_fields)
        + "\nstatic int epk_layout(long long *out, int n) {\n"
        "    int m = (int)(sizeof(epk_values) / sizeof(epk_values[0]));\n"
        "    for (int i = 0; i < m && i < n; i++) out[i] = epk_values[i];\n"
        "    return m;\n}\n"
    )
    api = cffi.FFI()
    api.cdef("int epk_layout(long long *out, int n);")
    api.set_source(
        "_epk_verbs_layout",
        source,
        libraries=["ibverbs", "mlx5"],
        extra_compile_args=["-Werror=incompatible-pointer-types", "-Werror=implicit-function-declaration"],
    )
    so = api.compile(tmpdir=str(tmp_path), verbose=False)
    spec = importlib.util.spec_from_file_location("_epk_verbs_layout", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    buf = mod.ffi.new("long long[]", len(items))
    assert mod.lib.epk_layout(buf, len(items)) == len(items)
    mismatches = [
        f"{label}: header {buf[i]}, cdef {_abi_value(abi, label)}"
        for i, (label, _) in enumerate(items)
        if buf[i] != _abi_value(abi, label)
    ]
    assert not mismatches, "ABI cdef disagrees with rdma-core headers:\n" + "\n".join(mismatches)
    # Sanity: the check covered what the RDMA path relies on.
    labels = {label for label, _ in items}
    for must in (
        "offsetof(struct mlx5dv_qp, sq.buf)",
        "offsetof(struct mlx5dv_qp, bf.reg)",
        "offsetof(struct mlx5dv_cq, dbrec)",
        "offsetof(struct ibv_qp, qp_num)",
        "offsetof(struct ibv_qp_attr, ah_attr.grh.dgid.raw)",
        "sizeof(struct ibv_port_attr)",
        "IBV_ACCESS_RELAXED_ORDERING",
        # the standard-verbs posting path: the ops table, the work request and the completion
        "offsetof(struct ibv_context, ops.post_send)",
        "offsetof(struct ibv_context, ops.poll_cq)",
        "offsetof(struct ibv_send_wr, wr.rdma.rkey)",
        "offsetof(struct ibv_send_wr, wr.atomic.compare_add)",
        "offsetof(struct ibv_send_wr, wr.atomic.rkey)",
        "sizeof(struct ibv_send_wr)",
        "sizeof(struct ibv_sge)",
        "offsetof(struct ibv_wc, vendor_err)",
        "offsetof(struct ibv_wc, qp_num)",
        "sizeof(struct ibv_wc)",
        "offsetof(struct ibv_cq, cqe)",
        "IBV_WR_ATOMIC_FETCH_AND_ADD",
        "IBV_WC_REM_ACCESS_ERR",
    ):
        assert must in labels, must
    assert {label for label, _ in fn_fields} == {"struct ibv_context_ops.post_send", "struct ibv_context_ops.poll_cq"}
    assert {name for name, _ in protos} >= {"ibv_create_qp", "ibv_reg_dmabuf_mr", "mlx5dv_init_obj"}


def test_memory_regions_get_local_rights_unless_asked():
    """Least privilege (issue #20, finding 5): a region registered without access= allows no remote operation."""
    import inspect

    from epkern.nic import mlx5

    assert verbs.MR_ACCESS == _cdef.CONSTANTS["IBV_ACCESS_LOCAL_WRITE"]
    for fn in (verbs.reg_mr, verbs.reg_dmabuf_mr, mlx5.Mlx5Nic.reg_mr, mlx5.Mlx5Nic.reg_gpu_mr):
        assert inspect.signature(fn).parameters["access"].default == verbs.MR_ACCESS, fn
