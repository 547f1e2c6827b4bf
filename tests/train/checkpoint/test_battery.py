"""Fault-injection battery for checkpoint saves: every file operation of a save fails, or the process
"dies" there, and what is left must resume: the newest complete checkpoint verifies and loads, ``latest``
names a complete one, no checkpoint that existed before is lost, and the next save succeeds and cleans up.

Every file operation a save performs goes through :mod:`picomaml.train._atomic_io` (create, write, fsync,
rename, replace, remove), so the battery counts them and makes the N-th one, for every N of a full
save, either raise ``OSError(ENOSPC)`` (the save's own error handling runs) or "crash": that operation
and every later one raise a ``BaseException``, so nothing more reaches the disk, as after ``kill -9``.
A snapshot of the directory at the crash is compared with the directory afterwards, which proves no
operation bypassed the seams. Three situations: a new step (with pruning), a re-save of the latest
step, and a re-save of an older step. A few real ``kill -9`` of a saving subprocess complete it.

Run ``python tests/checkpoint/test_battery.py [kills]`` to print the counts.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from picomaml.train import _atomic_io as aio
from picomaml.train import checkpoint as ckpt
from picomaml.train.checkpoint import discovery
from picomaml.train.checkpoint.discovery import locate

SEAMS = ("make_dir", "create_file", "write_out", "fsync_fd", "rename", "replace", "remove_file", "remove_dir")


class Crash(BaseException):
    """The simulated death of the process: not an ``Exception``, so no ``except Exception`` handles it."""


class Injector:
    """Counts the file operations of a save; makes the ``fail_at``-th raise (``mode="error"``) or crash."""

    def __init__(self, root: Path, fail_at: int | None = None, mode: str = "error") -> None:
        self.root, self.fail_at, self.mode = root, fail_at, mode
        self.count, self.crashed, self.snapshot, self.kinds = 0, False, None, []

    def hit(self, kind: str) -> None:
        if self.crashed:
            raise Crash(f"after the crash: {kind}")
        self.count += 1
        self.kinds.append(kind)
        if self.count != self.fail_at:
            return
        if self.mode == "error":
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        self.crashed, self.snapshot = True, tree(self.root)
        raise Crash(f"crash at operation {self.count} ({kind})")

    @contextmanager
    def installed(self):
        originals = {name: getattr(aio, name) for name in SEAMS}

        def wrap(name, fn):
            def seam(*args, **kwargs):
                self.hit(name)
                return None if name == "fsync_fd" else fn(*args, **kwargs)  # durability is not tested here

            return seam

        try:
            for name, fn in originals.items():
                setattr(aio, name, wrap(name, fn))
            yield self
        finally:
            for name, fn in originals.items():
                setattr(aio, name, fn)


def tree(root: Path) -> dict[str, tuple[bool, bytes | None]]:
    """Every entry under ``root``: ``relative path -> (is a directory, contents)``."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[p.relative_to(root).as_posix()] = (p.is_dir(), None if p.is_dir() else p.read_bytes())
    return out


def state(value: float) -> dict:
    return {"model": {"w": torch.full((4,), value)}, "optimizer": {"step": torch.tensor(value), "lr": 0.1}}


def weight(path: Path) -> float:
    """The value a checkpoint's model holds (read directly: the callers have verified ``path``)."""
    return float(torch.load(path / "model.pt", weights_only=True)["w"][0])


@dataclass
class Scenario:
    """Checkpoints ``before`` (step -> weight) with ``latest`` at ``latest``; then save ``step`` with ``value``."""

    name: str
    before: dict[int, float]
    latest: int
    step: int
    value: float
    keep_last: int | None
    pruned: set[int] = field(default_factory=set)  # what a successful save deletes


SCENARIOS = [
    Scenario("new step", {1: 1.0, 2: 2.0}, 2, 3, 3.0, keep_last=2, pruned={1}),
    Scenario("re-save of the latest step", {1: 1.0, 2: 2.0, 3: 3.0}, 3, 3, 3.5, keep_last=2, pruned={1}),
    Scenario("re-save of an older step", {1: 1.0, 2: 2.0, 3: 3.0}, 3, 2, 2.5, keep_last=3),
]


def build(root: Path, sc: Scenario) -> None:
    for step in sorted(sc.before):
        if step != sc.latest:
            ckpt.save_checkpoint(root, step, state(sc.before[step]), keep_last=None, fsync=False)
    ckpt.save_checkpoint(root, sc.latest, state(sc.before[sc.latest]), keep_last=None, fsync=False)


def save(root: Path, sc: Scenario) -> Path:
    return ckpt.save_checkpoint(
        root, sc.step, state(sc.value), config={"v": sc.value}, keep_last=sc.keep_last
    )


def resolves(root: Path, step: int) -> Path | None:
    """The verified folder the library reads as ``step`` (its step directory, or the copy a re-save set aside)."""
    path = discovery._candidates(root).get(step)
    try:
        return locate(path)[0] if path is not None else None
    except FileNotFoundError:
        return None


def check_after_failure(root: Path, sc: Scenario) -> list[str]:
    """What must hold right after the save failed or the process died (before any repair)."""
    problems = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ckpt.CheckpointWarning)
        chosen = ckpt.find_latest(root)
    if chosen is None:
        return ["find_latest found nothing"]
    ok = {(sc.latest, sc.before[sc.latest]), (sc.step, sc.value)}
    loaded = ckpt.load_checkpoint(chosen)
    got = (loaded.step, float(loaded.states["model"]["w"][0]))
    if got not in ok:
        problems.append(f"resumes from {got}, expected one of {sorted(ok)}")
    pointer = int((root / ckpt.LATEST).read_text().strip().removeprefix("step_"))
    if resolves(root, pointer) is None:
        problems.append(f"latest names step {pointer}, which is not complete")
    new_published = pointer == sc.step and resolves(root, sc.step) is not None
    for step, value in sc.before.items():
        path = resolves(root, step)
        if path is None and not (step in sc.pruned and new_published):
            problems.append(f"LOST step {step}")
        elif path is not None and weight(path) not in ({value, sc.value} if step == sc.step else {value}):
            problems.append(f"step {step} holds {weight(path)}")
    return problems


def check_next_save(root: Path, sc: Scenario) -> list[str]:
    """The next save (another process: leftovers carry a dead pid) succeeds, cleans up, loses nothing."""
    survivors = {s: weight(p) for s in sc.before if (p := resolves(root, s)) is not None}
    path = ckpt.save_checkpoint(root, 9, state(9.0), keep_last=None, fsync=False)
    problems = [f"left behind: {p.name}" for p in root.iterdir() if p.name.startswith(".")]
    if (root / ckpt.LATEST).read_text().strip() != path.name or ckpt.find_latest(root) != path:
        problems.append("latest does not name the new checkpoint")
    for step, value in survivors.items():
        p = root / ckpt.step_dir_name(step)
        if not p.is_dir() or resolves(root, step) != p or weight(p) != value:
            problems.append(f"LOST step {step} at the next save (not back in place)")
    return problems


@dataclass
class Tally:
    tries: int = 0
    failures: int = 0
    lost: int = 0
    operations: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def add(self, label: str, problems: list[str]) -> None:
        self.tries += 1
        if problems:
            self.failures += 1
            self.lost += sum(p.startswith("LOST") for p in problems)
            self.examples.append(f"{label}: {'; '.join(problems)}")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def run_battery(base: Path, scenarios: list[Scenario] = SCENARIOS, modes=("error", "crash")) -> Tally:
    """Every operation of every scenario, in each mode; returns the counts."""
    tally, dead = Tally(), _dead_pid()
    for si, sc in enumerate(scenarios):
        template = base / f"template{si}"
        build(template, sc)
        counting = base / f"count{si}"
        shutil.copytree(template, counting)
        with Injector(counting).installed() as inj:
            save(counting, sc)
        tally.operations[sc.name] = inj.count
        for mode in modes:
            for n in range(1, inj.count + 2):  # the last one fails nothing: the save completes
                root = base / f"s{si}_{mode}_{n}"
                shutil.copytree(template, root)
                tally.add(f"{sc.name}, {mode} at operation {n}", _one_try(root, sc, n, mode, dead))
                shutil.rmtree(root)
    return tally


def _one_try(root: Path, sc: Scenario, n: int, mode: str, dead_pid: int) -> list[str]:
    problems = []
    with Injector(root, n, mode).installed() as fault:
        try:
            save(root, sc)
        except BaseException as exc:  # noqa: B036 - the simulated crash is a BaseException
            clear = isinstance(exc, OSError) and "disk full" in str(exc) and "step_" in str(exc)
            if mode == "error" and not clear:
                problems.append(f"unclear error: {type(exc).__name__}: {exc}")
    if fault.crashed and tree(root) != fault.snapshot:
        problems.append("the disk changed after the crash (an operation bypassed the seams)")
    problems += check_after_failure(root, sc)
    if mode == "crash":  # the next save runs in a new process: the dead one's pid is in the names
        for p in root.glob(f".*_{os.getpid()}"):
            p.rename(p.with_name(p.name.removesuffix(str(os.getpid())) + str(dead_pid)))
    return problems or check_next_save(root, sc)


@pytest.mark.parametrize("mode", ["error", "crash"])
@pytest.mark.parametrize("sc", SCENARIOS, ids=lambda sc: sc.name.replace(" ", "-"))
def test_every_file_operation_of_a_save_fails_or_crashes_and_nothing_is_lost(tmp_path, sc, mode, caplog):
    caplog.set_level(logging.ERROR, logger="picomaml")  # the expected "could not prune" warnings
    tally = run_battery(tmp_path, [sc], (mode,))
    ops = tally.operations[sc.name]
    print(
        f"{sc.name}, {mode}: {tally.tries} tries, {tally.failures} failures, {tally.lost} lost ({ops} operations)"
    )
    assert tally.failures == 0 and tally.lost == 0, "\n".join(tally.examples[:10])
    assert tally.tries == ops + 1 and ops >= 25, ops  # the seams do see every file of the save


def test_the_battery_sees_a_loss(tmp_path, monkeypatch):
    """With the recovery of an interrupted re-save switched off (the old behaviour), the battery reports losses."""
    from picomaml.train.checkpoint import save as save_module

    def old_cleanup(root: Path) -> None:
        for p in root.iterdir():
            if p.name.startswith((".tmp_", ".latest.tmp_")):
                aio.remove_tree(p)

    monkeypatch.setattr(save_module, "recover_interrupted", old_cleanup)
    monkeypatch.setattr(
        discovery,
        "_candidates",
        lambda root, refused=None: {s: p for p in root.iterdir() if (s := ckpt.layout.step_of(p.name)) is not None},
    )
    tally = run_battery(tmp_path, [SCENARIOS[1]], ("crash",))
    assert tally.lost >= 1 and tally.failures >= 1, tally


_CHILD = textwrap.dedent(
    """
    import sys, torch
    from picomaml.train.checkpoint import save_checkpoint
    root, step = sys.argv[1], 1
    while True:  # a new step, then the same step again (a re-save), forever: the parent kills us
        for value in (float(step), step + 0.5):
            save_checkpoint(root, step, {"model": {"w": torch.full((256,), value)}}, keep_last=2, fsync=False)
            print(step, value, flush=True)
        step += 1
    """
)


def kill_during_saves(root: Path, rng: random.Random, seen: Counter | None = None) -> list[str]:
    """Start a process that saves without pause, kill -9 it at a random moment, check what it left.

    ``seen`` counts what the kill left behind (``tmp``: a save being written, ``delete``: a copy set
    aside by a re-save, ``prune``, ``pointer``, ``nothing``): where in a save the kill landed."""
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # a few saves done: the root has checkpoints to lose
            proc.stdout.readline()
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = [tuple(map(float, line.split())) for line in proc.stdout.read().splitlines() if line.strip()]
    proc.stdout.close()
    if seen is not None:
        kinds = {p.name.split("_")[1] if p.name.startswith(".tmp_") else "pointer" for p in root.glob(".*")}
        seen.update(kinds or {"nothing"})
    problems = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ckpt.CheckpointWarning)
        chosen = ckpt.resolve_resume("auto", root)
    step, value = ckpt.load_checkpoint(chosen).step, weight(chosen)
    if done and (step, value) < done[-1]:  # the last save reported done must not be lost
        problems.append(f"LOST: resumes from {(step, value)} after {done[-1]} was saved")
    if value not in (float(step), step + 0.5):
        problems.append(f"step {step} holds {value}")
    path = ckpt.save_checkpoint(root, 10_000, {"x": torch.ones(1)}, keep_last=None, fsync=False)
    if [p.name for p in root.iterdir() if p.name.startswith(".")] or ckpt.find_latest(root) != path:
        problems.append("the next save did not clean up or take over latest")
    return problems


def test_kill_9_at_random_points_of_back_to_back_saves(tmp_path):
    rng, tally = random.Random(0), Tally()
    for i in range(3):
        tally.add(f"kill {i}", kill_during_saves(tmp_path / f"run{i}", rng))
    print(f"kill -9 battery: {tally.tries} tries, {tally.failures} failures, {tally.lost} lost")
    assert tally.failures == 0, "\n".join(tally.examples)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        t = run_battery(Path(d))
        print(
            f"fault injection: {t.tries} tries, {t.failures} failures, {t.lost} lost "
            f"({time.perf_counter() - t0:.1f}s); operations per save: {t.operations}"
        )
        print(*t.examples[:20], sep="\n")
        kills = int(sys.argv[1]) if len(sys.argv) > 1 else 10
        k, r, seen = Tally(), random.Random(1), Counter()
        for i in range(kills):
            k.add(f"kill {i}", kill_during_saves(Path(d) / f"kill{i}", r, seen))
        print(f"kill -9: {k.tries} tries, {k.failures} failures, {k.lost} lost; left behind: {dict(seen)}")
        print(*k.examples, sep="\n")
