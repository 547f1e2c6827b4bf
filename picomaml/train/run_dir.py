"""A trainer's start in its run directory: resume or start fresh without losing or mixing any history.

    RUN/
      .lock                      the running trainer (see picomaml.train.run_lock)
      config.yaml training_config.yaml metrics.csv curves.png checkpoints/ tensorboard/ wandb/
      config_changes.yaml        what changed on each resume (one YAML document per resume)
      previous/20250131T120000Z/ an earlier run moved aside (never deleted, never truncated)

A start has two halves. [`plan_start`][picomaml.train.run_dir.plan_start] only reads: it resolves
``--resume``, compares the checkpoint's saved config with the current one and checks that ``metrics.csv`` can
be continued, so every refusal comes before anything changes.
[`commit_start`][picomaml.train.run_dir.commit_start] then writes: it moves what belongs to another run into
``previous/<UTC time>/``, records the config changes, and only then rewrites ``config.yaml``.

``--resume`` values: ``auto`` (the newest usable checkpoint of the run; a fresh start when the run has no
checkpoint folders; an error listing each folder and why when none is usable), ``fresh`` (alias ``none``:
step 0, the earlier run moved aside) or a checkpoint path.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from picomaml.data.sources import DataError
from picomaml.interop.pico_analyze import TRAINING_CONFIG, training_config_yaml
from picomaml.params import ConfigError, one_line, short_repr
from picomaml.train import checkpoint as ckpt
from picomaml.train._atomic_io import describe_os_error, entry_kind, fsync_dir, write_text
from picomaml.train.checkpoint.layout import backup_step, step_of
from picomaml.train.config import ExperimentConfig
from picomaml.train.config_diff import ConfigChange, compare_configs
from picomaml.train.run_lock import RunDirError, RunLock, RunLockedError
from picomaml.train.state_check import StateMismatchError, check_counters
from picomaml.train.tracking import MetricsFileError, MetricsTracker, read_metrics_csv

__all__ = [
    "RUN_FILES", "PREVIOUS", "CONFIG_CHANGES", "FRESH", "RESUME_HELP", "USER_ERRORS", "RunDirError", "RunLockedError",
    "StartPlan", "RunStart", "archive", "plan_start", "commit_start", "open_run", "check_contained", "check_writable", "error_line",
]  # fmt: skip

log = logging.getLogger(__name__)

#: what belongs to one run (moved aside together by a fresh start), checkpoints first: a move cut short
#: leaves nothing that a later ``--resume auto`` would continue
RUN_FILES = (
    "checkpoints", "config.yaml", TRAINING_CONFIG, "metrics.csv", "curves.png", "config_changes.yaml", "tensorboard",
    "wandb", "hf",
)  # fmt: skip
PREVIOUS = "previous"
CONFIG_CHANGES = "config_changes.yaml"
FRESH = ("fresh", "none")
#: the ``--resume`` values, for a trainer's ``--help``
RESUME_HELP = (
    "auto: the newest usable checkpoint (an error when there are checkpoints but none is usable) | fresh (or "
    "none): step 0, an earlier run moved to RUN_DIR/previous/<UTC time>/ | PATH: a checkpoint directory"
)
#: errors a trainer prints as one line without a traceback (exit code 2): the user's to fix
USER_ERRORS = (ConfigError, RunDirError, MetricsFileError, DataError)
_MAX_LISTED = 8

def archive(run_dir: Path, move: Sequence[str], copy: Sequence[str] = ()) -> Path:
    """Move (and copy) run-directory entries into a new ``RUN/previous/<UTC time>/``, same relative paths.

    Raises:
        RunDirError: An entry cannot be moved (e.g. a mount point); what was moved is named.
    """
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest, n = run_dir / PREVIOUS / stamp, 1
    while dest.exists():
        n += 1
        dest = run_dir / PREVIOUS / f"{stamp}-{n}"
    dest.mkdir(parents=True)
    for name in copy:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(run_dir / name, dest / name)
    done: list[str] = []
    for name in move:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(run_dir / name, dest / name)
        except OSError as exc:
            raise RunDirError(f"cannot move {run_dir / name} to {dest} ({exc}); moved so far: {done}") from None
        done.append(name)
        fsync_dir((run_dir / name).parent)
    fsync_dir(dest)
    return dest


@dataclasses.dataclass
class StartPlan:
    """What a start does in its run directory (made by [`plan_start`][picomaml.train.run_dir.plan_start], done
    by [`commit_start`][picomaml.train.run_dir.commit_start]).

    Attributes:
        run_dir: The run directory.
        checkpoint: The step directory to resume from; ``None``: start from step 0.
        changes: Config changes since that checkpoint (none of them architectural).
        move: Run-directory entries of another run, or of steps after the checkpoint, to move aside.
        copy: Entries to copy aside as well (the resumed run continues them, without the dropped rows).
    """

    run_dir: Path
    checkpoint: Path | None = None
    changes: list[ConfigChange] = dataclasses.field(default_factory=list)
    move: list[str] = dataclasses.field(default_factory=list)
    copy: list[str] = dataclasses.field(default_factory=list)


def _unusable(root: Path, problems: Sequence[tuple[Path, str]]) -> RunDirError:
    listed = "; ".join(f"{Path(p).name}: {one_line(str(why), 160)}" for p, why in problems[:_MAX_LISTED])
    more = f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    return RunDirError(
        f"--resume auto: {root} holds {len(problems)} checkpoint folder(s), none usable: {listed}{more}. "
        f"To start from step 0 instead, pass --resume fresh (this run is moved to {root.parent / PREVIOUS}/)"
    )


def _resolve(run_dir: Path, resume: str) -> Path | None:
    root = run_dir / "checkpoints"
    if resume == "auto":
        try:
            return ckpt.resolve_resume("auto", root)
        except ckpt.NoUsableCheckpointError as exc:
            raise _unusable(root, exc.problems) from None
    if not Path(resume).exists():
        raise ConfigError(f"--resume: {short_repr(resume)} does not exist (pass auto, fresh, or a checkpoint)")
    try:
        return ckpt.resolve_resume(resume, root)
    except FileNotFoundError as exc:
        raise ConfigError(f"--resume: {one_line(str(exc), 400)}") from None


def _saved_config(checkpoint: Path) -> dict[str, Any] | None:
    path = checkpoint / ckpt.CONFIG
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        log.warning("%s has no %s: the current config cannot be compared with it", checkpoint, ckpt.CONFIG)
        return None
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise RunDirError(f"{path}: cannot be read ({one_line(str(exc), 200)})") from None
    if not isinstance(data, Mapping):
        raise RunDirError(f"{path}: not a config mapping")
    return dict(data)


def _check_changes(checkpoint: Path, saved: Mapping[str, Any], config: Mapping[str, Any]) -> list[ConfigChange]:
    changes = compare_configs(saved, config)
    shape = [c for c in changes if c.architecture]
    if shape:
        listed = "; ".join(map(str, shape[:_MAX_LISTED]))
        raise ConfigError(
            f"{', '.join(c.key for c in shape[:_MAX_LISTED])}: changed since {checkpoint} was saved ({listed}); "
            f"they change parameter shapes, so it cannot be resumed: undo them, or start a new run (another "
            f"--run-dir, or --resume fresh to move this one to {checkpoint.parent.parent / PREVIOUS}/)"
        )
    return changes


def _step(name: str) -> int | None:
    """The step of a step folder, or of the copy a re-save set aside."""
    backup = backup_step(name)
    return step_of(backup[0] if backup else name)


def plan_start(run_dir: str | os.PathLike[str], resume: str, config: Any) -> StartPlan:
    """Decide how a trainer starts in ``run_dir``; reads only (call it holding the run's lock).

    Args:
        run_dir: The run directory.
        resume: ``"auto"``, ``"fresh"`` / ``"none"``, or a checkpoint path (a step directory or a root).
        config: The current config (an [`ExperimentConfig`][picomaml.train.config.ExperimentConfig] or its
            nested dict).

    Raises:
        ConfigError: A ``--resume`` path that holds no checkpoint; a change of the architecture since the
            checkpoint (each key ``old -> new``).
        RunDirError: Checkpoint folders, none usable (each and why).
        MetricsFileError: A ``metrics.csv`` to continue that cannot be read (file and line).
    """
    run_dir = Path(run_dir)
    current = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    present = [name for name in RUN_FILES if (run_dir / name).exists()]
    resume = str(resume)
    resume = resume.lower() if resume.lower() in ("auto", *FRESH) else resume
    checkpoint = None if resume in FRESH else _resolve(run_dir, resume)
    if checkpoint is None:
        return StartPlan(run_dir, move=present)
    saved = _saved_config(checkpoint)
    changes = _check_changes(checkpoint, saved, current) if saved is not None else []
    root = run_dir / "checkpoints"
    if checkpoint.resolve().parent != root.resolve():  # another run's checkpoint: this run is moved aside
        return StartPlan(run_dir, checkpoint, changes, move=present)
    if (run_dir / "metrics.csv").exists():
        try:
            read_metrics_csv(run_dir / "metrics.csv", drop_torn_tail=True)
        except MetricsFileError as exc:
            raise MetricsFileError(f"cannot continue {exc}; fix that line, or move the file away") from None
    step = _step(checkpoint.name)
    later = sorted(p.name for p in root.iterdir() if step is not None and (_step(p.name) or -1) > step)
    newer = [f"checkpoints/{name}" for name in later]
    if newer and (root / ckpt.LATEST).exists():
        newer.append(f"checkpoints/{ckpt.LATEST}")  # it names one of them: it goes with them
    copy = [name for name in ("config.yaml", "metrics.csv") if newer and (run_dir / name).exists()]
    return StartPlan(run_dir, checkpoint, changes, move=newer, copy=copy)


def commit_start(plan: StartPlan, config: ExperimentConfig) -> Path | None:
    """Carry out a [`plan_start`][picomaml.train.run_dir.plan_start]: move aside, record the config changes,
    then write ``config.yaml``.

    Returns:
        The ``previous/<UTC time>/`` folder things were moved to (``None`` when nothing was).
    """
    run_dir, dest = plan.run_dir, None
    run_dir.mkdir(parents=True, exist_ok=True)
    if plan.move:
        dest = archive(run_dir, plan.move, plan.copy)
        log.warning("moved %s of the earlier run in %s to %s", ", ".join(plan.move), run_dir, dest)
    if plan.changes:
        record = {
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "checkpoint": str(plan.checkpoint),
            "changes": [{"key": c.key, "old": c.old, "new": c.new} for c in plan.changes],
        }
        with open(run_dir / CONFIG_CHANGES, "a", encoding="utf-8") as fh:  # appended: never rewritten
            fh.write(yaml.safe_dump(record, sort_keys=False, explicit_start=True))
            fh.flush()
            os.fsync(fh.fileno())
        log.warning(
            "config changed since %s: %s (recorded in %s)",
            plan.checkpoint, "; ".join(map(str, plan.changes)), run_dir / CONFIG_CHANGES,
        )  # fmt: skip
    for name, text in (("config.yaml", config.to_yaml()), (TRAINING_CONFIG, training_config_yaml(config, run_dir.name))):
        tmp = run_dir / f".{name}.tmp_{os.getpid()}"  # pico-analyze reads training_config.yaml
        write_text(tmp, text, fsync=True)
        os.replace(tmp, run_dir / name)
    return dest


class RunStart:
    """A trainer's start in its run directory, made by [`open_run`][picomaml.train.run_dir.open_run]: the
    plan, and on the main process the held lock (a context manager: leaving it releases the lock)."""

    def __init__(self, plan: StartPlan, lock: RunLock | None = None) -> None:
        self.plan, self.lock = plan, lock
        self._step: int | None = None

    @property
    def resume_step(self) -> int | None:
        """The step [`restore`][picomaml.train.run_dir.RunStart.restore] resumed from (for
        ``MetricsTracker(resume_step=...)``); ``None`` for a fresh start."""
        return self._step

    def restore(
        self, objects: Mapping[str, Any], rng: bool = True, counters: Sequence[str] | None = None
    ) -> ckpt.Checkpoint | None:
        """Load the plan's checkpoint into ``objects`` (``name -> object with load_state_dict``) and, with
        ``rng``, the global RNG states; ``None`` for a fresh start.

        Every saved state is checked first ([`check_states`][picomaml.train.state_check.check_states]:
        shapes, dtypes, finite values, the LR schedule's step), and with ``counters`` (the known names) the
        saved counters too, so nothing is loaded from a checkpoint that does not fit.

        Raises:
            RunDirError: The checkpoint's states do not fit the objects built from the current config (names
                the component, the key and what was expected).
        """
        if self.plan.checkpoint is None:
            return None
        try:
            state = ckpt.load_checkpoint(self.plan.checkpoint)
        except FileNotFoundError as exc:  # damaged since it was chosen
            raise RunDirError(one_line(str(exc), 600)) from None
        try:
            if counters is not None:
                check_counters(state.counters, tuple(counters), state.step)
            state.load_into(objects)  # checks every state before loading any
        except StateMismatchError as exc:
            raise RunDirError(f"{state.path} cannot be resumed: {exc}{_earlier(state.path)}") from None
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            changed = "; ".join(map(str, self.plan.changes[:_MAX_LISTED])) or "none"
            raise RunDirError(
                f"{self.plan.checkpoint} does not fit the run built from the current config ({one_line(first, 300)}); "
                f"config changes since it was saved: {changed}"
            ) from None
        if rng:
            state.restore_rng()
        self._step = state.step
        log.info("resumed from %s at step %d", state.path, state.step)
        return state

    def tracker(self, config: ExperimentConfig) -> MetricsTracker:
        """The run's [`MetricsTracker`][picomaml.train.tracking.MetricsTracker] (writing on the main process
        only), which continues ``metrics.csv`` from the resumed step."""
        t = config.trainer
        return MetricsTracker(
            self.plan.run_dir, t.loggers, enabled=self.lock is not None, config=config.to_dict(),
            resume_step=self.resume_step, wandb_project=t.wandb_project, wandb_offline=t.wandb_offline,
        )  # fmt: skip

    def commit(self, config: ExperimentConfig) -> Path | None:
        """[`commit_start`][picomaml.train.run_dir.commit_start] on the main process (a no-op elsewhere)."""
        return commit_start(self.plan, config) if self.lock is not None else None

    def __enter__(self) -> RunStart:
        return self

    def __exit__(self, *exc: object) -> None:  # releases the lock (main process)
        if self.lock is not None:
            self.lock.release()


def _earlier(step_dir: Path) -> str:
    """Advice naming the newest other checkpoint of ``step_dir``'s root, if any."""
    step = step_of(step_dir.name)
    others = [p for s, p in ckpt.list_checkpoints(step_dir.parent) if step is None or s < step]
    if not others:
        return ""
    return f"; to resume from the newest earlier checkpoint instead: --resume {others[-1]}"


def open_run(
    run_dir: str | os.PathLike[str],
    resume: str,
    config: ExperimentConfig,
    *,
    is_main: bool = True,
    broadcast: Callable[[Any], Any] | None = None,
) -> RunStart:
    """The main process locks ``run_dir`` and plans the start; every process gets the plan, or the error.

    Args:
        run_dir: The run directory.
        resume: See [`plan_start`][picomaml.train.run_dir.plan_start].
        config: The current config.
        is_main: Whether this is the process that writes the run directory (rank 0).
        broadcast: ``obj -> rank 0's obj`` on every process (e.g. ``fabric.broadcast``); ``None``: one process.

    Returns:
        The [`RunStart`][picomaml.train.run_dir.RunStart], a context manager: leaving it releases the lock, on
        every exit path.

    Raises:
        RunLockedError, RunDirError, ConfigError, MetricsFileError: see
            [`RunLock`][picomaml.train.run_lock.RunLock] and [`plan_start`][picomaml.train.run_dir.plan_start]
            (raised on every process; the lock is released first).
    """
    lock, outcome = None, None
    if is_main:
        try:
            check_contained(run_dir)  # before the lock: a run dir that is a file cannot hold one
            lock = RunLock(run_dir).acquire()
            outcome = plan_start(run_dir, resume, config)
        except BaseException as exc:
            if lock is not None:
                lock.release()
            if not isinstance(exc, USER_ERRORS):
                raise
            outcome = exc
    if broadcast is not None:
        outcome = broadcast(outcome)
    if isinstance(outcome, BaseException):
        raise outcome
    if outcome is None:
        raise ValueError("open_run: a process other than the main one needs broadcast= (rank 0's plan)")
    return RunStart(outcome, lock)


def check_writable(run_dir: str | os.PathLike[str], need_bytes: int = 0) -> None:
    """Fail now, not at the first save: ``run_dir`` (and its ``checkpoints/``) must take a file, and its file
    system must have ``need_bytes`` free (about one checkpoint).

    Raises:
        RunDirError: A folder that cannot be written (read-only, immutable, permissions) or too little free
            space; the message names the folder, the reason and the figures.
    """
    run_dir = Path(run_dir)
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        probe = folder / f".write_probe_{os.getpid()}"
        try:
            write_text(probe, "picomaml write probe\n", fsync=True)
        except OSError as exc:
            raise RunDirError(f"{folder}: cannot be written ({describe_os_error(exc)}); choose another --run-dir") from None
        finally:
            probe.unlink(missing_ok=True)
    free = shutil.disk_usage(run_dir if run_dir.exists() else run_dir.parent).free
    if free < need_bytes:
        raise RunDirError(
            f"{run_dir}: {free / 1e9:.2f} GB free, but a checkpoint takes about {need_bytes / 1e9:.2f} GB (weights "
            "and optimizer state); free some space or choose another --run-dir"
        )


#: run-directory entries that are folders (the others are files)
_FOLDERS = ("checkpoints", "tensorboard", "wandb", "hf", PREVIOUS)


def check_contained(run_dir: str | os.PathLike[str]) -> None:
    """Refuse a run directory whose own entries lead out of it or cannot be written as they should.

    The trainer reads, writes, moves and deletes only inside its run directory: a ``checkpoints/`` (or any
    entry of [`RUN_FILES`][picomaml.train.run_dir.RUN_FILES], or ``previous/``) that is a symbolic link could
    make a resume continue another run, or a fresh start move that run's link into ``previous/``; a FIFO
    or device blocks or never ends. The run directory itself may be reached through links (a scratch
    mount): only its entries are checked.

    Raises:
        RunDirError: ``run_dir`` is not a directory, or one of its entries is a link or of the wrong kind;
            the message names it and what to do.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--run-dir {run_dir}: is a file, not a directory; give a directory (created if missing)")
    if not run_dir.exists():
        above = next((p for p in run_dir.absolute().parents if p.exists()), None)
        if above is not None and not above.is_dir():
            raise RunDirError(f"--run-dir {run_dir}: {above} is a file, so the directory cannot be created there")
        return
    for name in (*RUN_FILES, PREVIOUS):
        entry, folder = run_dir / name, name in _FOLDERS
        try:
            found = entry_kind(entry)
        except OSError as exc:
            raise RunDirError(f"{entry}: cannot be read ({one_line(exc, 120)})") from None
        if found == "link":
            raise RunDirError(
                f"{entry} is a symbolic link (to {os.readlink(entry)}); the trainer never reads, writes or moves "
                f"anything outside {run_dir}: replace the link by a {'folder' if folder else 'file'}"
            )
        if found not in ("missing", "dir" if folder else "file"):
            raise RunDirError(f"{entry}: expected a {'folder' if folder else 'regular file'}; move it away")


def error_line(exc: BaseException, limit: int = 2000) -> str:
    """``exc`` as one line of at most ``limit`` characters, for a trainer's stderr."""
    kind = "config error" if isinstance(exc, ConfigError) else "error"
    return one_line(f"{kind}: {exc}", limit)
