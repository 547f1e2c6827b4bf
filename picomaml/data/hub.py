"""Streaming pretokenized rows from the Hugging Face hub (e.g. ``pico-lm/pretokenized-dolma``) or local parquet.

Pretokenized Dolma stores parquet shards with an ``input_ids`` column of 2,049-token rows (OLMo tokenizer).
[`PretokenizedStream`][picomaml.data.hub.PretokenizedStream] streams such rows with ``datasets`` (nothing is
downloaded up front), gives each rank of a distributed run its own part, cuts rows to the model's length,
groups them into batches ``(B, L)``, and records how far it got so that a resumed run continues with exactly
the next window.

Row cutting (``mode``), for stored rows of ``R`` tokens and ``seq_len = L``:

* ``"split"`` (default): ``R // L`` non-overlapping windows per stored row, the remainder dropped. With
  ``L = 2049`` a Dolma row is kept whole: 2,048 inputs plus the shifted targets of next-token training.
* ``"truncate"``: the first ``L`` tokens of each stored row, the rest dropped.

Sharding: when the dataset's number of shards (files) is a multiple of ``world_size``, ranks read disjoint
files (``datasets.distributed.split_dataset_by_node``, "shards" strategy); otherwise every rank reads every
file and keeps one row out of ``world_size`` (slower; a warning says so).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from picomaml._optional import require
from picomaml.params import check_int

__all__ = ["DOLMA", "PretokenizedStream"]

DOLMA = "pico-lm/pretokenized-dolma"
_MODES = ("split", "truncate")


def _parquet_files(data_files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    items = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
    files: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*.parquet"))
            if not found:
                raise FileNotFoundError(f"PretokenizedStream: no .parquet files under {str(path)!r}")
            files.extend(found)
        elif not path.is_file():
            raise FileNotFoundError(f"PretokenizedStream: data file {str(path)!r} does not exist")
        elif path.suffix != ".parquet":
            raise ValueError(f"PretokenizedStream: data_files must be .parquet files, got {str(path)!r}")
        else:
            files.append(str(path))
    if not files:
        raise ValueError("PretokenizedStream: data_files is empty")
    return files


class PretokenizedStream:
    """Batches ``(batch_size, seq_len)`` of token ids streamed from a pretokenized parquet dataset.

    Args:
        name: Hub dataset name (default: pretokenized Dolma). Ignored when ``data_files`` is given.
        data_files: Local parquet files or directories to stream instead of the hub (same code path).
        split: Dataset split.
        seq_len: Tokens per output row ``L``.
        batch_size: Rows per batch ``B``.
        rank: This process's rank in ``[0, world_size)``.
        world_size: Number of ranks sharing the stream.
        mode: ``"split"`` (all ``R // L`` windows of a stored row) or ``"truncate"`` (its first ``L`` tokens).
        column: Column holding the token ids.
        drop_last: Drop a final batch smaller than ``batch_size``.
        **load_kwargs: Passed to ``datasets.load_dataset`` (e.g. ``revision``).

    The position is counted in stored rows of *this rank's* stream plus windows already taken from the next
    row; [`state_dict`][picomaml.data.hub.PretokenizedStream.state_dict] /
    [`load_state_dict`][picomaml.data.hub.PretokenizedStream.load_state_dict] save and restore it, and the
    next ``iter()`` resumes there (``IterableDataset.skip``).
    """

    def __init__(
        self,
        name: str = DOLMA,
        *,
        data_files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
        split: str = "train",
        seq_len: int = 2049,
        batch_size: int = 8,
        rank: int = 0,
        world_size: int = 1,
        mode: str = "split",
        column: str = "input_ids",
        drop_last: bool = True,
        **load_kwargs: Any,
    ) -> None:
        self.seq_len = check_int("seq_len", seq_len, ge=2)
        self.batch_size = check_int("batch_size", batch_size, ge=1)
        self.world_size = check_int("world_size", world_size, ge=1)
        self.rank = check_int("rank", rank, ge=0)
        if self.rank >= self.world_size:
            raise ValueError(f"PretokenizedStream: rank must be in [0, {world_size}), got {rank}")
        if mode not in _MODES:
            raise ValueError(f"PretokenizedStream: mode must be one of {list(_MODES)}, got {mode!r}")
        self.mode = mode
        self.name = name
        self.data_files = None if data_files is None else _parquet_files(data_files)
        self.split = split
        self.column = column
        self.drop_last = drop_last
        self.load_kwargs = load_kwargs
        self.rows_consumed = 0  # stored rows of this rank fully handed out
        self.windows_into_row = 0  # windows of the next stored row already handed out
        self._warned_short = False

    # -- dataset ------------------------------------------------------------------------------------------

    def dataset(self) -> Any:
        """This rank's ``datasets.IterableDataset`` of stored rows, from the start (no skipping)."""
        datasets = require("datasets", "data", "streaming pretokenized datasets")
        if self.data_files is not None:
            ds = datasets.load_dataset(
                "parquet", data_files={self.split: self.data_files}, split=self.split, streaming=True,
                **self.load_kwargs,
            )  # fmt: skip
        else:
            ds = datasets.load_dataset(self.name, split=self.split, streaming=True, **self.load_kwargs)
        columns = ds.column_names
        if columns is not None and self.column not in columns:
            raise KeyError(
                f"PretokenizedStream: no column {self.column!r} in the dataset; columns found: {columns}"
            )
        if columns is not None and len(columns) > 1:
            ds = ds.select_columns([self.column])
        if self.world_size > 1:
            if ds.num_shards % self.world_size != 0:
                warnings.warn(
                    f"PretokenizedStream: {ds.num_shards} shards do not divide among {self.world_size} ranks; "
                    "every rank reads every shard and keeps one row in world_size (slower)",
                    stacklevel=2,
                )
            distributed = require("datasets.distributed", "data", "sharding a stream across ranks")
            ds = distributed.split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
        return ds

    def _windows(self, ids: Sequence[int]) -> list[list[int]]:
        n = len(ids)
        if n < self.seq_len:
            if not self._warned_short:
                warnings.warn(
                    f"PretokenizedStream: stored rows of {n} tokens are shorter than seq_len={self.seq_len}; "
                    "they are skipped",
                    stacklevel=3,
                )
                self._warned_short = True
            return []
        if self.mode == "truncate":
            return [list(ids[: self.seq_len])]
        return [list(ids[i : i + self.seq_len]) for i in range(0, n - self.seq_len + 1, self.seq_len)]

    # -- iteration ------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Batches ``(B, seq_len)`` long, resuming from the current position."""
        ds = self.dataset()
        first_row = self.rows_consumed
        if first_row:
            ds = ds.skip(first_row)
        skip_windows = self.windows_into_row
        pending: list[list[int]] = []
        for offset, record in enumerate(ds):
            row_index = first_row + offset
            windows = self._windows(record[self.column])
            for j in range(skip_windows, len(windows)):
                pending.append(windows[j])
                if len(pending) == self.batch_size:
                    # the position is updated before the batch leaves, so a checkpoint taken while the caller
                    # holds this batch resumes with the next one
                    if j == len(windows) - 1:
                        self.rows_consumed, self.windows_into_row = row_index + 1, 0
                    else:
                        self.rows_consumed, self.windows_into_row = row_index, j + 1
                    yield torch.tensor(pending, dtype=torch.long)
                    pending = []
            skip_windows = 0
        if pending and not self.drop_last:
            self.rows_consumed, self.windows_into_row = first_row + offset + 1, 0
            yield torch.tensor(pending, dtype=torch.long)

    # -- state -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Position and the settings it depends on."""
        return {
            "rows_consumed": self.rows_consumed,
            "windows_into_row": self.windows_into_row,
            "rank": self.rank,
            "world_size": self.world_size,
            "seq_len": self.seq_len,
            "mode": self.mode,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by [`state_dict`][picomaml.data.hub.PretokenizedStream.state_dict] (same
        rank layout, ``seq_len`` and ``mode``).

        The batch size may differ: the position is counted in rows and windows, not batches.
        """
        missing = {"rows_consumed", "windows_into_row"} - set(state)
        if missing:
            raise KeyError(f"PretokenizedStream.load_state_dict: missing keys {sorted(missing)}")
        for key in ("rank", "world_size", "seq_len", "mode"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"PretokenizedStream.load_state_dict: saved {key}={state[key]!r} but this stream has "
                    f"{key}={getattr(self, key)!r}; the saved position would point at different rows"
                )
        self.rows_consumed = check_int("rows_consumed", state["rows_consumed"], ge=0)
        self.windows_into_row = check_int("windows_into_row", state["windows_into_row"], ge=0)
