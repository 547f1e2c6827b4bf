"""Loading a checkpoint: verify it, then read every file with the safe unpickler and name any bad one.

Every file is checked against the manifest's SHA-256 before it is read (see
[`picomaml.train.checkpoint.manifest`][picomaml.train.checkpoint.manifest]), so a damaged file is reported as
damaged, by name, rather than surfacing as whatever torch, JSON or YAML make of the broken bytes. Checkpoints
written before checksums existed are checked by size; for those, a file torch cannot read is diagnosed from
its bytes (no zip header: damaged; a broken archive: truncated or damaged). ``weights_only=True`` and
``yaml.safe_load`` throughout: no file of a checkpoint can run code.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from picomaml.params import one_line
from picomaml.train.checkpoint.discovery import locate
from picomaml.train.checkpoint.layout import CONFIG, RNG, TRAINER_STATE, DamagedCheckpointError
from picomaml.train.checkpoint.manifest import Manifest, read_trainer_state
from picomaml.train.rng_state import restore_rng_state
from picomaml.train.state_check import check_states

__all__ = ["Checkpoint", "load_checkpoint"]

logger = logging.getLogger(__name__)

_ZIP_MAGIC = b"PK\x03\x04"
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        path: The step directory.
        step: The optimizer step it was saved at.
        states: Component name -> loaded state (what ``state_dict()`` returned, or the saved value).
        counters: The counters given to [`save_checkpoint`][picomaml.train.checkpoint.save.save_checkpoint].
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
        """Call ``obj.load_state_dict(states[name])`` for each ``name -> obj``, after checking every state
        against its object ([`check_states`][picomaml.train.state_check.check_states]: shapes, dtypes,
        finite values, optimizer moments, the LR schedule's step), so nothing is loaded when one does not fit.

        Args:
            objects: Name -> object with ``load_state_dict`` (same names as at save time).
            strict: Raise ``KeyError`` when a name has no saved state (otherwise skip it with a warning).

        Returns:
            The names that were restored.

        Raises:
            StateMismatchError: A saved state does not fit its object (a ``ValueError`` naming the component,
                the key and what was expected).
        """
        check_states(objects, self.states, self.step)
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


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    map_location: Any = "cpu",
    weights_only: bool = True,
    components: tuple[str, ...] | None = None,
) -> Checkpoint:
    """Load a checkpoint written by [`save_checkpoint`][picomaml.train.checkpoint.save.save_checkpoint], after
    verifying it.

    Args:
        path: A step directory, or a checkpoint root (its newest verified checkpoint is loaded; damaged
            newer ones are skipped with a warning).
        map_location: Passed to ``torch.load`` (default: CPU; ``load_state_dict`` moves tensors).
        weights_only: Use the safe unpickler (tensors, numbers, strings and containers only).
        components: Load only these component files (default: all listed in ``trainer_state.json``).

    Raises:
        DamagedCheckpointError: The checkpoint is incomplete or a file is damaged (names the file).
        NoUsableCheckpointError: ``path`` is a root whose step folders all fail to verify.
        FileNotFoundError: No checkpoint at ``path``.
        KeyError: ``components`` names one the checkpoint does not have.
    """
    ckpt_dir, manifest = locate(path)
    trainer_state = read_trainer_state(ckpt_dir)
    names = trainer_state["components"]
    if components is not None:
        missing = sorted(set(components) - set(names))
        if missing:
            raise KeyError(f"checkpoint {ckpt_dir} has no components {missing}; it has {names}")
        names = list(components)
    states = {n: _load_file(ckpt_dir, f"{n}.pt", manifest, map_location, weights_only) for n in names}
    rng_name = f"{RNG}.pt"
    rng_state = (
        _load_file(ckpt_dir, rng_name, manifest, "cpu", weights_only) if rng_name in manifest.sizes else None
    )
    config = _config(ckpt_dir) if CONFIG in manifest.sizes else None
    return Checkpoint(
        path=ckpt_dir,
        step=trainer_state["step"],
        states=states,
        counters=dict(trainer_state.get("counters", {})),
        config=config,
        rng=rng_state,
        trainer_state=trainer_state,
    )


def _config(ckpt_dir: Path) -> dict[str, Any] | None:
    """``config.yaml`` through ``yaml.safe_load``; anything but a mapping is a damaged file."""
    f = ckpt_dir / CONFIG
    try:
        data = yaml.safe_load(f.read_bytes().decode("utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise DamagedCheckpointError(ckpt_dir, f"{CONFIG}: not valid YAML ({one_line(exc, 160)})", f) from exc
    if data is not None and not isinstance(data, dict):
        raise DamagedCheckpointError(ckpt_dir, f"{CONFIG}: expected a mapping, got {type(data).__name__}", f)
    return data


def _load_file(ckpt_dir: Path, name: str, manifest: Manifest, map_location: Any, weights_only: bool) -> Any:
    f = ckpt_dir / name
    if name not in manifest.sizes:
        raise DamagedCheckpointError(
            ckpt_dir, f"{name}: not listed in the manifest ({TRAINER_STATE} names this component)", f
        )
    try:
        return torch.load(f, map_location=map_location, weights_only=weights_only)
    except Exception as exc:  # noqa: BLE001 - broken bytes surface as any exception type in torch
        raise _load_error(ckpt_dir, name, exc, checksummed=name in manifest.sha256) from exc


def _load_error(ckpt_dir: Path, name: str, exc: Exception, checksummed: bool) -> Exception:
    """The right diagnosis for a ``.pt`` file torch could not read."""
    f = ckpt_dir / name
    try:
        with open(f, "rb") as fh:
            head = fh.read(len(_ZIP_MAGIC))
    except OSError as err:
        return DamagedCheckpointError(ckpt_dir, f"{name}: cannot be read ({one_line(err, 120)})", f)
    torch_says = one_line(f"{type(exc).__name__}: {exc}", 160)
    if head != _ZIP_MAGIC:
        return DamagedCheckpointError(
            ckpt_dir, f"{name}: not a torch checkpoint file (no zip header): damaged or overwritten", f
        )
    refused = isinstance(exc, pickle.UnpicklingError) and "weights only" in str(exc).lower()
    if refused and checksummed:
        # the bytes are exactly what was saved (the SHA-256 matched), so the safe loader refused a type
        found = _GLOBAL.search(str(exc))
        what = f" ({found.group(1)})" if found else ""
        return RuntimeError(
            f"{f}: holds a Python object{what} that the safe loader refuses; the file is intact (its SHA-256 "
            "matches), so it was saved like that. Save plain state (tensors, numbers, strings, lists, dicts) "
            "instead. Loading it with weights_only=False would run code from the file: do that only for a "
            "file you wrote yourself."
        )
    if refused:
        return DamagedCheckpointError(
            ckpt_dir,
            f"{name}: refused by the safe loader; written without a checksum, so it is damaged or holds Python "
            f"objects other than tensors and containers ({torch_says})",
            f,
        )
    return DamagedCheckpointError(
        ckpt_dir, f"{name}: damaged or truncated; torch cannot read it ({torch_says})", f
    )
