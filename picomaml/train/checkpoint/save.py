"""Writing a checkpoint: a temporary directory, hashed and fsynced, published by rename, then ``latest``.

Order of a save (each step durable before the next, so a crash anywhere leaves the previous state):

1. Leftovers of a writer that died are cleaned: temporary directories and pointer files are removed, and
   the saved-aside copy of a step whose folder is missing (a re-save killed between its two renames)
   is renamed back, so that step is never lost.
2. Everything is written into ``root/.tmp_step_<N>_<pid>``, each file hashed while written and fsynced,
   the ``COMPLETE`` manifest (sizes and SHA-256) last.
3. Published: renamed to ``step_<N>``. When ``step_<N>`` exists (the same step saved again), it is first
   renamed to ``.tmp_delete_step_<N>_<pid>`` and deleted only once the new one is in place; readers treat
   that copy as step ``N`` while the folder is missing.
4. ``latest`` is replaced (temporary file + ``os.replace``), then old step directories are pruned.

A failure (disk full, I/O error) removes the temporary directory and raises an ``OSError`` that names
the file and the checkpoint; earlier checkpoints are not touched. One save at a time per root.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from picomaml._version import __version__
from picomaml.params import ConfigError, check_int, short_repr
from picomaml.train import _atomic_io as aio
from picomaml.train.checkpoint.discovery import list_checkpoints
from picomaml.train.checkpoint.layout import (
    CONFIG,
    LATEST,
    MARKER,
    PRUNED,
    RNG,
    TMP_ENTRY,
    TMP_POINTER,
    TRAINER_STATE,
    backup_step,
    step_dir_name,
)
from picomaml.train.checkpoint.manifest import is_complete, manifest_json
from picomaml.train.rng_state import capture_rng_state

__all__ = ["save_checkpoint"]

logger = logging.getLogger(__name__)

RESERVED = {RNG, "trainer_state", "config", MARKER, LATEST}
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


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
    keep_on_prune: Sequence[str] = (),
    fsync: bool = True,
) -> Path:
    """Write ``root/step_<N>/`` atomically, point ``root/latest`` at it, prune old ones.

    Args:
        root: Checkpoint root (created if missing).
        step: Optimizer step (>= 0); the directory is ``step_<step>``. Saving a step twice
            replaces the earlier directory (also an earlier version's zero-padded ``step_000<step>``); at no
            instant is the step lost.
        state: Name -> component. Objects with ``state_dict()`` (modules, optimizers, LR schedulers,
            samplers, the hybrid scheduler, the inner loop) are saved through it; anything else
            (dicts of tensors and numbers, e.g. a data position) is saved as is. Each goes to
            ``<name>.pt``. Names: letters, digits, ``_.-``; not ``rng``, ``config``, ``trainer_state``.
        config: Resolved configuration (mapping or dataclass) written as ``config.yaml``.
        counters: JSON-serialisable numbers (AR steps, meta steps, tokens, ...) for ``trainer_state.json``.
        extra: More JSON-serialisable fields for ``trainer_state.json``.
        writers: Subdirectory name -> callable that fills that (already created) directory, e.g.
            ``{"hf": lambda d: export_hf(model, d, tokenizer)}``
            ([`picomaml.model.hf.export_hf`][picomaml.model.hf.export_hf]) or learning dynamics; they run
            inside the temporary directory, so their output is part of the atomic checkpoint (and of its
            checksums).
        rng: Also save the global RNG states (``rng.pt``).
        keep_last: Keep this many complete step directories (the new one included); ``None`` keeps all.
        keep_on_prune: Writer subdirectories that survive pruning (e.g. ``("learning_dynamics",)``, so
            pico-analyze sees every step): a pruned folder keeps them, gets a ``PRUNED`` file instead of its
            manifest and loses everything else; it is never resumed from.
        fsync: Flush files and directories to disk (turn off only for throwaway tests).

    Returns:
        The final step directory.

    Raises:
        ConfigError: A bad argument (step, keep_last, a component or writer name).
        OSError: Writing failed (e.g. the disk is full): the message names the checkpoint and the file;
            the unfinished copy is removed and earlier checkpoints are intact. When only the ``latest``
            update failed, the new step directory is complete but ``latest`` still names the earlier one.
    """
    step = check_int("step", step, ge=0)
    if keep_last is not None:
        keep_last = check_int("keep_last", keep_last, ge=1)
    _check_names(state, writers or {})
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp_{final.name}_{os.getpid()}"
    t0 = time.perf_counter()
    try:
        recover_interrupted(root)
        aio.remove_tree(tmp)
        aio.make_dir(tmp)
        _write_contents(tmp, step, state, config, counters, extra, writers or {}, rng, fsync)
        _publish(root, tmp, final, fsync)
    except OSError as exc:
        aio.remove_tree_quietly(tmp)
        raise _save_error(exc, root, tmp, final) from exc
    except BaseException:
        aio.remove_tree_quietly(tmp)
        raise
    try:
        _write_latest(root, final.name, fsync)
    except OSError as exc:
        raise _os_error(
            exc,
            f"checkpoint {final} is saved and complete, but {LATEST} could not be updated "
            f"({aio.describe_os_error(exc)}: {exc}); it still names the previous checkpoint",
        ) from exc
    legacy = root / f"step_{step:06d}"
    if legacy != final and legacy.is_dir():  # the same step under an earlier version's name
        aio.rmtree_atomic(legacy)
    if keep_last is not None:
        _prune(root, final, keep_last, tuple(keep_on_prune))
    logger.info("saved checkpoint %s in %.2fs", final, time.perf_counter() - t0)
    return final


def recover_interrupted(root: Path) -> None:
    """Clean up after writers that died: restore saved-aside step copies, delete temporary entries.

    An entry whose pid (the last ``_<digits>`` of its name) belongs to another live process is left
    alone; this process's own entries count as stale, because saves are not run concurrently.
    """
    me = os.getpid()
    for p in sorted(root.iterdir()):
        m = TMP_ENTRY.match(p.name) or TMP_POINTER.match(p.name)
        if not m or (int(m.group(1)) != me and aio.pid_alive(int(m.group(1)))):
            continue
        if p.is_symlink():  # never put back, and never delete through, a link (it may lead to another run)
            logger.warning("leaving %s alone: a temporary checkpoint entry that is a symbolic link", p)
            continue
        backup = backup_step(p.name)
        target = root / backup[0] if backup else None
        if target is not None and not target.exists() and not target.is_symlink() and is_complete(p):
            logger.warning("putting back %s from %s (a re-save of that step was interrupted)", target, p.name)
            aio.rename(p, target)
            continue
        logger.info("removing stale temporary checkpoint entry %s", p)
        if not aio.remove_tree_quietly(p):
            logger.warning("could not remove stale temporary checkpoint entry %s", p)


def _check_names(state: Mapping[str, Any], writers: Mapping[str, Any]) -> None:
    for name in state:
        if not _valid_name(name) or name in RESERVED:
            raise ConfigError(
                f"state: invalid component name {short_repr(name)} (letters, digits, '_.-'; "
                f"reserved: {sorted(RESERVED)})"
            )
    for name in writers:
        bad_suffix = isinstance(name, str) and name.endswith((".pt", ".json", ".yaml"))
        if not _valid_name(name) or name in RESERVED or bad_suffix:
            raise ConfigError(
                f"writers: invalid subdirectory name {short_repr(name)} (letters, digits, '_.-', no file suffix)"
            )


def _valid_name(name: object) -> bool:
    return isinstance(name, str) and bool(name) and name[0] not in ".-" and set(name) <= _NAME_CHARS


def _plain(obj: Any) -> Any:
    """Dataclasses / tuples / paths -> YAML- and JSON-safe builtins."""
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
    hashes: dict[str, str] = {}
    for name, obj in state.items():
        value = obj.state_dict() if callable(getattr(obj, "state_dict", None)) else obj
        hashes[f"{name}.pt"] = aio.write_bytes(tmp / f"{name}.pt", lambda f, v=value: torch.save(v, f), fsync)
    if rng:
        rng_state = capture_rng_state()
        hashes[f"{RNG}.pt"] = aio.write_bytes(tmp / f"{RNG}.pt", lambda f: torch.save(rng_state, f), fsync)
    if config is not None:
        hashes[CONFIG] = aio.write_text(tmp / CONFIG, yaml.safe_dump(_plain(config), sort_keys=False), fsync)
    for name, write in writers.items():
        sub = tmp / name
        aio.make_dir(sub)
        write(sub)
        if fsync:
            aio.fsync_tree(sub)  # third-party writers (save_pretrained) do not fsync
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
    text = json.dumps(trainer_state, indent=2, sort_keys=False)
    hashes[TRAINER_STATE] = aio.write_text(tmp / TRAINER_STATE, text, fsync)
    aio.write_text(tmp / MARKER, manifest_json(step, tmp, hashes), fsync)
    if fsync:
        aio.fsync_dir(tmp)


def _publish(root: Path, tmp: Path, final: Path, fsync: bool) -> None:
    """Rename the finished ``tmp`` to ``final``; an earlier save of the same step is swapped out.

    The old copy is renamed aside, the new one renamed in, and the old one deleted only after the
    directory is fsynced. If the process dies between the renames, readers use the copy aside and the
    next save renames it back ([`recover_interrupted`][picomaml.train.checkpoint.save.recover_interrupted]);
    if the second rename raises, it is put back here.
    """
    if not (final.exists() or final.is_symlink()):
        aio.rename(tmp, final)
        if fsync:
            aio.fsync_dir(root)
        return
    aside = root / f".tmp_delete_{final.name}_{os.getpid()}"
    aio.remove_tree(aside)  # a stale one (final exists, so it is not the only copy)
    aio.rename(final, aside)
    try:
        aio.rename(tmp, final)
    except BaseException:
        if not final.exists():
            aio.rename(aside, final)
        raise
    if fsync:
        aio.fsync_dir(root)  # both renames on disk before the old copy goes
    aio.remove_tree_quietly(aside)


def _write_latest(root: Path, name: str, fsync: bool = True) -> None:
    """Point ``root/latest`` at ``name``: write a temporary file, then ``os.replace`` (atomic)."""
    tmp = root / f".{LATEST}.tmp_{os.getpid()}"
    try:
        aio.write_text(tmp, name + "\n", fsync)
        aio.replace(tmp, root / LATEST)
    except BaseException:
        aio.remove_tree_quietly(tmp)
        raise
    if fsync:
        aio.fsync_dir(root)


def _prune(root: Path, final: Path, keep_last: int, keep: tuple[str, ...] = ()) -> None:
    """Delete the oldest complete step directories beyond ``keep_last`` (never ``final``); those holding a
    subdirectory named in ``keep`` keep it (and only it)."""
    for _old_step, old in list_checkpoints(root)[:-keep_last]:
        if old == final:
            continue
        logger.debug("pruning checkpoint %s (keep_last=%d)", old, keep_last)
        try:
            kept = [name for name in keep if (old / name).is_dir()]
            if not kept:
                aio.rmtree_atomic(old)
                continue
            # PRUNED first, then the manifest goes: from here on the folder is never taken for a checkpoint
            aio.write_text(old / PRUNED, f"pruned by keep_last={keep_last}; kept: {', '.join(kept)}\n", fsync=False)
            (old / MARKER).unlink(missing_ok=True)
            for entry in old.iterdir():
                if entry.name not in (*kept, PRUNED):
                    aio.remove_tree(entry) if entry.is_dir() else entry.unlink()
        except OSError as exc:  # the new checkpoint is saved; an old one staying behind is no failure
            logger.warning("could not prune old checkpoint %s: %s", old, exc)


def _save_error(exc: OSError, root: Path, tmp: Path, final: Path) -> OSError:
    """An ``OSError`` that says which checkpoint and file failed, why, and that nothing else changed."""
    where = Path(exc.filename) if exc.filename else None
    if where is not None and where.is_relative_to(tmp):
        what = f" while writing {where.relative_to(tmp).as_posix()}"
    elif where is not None:
        what = f" at {where}"
    else:
        what = ""
    try:
        free = f"; {shutil.disk_usage(root).free / 2**20:.1f} MiB free on {root}"
    except OSError:
        free = ""
    reason = aio.describe_os_error(exc)
    return _os_error(
        exc,
        f"cannot save checkpoint {final.name} under {root}: {reason}{what}{free}. The unfinished copy was "
        "removed; earlier checkpoints are intact",
    )


def _os_error(exc: OSError, message: str) -> OSError:
    """``exc``'s kind (errno, file name) with a new message."""
    if exc.errno is None:
        return OSError(message)
    return OSError(exc.errno, message, exc.filename) if exc.filename else OSError(exc.errno, message)
