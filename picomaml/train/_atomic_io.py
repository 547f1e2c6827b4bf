"""Crash-safe file operations for checkpoints: hashed writes, fsync, rename, remove.

A rename within one file system is atomic, and data reaches the disk only once the file *and* its
directory entry are fsynced; [`picomaml.train.checkpoint`][picomaml.train.checkpoint] builds its guarantees on
these helpers.

Every operation that changes the file system during a save goes through one function here
(`make_dir`, `create_file`, `write_out`, `fsync_fd`, `rename`,
`replace`, `remove_file`, `remove_dir`), so a test can make the N-th of them fail
or "crash" and check what a real crash at that point would leave behind.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "HashingWriter",
    "create_file",
    "describe_os_error",
    "entry_kind",
    "fsync_dir",
    "fsync_fd",
    "fsync_tree",
    "hash_file",
    "make_dir",
    "pid_alive",
    "remove_dir",
    "remove_file",
    "remove_tree",
    "remove_tree_quietly",
    "rename",
    "replace",
    "rmtree_atomic",
    "write_bytes",
    "write_out",
    "write_text",
]

_CHUNK = 1 << 20
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


# ----------------------------------------------------------------------------------------------
# the operations a save performs (one function each, so tests can interpose)
# ----------------------------------------------------------------------------------------------


def make_dir(path: Path) -> None:
    """Create one directory (its parent must exist)."""
    os.mkdir(path)


def create_file(path: Path) -> BinaryIO:
    """Open a new file for unbuffered binary writing (every ``write`` goes straight to the OS)."""
    return open(path, "wb", buffering=0)  # noqa: SIM115 - the caller closes it


def fsync_fd(fd: int) -> None:
    """Flush one open file (or directory) descriptor to disk."""
    os.fsync(fd)


def rename(src: Path, dst: Path) -> None:
    """Atomic rename within one file system (``dst`` must not be a non-empty directory)."""
    os.rename(src, dst)


def replace(src: Path, dst: Path) -> None:
    """Atomic rename that replaces an existing file ``dst``."""
    os.replace(src, dst)


def remove_file(path: Path) -> None:
    """Delete one file or symbolic link."""
    os.unlink(path)


def remove_dir(path: Path) -> None:
    """Delete one empty directory."""
    os.rmdir(path)


def write_out(file: BinaryIO, data: memoryview) -> None:
    """Hand all of ``data`` to the operating system (a raw write may take only part of it)."""
    done = 0
    while done < len(data):
        done += file.write(data[done:]) or 0


class HashingWriter:
    """A write-only, buffered file wrapper that computes the SHA-256 of every byte written through it.

    ``torch.save`` and text writers see an object with ``write`` and ``flush``. Small writes (torch
    writes a header per record) are gathered into 1 MiB before they go to the operating system; large
    ones go straight through. The digest is of the bytes handed to the operating system, so a later
    change on disk is detectable. An ``OSError`` from the file is remembered in `error`, because
    ``torch.save`` replaces it by its own message.

    Args:
        file: An unbuffered binary file from `create_file`.
    """

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._sha = hashlib.sha256()
        self._buffer = bytearray()
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        """Write all of ``data`` (a bytes-like object); returns its length."""
        view = memoryview(data).cast("B")
        self._sha.update(view)
        if len(self._buffer) + len(view) > _CHUNK:
            self.flush()
        if len(view) >= _CHUNK:
            self._out(view)
        else:
            self._buffer += view
        return len(view)

    def flush(self) -> None:
        """Hand the gathered small writes to the operating system."""
        if self._buffer:
            self._out(memoryview(self._buffer))
            self._buffer = bytearray()

    def hexdigest(self) -> str:
        """The SHA-256 of everything written so far, in hex."""
        return self._sha.hexdigest()

    def _out(self, view: memoryview) -> None:
        try:
            write_out(self._file, view)
        except OSError as exc:
            self.error = exc
            raise


# ----------------------------------------------------------------------------------------------
# built from the operations above
# ----------------------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (new names, renames) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        fsync_fd(fd)
    except OSError:
        pass  # e.g. EINVAL on file systems that do not support fsync on directories
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file and directory under ``path`` (for writers that do not fsync themselves)."""
    for p in sorted(path.rglob("*")):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as f:
                fsync_fd(f.fileno())
        elif p.is_dir():
            fsync_dir(p)
    fsync_dir(path)


def write_bytes(path: Path, write: Callable[[Any], None], fsync: bool) -> str:
    """Create ``path``, let ``write(file)`` fill it, fsync it when ``fsync``; return its SHA-256 (hex).

    Raises:
        OSError: Writing failed (disk full, I/O error, ...): the file system's error, with ``path`` as
            its ``filename`` even when ``write`` (``torch.save``) replaced it by an error of its own.
    """
    writer: HashingWriter | None = None
    try:
        with create_file(path) as f:
            writer = HashingWriter(f)
            write(writer)
            writer.flush()
            if fsync:
                fsync_fd(f.fileno())
    except Exception as exc:
        cause = writer.error if writer is not None and writer.error is not None else _os_error_in(exc)
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from exc
    return writer.hexdigest()


def write_text(path: Path, text: str, fsync: bool) -> str:
    """`write_bytes` of UTF-8 text; returns its SHA-256 (hex)."""
    return write_bytes(path, lambda f: f.write(text.encode("utf-8")), fsync)


def hash_file(path: Path) -> str:
    """SHA-256 (hex) of a file's contents, read in 1 MiB chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def remove_tree(path: Path) -> None:
    """Delete ``path`` and everything below it, one file at a time (a missing ``path`` is fine)."""
    if path.is_symlink() or path.is_file():
        remove_file(path)
        return
    if not path.exists():
        return
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        for name in filenames:
            remove_file(Path(dirpath, name))
        for name in dirnames:
            sub = Path(dirpath, name)
            (remove_file if sub.is_symlink() else remove_dir)(sub)
    remove_dir(path)


def remove_tree_quietly(path: Path) -> bool:
    """`remove_tree`, ignoring ``OSError`` (cleanup must not hide the error being handled).

    Returns:
        Whether ``path`` is gone.
    """
    try:
        remove_tree(path)
    except OSError:
        return False
    return True


def rmtree_atomic(path: Path, prefix: str = ".tmp_prune_") -> None:
    """Rename ``path`` to ``<prefix><name>_<pid>`` first, so a crash mid-delete never leaves a
    half-deleted directory under its real name; then delete it (best effort)."""
    trash = path.with_name(f"{prefix}{path.name}_{os.getpid()}")
    rename(path, trash)
    remove_tree_quietly(trash)


def entry_kind(path: Path) -> str:
    """What ``path`` itself is, links not followed: ``"missing"``, ``"link"``, ``"dir"``, ``"file"`` (regular)
    or ``"special"`` (a FIFO, device or socket: a read blocks or never ends).

    Raises:
        OSError: ``lstat`` fails for another reason than a missing entry (permissions, I/O).
        ValueError: ``path`` holds a NUL byte.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "missing"
    if stat.S_ISLNK(mode):
        return "link"
    if stat.S_ISDIR(mode):
        return "dir"
    return "file" if stat.S_ISREG(mode) else "special"


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` may still run (unknown counts as alive, so its files are left alone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but not ours, or unknown: leave it alone
    return True


def describe_os_error(exc: OSError) -> str:
    """A short reason for an ``OSError``: "disk full (no space left on device)" for ENOSPC/EDQUOT."""
    if exc.errno in _DISK_FULL:
        return "disk full (no space left on device)"
    return exc.strerror or str(exc) or type(exc).__name__


def _os_error_in(exc: BaseException) -> OSError | None:
    """``exc`` itself or the first ``OSError`` it was raised from or while handling."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None
