"""The tensors of one N-way K-shot SMLMT episode (or of a stack of T independent episodes).

An [`Episode`][picomaml.meta.episode.Episode] is plain data: it does not know how it was sampled (see
[`picomaml.meta.sampler.SMLMTSampler`][picomaml.meta.sampler.SMLMTSampler]). Rows are laid out label-major:
support row ``i`` has label ``i // K`` and query row ``j`` has label ``j // Q``, and ``class_token_ids[l]`` is
the original token id that label ``l`` stands for in this task. Optional provenance (``support_windows`` /
``query_windows``, the indices of the source windows in the sampler's buffer, and ``windows_per_row``) lets
tests and displays map every row back to the tokens it came from.

The text episodes of the downstream evaluation
([`picomaml.eval.leopard.TextEpisode`][picomaml.eval.leopard.TextEpisode]) carry the fields of `COMMON_FIELDS`
with the same meanings, so featurising
([`picomaml.meta.objectives.episode_features`][picomaml.meta.features.episode_features]) and display
([`picomaml.format_episode`][picomaml.data.display.format_episode]) treat both
alike: ``*_mask`` is True at masked class tokens (none in a text window), ``*_valid`` at real, non-pad
tokens (every position of an SMLMT window), and ``class_ids`` says what each task-local label stands for
(the class token id here, the dataset label index there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["Episode", "EpisodeError", "CONTRACT_FIELDS", "COMMON_FIELDS"]

# the fields other code relies on (documented in docs/pages/episodes.md); the window indices are
# provenance on top
CONTRACT_FIELDS = (
    "support_ids",
    "support_labels",
    "support_mask",
    "query_ids",
    "query_labels",
    "query_mask",
    "class_token_ids",
)
_TENSOR_FIELDS = (*CONTRACT_FIELDS, "support_windows", "query_windows")
# what every episode type (Episode, picomaml.eval.leopard.TextEpisode) has, each with one meaning
COMMON_FIELDS = (
    "support_ids",
    "support_labels",
    "support_mask",
    "support_valid",
    "query_ids",
    "query_labels",
    "query_mask",
    "query_valid",
    "class_ids",
)


class EpisodeError(ValueError):
    """An [`Episode`][picomaml.meta.episode.Episode] breaks one of its invariants (shape, dtype, label range,
    class balance)."""


@dataclasses.dataclass
class Episode:
    """One N-way K-shot task, or T of them stacked along a leading task dimension.

    Shapes below are for a single task; a stacked episode puts ``T`` in front of every tensor.

    Attributes:
        support_ids: ``(N*K, W)`` long, the support windows with every occurrence of the row's class
            token replaced by the mask token.
        support_labels: ``(N*K,)`` long in ``[0, N)``; label-major (``i // K``).
        support_mask: ``(N*K, W)`` bool, True where a token was masked.
        query_ids: ``(N*Q, W)`` long, as ``support_ids`` for the query windows.
        query_labels: ``(N*Q,)`` long in ``[0, N)``; label-major (``j // Q``).
        query_mask: ``(N*Q, W)`` bool.
        class_token_ids: ``(N,)`` long, the original token id of each task-local label.
        support_windows: ``(N*K,)`` long or None, index of each support window in the source buffer
            (window ``w`` is row ``w // windows_per_row``, tokens ``[s, s + W)`` with
            ``s = (w % windows_per_row) * W``).
        query_windows: ``(N*Q,)`` long or None, as ``support_windows``.
        windows_per_row: Windows cut from each buffer row (None when unknown).

    Properties shared with [`picomaml.eval.leopard.TextEpisode`][picomaml.eval.leopard.TextEpisode] (see
    `COMMON_FIELDS`): ``support_valid`` / ``query_valid`` (all True: an SMLMT window has no padding),
    ``class_ids`` (the same tensor as ``class_token_ids``) and ``padded`` (False).
    """

    support_ids: Tensor
    support_labels: Tensor
    support_mask: Tensor
    query_ids: Tensor
    query_labels: Tensor
    query_mask: Tensor
    class_token_ids: Tensor
    support_windows: Tensor | None = None
    query_windows: Tensor | None = None
    windows_per_row: int | None = None

    # ------------------------------------------------------------------ fields shared with TextEpisode

    @property
    def support_valid(self) -> Tensor:
        """``([T,] N*K, W)`` bool, True at real (non-pad) tokens: all True, SMLMT windows are never padded."""
        return torch.ones_like(self.support_mask)

    @property
    def query_valid(self) -> Tensor:
        """``([T,] N*Q, W)`` bool, all True (as
        [`support_valid`][picomaml.meta.episode.Episode.support_valid])."""
        return torch.ones_like(self.query_mask)

    @property
    def class_ids(self) -> Tensor:
        """``([T,] N)`` long, what each task-local label stands for: `class_token_ids` itself."""
        return self.class_token_ids

    @property
    def padded(self) -> bool:
        """False: every position is a real token, so poolings need not read
        [`support_valid`][picomaml.meta.episode.Episode.support_valid]."""
        return False

    # ------------------------------------------------------------------ shape properties

    @property
    def n_tasks(self) -> int | None:
        """``T`` for a stacked episode, None for a single task."""
        return None if self.support_ids.dim() == 2 else int(self.support_ids.shape[0])

    @property
    def n_way(self) -> int:
        """Number of classes ``N``."""
        return int(self.class_token_ids.shape[-1])

    @property
    def k_shot(self) -> int:
        """Support windows per class ``K``."""
        return int(self.support_ids.shape[-2]) // self.n_way

    @property
    def n_query(self) -> int:
        """Query windows per class ``Q``."""
        return int(self.query_ids.shape[-2]) // self.n_way

    @property
    def window_len(self) -> int:
        """Tokens per window ``W``."""
        return int(self.support_ids.shape[-1])

    @property
    def device(self) -> torch.device:
        """Device of the tensors."""
        return self.support_ids.device

    # ------------------------------------------------------------------ conversions

    def _map(self, fn: Any) -> Episode:
        values = {
            name: (None if getattr(self, name) is None else fn(getattr(self, name)))
            for name in _TENSOR_FIELDS
        }
        return Episode(**values, windows_per_row=self.windows_per_row)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Episode:
        """A copy with every tensor on ``device`` (dtypes unchanged)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    @staticmethod
    def stack(episodes: Sequence[Episode]) -> Episode:
        """Stack single-task episodes of equal shape into one with a leading task dimension ``T``.

        Provenance windows are kept only if every episode has them; ``windows_per_row`` only if all agree.

        Raises:
            EpisodeError: empty list, an already stacked episode, or differing shapes.
        """
        episodes = list(episodes)
        if not episodes:
            raise EpisodeError("Episode.stack: got an empty list; pass at least one episode")
        first = episodes[0]
        for i, ep in enumerate(episodes):
            if not isinstance(ep, Episode):
                raise EpisodeError(f"Episode.stack: item {i} is a {type(ep).__name__}, not an Episode")
            if ep.n_tasks is not None:
                raise EpisodeError(f"Episode.stack: item {i} is already stacked (n_tasks={ep.n_tasks})")
            if ep.support_ids.shape != first.support_ids.shape or ep.query_ids.shape != first.query_ids.shape:
                raise EpisodeError(
                    f"Episode.stack: item {i} has support {tuple(ep.support_ids.shape)} / query "
                    f"{tuple(ep.query_ids.shape)}, item 0 has {tuple(first.support_ids.shape)} / "
                    f"{tuple(first.query_ids.shape)}; all episodes must share N, K, Q and W"
                )
        values: dict[str, Any] = {}
        for name in _TENSOR_FIELDS:
            parts = [getattr(ep, name) for ep in episodes]
            values[name] = None if any(p is None for p in parts) else torch.stack(parts)
        wpr = {ep.windows_per_row for ep in episodes}
        return Episode(**values, windows_per_row=wpr.pop() if len(wpr) == 1 else None)

    def task(self, i: int) -> Episode:
        """Task ``i`` of a stacked episode, as a single-task [`Episode`][picomaml.meta.episode.Episode]
        (views, no copy)."""
        if self.n_tasks is None:
            raise EpisodeError("Episode.task: this episode is not stacked (n_tasks is None)")
        if not -self.n_tasks <= i < self.n_tasks:
            raise EpisodeError(f"Episode.task: index {i} out of range for n_tasks={self.n_tasks}")
        return self._map(lambda t: t[i])

    def tasks(self) -> Iterator[Episode]:
        """Iterate over the single tasks (a single-task episode yields itself)."""
        if self.n_tasks is None:
            yield self
        else:
            for i in range(self.n_tasks):
                yield self.task(i)

    def origins(self, part: str = "support") -> tuple[Tensor, Tensor]:
        """Where each window of ``part`` (``"support"`` or ``"query"``) came from in the source buffer.

        Returns:
            ``(rows, starts)``, each shaped like ``support_labels`` / ``query_labels``: the buffer row and
            the offset of the window's first token (the window is ``tokens[row, start:start + W]``).
        """
        if part not in ("support", "query"):
            raise ValueError(f"part: must be 'support' or 'query', got {part!r}")
        windows = getattr(self, f"{part}_windows")
        if windows is None or self.windows_per_row is None:
            raise EpisodeError(
                f"Episode.origins: no provenance recorded ({part}_windows or windows_per_row is None)"
            )
        rows = torch.div(windows, self.windows_per_row, rounding_mode="floor")
        return rows, (windows - rows * self.windows_per_row) * self.window_len

    # ------------------------------------------------------------------ invariants

    def validate(self, mask_token_id: int | None = None) -> Episode:
        """Check the invariants and return ``self``; raise
        [`EpisodeError`][picomaml.meta.episode.EpisodeError] naming the broken one.

        Checks: dtypes; consistent shapes (``N*K`` / ``N*Q`` rows, one ``W``, same leading ``T``); labels
        in ``[0, N)`` with exactly ``K`` support and ``Q`` query rows per label; distinct class tokens; no
        class token left in a window of its class; at least one masked position per window (when
        ``mask_token_id`` is given, every masked position holds it and no other position does: a mask id
        that is a real token of the data is refused); provenance windows distinct within a task.
        """
        for name in _TENSOR_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, Tensor):
                raise EpisodeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
        lead = 0 if self.n_tasks is None else 1
        for name in ("support_ids", "query_ids", "support_labels", "query_labels", "class_token_ids"):
            if getattr(self, name).dtype != torch.long:
                raise EpisodeError(f"{name}: expected dtype torch.long, got {getattr(self, name).dtype}")
        for name in ("support_mask", "query_mask"):
            if getattr(self, name).dtype != torch.bool:
                raise EpisodeError(f"{name}: expected dtype torch.bool, got {getattr(self, name).dtype}")
        if self.class_token_ids.dim() != 1 + lead:
            raise EpisodeError(
                f"class_token_ids: expected {1 + lead} dims, got shape {tuple(self.class_token_ids.shape)}"
            )
        n = self.n_way
        if n < 1:
            raise EpisodeError("class_token_ids: an episode needs at least one class")
        lead_shape = tuple(self.support_ids.shape[:lead])
        for part in ("support", "query"):
            ids, labels, mask = (getattr(self, f"{part}_{s}") for s in ("ids", "labels", "mask"))
            rows = ids.shape[-2] if ids.dim() == 2 + lead else -1
            if ids.dim() != 2 + lead or rows % n or rows == 0:
                raise EpisodeError(
                    f"{part}_ids: expected shape {lead_shape + ('N*per_class', 'W')} with N={n}, "
                    f"got {tuple(ids.shape)}"
                )
            if ids.shape[-1] != self.window_len:
                raise EpisodeError(
                    f"{part}_ids: window length {ids.shape[-1]} != support's {self.window_len}"
                )
            if (
                tuple(ids.shape[:lead]) != lead_shape
                or tuple(self.class_token_ids.shape[:lead]) != lead_shape
            ):
                raise EpisodeError(f"{part}_ids: leading task dims differ from support_ids' {lead_shape}")
            if mask.shape != ids.shape:
                raise EpisodeError(f"{part}_mask: shape {tuple(mask.shape)} != {part}_ids {tuple(ids.shape)}")
            if labels.shape != ids.shape[:-1]:
                raise EpisodeError(
                    f"{part}_labels: shape {tuple(labels.shape)}, expected {tuple(ids.shape[:-1])}"
                )
            if labels.numel() and (labels.min() < 0 or labels.max() >= n):
                raise EpisodeError(
                    f"{part}_labels: values must lie in [0, {n}), got range "
                    f"[{int(labels.min())}, {int(labels.max())}]"
                )
            per = rows // n
            counts = torch.nn.functional.one_hot(labels, n).sum(-2)  # (..., N)
            if not bool((counts == per).all()):
                raise EpisodeError(
                    f"{part}_labels: every label needs exactly {per} rows; counts per label {counts.tolist()}"
                )
            # the class token of each row: gather class_token_ids by label
            row_tok = torch.gather(self.class_token_ids, -1, labels)
            if bool((ids == row_tok.unsqueeze(-1)).any()):
                raise EpisodeError(f"{part}_ids: a class token survives unmasked in a window of its class")
            if mask_token_id is not None and not bool((ids[mask] == mask_token_id).all()):
                raise EpisodeError(
                    f"{part}_mask: a masked position does not hold mask_token_id={mask_token_id}"
                )
            stray = 0 if mask_token_id is None else int((ids[~mask] == mask_token_id).sum())
            if stray:
                raise EpisodeError(
                    f"mask_token_id: {mask_token_id} occurs at {stray} unmasked positions of {part}_ids: it is a "
                    f"real token of the data, so masked class tokens cannot be told from it"
                )
            if not bool(mask.any(-1).all()):
                raise EpisodeError(
                    f"{part}_mask: a window has no masked position (its class token was absent)"
                )
        if self.n_tasks is None:
            tasks = [self.class_token_ids]
        else:
            tasks = list(self.class_token_ids.unbind(0))
        for t, toks in enumerate(tasks):
            if toks.unique().numel() != n:
                raise EpisodeError(f"class_token_ids: task {t} repeats a class token: {toks.tolist()}")
        if self.support_windows is not None and self.query_windows is not None:
            both = torch.cat([self.support_windows, self.query_windows], dim=-1).reshape(
                -1, n * (self.k_shot + self.n_query)
            )
            for t, row in enumerate(both):
                if row.unique().numel() != row.numel():
                    raise EpisodeError(f"support_windows/query_windows: task {t} uses a window twice")
        return self

    def __repr__(self) -> str:
        t = "" if self.n_tasks is None else f"n_tasks={self.n_tasks}, "
        return (
            f"Episode({t}n_way={self.n_way}, k_shot={self.k_shot}, n_query={self.n_query}, "
            f"window_len={self.window_len}, device={self.device})"
        )
