"""What the two verbs-backed NICs (``Mlx5Nic`` and ``VerbsNic``) share: opening a device's port and PD, the lists of
what they made, deregistering, and closing it all in order (dependents first, every failure kept while the rest
still closes)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import _verbs_cffi as V
from ..errors import ArgumentError
from .observation import NicError, NicObservation

IBV_PORT_ACTIVE = 4


@dataclass
class RegisteredRegion:
    """A registered region: ``addr`` (what remote requests name), ``length``, ``lkey``, ``rkey``, ``access``."""

    nic: Any
    addr: int
    length: int
    lkey: int
    rkey: int
    access: int
    handle: Any
    keepalive: Any = None  # the numpy array registered, kept alive with the MR

    def contains(self, addr: int, n: int) -> bool:
        return self.addr <= addr and addr + n <= self.addr + self.length


class RcConnection:
    """Connecting an RC QP of a verbs-backed NIC (``self.nic``, ``self.handle``, ``self.psn``, ``self.state`` with
    RESET / RTS, ``self.remote``): what the peer needs, and RESET -> INIT -> RTR -> RTS towards it."""

    def local_info(self) -> V.PeerInfo:
        """What the peer's QP needs to connect to this one."""
        return self.nic._verbs.local_peer_info(self.handle, self.nic.port, self.nic.gid_index, self.psn)

    def connect(self, peer: V.PeerInfo) -> None:
        """RESET → INIT → RTR → RTS towards ``peer``."""
        if not isinstance(peer, V.PeerInfo):
            raise ArgumentError(f"peer: expected a PeerInfo, got {type(peer).__name__}")
        if self.state != self.RESET:
            raise NicError(f"QP {self.qpn} is {self.state}; connect() needs a fresh QP")
        self.nic._verbs.connect_rc_qp(
            self.handle, self.local_info(), peer, port_num=self.nic.port, sgid_index=self.nic.gid_index
        )
        self.remote = peer
        self.state = self.RTS


class VerbsBackedNic(NicObservation):
    """Base of the NICs opened through ``_verbs_cffi``: ``kind`` names the NIC in errors; subclasses set
    ``_verbs`` (the verbs module) and ``port`` before calling :meth:`_open`."""

    kind = "verbs-backed NIC"

    def _open(self, device_name: str | None, name: str | None, check_device: Callable | None = None) -> None:
        """Open the device, check it (``check_device(ctx)`` raises for an unusable one) and its port, allocate the PD;
        on failure close what was made and re-raise."""
        self.faults = []
        self._qps: list = []
        self._cqs: list = []
        self._mrs: list = []
        self._lock = threading.Lock()
        self._closed = False
        self._pd = None
        self._ctx = self._verbs.open_device(device_name)  # RdmaUnavailableError (with the reason) when none
        try:
            self.name = name or self._ctx.name
            if check_device is not None:
                check_device(self._ctx)
            self.port_attr = self._verbs.query_port(self._ctx, self.port)
            if self.port_attr.state != IBV_PORT_ACTIVE:
                raise V.RdmaUnavailableError(
                    f"{self._ctx.name} port {self.port} is not ACTIVE (state {self.port_attr.state})"
                )
            self._pd = self._verbs.alloc_pd(self._ctx)
        except BaseException:
            self._close_quietly()
            raise

    @property
    def device_name(self) -> str:
        return self._ctx.name

    def _check_open(self) -> None:
        if self._closed:
            raise NicError(f"{self.kind} {self.name} is closed")

    def _track(self, objects: list, obj):
        """``obj`` (an MR, CQ or QP just made) recorded in ``objects`` for close(); returns it."""
        with self._lock:
            objects.append(obj)
        return obj

    def _forget_mr(self, mr) -> None:
        """Deregister ``mr`` (already checked to be this NIC's)."""
        with self._lock:
            if mr in self._mrs:
                self._mrs.remove(mr)
        mr.handle.close()

    def close(self) -> None:
        """Destroy what this NIC made (subclasses' :meth:`_first_to_close` first, then QPs, CQs, MRs, the PD) and
        close the device, carrying on past failures and raising them together. Idempotent. Stop every user first
        (proxy service, kernels): nothing may touch the rings after this."""
        if self._closed:
            return
        self._closed = True
        errors = self._close_quietly()
        if errors:
            raise NicError(f"closing {self.kind} {self.name}: " + "; ".join(errors))

    def _first_to_close(self) -> list[tuple[str, Callable, tuple]]:
        """(what, fn, args) to run before the QPs are destroyed (mlx5: the GPU mappings of the rings)."""
        return []

    def _close_quietly(self) -> list[str]:
        errors: list[str] = []

        def run(what, fn, *args):
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 - keep closing the rest
                errors.append(f"{what}: {e}")

        for what, fn, args in self._first_to_close():
            run(what, fn, *args)
        for qp in reversed(self._qps):
            run(f"destroy QP {qp.qpn}", qp.handle.close)
            qp.state = type(qp).CLOSED
        self._qps.clear()
        for cq in reversed(self._cqs):
            run(f"destroy CQ {getattr(cq, 'cqn', '')}".rstrip(), cq.handle.close)
        self._cqs.clear()
        for mr in reversed(self._mrs):
            run(f"deregister MR 0x{mr.addr:x}", mr.handle.close)
        self._mrs.clear()
        if self._pd is not None:
            run("dealloc PD", self._pd.close)
            self._pd = None
        if self._ctx is not None:
            run("close device", self._ctx.close)
        return errors

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
