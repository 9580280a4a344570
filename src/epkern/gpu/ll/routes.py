"""The LL route of every peer, chosen once at Buffer creation (issue #17, step 1): IPC, PROXY or RDMA.

Inputs, all known on every rank: the node of every rank (``group.node_of_rank``; ``EPKERN_RANKS_PER_NODE`` makes
virtual nodes), the ``transport=`` choice (``auto`` | ``proxy`` | ``rdma``), hybrid (``allow_nvlink_for_low_latency
_mode`` and ``EPKERN_LL_HYBRID``: same-node peers over IPC) and every rank's NIC (:class:`NicInfo`, gathered).

- A rank reaches itself over IPC (its own memory: a local copy), always.
- Hybrid on: a peer of the same node is IPC, a peer of another node takes the NIC route; hybrid off: every other
  rank takes the NIC route, same node or not.
- The NIC route: ``proxy``, or ``rdma`` (GPU-written WQEs; both ends' NICs must give GPU-writable send rings: the
  emulated NIC does, watching its doorbell words; ConfigError otherwise). ``auto``: RDMA where both ends' rings
  allow it, else PROXY.
- The emulated NIC reaches only ranks of its own host (it is the wire: it copies into the peer's memory mapped in
  this process), so a remote peer on another host needs a real NIC.

Every rank computes the whole table (R x R) from its own settings; the tables are gathered and must be identical
(a ConfigError naming the ranks that differ), so no rank launches a kernel that a peer would not answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError
from .layout import ROUTE_IPC, ROUTE_PROXY, ROUTE_RDMA

TRANSPORTS = ("auto", "proxy", "rdma")
ROUTE_NAMES = {ROUTE_IPC: "ipc", ROUTE_PROXY: "proxy", ROUTE_RDMA: "rdma"}


@dataclass(frozen=True)
class NicInfo:
    """What a rank says about its NIC: ``kind`` ("emulated", "mlx5", or None: no NIC), the host it is on (the
    emulated NIC reaches only that host's ranks) and whether its send rings can be mapped for the GPU (RDMA)."""

    kind: str | None
    host: str
    gpu_rings: bool = False

    def as_wire(self) -> tuple:
        return (self.kind, self.host, self.gpu_rings)

    @classmethod
    def from_wire(cls, t) -> NicInfo:
        kind, host, rings = t
        return cls(kind, str(host), bool(rings))


def node_identity(group) -> tuple[int, ...] | None:
    """The node of every rank, or None where the group cannot tell (an object without ``node_of_rank``, or one
    whose map does not cover the group)."""
    nodes = getattr(group, "node_of_rank", None)
    if nodes is None:
        return None
    nodes = tuple(int(n) for n in nodes)
    return nodes if len(nodes) == group.size else None


def route_table(nodes, hybrid: bool, transport: str, nics) -> tuple[tuple[int, ...], ...]:
    """The R x R table of route kinds (row = sender, column = destination), or ConfigError. ``nics``: a NicInfo
    per rank (only consulted where a NIC route is needed)."""
    if transport not in TRANSPORTS:
        raise ConfigError(f"transport: expected one of {', '.join(TRANSPORTS)}, got {transport!r}")
    size = len(nodes)
    table = []
    for r in range(size):
        row = []
        for p in range(size):
            if p == r or (hybrid and nodes[p] == nodes[r]):
                row.append(ROUTE_IPC)
            else:
                row.append(_nic_route(r, p, nodes, transport, nics))
        table.append(tuple(row))
    return tuple(table)


def _nic_route(r: int, p: int, nodes, transport: str, nics) -> int:
    where = f"rank {r} -> rank {p} (node {nodes[r]} -> node {nodes[p]})"
    for who in (r, p):
        if nics[who].kind is None:
            raise ConfigError(f"{where} needs a NIC route, but rank {who} has no NIC")
    if nics[r].kind == "emulated" or nics[p].kind == "emulated":
        if nics[r].host != nics[p].host:
            raise ConfigError(
                f"{where}: the emulated NIC reaches only ranks of its own host (rank {r} is on {nics[r].host!r}, "
                f"rank {p} on {nics[p].host!r}); ranks on other hosts need a real NIC"
            )
    if transport == "rdma":
        for who in (r, p):
            if not nics[who].gpu_rings:
                raise ConfigError(
                    f"transport='rdma' ({where}): the NIC of rank {who} ({nics[who].kind}) has no GPU-writable send "
                    "rings (the RDMA route's kernels post WQEs themselves); use 'proxy' or 'auto'"
                )
        return ROUTE_RDMA
    if transport == "proxy":
        return ROUTE_PROXY
    return ROUTE_RDMA if nics[r].gpu_rings and nics[p].gpu_rings else ROUTE_PROXY  # auto


def check_identical(tables: list) -> None:
    """Every rank's table must be the same: ConfigError naming the ranks that differ from the most common one."""
    tables = [tuple(tuple(row) for row in t) for t in tables]
    counts: dict = {}
    for t in tables:
        counts[t] = counts.get(t, 0) + 1
    if len(counts) == 1:
        return
    common = max(counts, key=lambda t: (counts[t], -tables.index(t)))
    differ = [r for r, t in enumerate(tables) if t != common]
    agree = [r for r, t in enumerate(tables) if t == common]
    raise ConfigError(
        f"LL routes differ between ranks: ranks {differ} chose other routes than ranks {agree} (transport=, "
        "allow_nvlink_for_low_latency_mode, EPKERN_LL_HYBRID, EPKERN_RANKS_PER_NODE and the NIC must agree on "
        f"every rank); rank {differ[0]}: {describe(tables[differ[0]])}; rank {agree[0]}: {describe(common)}"
    )


def describe(table) -> str:
    """Compact text of a table: one row per sender, e.g. ``[ipc proxy | proxy ipc]``."""
    return "[" + " | ".join(" ".join(ROUTE_NAMES.get(k, str(k)) for k in row) for row in table) + "]"


def local_nic(group) -> NicInfo:
    """This rank's NIC. Ranks all on one host (virtual nodes): the emulated NIC (every rank can make one; it reaches
    the ranks of its host; its rings live in host-mapped memory that kernels write, and it watches their doorbell
    words). Ranks on several hosts: a real mlx5 NIC when libibverbs lists an RDMA device (its send rings and
    doorbell register are mapped for the GPU: ``Mlx5QueuePair.map_for_gpu``), else none (the route table then names
    the rank without a NIC). The real NIC has never been run (docs/rdma.md)."""
    host = str(group.hostnames[group.rank])
    if len(set(group.hostnames)) == 1:
        return NicInfo("emulated", host, gpu_rings=True)
    try:
        from ... import _verbs_cffi

        available, _ = _verbs_cffi.rdma_available()
    except ImportError:  # the cffi bindings were not built (no rdma-core headers where epkern was installed)
        available = False
    return NicInfo("mlx5", host, gpu_rings=True) if available else NicInfo(None, host)


def real_nic(rank: int, device: int):
    """The zero-argument maker of this rank's real NIC (``nic_link.NicLink``'s ``real_nic``): of the RDMA devices
    libibverbs lists, the one closest to CUDA device ``device`` on the PCIe tree (``nic.pci_locality``)."""

    def make():
        from ... import _verbs_cffi
        from ...nic import pci_locality
        from ...nic.mlx5 import Mlx5Nic

        name = pci_locality.closest_nic(pci_locality.gpu_bus_id(device), _verbs_cffi.device_list())
        return Mlx5Nic(name, name=f"rank{rank}")

    return make


def choose(group, hybrid: bool, transport: str, nic: NicInfo) -> tuple[tuple[int, ...], ...]:
    """The agreed table, identical on every rank (collective: two allgathers); row ``group.rank`` is this rank's.
    ConfigError on every rank alike."""
    nodes = node_identity(group)
    if nodes is None:
        if hybrid and group.size > 1:
            raise ConfigError(
                "hybrid LL routes (allow_nvlink_for_low_latency_mode=True, EPKERN_LL_HYBRID=1) need node identity: "
                f"this group ({type(group).__name__}) does not say which node each rank is on"
            )
        nodes = tuple(range(group.size))  # without node identity every other rank is remote
    nics = [NicInfo.from_wire(t) for t in group.allgather_object(nic.as_wire())]
    error = None
    try:
        table = route_table(nodes, hybrid, transport, nics)
    except ConfigError as exc:  # every rank must leave the next collective alike
        error, table = str(exc), ()
    gathered = group.allgather_object((error, table))
    errors = [(r, e) for r, (e, _) in enumerate(gathered) if e]
    if errors:
        r, e = errors[0]
        raise ConfigError(e if all(x == e for _, x in errors) else f"rank {r}: {e}")
    check_identical([t for _, t in gathered])
    return table


def needs_nic(table) -> bool:
    """Whether any route of the table goes over a NIC (then every rank sets its NIC up: the tables are identical
    and symmetric, so every rank of a group of more than one node has a remote peer)."""
    return any(k != ROUTE_IPC for row in table for k in row)
