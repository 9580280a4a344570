"""Node identity: which ranks share a machine.

Every rank contributes ``(hostname, ranks_per_node setting)``; every rank then computes the same map, so a
bad setting raises the same error on every rank (no rank is left waiting in a later collective).

- hostname: ``EPKERN_HOSTNAME`` if set, else ``socket.gethostname()``.
- ``EPKERN_RANKS_PER_NODE=n`` (or the launcher's ``ranks_per_node=``) replaces hostnames: node = rank // n
  ("virtual nodes", to exercise multi-node paths on one machine). The group size must be a multiple of n.

Nodes are numbered 0.. in order of first appearance by rank; a rank's local rank is its index among the
ranks of its node, in ascending rank order. Besides the (possibly virtual) node map, the *host* local rank
(by hostname only) is kept for picking GPUs: virtual nodes on one 8-GPU host still spread over all 8 GPUs.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass

from .. import _env
from ..errors import ArgumentError, ConfigError


@dataclass(frozen=True)
class NodeMap:
    node_of_rank: tuple[int, ...]
    local_rank_of_rank: tuple[int, ...]
    host_local_rank_of_rank: tuple[int, ...]  # index among the ranks of the same hostname (for devices)
    hostnames: tuple[str, ...]


def local_hostname() -> str:
    return _env.hostname_override() or socket.gethostname()


def _number(keys: Sequence) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(index of each key in order of first appearance, index of each position among equal keys)."""
    ids: dict = {}
    counts: dict = {}
    index, local = [], []
    for key in keys:
        n = ids.setdefault(key, len(ids))
        index.append(n)
        local.append(counts.get(n, 0))
        counts[n] = local[-1] + 1
    return tuple(index), tuple(local)


def check_ranks_per_node(value, name: str = "ranks_per_node") -> int | None:
    """Validate an explicit ``ranks_per_node=`` argument (None = not given)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ArgumentError(f"{name}: expected a positive integer or None, got {value!r}")
    return value


def local_entry(ranks_per_node: int | None = None) -> tuple[str, int | None, str | None]:
    """What this rank contributes: (hostname, ranks_per_node, error text). Never raises for a bad
    environment variable: the error text travels to every rank, which all raise together."""
    error = None
    rpn = ranks_per_node
    if rpn is None:
        try:
            rpn = _env.ranks_per_node()
        except ConfigError as exc:
            error = str(exc)
    return local_hostname(), rpn, error


def node_map(
    hostnames: Sequence[str], ranks_per_node: int | None = None, source: str = "EPKERN_RANKS_PER_NODE"
) -> NodeMap:
    """Node map of ``len(hostnames)`` ranks. ``source`` names where ``ranks_per_node`` came from (an
    environment variable -> ConfigError, an argument -> ArgumentError) for the error message."""
    size = len(hostnames)
    hostnames = tuple(str(h) for h in hostnames)
    host_index, host_local = _number(hostnames)
    if ranks_per_node is None:
        return NodeMap(host_index, host_local, host_local, hostnames)
    if size % ranks_per_node:
        msg = (
            f"{source}={ranks_per_node}: the group size {size} is not a multiple of it "
            f"(virtual nodes need equal numbers of consecutive ranks)"
        )
        raise ConfigError(msg) if source.startswith("EPKERN_") else ArgumentError(msg)
    nodes = tuple(r // ranks_per_node for r in range(size))
    local = tuple(r % ranks_per_node for r in range(size))
    return NodeMap(nodes, local, host_local, hostnames)


def node_map_from_entries(entries: Sequence[tuple[str, int | None, str | None]], explicit: bool = False) -> NodeMap:
    """Node map from every rank's :func:`local_entry` (the same result, or the same error, on every rank)."""
    for rank, (_, _, error) in enumerate(entries):
        if error:
            raise ConfigError(f"rank {rank}: {error}")
    settings = {rpn for _, rpn, _ in entries}
    if len(settings) > 1:
        per_rank = ", ".join(f"rank {r}: {rpn}" for r, (_, rpn, _) in enumerate(entries))
        what = "ranks_per_node" if explicit else "EPKERN_RANKS_PER_NODE"
        raise ConfigError(f"{what} differs between ranks ({per_rank}); set it the same on every rank")
    (rpn,) = settings
    return node_map([h for h, _, _ in entries], rpn, "ranks_per_node" if explicit else "EPKERN_RANKS_PER_NODE")
