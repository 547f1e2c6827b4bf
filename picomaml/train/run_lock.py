"""One writer per run directory: a lock file that names its holder, with stale locks of dead processes
detected and taken over.

``RUN/.lock`` is created with ``O_CREAT | O_EXCL`` (atomic on local file systems and NFSv3+: exactly one
process creates it) and holds JSON: the holder's pid, host, start time and a random token. A second
trainer finds the file and stops with a message naming the holder. A lock whose holder ran on this host
and no longer runs (or whose pid now belongs to a younger process) is stale: it is reported and taken
over. A lock held on another host (or in another pid namespace, i.e. container) is never taken over:
this process cannot tell whether its holder runs.

Why not [`filelock`](https://py-filelock.readthedocs.io) (installed with torch): its lock is a kernel
lock (`flock`) on an empty file. That lock cannot say who holds it, which is what the refusal message
needs ("locked by pid 4121 on node07 since 12:03"), and on the network file systems where cluster run
directories live (NFS, Lustre) `flock` is, depending on the mount, local to one client or unsupported, so
two trainers on two nodes would both "hold" it. An `O_EXCL` create is atomic there. What filelock gives
for free, release when the holder dies, is covered by the stale check on the same host.

Examples:
    ```python
    with RunLock("runs/a"):
        train()  # released on return, exception or Ctrl-C
    ```
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from picomaml.params import short_repr
from picomaml.train._atomic_io import entry_kind, fsync_dir, pid_alive

__all__ = ["LOCK_FILE", "RunDirError", "RunLockedError", "RunLock", "read_lock"]

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
# a lock file younger than this with no readable content is still being written by its creator
_WRITE_GRACE_S = 5.0


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (in use, nothing to resume, ...); the message says why
    and what to do."""


class RunLockedError(RunDirError):
    """Another process holds the run directory's lock.

    Attributes:
        holder: The lock file's contents (``pid``, ``host``, ``since``, ...), empty when unreadable.
    """

    def __init__(self, message: str, holder: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.holder = dict(holder or {})

    def __reduce__(self) -> tuple[Any, ...]:  # picklable for a broadcast to the other ranks
        return (type(self), (str(self), self.holder))


def _proc_stat(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` after the command name: ``[state, ppid, ...]`` (Linux; ``None`` elsewhere)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _process_start(pid: int) -> str | None:
    """A token that changes when ``pid`` is reused: its start time in clock ticks since boot (Linux)."""
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None  # field 22 of proc(5)


def _pid_namespace() -> str | None:
    """This process's pid namespace (Linux): containers on one host can share a host name, not pids."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def read_lock(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The holder recorded in a lock file, or ``None`` when it is missing, empty or not a lock's JSON."""
    text = _read_text(Path(path))
    try:
        holder = json.loads(text) if text is not None else None
    except ValueError:
        return None
    if not isinstance(holder, dict) or not isinstance(holder.get("host"), str):
        return None
    pid = holder.get("pid")
    # a pid beyond any OS's range (10**20) names no process: os.kill would raise OverflowError
    return holder if isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < 2**31 else None


def _stale_reason(holder: dict[str, Any]) -> str | None:
    """Why a lock's holder is gone, or ``None`` when it may still run."""
    if holder["host"] != socket.gethostname() or holder.get("pid_ns", _pid_namespace()) != _pid_namespace():
        return None  # its pids are not ours to check
    pid = holder["pid"]
    fields = _proc_stat(pid)
    if not pid_alive(pid) or (fields is not None and fields[0] in ("Z", "X")):
        return f"process {pid} no longer runs"
    started = holder.get("pid_start")
    if started is not None and _process_start(pid) not in (None, started):
        return f"pid {pid} now belongs to another process"
    return None


@contextlib.contextmanager
def _guard(directory: Path) -> Iterator[None]:
    """Serialise stale-lock take-overs on this host (``flock`` on the directory; released if we die)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the O_EXCL create still admits one winner
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _describe(holder: dict[str, Any]) -> str:
    since = " ".join(str(holder.get("since", "an unknown time")).split())[:40]
    return f"pid {holder['pid']} on host {short_repr(holder['host'])}, since {since}"


class RunLock:
    """The lock of one run directory (``RUN/.lock``); a context manager.

    Args:
        run_dir: The run directory (created when missing).
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._token: str | None = None
        self._pid: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock (in this process)."""
        return self._token is not None and self._pid == os.getpid()

    def acquire(self) -> RunLock:
        """Take the lock, taking over a stale one.

        Raises:
            RunLockedError: A live process (or one this host cannot check) holds it.
        """
        if self.held:
            return self
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"--run-dir {self.run_dir}: cannot be created ({exc.strerror or exc})") from None
        for _ in range(200):  # a race with another starter ends in a few rounds; a lock being written, in 5 s
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._check_holder()
                continue
            self._write(fd)
            return self
        raise RunLockedError(f"{self.path}: could not take the lock (other processes keep taking it)")

    def _write(self, fd: int) -> None:
        token = secrets.token_hex(8)
        now = _dt.datetime.now(_dt.timezone.utc)
        holder = {
            "pid": os.getpid(), "host": socket.gethostname(), "since": now.isoformat(timespec="seconds"),
            "unix_time": now.timestamp(), "pid_start": _process_start(os.getpid()), "pid_ns": _pid_namespace(),
            "token": token,
        }  # fmt: skip
        try:
            os.write(fd, json.dumps(holder, indent=1).encode("utf-8"))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(fd)
        fsync_dir(self.run_dir)
        self._token, self._pid = token, os.getpid()

    def _check_holder(self) -> None:
        """The lock exists: raise naming its holder, or remove it when stale (the caller retries)."""
        found = entry_kind(self.path)
        if found == "missing":
            return  # removed meanwhile: try again
        if found != "file":  # never read (a FIFO blocks) nor removed (a folder, a link elsewhere)
            kind = {"dir": "a folder", "link": "a symbolic link"}.get(found, "a FIFO, device or socket")
            raise RunDirError(
                f"{self.path} is {kind}, not a lock file, so this trainer cannot lock {self.run_dir}; move it away "
                "(a lock is a small JSON file that a trainer writes and removes)"
            )
        text = _read_text(self.path)
        holder = read_lock(self.path)
        if holder is None:
            if text is None:
                return  # removed meanwhile: try again
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return
            if age < _WRITE_GRACE_S:
                time.sleep(0.05)  # its creator is writing it
                return
            raise RunLockedError(
                f"{self.run_dir} is locked by {self.path}, which names no holder (unreadable); if no trainer "
                f"uses this directory, delete {self.path}"
            )
        reason = _stale_reason(holder)
        if reason is None:
            mine = holder["host"] == socket.gethostname() and holder.get("pid_ns", _pid_namespace()) == _pid_namespace()
            where = "" if mine else " (another host or container: this one cannot check it)"
            raise RunLockedError(
                f"{self.run_dir} is in use by another trainer: {_describe(holder)}{where}; wait for it to end or "
                f"use another --run-dir (if it no longer runs, delete {self.path})",
                holder,
            )
        with _guard(self.run_dir):
            if _read_text(self.path) == text:  # nobody took it over meanwhile
                log.warning("taking over the stale lock %s of %s: %s", self.path, _describe(holder), reason)
                self.path.unlink()

    def release(self) -> None:
        """Remove the lock if this object holds it (a no-op otherwise, and when called twice)."""
        if not self.held:
            return
        holder = read_lock(self.path)
        if holder is not None and holder.get("token") == self._token:
            self.path.unlink(missing_ok=True)
        else:
            log.warning("%s no longer holds this process's token; left as it is", self.path)
        self._token = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _read_text(path: Path, limit: int = 4096) -> str | None:
    """The start of a lock file (a lock is a few hundred bytes: a huge file is not read whole)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return None
