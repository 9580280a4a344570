"""``mlx5dv_init_obj``: where an mlx5 QP's send ring, doorbell record and BlueFlame register live, and an mlx5
CQ's CQE ring and doorbell record (the addresses the host and GPU posting paths write)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._cdef import CONSTANTS as _C
from ._handles import CompletionQueue, Context, Handle, QueuePair
from ._library import RdmaUnavailableError, check_rc, get_ffi, mlx5_lib


@dataclass(frozen=True)
class Mlx5QpInfo:
    """Where a QP's send ring and doorbells live (from ``mlx5dv_init_obj(MLX5DV_OBJ_QP)``).

    ``dbrec`` points to two big-endian u32: [0] receive, [1] send doorbell record. ``bf_reg`` is the
    BlueFlame / doorbell register in the UAR page (MMIO; map to a GPU with CU_MEMHOSTREGISTER_IOMEMORY).
    """

    qpn: int
    sq_buf: int
    sq_wqe_cnt: int
    sq_stride: int
    dbrec: int
    bf_reg: int
    bf_size: int
    rq_buf: int
    rq_wqe_cnt: int
    rq_stride: int


@dataclass(frozen=True)
class Mlx5CqInfo:
    cqn: int
    buf: int
    cqe_cnt: int
    cqe_size: int
    dbrec: int


def _addr(ptr: Any) -> int:
    return int(get_ffi().cast("uintptr_t", ptr))


def _init_obj(kind: str, obj_type: int, handle: Handle, ctx: Context) -> Any:
    if not ctx.is_mlx5:
        raise RdmaUnavailableError(f"mlx5dv_init_obj: device {ctx.name} is not an mlx5 device (or libmlx5 is missing)")
    ffi, lib = get_ffi(), mlx5_lib()
    obj = ffi.new("struct mlx5dv_obj *")
    out = ffi.new(f"struct mlx5dv_{kind} *")
    member = getattr(obj, kind)
    setattr(member, "in", handle._require())  # "in" is a Python keyword
    member.out = out
    check_rc("mlx5dv_init_obj", lib.mlx5dv_init_obj(obj, obj_type), f"MLX5DV_OBJ_{kind.upper()}")
    return out


def mlx5_qp_info(qp: QueuePair) -> Mlx5QpInfo:
    """Send ring, doorbell record and BlueFlame register of an mlx5 QP."""
    out = _init_obj("qp", _C["MLX5DV_OBJ_QP"], qp, qp.pd.context)
    return Mlx5QpInfo(
        qpn=qp.qp_num,
        sq_buf=_addr(out.sq.buf),
        sq_wqe_cnt=int(out.sq.wqe_cnt),
        sq_stride=int(out.sq.stride),
        dbrec=_addr(out.dbrec),
        bf_reg=_addr(out.bf.reg),
        bf_size=int(out.bf.size),
        rq_buf=_addr(out.rq.buf),
        rq_wqe_cnt=int(out.rq.wqe_cnt),
        rq_stride=int(out.rq.stride),
    )


def mlx5_cq_info(cq: CompletionQueue) -> Mlx5CqInfo:
    """CQE ring and doorbell record of an mlx5 CQ."""
    out = _init_obj("cq", _C["MLX5DV_OBJ_CQ"], cq, cq.context)
    return Mlx5CqInfo(
        cqn=int(out.cqn),
        buf=_addr(out.buf),
        cqe_cnt=int(out.cqe_cnt),
        cqe_size=int(out.cqe_size),
        dbrec=_addr(out.dbrec),
    )
