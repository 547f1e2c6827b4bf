"""Deterministic, resumable batches of token rows held in memory, with data-parallel slicing.

Every rank walks the same seeded permutation of the rows and sees the same *global* batch at each step;
[`RowBatcher.local`][picomaml.data.row_batcher.RowBatcher.local] gives the rank its contiguous share. Because
the global batch is known on every rank, episodes sampled from it are identical across device counts, which
makes a 2-device run reproduce a 1-device run with the same global batch.
"""

from __future__ import annotations

from typing import Any

import torch

from picomaml.params import check_int

__all__ = ["RowBatcher"]

_MAX_SEED = 2**63 - 1  # seed + epoch seeds a torch.Generator


class RowBatcher:
    """Endless epochs over ``rows`` in a seeded random order; the position is checkpointable.

    Args:
        rows: Token rows ``(R, L)``.
        batch_size: Global batch size (rows per micro-batch, summed over ranks).
        seed: Seed of the shuffling generator (epoch ``e`` uses ``seed + e``: a pure function of both).
        rank: This process's rank.
        world_size: Number of data-parallel processes; must divide ``batch_size``.
    """

    def __init__(
        self, rows: torch.Tensor, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if rows.ndim != 2:
            raise ValueError(f"rows must be (num_rows, seq_len), got shape {tuple(rows.shape)}")
        if batch_size < 1 or batch_size > rows.shape[0]:
            raise ValueError(
                f"batch_size must be in [1, {rows.shape[0]}] (the number of rows), got {batch_size}"
            )
        if world_size < 1 or batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be divisible by world_size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.rows = rows
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0  # batches taken in the current epoch
        self._order = self._permutation(0)

    @property
    def batches_per_epoch(self) -> int:
        """Full batches per pass over the rows (the tail is dropped)."""
        return self.rows.shape[0] // self.batch_size

    def _permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.rows.shape[0], generator=gen)

    def next_global(self) -> torch.Tensor:
        """The next global batch ``(batch_size, L)`` (identical on every rank)."""
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
        start = self.position * self.batch_size
        idx = self._order[start : start + self.batch_size]
        self.position += 1
        return self.rows[idx]

    def local(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share ``(batch_size / world_size, L)`` of a global batch."""
        share = batch.shape[0] // self.world_size
        return batch[self.rank * share : (self.rank + 1) * share]

    def state_dict(self) -> dict[str, Any]:
        """Position in the stream (the rows themselves are not saved)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a [`state_dict`][picomaml.data.row_batcher.RowBatcher.state_dict].

        Raises:
            KeyError: A key is missing.
            ValueError: The batch size differs, or a position is outside the rows (names the key and the
                allowed range): a position beyond the epoch would silently start the next one.
        """
        missing = {"epoch", "position", "seed", "batch_size"} - set(state)
        if missing:
            raise KeyError(f"RowBatcher.load_state_dict: missing keys {sorted(missing)}")
        if state["batch_size"] != self.batch_size:
            raise ValueError(f"checkpoint batch_size {state['batch_size']} != current {self.batch_size}")
        seed = check_int("data position 'seed'", state["seed"], ge=0, le=_MAX_SEED)
        epoch = check_int("data position 'epoch'", state["epoch"], ge=0, le=_MAX_SEED - seed)
        position = check_int("data position 'position'", state["position"], ge=0, le=self.batches_per_epoch)
        self.seed, self.epoch, self.position = seed, epoch, position
        self._order = self._permutation(self.epoch)
