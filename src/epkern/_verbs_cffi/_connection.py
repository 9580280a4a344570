"""Connecting an RC queue pair: the :class:`PeerInfo` both sides exchange, the RESET -> INIT -> RTR -> RTS
attributes and masks, and :func:`connect_rc_qp`."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from ..errors import EpkernError
from ._cdef import CONSTANTS as _C
from ._device import query_gid, query_port
from ._handles import QueuePair
from ._library import check_rc, flag_mask, get_ffi, verbs_lib
from ._resources import DEFAULT_ACCESS

_MTU_BYTES = {1: 256, 2: 512, 3: 1024, 4: 2048, 5: 4096}


@dataclass(frozen=True)
class PeerInfo:
    """What one side of an RC connection tells the other (exchanged e.g. through the group's allgather).

    ``mtu`` is the IBV_MTU_* enum value (1..5 = 256..4096 bytes); ``gid`` is 16 raw bytes (all zero on
    InfiniBand without GRH; required on RoCE).
    """

    lid: int
    gid: bytes
    qpn: int
    psn: int
    mtu: int

    _FMT = "<HIII16s"  # lid, qpn, psn, mtu, gid

    def __post_init__(self) -> None:
        if len(self.gid) != 16:
            raise EpkernError(f"PeerInfo.gid: expected 16 bytes, got {len(self.gid)}")
        if self.mtu not in _MTU_BYTES:
            raise EpkernError(f"PeerInfo.mtu: expected an IBV_MTU_* value in 1..5, got {self.mtu}")
        if not 0 <= self.psn < 1 << 24:
            raise EpkernError(f"PeerInfo.psn: expected a 24-bit value, got {self.psn}")

    def to_bytes(self) -> bytes:
        return struct.pack(self._FMT, self.lid, self.qpn, self.psn, self.mtu, self.gid)

    @classmethod
    def from_bytes(cls, data: bytes) -> PeerInfo:
        lid, qpn, psn, mtu, gid = struct.unpack(cls._FMT, bytes(data))
        return cls(lid=lid, gid=gid, qpn=qpn, psn=psn, mtu=mtu)

    @classmethod
    def size(cls) -> int:
        return struct.calcsize(cls._FMT)


def local_peer_info(qp: QueuePair, port_num: int = 1, gid_index: int = 0, psn: int = 0) -> PeerInfo:
    """This QP's :class:`PeerInfo` (queries the port and the GID)."""
    ctx = qp.pd.context
    port = query_port(ctx, port_num)
    gid = query_gid(ctx, port_num, gid_index)
    return PeerInfo(lid=port.lid, gid=gid, qpn=qp.qp_num, psn=psn, mtu=port.active_mtu)


def init_attr(port_num: int = 1, access: int = DEFAULT_ACCESS, pkey_index: int = 0) -> tuple[Any, int]:
    """(``struct ibv_qp_attr *``, mask) for RESET -> INIT."""
    ffi = get_ffi()
    a = ffi.new("struct ibv_qp_attr *")
    a.qp_state = ffi.cast("enum ibv_qp_state", _C["IBV_QPS_INIT"])
    a.pkey_index = pkey_index
    a.port_num = port_num
    a.qp_access_flags = access
    return a, flag_mask("IBV_QP_STATE", "IBV_QP_PKEY_INDEX", "IBV_QP_PORT", "IBV_QP_ACCESS_FLAGS")


def rtr_attr(
    peer: PeerInfo,
    port_num: int = 1,
    sgid_index: int = 0,
    *,
    use_grh: bool | None = None,
    hop_limit: int = 255,
    traffic_class: int = 0,
    sl: int = 0,
    max_dest_rd_atomic: int = 16,
    min_rnr_timer: int = 12,
) -> tuple[Any, int]:
    """(attr, mask) for INIT -> RTR towards ``peer``. GRH is used when ``use_grh`` or the peer's GID is set."""
    ffi = get_ffi()
    a = ffi.new("struct ibv_qp_attr *")
    a.qp_state = ffi.cast("enum ibv_qp_state", _C["IBV_QPS_RTR"])
    a.path_mtu = ffi.cast("enum ibv_mtu", peer.mtu)
    a.dest_qp_num = peer.qpn
    a.rq_psn = peer.psn
    a.max_dest_rd_atomic = max_dest_rd_atomic
    a.min_rnr_timer = min_rnr_timer
    a.ah_attr.dlid = peer.lid
    a.ah_attr.sl = sl
    a.ah_attr.port_num = port_num
    if use_grh if use_grh is not None else any(peer.gid):
        a.ah_attr.is_global = 1
        ffi.memmove(a.ah_attr.grh.dgid.raw, peer.gid, 16)
        a.ah_attr.grh.sgid_index = sgid_index
        a.ah_attr.grh.hop_limit = hop_limit
        a.ah_attr.grh.traffic_class = traffic_class
    return a, flag_mask(
        "IBV_QP_STATE",
        "IBV_QP_AV",
        "IBV_QP_PATH_MTU",
        "IBV_QP_DEST_QPN",
        "IBV_QP_RQ_PSN",
        "IBV_QP_MAX_DEST_RD_ATOMIC",
        "IBV_QP_MIN_RNR_TIMER",
    )


def rts_attr(
    psn: int, *, timeout: int = 14, retry_cnt: int = 7, rnr_retry: int = 7, max_rd_atomic: int = 16
) -> tuple[Any, int]:
    """(attr, mask) for RTR -> RTS with our send PSN ``psn``."""
    ffi = get_ffi()
    a = ffi.new("struct ibv_qp_attr *")
    a.qp_state = ffi.cast("enum ibv_qp_state", _C["IBV_QPS_RTS"])
    a.sq_psn = psn
    a.timeout = timeout
    a.retry_cnt = retry_cnt
    a.rnr_retry = rnr_retry
    a.max_rd_atomic = max_rd_atomic
    return a, flag_mask(
        "IBV_QP_STATE",
        "IBV_QP_TIMEOUT",
        "IBV_QP_RETRY_CNT",
        "IBV_QP_RNR_RETRY",
        "IBV_QP_SQ_PSN",
        "IBV_QP_MAX_QP_RD_ATOMIC",
    )


def modify_qp(qp: QueuePair, attr: Any, mask: int, what: str = "") -> None:
    check_rc("ibv_modify_qp", verbs_lib().ibv_modify_qp(qp._require(), attr, mask), what)


def connect_rc_qp(
    qp: QueuePair,
    local: PeerInfo,
    peer: PeerInfo,
    port_num: int = 1,
    sgid_index: int = 0,
    access: int = DEFAULT_ACCESS,
    **rtr_kwargs: Any,
) -> None:
    """RESET -> INIT -> RTR -> RTS, using the exchanged ``peer`` info and our ``local.psn``."""
    modify_qp(qp, *init_attr(port_num, access), what="RESET->INIT")
    modify_qp(qp, *rtr_attr(peer, port_num, sgid_index, **rtr_kwargs), what=f"INIT->RTR (peer qpn {peer.qpn})")
    modify_qp(qp, *rts_attr(local.psn), what="RTR->RTS")
