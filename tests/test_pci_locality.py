"""The NIC chosen for a GPU on a fake sysfs tree (epkern.nic.pci_locality): the one sharing the deepest PCIe bridge,
the first one where sysfs says nothing."""

from __future__ import annotations

import os

from epkern.nic.pci_locality import closest_nic, distance


def _device(sysfs, chain):
    """Make /sys/devices/pci0000:XX/<chain...> and return its path."""
    path = os.path.join(sysfs, "devices", "pci" + chain[0][:7], *chain)
    os.makedirs(path, exist_ok=True)
    return path


def _link(src, dst):
    os.makedirs(os.path.dirname(src), exist_ok=True)
    os.symlink(dst, src)


def _host(tmp_path):
    """Two sockets; on each a PCIe switch with 2 GPUs and 1 NIC; mlx5_9 hangs off socket 0's root port directly."""
    sysfs = str(tmp_path)
    gpus = {
        "0000:17:00.0": ["0000:00:01.0", "0000:10:00.0", "0000:11:00.0", "0000:17:00.0"],
        "0000:18:00.0": ["0000:00:01.0", "0000:10:00.0", "0000:11:01.0", "0000:18:00.0"],
        "0000:97:00.0": ["0000:80:01.0", "0000:90:00.0", "0000:91:00.0", "0000:97:00.0"],
    }
    nics = {
        "mlx5_0": ["0000:00:01.0", "0000:10:00.0", "0000:11:02.0", "0000:1a:00.0"],
        "mlx5_1": ["0000:80:01.0", "0000:90:00.0", "0000:91:02.0", "0000:9a:00.0"],
        "mlx5_9": ["0000:00:02.0", "0000:05:00.0"],
    }
    for bus, chain in gpus.items():
        _link(os.path.join(sysfs, "bus", "pci", "devices", bus), _device(sysfs, chain))
    for name, chain in nics.items():
        _link(os.path.join(sysfs, "class", "infiniband", name, "device"), _device(sysfs, chain))
    return sysfs


def test_each_gpu_gets_the_nic_behind_its_own_switch(tmp_path):
    sysfs = _host(tmp_path)
    names = ["mlx5_9", "mlx5_1", "mlx5_0"]  # the order libibverbs happens to list them in
    assert closest_nic("0000:17:00.0", names, sysfs) == "mlx5_0"
    assert closest_nic("0000:18:00.0", names, sysfs) == "mlx5_0"
    assert closest_nic("0000:97:00.0", names, sysfs) == "mlx5_1"
    assert closest_nic("0000:97:00.0".upper(), names, sysfs) == "mlx5_1"  # bus ids as CUDA spells them


def test_without_sysfs_information_the_first_name_and_none_without_names(tmp_path):
    sysfs = _host(tmp_path)
    assert closest_nic("0000:ff:00.0", ["mlx5_1", "mlx5_0"], sysfs) == "mlx5_1"  # unknown GPU
    assert closest_nic("0000:17:00.0", ["rxe0", "mlx5_1"], sysfs) == "mlx5_1"  # rxe0 has no PCI device
    assert closest_nic("0000:17:00.0", ["rxe0"], sysfs) == "rxe0"
    assert closest_nic("0000:17:00.0", [], sysfs) is None
    assert closest_nic("0000:17:00.0", ["mlx5_0"], str(tmp_path / "nowhere")) == "mlx5_0"


def test_distance_counts_hops_to_the_deepest_common_bridge():
    assert distance(["a", "b", "c"], ["a", "b", "d"]) == 2
    assert distance(["a", "b"], ["a", "b"]) == 0
    assert distance(["a"], ["x", "y"]) == 3


def test_a_rank_opens_the_nic_closest_to_its_gpu(tmp_path, monkeypatch):
    """gpu/ll/routes.real_nic: the device name handed to Mlx5Nic is the one closest to the rank's GPU."""
    from epkern import _verbs_cffi
    from epkern.gpu.ll import routes
    from epkern.nic import mlx5, pci_locality

    sysfs = _host(tmp_path)
    opened = []
    monkeypatch.setattr(_verbs_cffi, "device_list", lambda: ["mlx5_9", "mlx5_0", "mlx5_1"])
    monkeypatch.setattr(pci_locality, "gpu_bus_id", lambda d: {0: "0000:17:00.0", 1: "0000:97:00.0"}[d])
    real_closest = pci_locality.closest_nic
    monkeypatch.setattr(pci_locality, "closest_nic", lambda bus, names: real_closest(bus, names, sysfs))
    monkeypatch.setattr(mlx5, "Mlx5Nic", lambda device_name, name: opened.append((device_name, name)) or name)
    assert routes.real_nic(3, 0)() == "rank3" and routes.real_nic(5, 1)() == "rank5"
    assert opened == [("mlx5_0", "rank3"), ("mlx5_1", "rank5")]
