"""Crash-safe file writing for checkpoints: fsync files and directories, delete by rename-then-remove.

A rename within one file system is atomic, and data reaches the disk only once the file *and* its
directory entry are fsynced; these helpers are what :mod:`picomaml.checkpoint` builds its guarantees on.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["fsync_dir", "fsync_tree", "write_bytes", "write_text", "pid_alive", "rmtree_atomic"]


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (new names, renames) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file and directory under ``path`` (for writers that do not fsync themselves)."""
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        elif p.is_dir():
            fsync_dir(p)
    fsync_dir(path)


def write_bytes(path: Path, write: Callable[[Any], None], fsync: bool) -> None:
    """Create ``path``, let ``write(file)`` fill it, flush, and fsync it when ``fsync``."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def write_text(path: Path, text: str, fsync: bool) -> None:
    """:func:`write_bytes` of UTF-8 text."""
    write_bytes(path, lambda f: f.write(text.encode("utf-8")), fsync)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` may still run (unknown counts as alive, so its files are left alone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but not ours, or unknown: leave it alone
    return True


def rmtree_atomic(path: Path) -> None:
    """Rename out of the way first, so a crash mid-delete never leaves a half-deleted step directory."""
    trash = path.with_name(f".tmp_delete_{path.name}_{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
