"""The kernel cache runs only this user's code (issue #20, finding 5): a cache folder that another user owns or
can write is refused with an error naming EPKERN_CACHE_DIR; a cached cubin that was changed, replaced by a link
or written by someone else is compiled again; new folders are 0700. Compiles a tiny kernel to sm_90 (no GPU)."""

from __future__ import annotations

import logging
import os

import pytest

from epkern import kernel_loader
from epkern.errors import ConfigError

PROBE = 'extern "C" __global__ void epk_trust_probe(int* out) { out[0] = EPK_TRUST_PROBE; }\n'
DEFINES = {"EPK_TRUST_PROBE": 3}


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "trust_probe.cu"
    path.write_text(PROBE)
    return path


def _cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("EPKERN_CACHE_DIR", str(root))
    return root


def test_new_cache_folder_is_private(tmp_path, monkeypatch, source):
    root = _cache(tmp_path, monkeypatch)
    path = kernel_loader.cubin_path(source, DEFINES, "sm_90")
    assert path.parent == root / "cubin"
    assert (os.stat(path.parent).st_mode & 0o777) == 0o700
    assert path.with_suffix(".sha256").read_bytes().strip()


@pytest.mark.parametrize("which", ["root", "cubin"])
def test_world_writable_cache_is_refused(tmp_path, monkeypatch, source, which):
    root = _cache(tmp_path, monkeypatch)
    (root / "cubin").mkdir(parents=True)
    os.chmod(root if which == "root" else root / "cubin", 0o777)
    with pytest.raises(ConfigError, match=r"EPKERN_CACHE_DIR: refusing .* writable by other users \(mode 0777\)"):
        kernel_loader.cubin_path(source, DEFINES, "sm_90")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the folder to another user")
def test_cache_owned_by_another_user_is_refused(tmp_path, monkeypatch, source):
    root = _cache(tmp_path, monkeypatch)
    (root / "cubin").mkdir(parents=True, mode=0o700)
    os.chown(root / "cubin", 65534, 65534)
    with pytest.raises(ConfigError, match="owned by uid 65534, not by this user"):
        kernel_loader.cubin_path(source, DEFINES, "sm_90")


def test_cache_under_a_foreign_writable_folder_is_refused(tmp_path, monkeypatch, source):
    parent = tmp_path / "shared"
    parent.mkdir()
    os.chmod(parent, 0o777)  # no sticky bit: anyone may rename our folder away and put theirs in its place
    monkeypatch.setenv("EPKERN_CACHE_DIR", str(parent / "cache"))
    with pytest.raises(ConfigError, match=r"shared is writable by other users"):
        kernel_loader.cubin_path(source, DEFINES, "sm_90")


def test_symlinked_cache_folder_is_refused(tmp_path, monkeypatch, source):
    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o700)
    (tmp_path / "cache").symlink_to(real)
    monkeypatch.setenv("EPKERN_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="a symbolic link"):
        kernel_loader.cubin_path(source, DEFINES, "sm_90")


def _tamper_cases():
    def changed(path):
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))

    def swapped_for_a_link(path):
        other = path.with_name("planted.bin")
        other.write_bytes(path.read_bytes())
        path.unlink()
        path.symlink_to(other)

    def hash_missing(path):
        path.with_suffix(".sha256").unlink()

    def group_writable(path):
        os.chmod(path, 0o664)

    return [changed, swapped_for_a_link, hash_missing, group_writable]


@pytest.mark.parametrize("tamper", _tamper_cases(), ids=lambda f: f.__name__)
def test_a_tampered_cubin_is_compiled_again(tmp_path, monkeypatch, source, tamper, caplog):
    _cache(tmp_path, monkeypatch)
    path = kernel_loader.cubin_path(source, DEFINES, "sm_90")
    good = path.read_bytes()
    tamper(path)
    with caplog.at_level(logging.INFO, logger="epkern"):
        again = kernel_loader.cubin_path(source, DEFINES, "sm_90")
    assert again == path and again.read_bytes() == good and not again.is_symlink()
    text = caplog.text
    assert "ignoring cached" in text and "compiled" in text, text


def test_kernel_dir_another_user_can_change_is_refused(tmp_path, monkeypatch):
    """EPKERN_KERNEL_DIR loads GPU code: a folder (or a source in it) others can write is refused."""
    from epkern import kernel_files

    folder = tmp_path / "kernels"
    folder.mkdir()
    (folder / "x.cu").write_text("// test\n")
    monkeypatch.setenv("EPKERN_KERNEL_DIR", str(folder))
    assert kernel_files.kernel_dir() == folder
    os.chmod(folder / "x.cu", 0o666)
    with pytest.raises(ConfigError, match=r"EPKERN_KERNEL_DIR=.*refused, .*x\.cu is writable by other users"):
        kernel_files.kernel_dir()
    os.chmod(folder / "x.cu", 0o644)
    os.chmod(folder, 0o777)
    with pytest.raises(ConfigError, match=r"refused, .*kernels is writable by other users"):
        kernel_files.kernel_dir()
