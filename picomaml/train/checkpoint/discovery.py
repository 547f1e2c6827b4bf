"""Finding the checkpoint to resume from: follow ``latest``, verify, fall back loudly, or refuse.

A checkpoint is chosen only after it is *verified* (every file's size and SHA-256 match its manifest,
see [`picomaml.train.checkpoint.manifest`][picomaml.train.checkpoint.manifest]). The ``latest`` pointer is
tried first; when it is missing, unreadable or names a checkpoint that does not verify, the step folders are
tried newest first. Each one skipped is named with the file that is wrong in a
[`CheckpointWarning`][picomaml.train.checkpoint.layout.CheckpointWarning]. When step folders exist but none
verifies, [`resolve_resume`][picomaml.train.checkpoint.discovery.resolve_resume] raises
[`NoUsableCheckpointError`][picomaml.train.checkpoint.layout.NoUsableCheckpointError] instead of quietly
starting from step 0.

A re-save of an existing step moves the old copy to ``.tmp_delete_step_<N>_<pid>`` for the instant
between its two renames; if the writer died there, that copy is used as step ``N`` (and the next save
moves it back), so no step is ever missing to a reader.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from picomaml.params import one_line
from picomaml.train.checkpoint.layout import (
    LATEST,
    MARKER,
    PRUNED,
    CheckpointWarning,
    DamagedCheckpointError,
    NoUsableCheckpointError,
    backup_step,
    describe_problems,
    entry_problem,
    quote,
    step_dir_name,
    step_of,
)
from picomaml.train.checkpoint.manifest import Manifest, is_complete, verify_checkpoint

__all__ = ["find_latest", "list_checkpoints", "locate", "resolve_resume"]

_MAX_POINTER_BYTES = 4096


def list_checkpoints(root: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete step directories under ``root`` as ``(step, path)``, oldest step first.

    "Complete" is by names and sizes only (cheap; what pruning needs): use
    [`verify_checkpoint`][picomaml.train.checkpoint.manifest.verify_checkpoint] before trusting one's
    contents.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        step = step_of(p.name)
        if step is not None and entry_problem(p, "dir") is None and is_complete(p):  # never through a link
            found.append((step, p))
    return sorted(found)


def find_latest(root: str | os.PathLike[str]) -> Path | None:
    """The newest verified checkpoint under ``root``, or ``None``.

    The ``latest`` pointer is followed when it names a checkpoint that verifies; otherwise (missing or
    garbled pointer, a crash between the rename and the pointer update, a damaged file) the verified
    step directory with the highest step is returned, with a
    [`CheckpointWarning`][picomaml.train.checkpoint.layout.CheckpointWarning] naming every checkpoint skipped
    and the file that is wrong. Temporary and incomplete directories are never returned.
    """
    found = _choose(Path(root))
    return found[0] if found else None


def resolve_resume(resume: str | os.PathLike[str] | None, root: str | os.PathLike[str]) -> Path | None:
    """Turn a ``--resume`` value into a checkpoint directory (or ``None`` for a fresh start).

    Args:
        resume: ``"auto"`` (the newest verified checkpoint under ``root``; ``None`` when ``root`` holds
            no step folders at all), ``"none"`` / ``None`` (fresh start), or a path: a step directory or
            a checkpoint root.
        root: The run's checkpoint root.

    Raises:
        NoUsableCheckpointError: ``"auto"``, and ``root`` holds step folders but none verifies (or the
            path given is a root like that); ``problems`` lists each folder and why.
        DamagedCheckpointError: ``resume`` is a step directory that is incomplete or damaged (names the file).
        FileNotFoundError: ``resume`` is a path that holds no checkpoint.
    """
    if resume is None or (isinstance(resume, str) and resume.lower() == "none"):
        return None
    if isinstance(resume, str) and resume.lower() == "auto":
        found = _choose(Path(root), required=True)
        return found[0] if found else None
    return locate(resume)[0]


def locate(path: str | os.PathLike[str]) -> tuple[Path, Manifest]:
    """The verified checkpoint at ``path``: a step directory; a root, or its ``latest`` pointer file (the step
    it names if that verifies, else the newest that does); or a run directory (its ``checkpoints/`` root).

    Raises:
        DamagedCheckpointError: ``path`` is a step directory that does not verify (names the file).
        NoUsableCheckpointError: ``path`` is a root whose step folders all fail to verify.
        FileNotFoundError: No checkpoint at ``path``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no complete checkpoint at {path}: no such file or directory")
    if path.name == LATEST and path.is_file():  # the pointer file stands for its root
        path = path.parent
    elif path.is_dir() and (path / "checkpoints").is_dir() and not _candidates(path):  # a run directory
        path = path / "checkpoints"
    if path.is_dir() and (
        (path / MARKER).exists() or step_of(path.name) is not None or backup_step(path.name)
    ):
        return path, verify_checkpoint(path)
    if path.is_dir():
        found = _choose(path, required=True)
        if found is not None:
            return found
    raise FileNotFoundError(
        f"no complete checkpoint at {path} (expected a step directory with a {MARKER} file, or a "
        "checkpoint root holding one)"
    )


def _candidates(root: Path, refused: list[tuple[Path, str]] | None = None) -> dict[int, Path]:
    """Step -> folder: ``step_<N>`` entries, and the saved-aside copy of a step whose folder is missing.

    A step entry that is a link or not a directory is left out, with its reason appended to ``refused``.
    """
    found: dict[int, Path] = {}
    aside: dict[int, Path] = {}
    if not root.is_dir():
        return found
    for p in sorted(root.iterdir()):
        step = step_of(p.name)
        if (step is not None or backup_step(p.name)) and (problem := entry_problem(p, "dir")) is not None:
            if refused is not None:
                refused.append((p, f"the step folder {problem}"))
            continue
        if step is not None and not (p / PRUNED).exists():  # a pruned folder keeps dynamics, no state
            if step not in found or p.name == step_dir_name(step):  # step_20 over an older step_000020
                found[step] = p
        elif (backup := backup_step(p.name)) is not None and p.is_dir():
            aside.setdefault(step_of(backup[0]), p)
    for step, p in aside.items():
        found.setdefault(step, p)
    return found


def _read_pointer(root: Path) -> tuple[int | None, str]:
    """``(step named by latest, problem)``; ``(None, "")`` when there is no pointer."""
    pointer = root / LATEST
    problem = entry_problem(pointer, "file")
    if problem == "missing":
        return None, ""
    if problem is not None:
        return None, f"{LATEST}: {problem}"
    try:
        with open(pointer, "rb") as f:
            raw = f.read(_MAX_POINTER_BYTES)
    except FileNotFoundError:
        return None, ""
    except OSError as exc:
        return None, f"{LATEST}: cannot be read ({one_line(exc, 120)})"
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, f"{LATEST}: not UTF-8 text (damaged); it should hold a step folder name"
    step = step_of(name)
    if step is None:
        return None, f"{LATEST}: holds {quote(name)}, not a step folder name like step_120"
    return step, ""


def _choose(root: Path, *, required: bool = False) -> tuple[Path, Manifest] | None:
    """The checkpoint to resume from, warning about everything skipped on the way.

    Args:
        root: The checkpoint root.
        required: Raise [`NoUsableCheckpointError`][picomaml.train.checkpoint.layout.NoUsableCheckpointError]
            when step folders exist but none verifies (otherwise that is a warning and ``None``).
    """
    problems: list[tuple[Path, str]] = []
    candidates = _candidates(root, problems)
    pointed, pointer_problem = _read_pointer(root)
    notes = [pointer_problem] if pointer_problem else []
    order = sorted(candidates, reverse=True)
    if pointed is not None:
        if pointed in candidates:
            order.remove(pointed)
            order.insert(0, pointed)
        else:
            notes.append(f"{LATEST}: names step {pointed}, which has no folder")
    chosen: tuple[Path, Manifest] | None = None
    for step in order:
        try:
            chosen = candidates[step], verify_checkpoint(candidates[step])
            break
        except DamagedCheckpointError as exc:
            problems.append((candidates[step], exc.reason))
    if chosen is not None:
        if backup_step(chosen[0].name):
            notes.append(
                f"{chosen[0].name} is the previous copy of step folder {backup_step(chosen[0].name)[0]}, saved "
                "aside by a re-save that was interrupted (the next save puts it back)"
            )
        if problems or notes:
            warnings.warn(
                _fallback_message(root, chosen[0], problems, notes),
                CheckpointWarning,
                stacklevel=_caller_level(),
            )
        return chosen
    note = "\n".join(notes)
    if problems and required:
        raise NoUsableCheckpointError(root, problems, note)
    if problems or notes:
        detail = describe_problems(problems) if problems else "  no step folders"
        warnings.warn(
            f"no usable checkpoint under {root}:\n{detail}" + (f"\n{note}" if note else ""),
            CheckpointWarning,
            stacklevel=_caller_level(),
        )
    return None


def _fallback_message(root: Path, chosen: Path, problems: list[tuple[Path, str]], notes: list[str]) -> str:
    parts = [f"checkpoint under {root}: using {chosen.name}"]
    if problems:
        parts[0] += f", the newest that verifies; skipped {len(problems)} unusable:"
        parts.append(describe_problems(problems))
    parts += notes
    return "\n".join(parts)


def _caller_level() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside this package."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("picomaml.train.checkpoint"):
        frame, level = frame.f_back, level + 1
    return level
