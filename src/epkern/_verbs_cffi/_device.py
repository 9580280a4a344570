"""Finding and opening an RDMA device: the device list (and why it is empty), :func:`open_device`, and the
port and GID queries."""

from __future__ import annotations

import errno as _errno
from dataclasses import dataclass

from ..errors import EpkernError
from ._handles import Context
from ._library import RdmaUnavailableError, VerbsError, check_ptr, check_rc, get_ffi, mlx5_lib, verbs_lib


def _device_list_raw() -> tuple[list[str], str]:
    """(names, reason when empty)."""
    ffi, lib = get_ffi(), verbs_lib()
    num = ffi.new("int *")
    lst = lib.ibv_get_device_list(num)
    if lst == ffi.NULL:
        err = ffi.errno
        if err == _errno.ENOSYS:
            return [], (
                "ibv_get_device_list failed with ENOSYS: the kernel exposes no RDMA verbs devices "
                "(no /sys/class/infiniband_verbs; no NIC driver and no soft-RoCE loaded)"
            )
        raise VerbsError("ibv_get_device_list", err)
    try:
        names = [ffi.string(lib.ibv_get_device_name(lst[i])).decode() for i in range(num[0])]
    finally:
        lib.ibv_free_device_list(lst)
    return names, ("" if names else "ibv_get_device_list returned an empty list")


def device_list() -> list[str]:
    """Names of the RDMA devices libibverbs sees (e.g. ``["mlx5_0", "mlx5_1"]``); ``[]`` when there are none.

    Raises :class:`RdmaUnavailableError` when libibverbs itself cannot be loaded.
    """
    return _device_list_raw()[0]


def rdma_available() -> tuple[bool, str]:
    """(True, "N RDMA devices: ...") or (False, why not). Never raises."""
    try:
        names, reason = _device_list_raw()
    except EpkernError as e:
        return False, f"RDMA unavailable: {e}"
    if not names:
        return False, f"no RDMA devices: {reason}"
    return True, f"{len(names)} RDMA device(s): {', '.join(names)}"


def open_device(name: str | None = None) -> Context:
    """Open the RDMA device called ``name`` (the first one when None)."""
    ffi, lib = get_ffi(), verbs_lib()
    num = ffi.new("int *")
    lst = lib.ibv_get_device_list(num)
    if lst == ffi.NULL:
        err = ffi.errno
        if err == _errno.ENOSYS:
            raise RdmaUnavailableError(f"cannot open RDMA device {name or '(first)'}: {_device_list_raw()[1]}")
        raise VerbsError("ibv_get_device_list", err)
    try:
        names = [ffi.string(lib.ibv_get_device_name(lst[i])).decode() for i in range(num[0])]
        if not names:
            raise RdmaUnavailableError("no RDMA devices: ibv_get_device_list returned an empty list")
        if name is None:
            index = 0
        elif name in names:
            index = names.index(name)
        else:
            raise RdmaUnavailableError(f"no RDMA device named {name!r}; devices: {', '.join(names)}")
        dev = lst[index]
        ctx = check_ptr("ibv_open_device", lib.ibv_open_device(dev), f"device {names[index]}")
        try:
            is_mlx5 = bool(mlx5_lib().mlx5dv_is_supported(dev))
        except RdmaUnavailableError:
            is_mlx5 = False
        return Context(ctx, names[index], is_mlx5)
    finally:
        lib.ibv_free_device_list(lst)


@dataclass(frozen=True)
class PortAttr:
    state: int  # IBV_PORT_* (4 = ACTIVE)
    max_mtu: int  # IBV_MTU_* enum (1..5 = 256..4096)
    active_mtu: int
    lid: int
    link_layer: int  # IBV_LINK_LAYER_* (1 = InfiniBand, 2 = Ethernet / RoCE)
    gid_tbl_len: int
    port_cap_flags: int
    max_msg_sz: int
    active_width: int
    active_speed: int
    phys_state: int


def query_port(ctx: Context, port_num: int = 1) -> PortAttr:
    ffi = get_ffi()
    attr = ffi.new("struct ibv_port_attr *")  # zeroed, as the header's inline fallback does
    check_rc("ibv_query_port", verbs_lib().ibv_query_port(ctx._require(), port_num, attr), f"port {port_num}")
    return PortAttr(
        state=int(attr.state),
        max_mtu=int(attr.max_mtu),
        active_mtu=int(attr.active_mtu),
        lid=int(attr.lid),
        link_layer=int(attr.link_layer),
        gid_tbl_len=int(attr.gid_tbl_len),
        port_cap_flags=int(attr.port_cap_flags),
        max_msg_sz=int(attr.max_msg_sz),
        active_width=int(attr.active_width),
        active_speed=int(attr.active_speed),
        phys_state=int(attr.phys_state),
    )


def query_gid(ctx: Context, port_num: int = 1, index: int = 0) -> bytes:
    """The 16 raw bytes of GID ``index`` of the port (network order)."""
    ffi = get_ffi()
    gid = ffi.new("union ibv_gid *")
    rc = verbs_lib().ibv_query_gid(ctx._require(), port_num, index, gid)
    check_rc("ibv_query_gid", rc, f"port {port_num} index {index}")
    return bytes(ffi.buffer(gid.raw, 16))
