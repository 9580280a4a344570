"""Whether a file or folder could be changed by another user: epkern loads kernels (code that runs on the GPU)
only from places that this user, or root, alone can change."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def ownership_problem(st: os.stat_result, allow_root: bool) -> str | None:
    """Why a file or folder with this stat could be changed by another user (None when it cannot). ``allow_root``:
    root may own it too, and a folder writable by all is fine with the sticky bit (as /tmp)."""
    me = os.geteuid()
    if st.st_uid != me and not (allow_root and st.st_uid == 0):
        return f"owned by uid {st.st_uid}, not by this user (uid {me})"
    if st.st_mode & 0o022 and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and allow_root):
        return f"writable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def folder_problem(folder: Path, own: int = 1) -> str | None:
    """Why ``folder`` (and the folders above it) could be changed by another user: the first ``own`` levels
    (``folder`` itself, ...) must be this user's and not links; those above may also be root's."""
    chain = [folder, *folder.parents][:own] + list(folder.resolve().parents)
    for i, path in enumerate(chain):
        st = os.lstat(path) if i < own else os.stat(path)
        if i < own and stat.S_ISLNK(st.st_mode):
            return f"{path} is a symbolic link"
        problem = ownership_problem(st, allow_root=i >= own)
        if problem:
            return f"{path} is {problem}"
    return None
