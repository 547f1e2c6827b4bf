"""What the reference trainer writes at each checkpoint of a run, beside the training state.

* [`dynamics_rows`][picomaml.train.run_checkpoint.dynamics_rows]: the fixed rows learning dynamics are
  captured on: by default ``2 * d_model`` per split (pico-analyze's PWCCA needs more rows than the activations
  have features), train rows gathered from as many batches as needed without moving the data position,
  held-out rows from the run's held-out set, with a warning naming the key to raise when fewer are available.
* [`checkpoint_writers`][picomaml.train.run_checkpoint.checkpoint_writers]: the extras of a checkpoint (the
  ``transformers`` export, the learning dynamics, optionally the rows' tokens as a ``datasets`` folder, as
  pico-train saves its batch).
* [`save_run_checkpoint`][picomaml.train.run_checkpoint.save_run_checkpoint]: one checkpoint of a run: the
  state, the extras, pruning that keeps every step's learning dynamics (pico-analyze reads each
  ``checkpoints/step_{N}/learning_dynamics``), and the Hub upload of the new step when an uploader is given.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from picomaml.interop.hub_upload import HubUploader, checkpoint_folders, uploader_from_config
from picomaml.params import ConfigError
from picomaml.train.checkpoint import save_checkpoint
from picomaml.train.config import ExperimentConfig
from picomaml.train.dynamics import SUBDIR, capture_splits, learning_dynamics_writer, select_modules

__all__ = ["check_dynamics_layers", "dynamics_row_count", "heldout_rows_needed", "dynamics_rows",
           "checkpoint_writers", "save_run_checkpoint", "hub_uploader"]  # fmt: skip

log = logging.getLogger(__name__)


def dynamics_row_count(cfg: ExperimentConfig) -> int:
    """Rows per split of the learning dynamics: ``checkpoint.dynamics.batch_size``, or ``2 * d_model``."""
    n = cfg.checkpoint.dynamics.batch_size
    return n if n is not None else 2 * cfg.model.d_model


def heldout_rows_needed(cfg: ExperimentConfig) -> int:
    """Held-out rows a run keeps: ``eval.rows`` for evaluation, more when learning dynamics need them."""
    return max(cfg.eval.rows, dynamics_row_count(cfg) if cfg.checkpoint.learning_dynamics else 0)


def check_dynamics_layers(cfg: ExperimentConfig, model: nn.Module) -> None:
    """Fail before training when a ``checkpoint.dynamics.layers`` suffix names no module of ``model``."""
    if not cfg.checkpoint.learning_dynamics:
        return
    for suffix in cfg.checkpoint.dynamics.layers:
        try:
            select_modules(model, [suffix])
        except ValueError as exc:
            raise ConfigError(f"checkpoint.dynamics.layers: {exc}") from None


def dynamics_rows(cfg: ExperimentConfig, train: Any, heldout_rows: Tensor) -> dict[str, Tensor]:
    """The fixed ``{"train": (n, L), "val": (n, L)}`` input rows of the learning dynamics.

    Args:
        cfg: The experiment config (``n`` is
            [`dynamics_row_count`][picomaml.train.run_checkpoint.dynamics_row_count]).
        train: The run's batch source (``next_batch``, ``local``, ``state_dict``); its position is restored.
        heldout_rows: ``(R, L + 1)`` held-out rows.

    Returns:
        Rows without their last token (inputs of the next-token loss); fewer than ``n`` when the data
        holds fewer, with a ``UserWarning`` naming the key to raise.
    """
    n = dynamics_row_count(cfg)
    position, rows, got = train.state_dict(), [], 0
    try:
        while got < n:
            try:
                batch = train.local(train.next_batch())
            except StopIteration:
                break
            rows.append(batch[: n - got])
            got += rows[-1].shape[0]
    finally:
        train.load_state_dict(position)
    out = {"train": torch.cat(rows)[:, :-1] if rows else heldout_rows[:0, :-1], "val": heldout_rows[:n, :-1]}
    for split, key in (("train", "the training data"), ("val", "eval.rows")):
        if out[split].shape[0] < n:
            warnings.warn(
                f"learning dynamics: {out[split].shape[0]} {split} rows of the {n} asked for "
                f"(checkpoint.dynamics.batch_size) are available; more need {key}",
                UserWarning,
                stacklevel=2,
            )
    return out


def _data_writer(rows: Mapping[str, Tensor]) -> Callable[[Path], None]:
    """Writes ``{split}_data/`` (a ``datasets`` folder with an ``input_ids`` column), as pico-train does."""

    def write(directory: Path) -> None:
        from picomaml._optional import require

        datasets = require("datasets", "data", "saving the learning-dynamics rows (checkpoint.dynamics.save_data)")
        for split, batch in rows.items():
            datasets.Dataset.from_dict({"input_ids": batch.tolist()}).save_to_disk(str(directory / f"{split}_data"))

    return write


def checkpoint_writers(
    cfg: ExperimentConfig, model: nn.Module, tokenizer: Any, rows: Mapping[str, Tensor]
) -> dict[str, Callable[[Path], None]]:
    """The extras of a checkpoint as [`save_checkpoint`][picomaml.train.checkpoint.save.save_checkpoint]
    writers: ``hf`` (the ``transformers`` export, with ``checkpoint.hf_export``) and
    ``learning_dynamics`` (captured now on ``rows``, with ``checkpoint.learning_dynamics``; the rows' tokens
    too with ``dynamics.save_data``)."""
    writers: dict[str, Callable[[Path], None]] = {}
    c = cfg.checkpoint
    if c.hf_export:
        from picomaml.model.hf import export_hf

        writers["hf"] = lambda d: export_hf(model, d, tokenizer)
    if c.learning_dynamics:
        dynamics = learning_dynamics_writer(capture_splits(model, rows, c.dynamics))
        if c.dynamics.save_data:
            data = _data_writer(rows)
            writers[SUBDIR] = lambda d: (dynamics(d), data(d))
        else:
            writers[SUBDIR] = dynamics
    return writers


def save_run_checkpoint(
    run_dir: Path,
    step: int,
    state: Mapping[str, Any],
    cfg: ExperimentConfig,
    counters: Mapping[str, Any],
    model: nn.Module,
    tokenizer: Any,
    rows: Mapping[str, Tensor],
    uploader: Any = None,
) -> Path:
    """Save ``run_dir/checkpoints/step_{step}`` with the run's extras; prune keeping every step's dynamics;
    hand the new step's ``hf/`` and ``learning_dynamics/`` to ``uploader`` (a
    [`HubUploader`][picomaml.interop.hub_upload.HubUploader], or ``None``), which pushes them in the
    background."""
    writers = checkpoint_writers(cfg, model, tokenizer, rows)
    path = save_checkpoint(
        run_dir / "checkpoints", step, state, config=cfg.to_dict(), counters=counters, writers=writers,
        keep_last=cfg.checkpoint.keep_last, keep_on_prune=(SUBDIR,),
    )  # fmt: skip
    if uploader is not None and writers:
        uploader.submit(step, checkpoint_folders(path, run_dir))
    return path


def hub_uploader(cfg: ExperimentConfig, run_dir: Path, is_main: bool, stack: Any = None) -> HubUploader | None:
    """The run's [`HubUploader`][picomaml.interop.hub_upload.HubUploader] on the main process (``None``
    without ``checkpoint.hub_repo``). Every process checks the settings and the token, so a bad one stops all
    of them before training; only the main process keeps an uploader, closed (pending pushes waited for) by
    ``stack`` (a ``contextlib.ExitStack``) when one is given."""
    uploader = uploader_from_config(cfg.checkpoint, run_dir)
    if uploader is not None and not is_main:
        uploader.close(timeout=0)
        return None
    if uploader is not None and stack is not None:
        stack.callback(uploader.close)
    return uploader
