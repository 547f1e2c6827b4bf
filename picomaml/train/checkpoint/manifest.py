"""The ``COMPLETE`` manifest: written last by a save, it lists every file with its size and SHA-256.

Its presence says the save finished; its contents say what the files must be. A checkpoint is
*complete* when every listed file exists with its size (cheap: what pruning needs) and *verified* when,
in addition, every file's SHA-256 matches (reads every byte: what resuming and loading need). A zeroed
block or one flipped bit leaves the size alone but never the hash.

Format (JSON):

    {"step": 120, "format": 2,
     "files": {"model.pt": 18229, ...},            # sizes, also the whole format of earlier releases
     "sha256": {"model.pt": "3f2a...", ...}}       # absent in checkpoints of earlier releases

Checkpoints written before checksums existed have no ``sha256`` entry; they are checked by size only
(said at debug level).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from picomaml.params import one_line
from picomaml.train._atomic_io import hash_file
from picomaml.train.checkpoint.layout import (
    MARKER,
    PRUNED,
    TRAINER_STATE,
    DamagedCheckpointError,
    backup_step,
    entry_problem,
    quote,
    step_of,
)

__all__ = [
    "Manifest",
    "checkpoint_problem",
    "is_complete",
    "manifest_json",
    "read_manifest",
    "verify_checkpoint",
]

logger = logging.getLogger(__name__)

FORMAT = 2
_MAX_MANIFEST_BYTES = 16 << 20  # a real manifest is a few KB; never read a huge junk file into memory
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Manifest:
    """What ``COMPLETE`` says a checkpoint holds.

    Attributes:
        step: The step the save was for (``None`` when the manifest does not say).
        sizes: File (POSIX path relative to the step directory) -> size in bytes.
        sha256: File -> SHA-256 in hex; empty for checkpoints written before checksums.
    """

    step: int | None
    sizes: dict[str, int]
    sha256: dict[str, str] = field(default_factory=dict)


def manifest_json(step: int, directory: Path, hashes: dict[str, str]) -> str:
    """The manifest text for the files under ``directory`` (sizes from disk, hashes as computed).

    Args:
        step: The checkpoint's step.
        directory: The (temporary) step directory, every file already written.
        hashes: File -> SHA-256 computed while writing it; any other file found is hashed from disk.
    """
    files = {p.relative_to(directory).as_posix(): p for p in sorted(directory.rglob("*")) if p.is_file()}
    sizes = {name: p.stat().st_size for name, p in files.items()}
    digests = {name: hashes.get(name) or hash_file(p) for name, p in files.items()}
    return json.dumps({"step": step, "format": FORMAT, "files": sizes, "sha256": digests}, indent=1)


def read_manifest(path: Path) -> Manifest:
    """Parse ``path/COMPLETE``.

    Raises:
        DamagedCheckpointError: ``path`` is not a directory, the manifest is missing, not JSON, or does
            not describe this step directory.
    """
    path = Path(path)
    marker = path / MARKER
    if not path.is_dir():
        raise DamagedCheckpointError(path, "not a directory")
    problem = entry_problem(marker, "file")
    if problem not in (None, "missing"):
        raise DamagedCheckpointError(path, f"{MARKER}: {problem}", marker)
    try:
        size = marker.stat().st_size
        if size > _MAX_MANIFEST_BYTES:
            raise ValueError(f"{size} bytes, far larger than a manifest")
        data = json.loads(marker.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise DamagedCheckpointError(path, f"{MARKER}: missing (the save did not finish)", marker) from None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise DamagedCheckpointError(
            path, f"{MARKER}: not a valid manifest ({one_line(exc, 120)})", marker
        ) from exc
    try:
        manifest = _parse(data)
    except ValueError as exc:
        raise DamagedCheckpointError(path, f"{MARKER}: not a valid manifest ({exc})", marker) from None
    expected = _step_of_dir(path)
    if manifest.step is not None and expected is not None and manifest.step != expected:
        raise DamagedCheckpointError(
            path, f"{MARKER}: written for step {manifest.step}, but the folder is for step {expected}", marker
        )
    if TRAINER_STATE not in manifest.sizes:
        raise DamagedCheckpointError(path, f"{MARKER}: does not list {TRAINER_STATE}", marker)
    return manifest


def verify_checkpoint(path: str | os.PathLike[str], *, checksums: bool = True) -> Manifest:
    """Check that a step directory is complete and, with ``checksums``, that no file changed since the save.

    Args:
        path: A step directory.
        checksums: Also compare every file's SHA-256 with the manifest (reads every byte). Without it,
            or for checkpoints written before checksums existed, only names and sizes are checked.

    Returns:
        The manifest.

    Raises:
        DamagedCheckpointError: The first problem found, naming the file (missing, wrong size, wrong
            SHA-256, no or unreadable manifest).
    """
    path = Path(path)
    if (path / PRUNED).exists():
        raise DamagedCheckpointError(path, f"pruned by keep_last: only {_kept(path)} kept, no training state", path)
    manifest = read_manifest(path)
    for name, size in manifest.sizes.items():  # every size first: cheap, and catches truncation
        f = path / name
        _check_inside(path, name)
        try:
            st = f.stat()
        except FileNotFoundError:
            raise DamagedCheckpointError(path, f"{name}: missing (listed in {MARKER})", f) from None
        except OSError as exc:
            raise DamagedCheckpointError(path, f"{name}: cannot be read ({one_line(exc, 120)})", f) from exc
        if st.st_size != size:
            raise DamagedCheckpointError(
                path, f"{name}: {st.st_size} bytes, but {MARKER} says {size} (truncated or overwritten)", f
            )
    if checksums and not manifest.sha256:
        logger.debug(
            "%s was written without checksums (an earlier picomaml): checked by file size only", path
        )
    for name, digest in manifest.sha256.items() if checksums else ():
        f = path / name
        try:
            actual = hash_file(f)
        except OSError as exc:
            raise DamagedCheckpointError(path, f"{name}: cannot be read ({one_line(exc, 120)})", f) from exc
        if actual != digest:
            raise DamagedCheckpointError(
                path,
                f"{name}: contents changed since the save (SHA-256 differs from {MARKER}; same size, so "
                "damaged on disk or in a copy)",
                f,
            )
    _check_state_step(path, manifest)  # after the checksums: a changed file is reported as changed
    return manifest


def read_trainer_state(ckpt_dir: Path) -> dict[str, Any]:
    """``trainer_state.json`` of a step directory, checked for the fields loading relies on (``step``,
    ``components``, ``counters``).

    Raises:
        DamagedCheckpointError: The file is unreadable, too large, not JSON, or a field has the wrong type.
    """
    f = ckpt_dir / TRAINER_STATE
    try:
        size = f.stat().st_size
        if size > _MAX_MANIFEST_BYTES:
            raise ValueError(f"{size} bytes, far larger than a trainer state")
        data = json.loads(f.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise DamagedCheckpointError(
            ckpt_dir, f"{TRAINER_STATE}: not valid JSON ({one_line(exc, 120)})", f
        ) from exc
    problem = ""
    if not isinstance(data, dict):
        problem = f"expected a JSON object, got {type(data).__name__}"
    elif not isinstance(data.get("step"), int) or isinstance(data["step"], bool) or data["step"] < 0:
        problem = f"'step' is {quote(data.get('step'))}, not a step number"
    elif not isinstance(data.get("components", []), list) or not all(
        isinstance(n, str) for n in data.get("components", [])
    ):
        problem = f"'components' is {quote(data.get('components'))}, not a list of names"
    elif not isinstance(data.get("counters", {}), dict):
        problem = f"'counters' is {quote(data.get('counters'))}, not a table"
    if problem:
        raise DamagedCheckpointError(ckpt_dir, f"{TRAINER_STATE}: {problem}", f)
    data.setdefault("components", [])
    return data


def _check_state_step(path: Path, manifest: Manifest) -> None:
    """``trainer_state.json`` is valid and for the folder's step: a resume takes its step from there, so a
    mismatch would carry on from one step with another step's weights."""
    expected = manifest.step if manifest.step is not None else _step_of_dir(path)
    step = read_trainer_state(path)["step"]
    if expected is not None and step != expected:
        raise DamagedCheckpointError(
            path, f"{TRAINER_STATE}: says step {quote(step)}, but the checkpoint is for step {expected}",
            path / TRAINER_STATE,
        )


def _check_inside(path: Path, name: str) -> None:
    """Every component of ``path/name`` is a real folder and the last a regular file: no link, no FIFO."""
    parts = PurePosixPath(name).parts
    for i in range(len(parts)):
        entry = path.joinpath(*parts[: i + 1])
        problem = entry_problem(entry, "file" if i == len(parts) - 1 else "dir")
        if problem == "missing":
            raise DamagedCheckpointError(path, f"{name}: missing (listed in {MARKER})", entry)
        if problem is not None:
            where = name if i == len(parts) - 1 else f"{name}: its folder {'/'.join(parts[: i + 1])}"
            raise DamagedCheckpointError(path, f"{where}: {problem}", entry)


def _kept(path: Path) -> str:
    kept = sorted(p.name + "/" for p in path.iterdir() if p.is_dir())
    return ", ".join(kept) if kept else "nothing"


def checkpoint_problem(path: Path, *, checksums: bool = True) -> str | None:
    """Why ``path`` is not a usable checkpoint (the
    [`DamagedCheckpointError`][picomaml.train.checkpoint.layout.DamagedCheckpointError] reason), or
    ``None``."""
    try:
        verify_checkpoint(path, checksums=checksums)
    except DamagedCheckpointError as exc:
        return exc.reason
    return None


def is_complete(path: str | os.PathLike[str], *, checksums: bool = False) -> bool:
    """True when ``path`` is a step directory whose ``COMPLETE`` manifest matches the files on disk.

    Args:
        path: A step directory.
        checksums: Also compare SHA-256 digests (reads every file); by default names and sizes only.
    """
    return checkpoint_problem(Path(path), checksums=checksums) is None


def _parse(data: object) -> Manifest:
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    files, hashes, step = data.get("files"), data.get("sha256", {}), data.get("step")
    if not isinstance(files, dict) or not files:
        raise ValueError("no 'files' table")
    for name, size in files.items():
        _check_name(name)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"size of {quote(name)} is {quote(size)}, not a byte count")
    if not isinstance(hashes, dict):
        raise ValueError("'sha256' is not a table")
    if hashes and set(hashes) != set(files):
        missing = sorted(set(files) - set(hashes)) or sorted(set(hashes) - set(files))
        raise ValueError(f"'sha256' and 'files' list different files ({quote(missing)})")
    for name, digest in hashes.items():
        if not isinstance(digest, str) or not _HEX64.match(digest):
            raise ValueError(f"SHA-256 of {quote(name)} is {quote(digest)}, not 64 hex digits")
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
        raise ValueError(f"'step' is {quote(step)}, not a step number")
    return Manifest(step=step, sizes=dict(files), sha256=dict(hashes))


def _check_name(name: object) -> None:
    """Manifest names stay inside the step directory (a hand-edited or hostile manifest reads nothing else)."""
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    bad_char = isinstance(name, str) and any(ord(c) < 32 for c in name)  # NUL, newlines: never a real name
    if not parts or bad_char or name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"file name {quote(name)} is not a relative path inside the checkpoint")


def _step_of_dir(path: Path) -> int | None:
    step = step_of(path.name)
    if step is None and (backup := backup_step(path.name)) is not None:
        step = step_of(backup[0])
    return step
