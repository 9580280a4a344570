"""Which RDMA NIC serves which GPU: the one closest on the PCIe tree (as NCCL and DeepEP deployments pair them).

On an 8-GPU, 8-NIC host each GPU shares a PCIe switch with one NIC; traffic through any other crosses the CPU's root
complex (or the inter-socket link) and loses bandwidth. Both devices' sysfs paths (``/sys/bus/pci/devices/<bus id>``
and ``/sys/class/infiniband/<name>/device``, links into ``/sys/devices/pci.../``) list the bridges above them; the
distance is the number of hops to their deepest common bridge. Ties go to the first name in order. Without sysfs
information (a container without /sys, an unknown bus id) the first device is taken, as before this module.
Written and tested against fake sysfs trees (tests/test_pci_locality.py); never run on a host with NICs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


def _pci_chain(path: str) -> list[str] | None:
    """The PCI addresses from the root down to the device whose sysfs link is ``path`` (None if it does not exist)."""
    try:
        real = os.path.realpath(path, strict=True)
    except OSError:
        return None
    parts = [p for p in real.split(os.sep) if p]
    chain = [p.lower() for p in parts if p.count(":") == 2 and "." in p]  # dddd:bb:dd.f entries
    return chain or None


def distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Hops between two devices on the PCIe tree, from their chains of PCI addresses (root first)."""
    common = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        common += 1
    return (len(a) - common) + (len(b) - common)


def closest_nic(gpu_bus_id: str, nic_names: Sequence[str], sysfs: str = "/sys") -> str | None:
    """The name in ``nic_names`` closest to the GPU at PCI ``gpu_bus_id`` (e.g. ``"0000:17:00.0"``); the first
    name where the tree cannot be read; None when there is no name."""
    names = list(nic_names)
    if not names:
        return None
    gpu = _pci_chain(os.path.join(sysfs, "bus", "pci", "devices", gpu_bus_id.lower()))
    if gpu is None:
        return names[0]
    best, best_d = names[0], None
    for name in names:
        chain = _pci_chain(os.path.join(sysfs, "class", "infiniband", name, "device"))
        if chain is None:
            continue
        d = distance(gpu, chain)
        if best_d is None or d < best_d:
            best, best_d = name, d
    return best


def gpu_bus_id(device: int) -> str:
    """The PCI bus id of CUDA device ``device`` (``"0000:17:00.0"``)."""
    import cupy

    return str(cupy.cuda.Device(device).pci_bus_id).lower()
