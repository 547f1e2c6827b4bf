"""RunLock with real processes: one holder at a time, the holder named, stale locks taken over, released on
every exit path."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from picomaml.train.run_lock import LOCK_FILE, RunDirError, RunLock, RunLockedError, read_lock

# a holder process: takes the lock, says so, then waits for stdin to close (or a signal)
HOLDER = """
import sys, time
from picomaml.train.run_lock import RunLock
with RunLock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def start_holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    return proc


def test_second_process_is_refused_with_the_holder_named(tmp_path):
    proc = start_holder(tmp_path / "run")
    try:
        with pytest.raises(RunLockedError) as info:
            RunLock(tmp_path / "run").acquire()
        message = str(info.value)
        assert f"pid {proc.pid}" in message and socket.gethostname() in message and "since 20" in message
        assert info.value.holder["pid"] == proc.pid
        assert read_lock(tmp_path / "run" / LOCK_FILE)["pid"] == proc.pid  # the holder's lock is untouched
    finally:
        proc.communicate("")  # the holder ends normally
    assert proc.returncode == 0
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released on a normal end
    with RunLock(tmp_path / "run") as lock:
        assert lock.held


def test_stale_lock_of_a_killed_process_is_reported_and_taken_over(tmp_path, caplog):
    proc = start_holder(tmp_path / "run")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert read_lock(tmp_path / "run" / LOCK_FILE)["pid"] == proc.pid  # kill -9 leaves the lock behind
    with caplog.at_level(logging.WARNING, logger="picomaml.train.run_lock"):
        lock = RunLock(tmp_path / "run").acquire()
    assert f"pid {proc.pid}" in caplog.text and "no longer runs" in caplog.text
    assert read_lock(lock.path)["pid"] == os.getpid()
    lock.release()
    assert not lock.path.exists()


def test_released_on_exception_and_on_ctrl_c(tmp_path):
    with pytest.raises(ZeroDivisionError), RunLock(tmp_path / "a"):
        1 / 0  # noqa: B018
    assert not (tmp_path / "a" / LOCK_FILE).exists()
    proc = start_holder(tmp_path / "b")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert not (tmp_path / "b" / LOCK_FILE).exists()


def write_lock(run_dir: Path, **holder) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    path.write_text(json.dumps(holder))
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    path = write_lock(tmp_path, pid=dead_pid(), host="elsewhere.example", since="2025-01-01T00:00:00+00:00")
    with pytest.raises(RunLockedError, match="on host .elsewhere.example..*another host or container"):
        RunLock(tmp_path).acquire()
    assert read_lock(path)["host"] == "elsewhere.example"


@pytest.mark.skipif(not Path("/proc/self/ns/pid").exists(), reason="pid namespaces come from /proc")
def test_a_lock_from_another_container_on_this_host_is_never_taken_over(tmp_path):
    host = socket.gethostname()
    path = write_lock(tmp_path, pid=dead_pid(), host=host, pid_ns="pid:[1]", since="2025-01-01T00:00:00+00:00")
    with pytest.raises(RunLockedError, match="another host or container"):
        RunLock(tmp_path).acquire()
    assert read_lock(path)["pid_ns"] == "pid:[1]"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process start times come from /proc")
def test_a_reused_pid_is_stale(tmp_path, caplog):
    # the pid is alive (the test's parent), but it started at another time than the lock records
    write_lock(tmp_path, pid=os.getppid(), host=socket.gethostname(), pid_start="1", since="2025-01-01")
    with caplog.at_level(logging.WARNING, logger="picomaml.train.run_lock"), RunLock(tmp_path) as lock:
        assert lock.held
    assert "now belongs to another process" in caplog.text


def test_unreadable_lock_is_not_taken_over(tmp_path):
    path = write_lock(tmp_path)
    path.write_bytes(b"\xff\x00garbage")
    old = time.time() - 60
    os.utime(path, (old, old))
    with pytest.raises(RunLockedError, match="names no holder.*delete"):
        RunLock(tmp_path).acquire()
    assert path.read_bytes() == b"\xff\x00garbage"


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    lock = RunLock(tmp_path).acquire()
    lock.path.write_text(json.dumps({"pid": 1, "host": "other", "token": "theirs"}))
    lock.release()
    assert lock.path.exists() and not lock.held
    lock.release()  # twice: still a no-op


RACER = """
import sys, time
from picomaml.train.run_lock import RunLock, RunLockedError
start = float(sys.argv[2])
while time.time() < start:
    pass
try:
    RunLock(sys.argv[1]).acquire()  # kept until the process ends
    print("won", flush=True)
    sys.stdin.read()
except RunLockedError:
    print("refused", flush=True)
"""


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_racing_starters_admit_exactly_one(tmp_path, stale):
    """Battery: 4 processes start at the same instant on a free (or stale-locked) directory, 3 rounds."""
    results = []
    for round_ in range(3):
        run_dir = tmp_path / f"round{round_}"
        if stale:
            write_lock(run_dir, pid=dead_pid(), host=socket.gethostname(), since="2025-01-01")
        start = time.time() + 1.0
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", RACER, str(run_dir), str(start)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            for _ in range(4)
        ]
        outcomes = [p.stdout.readline().strip() for p in procs]
        winners = [p.pid for p, o in zip(procs, outcomes, strict=True) if o == "won"]
        holder = read_lock(run_dir / LOCK_FILE)
        for p in procs:
            p.communicate("")
        results.append(outcomes)
        assert sorted(outcomes) == ["refused"] * 3 + ["won"] and holder["pid"] == winners[0], outcomes
    assert len(results) == 3


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["folder", "fifo", "link"])
def test_a_lock_that_is_no_file_is_refused_and_left_alone(tmp_path, kind):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / LOCK_FILE
    if kind == "folder":
        lock.mkdir()
    elif kind == "fifo":
        os.mkfifo(lock)  # reading it would block forever
    else:
        lock.symlink_to(tmp_path / "elsewhere")
    expected = {"folder": "a folder", "fifo": "a FIFO, device or socket", "link": "a symbolic link"}[kind]
    with pytest.raises(RunDirError, match=f"{LOCK_FILE} is {expected}, not a lock file.*move it away"):
        RunLock(run_dir).acquire()
    assert os.path.lexists(lock) and not (tmp_path / "elsewhere").exists()


def test_a_pid_no_process_can_have_names_no_holder(tmp_path):
    write_lock(tmp_path, pid=10**20, host=socket.gethostname())
    assert read_lock(tmp_path / LOCK_FILE) is None  # os.kill(10**20, 0) would raise OverflowError
    with pytest.raises(RunLockedError, match="names no holder"):
        RunLock(tmp_path).acquire()
