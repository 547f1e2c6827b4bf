"""What the run directory and its entries can be: a file, a lock of the wrong kind or content, a metrics
file that is a folder, a resume path that is not a checkpoint, a full disk."""

from __future__ import annotations

import json
import os
import signal
import socket

from harness import (
    Outcome,
    area,
    refused,
    step_dir,
    subprocess_run,
    succeeded,
    tiny_config,
    train,
    train_command,
    trained_run,
)

case = area("run_dir", "the run directory and its entries")


def start(config, run, *extra):
    return train(["--config", str(config), "--run-dir", str(run), *extra])


@case("run-dir-is-a-file")
def _(tmp):
    config = tiny_config(tmp)
    (tmp / "run").write_text("not a folder")
    return refused(start(config, tmp / "run"), str(tmp / "run"))


@case("run-dir-under-a-file")
def _(tmp):
    config = tiny_config(tmp)
    (tmp / "file").write_text("")
    return refused(start(config, tmp / "file" / "run"), "file")


@case("lock-is-a-directory")
def _(tmp):
    config = tiny_config(tmp)
    (tmp / "run" / ".lock").mkdir(parents=True)
    return refused(start(config, tmp / "run"), ".lock", "folder")


@case("lock-is-a-fifo")
def _(tmp):
    config = tiny_config(tmp)
    (tmp / "run").mkdir()
    os.mkfifo(tmp / "run" / ".lock")
    return refused(start(config, tmp / "run"), ".lock")


def lock_with(tmp, holder) -> tuple:
    config = tiny_config(tmp)
    (tmp / "run").mkdir()
    (tmp / "run" / ".lock").write_text(holder if isinstance(holder, str) else json.dumps(holder))
    return config, tmp / "run"


@case("lock-pid-1e20")
def _(tmp):
    config, run = lock_with(tmp, {"pid": 10**20, "host": socket.gethostname(), "since": "2026-01-01T00:00:00+00:00"})
    r = start(config, run)
    return succeeded(r) if r.code == 0 else refused(r, ".lock")


@case("lock-garbage")
def _(tmp):
    config, run = lock_with(tmp, "\x00\xffnot json")
    r = start(config, run)
    return succeeded(r) if r.code == 0 else refused(r, ".lock")


@case("lock-of-a-live-process")
def _(tmp):
    config, run = lock_with(tmp, {"pid": os.getpid(), "host": socket.gethostname(), "since": "2026-01-01T00:00:00+00:00"})
    return refused(start(config, run), "in use")


@case("metrics-csv-is-a-directory")
def _(tmp):
    config, run = trained_run(tmp)
    (run / "metrics.csv").unlink()
    (run / "metrics.csv").mkdir()
    return refused(start(config, run, "--max-steps", "6"), "metrics.csv")


@case("metrics-csv-garbled")
def _(tmp):
    config, run = trained_run(tmp)
    with open(run / "metrics.csv", "a") as fh:
        fh.write("\x00\x01,garbage,\n")
    return refused(start(config, run, "--max-steps", "6"), "metrics.csv")


@case("config-yaml-is-a-directory")
def _(tmp):
    config, run = trained_run(tmp)
    (run / "config.yaml").unlink()
    (run / "config.yaml").mkdir()
    return refused(start(config, run, "--max-steps", "6"), "config.yaml")


@case("resume-path-missing")
def _(tmp):
    config = tiny_config(tmp)
    return refused(start(config, tmp / "run", "--resume", str(tmp / "nowhere")), "--resume")


@case("resume-path-is-a-plain-file")
def _(tmp):
    config = tiny_config(tmp)
    (tmp / "notes.txt").write_text("hello")
    return refused(start(config, tmp / "run", "--resume", str(tmp / "notes.txt")), "notes.txt")


@case("resume-an-empty-folder")
def _(tmp):
    config = tiny_config(tmp)
    (tmp / "empty").mkdir()
    return refused(start(config, tmp / "run", "--resume", str(tmp / "empty")), "empty")


@case("resume-a-pruned-step")
def _(tmp):
    config, run = trained_run(tmp)
    s = step_dir(run, 2)
    for f in s.iterdir():
        if f.is_file():
            f.unlink()
    (s / "PRUNED").write_text("")
    return refused(start(config, run, "--resume", str(s), "--max-steps", "6"), "pruned")


@case("resume-value-gibberish")
def _(tmp):
    config = tiny_config(tmp)
    return refused(start(config, tmp / "run", "--resume", "sometimes"), "--resume")


@case("disk-full-at-a-checkpoint")
def _(tmp):
    """A file-size limit makes every write past 64 KiB fail (EFBIG), as a full disk does: the run stops
    with one line naming the file, and the checkpoint saved before stays intact."""
    config, run = trained_run(tmp)

    cmd = ["bash", "-c", 'trap "" XFSZ; ulimit -f 64; exec "$@"', "--", *train_command(),
           "--config", str(config), "--run-dir", str(run), "--max-steps", "6"]  # fmt: skip
    r = subprocess_run(cmd)
    out = refused(r, "step_6" if "step_6" in r.text else "No space", )
    if out.kind not in ("clean", "unnamed"):
        return out
    if "File too large" not in r.text and "space" not in r.text.lower():
        return Outcome("unnamed", f"the write error is not named: {r.last_line[:300]}")
    import picomaml as pm

    try:
        kept = pm.load_checkpoint(run / "checkpoints").step
    except Exception as exc:  # noqa: BLE001
        return Outcome("lost", f"no checkpoint loads afterwards: {exc}")
    return Outcome("clean", r.last_line[:200]) if kept >= 4 else Outcome("lost", f"newest checkpoint is step {kept}")


@case("sigkill-then-resume")
def _(tmp):
    """kill -9 mid-run: the lock is stale, the next start takes it over and resumes from the newest save."""
    import subprocess
    import time

    config = tiny_config(tmp, trainer={"max_steps": 10_000, "save_every": 3})
    run = tmp / "run"
    proc = subprocess.Popen([*train_command(), "--config", str(config), "--run-dir", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (run / "checkpoints" / "latest").exists():
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    import picomaml as pm

    saved = pm.load_checkpoint(run / "checkpoints").step
    r = start(config, run, "--max-steps", str(saved + 3))

    def check():
        steps = [row.split(",")[0] for row in (run / "metrics.csv").read_text().splitlines()[1:]]
        if steps[-1] != str(saved + 3):
            return f"last metrics step {steps[-1]}, expected {saved + 3}"
        return None if len(steps) == len(set(steps)) else "duplicate metrics rows after the resume"

    return succeeded(r, check)
