"""Checkpoints: one directory per step, written atomically, with a ``latest`` pointer and pruning.

Layout under a checkpoint root (for the reference trainer, ``RUN_DIR/checkpoints``)::

    root/
      latest                   text file holding the name of the newest complete step directory
      step_000120/
        model.pt optimizer.pt ...    one file per component (its ``state_dict()`` or the value itself)
        rng.pt                       torch CPU / CUDA, Python ``random`` and NumPy generator states
        trainer_state.json           step, counters, library and torch versions, time, component names
        config.yaml                  the resolved configuration (when given)
        learning_dynamics/ hf/ ...   optional extras written by callables (see ``writers``)
        COMPLETE                     manifest (file names and sizes); written last

How a crash is survived: everything is written into ``root/.tmp_step_<N>_<pid>``, flushed and fsynced,
the ``COMPLETE`` manifest last; the directory is then renamed to ``step_<N>`` (a rename within one file
system is atomic), and only then is ``latest`` replaced (temporary file + ``os.replace``). Old step
directories are pruned after that. :func:`find_latest` trusts only directories whose manifest is present
and matches the files on disk, so a killed writer leaves at worst an ignored temporary directory.

Only one process (rank 0) should write to a root; loading is safe from every rank.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import pickle
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from picomaml._atomic_io import fsync_dir, fsync_tree, pid_alive, rmtree_atomic, write_bytes, write_text
from picomaml._version import __version__
from picomaml.params import check_int
from picomaml.rng_state import capture_rng_state, restore_rng_state

__all__ = [
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "find_latest",
    "resolve_resume",
    "is_complete",
    "list_checkpoints",
]

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
CONFIG = "config.yaml"
RNG = "rng"
_RESERVED = {RNG, "trainer_state", "config", MARKER, LATEST}
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_DIR = re.compile(r"^\.tmp_.*_(\d+)$")
_TMP_POINTER = re.compile(r"^\.latest\.tmp_(\d+)$")


def step_dir_name(step: int) -> str:
    """``step_000120``: zero-padded so that names sort like steps."""
    return f"step_{step:06d}"


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------


def _plain(obj: Any) -> Any:
    """Dataclasses / tuples / paths -> YAML- and JSON-safe builtins."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    return obj


def _remove_stale_tmp(root: Path) -> None:
    """Delete temporary directories and pointer files left by writers that no longer run (pid in the name)."""
    for p in root.iterdir():
        m = _TMP_DIR.match(p.name) or _TMP_POINTER.match(p.name)
        if not m or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        logger.info("removing stale temporary checkpoint file %s", p)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# discovery
# ----------------------------------------------------------------------------------------------


def is_complete(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a step directory whose ``COMPLETE`` manifest matches the files on disk."""
    path = Path(path)
    marker = path / MARKER
    try:
        manifest = json.loads(marker.read_text(encoding="utf-8"))
        files = manifest["files"]
        return all((path / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def list_checkpoints(root: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete step directories under ``root`` as ``(step, path)``, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_latest(root: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint under ``root``, or ``None``.

    The ``latest`` pointer is followed when it names a complete directory; otherwise (missing pointer,
    or a crash between the rename and the pointer update) the complete step directory with the
    highest step is returned. Temporary and incomplete directories are never returned.
    """
    root = Path(root)
    pointer = root / LATEST
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except OSError:
        name = ""
    if name and _STEP_DIR.match(name) and is_complete(root / name):
        return root / name
    found = list_checkpoints(root)
    if name:
        logger.warning(
            "checkpoint pointer %s names %r, which is not complete; using the newest complete one",
            pointer,
            name,
        )
    return found[-1][1] if found else None


def resolve_resume(resume: str | os.PathLike[str] | None, root: str | os.PathLike[str]) -> Path | None:
    """Turn a ``--resume`` value into a checkpoint directory (or ``None`` for a fresh start).

    Args:
        resume: ``"auto"`` (the newest complete checkpoint under ``root``, ``None`` when there is
            none), ``"none"`` / ``None`` (fresh start), or a path: a step directory or a root.
        root: The run's checkpoint root.

    Raises:
        FileNotFoundError: ``resume`` is a path that holds no complete checkpoint.
    """
    if resume is None or (isinstance(resume, str) and resume.lower() == "none"):
        return None
    if isinstance(resume, str) and resume.lower() == "auto":
        return find_latest(root)
    return _checkpoint_dir(resume)


def _checkpoint_dir(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if is_complete(path):
        return path
    if path.is_dir() and (path / MARKER).exists():
        raise FileNotFoundError(
            f"checkpoint {path} is incomplete or damaged (its {MARKER} manifest does not match)"
        )
    if path.is_dir():
        latest = find_latest(path)
        if latest is not None:
            return latest
    raise FileNotFoundError(
        f"no complete checkpoint at {path} (expected a step directory with a {MARKER} file, or a "
        f"checkpoint root holding one)"
    )


# ----------------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------------


def save_checkpoint(
    root: str | os.PathLike[str],
    step: int,
    state: Mapping[str, Any],
    *,
    config: Any = None,
    counters: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    writers: Mapping[str, Callable[[Path], None]] | None = None,
    rng: bool = True,
    keep_last: int | None = 3,
    fsync: bool = True,
) -> Path:
    """Write ``root/step_<N>/`` atomically, point ``root/latest`` at it, prune old ones.

    Args:
        root: Checkpoint root (created if missing).
        step: Optimizer step (>= 0); the directory is ``step_<step:06d>``. Saving a step twice
            replaces the earlier directory.
        state: Name -> component. Objects with ``state_dict()`` (modules, optimizers, LR schedulers,
            samplers, the hybrid scheduler, the inner loop) are saved through it; anything else
            (dicts of tensors and numbers, e.g. a data position) is saved as is. Each goes to
            ``<name>.pt``. Names: letters, digits, ``_.-``; not ``rng``, ``config``, ``trainer_state``.
        config: Resolved configuration (mapping or dataclass) written as ``config.yaml``.
        counters: JSON-serialisable numbers (AR steps, meta steps, tokens, ...) for ``trainer_state.json``.
        extra: More JSON-serialisable fields for ``trainer_state.json``.
        writers: Subdirectory name -> callable that fills that (already created) directory, e.g.
            ``{"hf": lambda d: export_hf(model, d, tokenizer)}`` (:func:`picomaml.model.hf.export_hf`) or
            learning dynamics; they run inside the temporary directory, so their output is part of the
            atomic checkpoint.
        rng: Also save the global RNG states (``rng.pt``).
        keep_last: Keep this many complete step directories (the new one included); ``None`` keeps all.
        fsync: Flush files and directories to disk (turn off only for throwaway tests).

    Returns:
        The final step directory.
    """
    step = check_int("step", step, ge=0)
    if keep_last is not None:
        keep_last = check_int("keep_last", keep_last, ge=1)
    _check_names(state, writers or {})
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp_{final.name}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        _write_contents(tmp, step, state, config, counters, extra, writers or {}, rng, fsync)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(root, tmp, final, fsync)
    _write_latest(root, final.name, fsync)
    if keep_last is not None:
        for _old_step, old in list_checkpoints(root)[:-keep_last]:
            if old != final:
                logger.debug("pruning checkpoint %s (keep_last=%d)", old, keep_last)
                rmtree_atomic(old)
    logger.info("saved checkpoint %s in %.2fs", final, time.perf_counter() - t0)
    return final


def _check_names(state: Mapping[str, Any], writers: Mapping[str, Any]) -> None:
    for name in state:
        if not isinstance(name, str) or not _NAME.match(name) or name in _RESERVED:
            raise ValueError(
                f"state: invalid component name {name!r} (letters, digits, '_.-'; reserved: {sorted(_RESERVED)})"
            )
    for name in writers:
        bad_suffix = isinstance(name, str) and name.endswith((".pt", ".json", ".yaml"))
        if not isinstance(name, str) or not _NAME.match(name) or name in _RESERVED or bad_suffix:
            raise ValueError(
                f"writers: invalid subdirectory name {name!r} (letters, digits, '_.-', no file suffix)"
            )


def _write_contents(
    tmp: Path,
    step: int,
    state: Mapping[str, Any],
    config: Any,
    counters: Mapping[str, Any] | None,
    extra: Mapping[str, Any] | None,
    writers: Mapping[str, Callable[[Path], None]],
    rng: bool,
    fsync: bool,
) -> None:
    """Every file of a checkpoint into ``tmp``, the manifest (``MARKER``) last."""
    for name, obj in state.items():
        value = obj.state_dict() if callable(getattr(obj, "state_dict", None)) else obj
        write_bytes(tmp / f"{name}.pt", lambda f, v=value: torch.save(v, f), fsync)
    if rng:
        rng_state = capture_rng_state()
        write_bytes(tmp / f"{RNG}.pt", lambda f: torch.save(rng_state, f), fsync)
    if config is not None:
        write_text(tmp / CONFIG, yaml.safe_dump(_plain(config), sort_keys=False), fsync)
    for name, write in writers.items():
        sub = tmp / name
        sub.mkdir()
        write(sub)
        if fsync:
            fsync_tree(sub)  # third-party writers (save_pretrained) do not fsync
    now = _dt.datetime.now(_dt.timezone.utc)
    trainer_state = {
        "step": step,
        "counters": _plain(dict(counters or {})),
        "components": list(state),
        "picomaml_version": __version__,
        "torch_version": torch.__version__,
        "time": now.isoformat(timespec="seconds"),
        "unix_time": now.timestamp(),
        "extra": _plain(dict(extra or {})),
    }
    write_text(tmp / TRAINER_STATE, json.dumps(trainer_state, indent=2, sort_keys=False), fsync)
    files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    write_text(tmp / MARKER, json.dumps({"step": step, "files": files}, indent=1), fsync)
    if fsync:
        fsync_dir(tmp)


def _publish(root: Path, tmp: Path, final: Path, fsync: bool) -> None:
    """Rename the finished ``tmp`` to ``final``; an earlier save of the same step is replaced."""
    trash: Path | None = None
    try:
        if final.exists():  # the same step saved again (e.g. the final save after a periodic one)
            trash = root / f".tmp_delete_{final.name}_{os.getpid()}"
            os.rename(final, trash)
        os.rename(tmp, final)
        if fsync:
            fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None and trash.exists() and not final.exists():
            os.rename(trash, final)  # put the earlier save of this step back
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _write_latest(root: Path, name: str, fsync: bool = True) -> None:
    """Point ``root/latest`` at ``name``: write a temporary file, then ``os.replace`` (atomic)."""
    tmp = root / f".{LATEST}.tmp_{os.getpid()}"
    write_text(tmp, name + "\n", fsync)
    os.replace(tmp, root / LATEST)
    if fsync:
        fsync_dir(root)


# ----------------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        path: The step directory.
        step: The optimizer step it was saved at.
        states: Component name -> loaded state (what ``state_dict()`` returned, or the saved value).
        counters: The counters given to :func:`save_checkpoint`.
        config: The ``config.yaml`` contents as a dict (``None`` when none was saved).
        rng: The saved global RNG states (``None`` when ``rng=False`` at save time).
        trainer_state: The whole ``trainer_state.json`` (versions, time, extra fields).
    """

    path: Path
    step: int
    states: dict[str, Any]
    counters: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    trainer_state: dict[str, Any] = field(default_factory=dict)

    def load_into(self, objects: Mapping[str, Any], strict: bool = True) -> list[str]:
        """Call ``obj.load_state_dict(states[name])`` for each ``name -> obj``.

        Args:
            objects: Name -> object with ``load_state_dict`` (same names as at save time).
            strict: Raise ``KeyError`` when a name has no saved state (otherwise skip it with a warning).

        Returns:
            The names that were restored.
        """
        done = []
        for name, obj in objects.items():
            if name not in self.states:
                if strict:
                    raise KeyError(
                        f"checkpoint {self.path} has no state {name!r}; it has {sorted(self.states)}"
                    )
                logger.warning("checkpoint %s has no state %r; left as is", self.path, name)
                continue
            if not callable(getattr(obj, "load_state_dict", None)):
                raise TypeError(f"objects[{name!r}] ({type(obj).__name__}) has no load_state_dict()")
            obj.load_state_dict(self.states[name])
            done.append(name)
        return done

    def restore_rng(self) -> None:
        """Restore the global RNG states saved with the checkpoint (no-op when none were saved)."""
        if self.rng is not None:
            restore_rng_state(self.rng)


def _load_file(path: Path, map_location: Any, weights_only: bool) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        raise RuntimeError(
            f"{path}: cannot be loaded with weights_only=True (it holds arbitrary Python objects). "
            f"If you trust this file, pass weights_only=False. Original error: {exc}"
        ) from exc


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    map_location: Any = "cpu",
    weights_only: bool = True,
    components: tuple[str, ...] | None = None,
) -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: A step directory, or a checkpoint root (its newest complete checkpoint is loaded).
        map_location: Passed to ``torch.load`` (default: CPU; ``load_state_dict`` moves tensors).
        weights_only: Use the safe unpickler (tensors, numbers, strings and containers only).
        components: Load only these component files (default: all listed in ``trainer_state.json``).

    Raises:
        FileNotFoundError: No complete checkpoint at ``path``.
    """
    ckpt_dir = _checkpoint_dir(path)
    trainer_state = json.loads((ckpt_dir / TRAINER_STATE).read_text(encoding="utf-8"))
    names = list(trainer_state.get("components", []))
    if components is not None:
        missing = sorted(set(components) - set(names))
        if missing:
            raise KeyError(f"checkpoint {ckpt_dir} has no components {missing}; it has {names}")
        names = list(components)
    states = {n: _load_file(ckpt_dir / f"{n}.pt", map_location, weights_only) for n in names}
    rng_file = ckpt_dir / f"{RNG}.pt"
    rng_state = _load_file(rng_file, "cpu", weights_only) if rng_file.exists() else None
    config_file = ckpt_dir / CONFIG
    config = yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file.exists() else None
    return Checkpoint(
        path=ckpt_dir,
        step=int(trainer_state["step"]),
        states=states,
        counters=dict(trainer_state.get("counters", {})),
        config=config,
        rng=rng_state,
        trainer_state=trainer_state,
    )
