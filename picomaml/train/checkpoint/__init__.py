"""Checkpoints: one directory per step, verified by checksums, written atomically, with a ``latest`` pointer.

Layout under a checkpoint root (for the reference trainer, ``RUN_DIR/checkpoints``):

    root/
      latest                   text file holding the name of the newest complete step directory
      step_120/                (pico-train's name; earlier picomaml versions wrote step_000120, still read)
        model.pt optimizer.pt ...    one file per component (its ``state_dict()`` or the value itself)
        rng.pt                       torch CPU / CUDA, Python ``random`` and NumPy generator states
        trainer_state.json           step, counters, library and torch versions, time, component names
        config.yaml                  the resolved configuration (when given)
        learning_dynamics/ hf/ ...   optional extras written by callables (see ``writers``)
        COMPLETE                     manifest: every file's size and SHA-256; written last
      step_20/                 pruned by keep_last with keep_on_prune: PRUNED and learning_dynamics/ only

The pieces:

- [`layout`][picomaml.train.checkpoint.layout]: names on disk,
  [`DamagedCheckpointError`][picomaml.train.checkpoint.layout.DamagedCheckpointError],
  [`NoUsableCheckpointError`][picomaml.train.checkpoint.layout.NoUsableCheckpointError],
  [`CheckpointWarning`][picomaml.train.checkpoint.layout.CheckpointWarning].
- [`manifest`][picomaml.train.checkpoint.manifest]: the ``COMPLETE`` manifest;
  [`verify_checkpoint`][picomaml.train.checkpoint.manifest.verify_checkpoint],
  [`is_complete`][picomaml.train.checkpoint.manifest.is_complete].
- [`save`][picomaml.train.checkpoint.save]:
  [`save_checkpoint`][picomaml.train.checkpoint.save.save_checkpoint] (atomic, also when a step is saved
  again; a full disk is a clear ``OSError`` that leaves earlier checkpoints as they were).
- [`discovery`][picomaml.train.checkpoint.discovery]:
  [`find_latest`][picomaml.train.checkpoint.discovery.find_latest],
  [`resolve_resume`][picomaml.train.checkpoint.discovery.resolve_resume],
  [`list_checkpoints`][picomaml.train.checkpoint.discovery.list_checkpoints] (only verified checkpoints are
  chosen; the ones skipped are named, with the bad file, in a warning).
- [`load`][picomaml.train.checkpoint.load]:
  [`load_checkpoint`][picomaml.train.checkpoint.load.load_checkpoint],
  [`Checkpoint`][picomaml.train.checkpoint.load.Checkpoint].

Only one process (rank 0) should write to a root, one save at a time; loading is safe from every rank.
"""

from __future__ import annotations

from picomaml.train.checkpoint.discovery import find_latest, list_checkpoints, resolve_resume
from picomaml.train.checkpoint.layout import (
    CONFIG,
    LATEST,
    MARKER,
    RNG,
    TRAINER_STATE,
    CheckpointWarning,
    DamagedCheckpointError,
    NoUsableCheckpointError,
    step_dir_name,
)
from picomaml.train.checkpoint.load import Checkpoint, load_checkpoint
from picomaml.train.checkpoint.manifest import is_complete, verify_checkpoint
from picomaml.train.checkpoint.save import save_checkpoint

__all__ = [
    "CONFIG",
    "LATEST",
    "MARKER",
    "RNG",
    "TRAINER_STATE",
    "Checkpoint",
    "CheckpointWarning",
    "DamagedCheckpointError",
    "NoUsableCheckpointError",
    "find_latest",
    "is_complete",
    "list_checkpoints",
    "load_checkpoint",
    "resolve_resume",
    "save_checkpoint",
    "step_dir_name",
    "verify_checkpoint",
]
