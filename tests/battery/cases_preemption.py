"""Signals a cluster sends (SIGTERM, SIGUSR1), Ctrl-C, and signals during an evaluation or a save: the
current step finishes, is saved, the lock is released, and the exit status says so; nothing trained is
lost."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from harness import Outcome, _s, area, tiny_config, train_command

case = area("preemption", "SIGTERM, SIGUSR1, Ctrl-C while training, evaluating and saving")


def launch(tmp: Path, **sections) -> tuple[subprocess.Popen, Path]:
    sections.setdefault("trainer", {})
    sections["trainer"] = {"max_steps": 100_000, "save_every": 100_000, "log_every": 1, **sections["trainer"]}
    config = tiny_config(tmp, **sections)
    run = tmp / "run"
    cmd = [*train_command(), "--config", str(config), "--run-dir", str(run)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE), run


def logged_steps(run: Path) -> list[int]:
    try:
        lines = (run / "metrics.csv").read_text().splitlines()[1:]
    except OSError:
        return []
    return [int(line.split(",")[0]) for line in lines if line.split(",")[0].isdigit()]


def wait_for(pred, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def stopped(proc: subprocess.Popen, run: Path, sig: signal.Signals, *, within: float, codes=(75,), again: bool = False) -> Outcome:
    """Send ``sig`` (twice with ``again``), then judge: exit in ``within`` s with one of ``codes``, no
    traceback, a checkpoint of the last logged step, the lock gone, no temporary folder left."""
    try:
        t0 = time.monotonic()
        proc.send_signal(sig)
        if again:
            time.sleep(0.2)
            proc.send_signal(sig)
        try:
            out, err = proc.communicate(timeout=within)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            return Outcome("hang", f"still running {within:.0f} s after {sig.name}")
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = _s(out), _s(err)
    if "Traceback (most recent call last)" in err:
        return Outcome("traceback", " | ".join(err.strip().splitlines()[-3:])[-500:])
    if proc.returncode not in codes:
        return Outcome("lost" if proc.returncode < 0 else "unnamed", f"exit {proc.returncode} after {sig.name}: {err.strip()[-300:]}")
    import picomaml as pm

    steps = logged_steps(run)
    try:
        saved = pm.load_checkpoint(run / "checkpoints").step
    except Exception as exc:  # noqa: BLE001
        return Outcome("lost", f"nothing saved at {sig.name}: {exc}")
    if steps and saved < steps[-1]:
        return Outcome("lost", f"saved step {saved}, but step {steps[-1]} was trained")
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    if (run / ".lock").exists() or leftovers:
        return Outcome("silent", f"left behind: {'.lock ' if (run / '.lock').exists() else ''}{leftovers}")
    return Outcome("clean", f"exit {proc.returncode} in {took:.1f} s, saved step {saved}")


def training_started(proc, run, steps: int = 2):
    return wait_for(lambda: proc.poll() is not None or len(logged_steps(run)) >= steps, 240)


@case("sigterm-while-training")
def _(tmp):
    proc, run = launch(tmp)
    training_started(proc, run)
    return stopped(proc, run, signal.SIGTERM, within=60)


@case("sigusr1-while-training")
def _(tmp):
    proc, run = launch(tmp)
    training_started(proc, run)
    return stopped(proc, run, signal.SIGUSR1, within=60)


@case("ctrl-c-while-training")
def _(tmp):
    proc, run = launch(tmp)
    training_started(proc, run)
    return stopped(proc, run, signal.SIGINT, within=60, codes=(0, 130))


@case("two-sigterms-in-a-row")
def _(tmp):
    proc, run = launch(tmp)
    training_started(proc, run)
    return stopped(proc, run, signal.SIGTERM, within=60, again=True)


@case("sigterm-during-a-long-evaluation")
def _(tmp):
    proc, run = launch(tmp, trainer={"eval_every": 3}, eval={"episodes": 200_000})
    # step 3's evaluation is running once step 3 is logged... or the process is in it without logging
    wait_for(lambda: proc.poll() is not None or max(logged_steps(run), default=0) >= 2, 240)
    time.sleep(1.5)
    return stopped(proc, run, signal.SIGTERM, within=30)


@case("ctrl-c-twice-during-a-long-evaluation")
def _(tmp):
    proc, run = launch(tmp, trainer={"eval_every": 3}, eval={"episodes": 200_000})
    wait_for(lambda: proc.poll() is not None or max(logged_steps(run), default=0) >= 2, 240)
    time.sleep(1.5)
    return stopped(proc, run, signal.SIGINT, within=30, codes=(0, 130), again=True)


@case("sigterm-during-a-save")
def _(tmp):
    proc, run = launch(tmp, trainer={"save_every": 1}, checkpoint={"keep_last": 2})
    wait_for(lambda: proc.poll() is not None or any(p.name.startswith(".tmp_step") for p in (run / "checkpoints").glob(".tmp*")), 240)
    return stopped(proc, run, signal.SIGTERM, within=60, again=True)


@case("sigterm-before-training-starts")
def _(tmp):
    proc, run = launch(tmp)
    time.sleep(1.0)  # importing torch or building the run
    out = stopped(proc, run, signal.SIGTERM, within=60, codes=(75, 143, -15))
    if out.kind == "lost" and "nothing saved" in out.detail and not logged_steps(run):
        out = Outcome("clean", "stopped before any step: nothing to save")  # nothing was trained
    if (run / ".lock").exists():
        return Outcome("silent", ".lock left behind")
    return out
