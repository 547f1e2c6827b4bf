"""Names on disk and the errors of the checkpoint package.

A checkpoint root holds ``step_<N>`` directories, a ``latest`` pointer and, while a save runs (or after
one was killed), hidden ``.tmp_*`` entries whose last ``_<digits>`` is the writer's process id:

- ``.tmp_step_<N>_<pid>``: a save being written; never read.
- ``.tmp_delete_step_<N>_<pid>``: the previous copy of ``step_<N>`` while a re-save of that step swaps
  it out. While ``step_<N>`` is missing it is that step's only copy: readers use it and the next save
  puts it back.
- ``.tmp_prune_step_<N>_<pid>``: a pruned checkpoint being deleted; never read.
- ``.latest.tmp_<pid>``: the pointer being replaced.

A step folder pruned by ``keep_last`` may keep some of its subfolders (the learning dynamics, for
pico-analyze): it then holds a ``PRUNED`` file and no ``COMPLETE`` manifest, and is never resumed from.

Nothing under a checkpoint root is read, moved or deleted through a symbolic link, and only regular files
are read: a step folder linked to another run's (which pruning would otherwise empty), or a ``latest`` or
``COMPLETE`` that is a link to ``/dev/zero`` or a FIFO (a read that never ends), is skipped with its reason
([`entry_problem`][picomaml.train.checkpoint.layout.entry_problem]).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from picomaml.params import one_line, short_repr
from picomaml.train._atomic_io import entry_kind

__all__ = [
    "CONFIG",
    "LATEST",
    "MARKER",
    "PRUNED",
    "RNG",
    "TRAINER_STATE",
    "CheckpointWarning",
    "DamagedCheckpointError",
    "NoUsableCheckpointError",
    "backup_step",
    "describe_problems",
    "entry_problem",
    "quote",
    "step_dir_name",
    "step_of",
]

MARKER = "COMPLETE"
PRUNED = "PRUNED"  # a step folder pruned by keep_last whose learning dynamics were kept
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
CONFIG = "config.yaml"
RNG = "rng"

STEP_DIR = re.compile(r"^step_(\d+)$")
BACKUP_DIR = re.compile(r"^\.tmp_delete_(step_\d+)_(\d+)$")
TMP_ENTRY = re.compile(r"^\.tmp_.*_(\d+)$")
TMP_POINTER = re.compile(r"^\.latest\.tmp_(\d+)$")
_MAX_LISTED = 12  # problems listed in one message; the rest are counted


def step_dir_name(step: int) -> str:
    """``step_120``: pico-train's name, which pico-analyze reads. Runs written by earlier picomaml versions
    have zero-padded ``step_000120`` folders; every reader takes both
    ([`step_of`][picomaml.train.checkpoint.layout.step_of])."""
    return f"step_{step}"


def step_of(name: str) -> int | None:
    """The step of a ``step_<N>`` directory name, else ``None``."""
    m = STEP_DIR.match(name)
    return int(m.group(1)) if m else None


def backup_step(name: str) -> tuple[str, int] | None:
    """``(step directory name, writer pid)`` of a ``.tmp_delete_step_<N>_<pid>`` name, else ``None``."""
    m = BACKUP_DIR.match(name)
    return (m.group(1), int(m.group(2))) if m else None


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (damaged, incomplete) or recovered from an interrupted save."""


class DamagedCheckpointError(FileNotFoundError):
    """A checkpoint directory is incomplete or one of its files is damaged, truncated or unreadable.

    A ``FileNotFoundError`` so that code treating "no usable checkpoint at this path" one way keeps
    working. Never fixed by ``weights_only=False``: the file's bytes are wrong, not its contents' types.

    Attributes:
        path: The checkpoint (step) directory.
        file: The damaged file (``None`` when the directory itself is the problem).
        reason: Why, starting with the file's name inside the directory.
    """

    def __init__(self, path: Path, reason: str, file: Path | None = None) -> None:
        self.path, self.file, self.reason = Path(path), file, reason
        super().__init__(f"checkpoint {path} is incomplete or damaged: {reason}")

    def __reduce__(self):  # picklable (multiprocessing, pytest-xdist) despite the custom __init__
        return (type(self), (self.path, self.reason, self.file))


class NoUsableCheckpointError(FileNotFoundError):
    """A checkpoint root holds step folders, but none of them can be resumed from.

    Attributes:
        root: The checkpoint root.
        problems: ``(step folder, why it is unusable)`` for each, newest first.
    """

    def __init__(self, root: Path, problems: list[tuple[Path, str]], note: str = "") -> None:
        self.root, self.problems, self.note = Path(root), list(problems), note
        extra = f"\n{note}" if note else ""
        super().__init__(
            f"no usable checkpoint under {root}: {len(self.problems)} step folder(s), none complete and "
            f"intact:\n{describe_problems(self.problems)}{extra}\nResume from an explicit checkpoint path, "
            "or move these folders aside to start fresh."
        )

    def __reduce__(self):
        return (type(self), (self.root, self.problems, self.note))


def describe_problems(problems: list[tuple[Path, str]]) -> str:
    """``"  step_000030: model.pt: ..."`` lines, at most a dozen (then a count)."""
    lines = [f"  {p.name}: {why}" for p, why in problems[:_MAX_LISTED]]
    if len(problems) > _MAX_LISTED:
        lines.append(f"  ... and {len(problems) - _MAX_LISTED} more")
    return "\n".join(lines)


def entry_problem(path: Path, kind: str) -> str | None:
    """Why ``path`` may not be used as a checkpoint ``kind`` (``"file"`` or ``"dir"``), or ``None``.

    Returns:
        ``"missing"``; a symbolic link (checkpoint code never follows one: it could lead out of the run
        directory); not a regular file or directory (a FIFO or a device blocks or never ends); or an
        ``lstat`` error. The text reads after the entry's name.
    """
    try:
        found = entry_kind(path)
    except (OSError, ValueError) as exc:  # ValueError: an embedded NUL byte
        return f"cannot be read ({one_line(exc, 120)})"
    if found == "link":
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return f"is a symbolic link (to {quote(target)}); checkpoints are never read or changed through links"
    if found == "missing":
        return found
    if found != kind:
        what = "directory" if kind == "dir" else "regular file"
        return f"is not a {what} (a FIFO, device or socket is never read)"
    return None


def quote(value: object) -> str:
    """A bounded ``repr`` for messages that quote what was found on disk."""
    return short_repr(value, 60)
