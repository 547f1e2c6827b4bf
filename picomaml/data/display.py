"""Human-readable text of an episode: what each label stands for, and its windows decoded.

Works for SMLMT episodes ([`picomaml.Episode`][picomaml.meta.episode.Episode]: the class token of each label,
masked positions shown as ``[MASK]``) and for text episodes
([`picomaml.eval.leopard.TextEpisode`][picomaml.eval.leopard.TextEpisode]: the dataset label of each
task-local label, padding left out), which share their field names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["format_episode", "format_window"]

# what every episode type carries besides its class ids (see picomaml.meta.episode.COMMON_FIELDS)
_ROW_FIELDS = ("support_ids", "support_labels", "support_mask", "query_ids", "query_labels", "query_mask")


def format_window(
    ids: torch.Tensor,
    mask: torch.Tensor,
    tokenizer: Any,
    mask_text: str = "[MASK]",
    class_text: str | None = None,
    *,
    valid: torch.Tensor | None = None,
) -> str:
    """Decode one window, showing every masked position as ``mask_text`` and leaving padding out.

    Runs of unmasked tokens are decoded together (so byte-level pieces join into words); each masked
    position becomes ``mask_text``, preceded by the leading whitespace of ``class_text`` (byte-level tokens
    such as ``" cat"`` carry their space). Newlines are shown as ``⏎`` to keep one window on one line.

    Args:
        ids: ``(W,)`` token ids.
        mask: ``(W,)`` bool, True where the class token was masked.
        tokenizer: Anything with ``decode(list[int]) -> str``.
        mask_text: What a masked position looks like.
        class_text: The decoded class token, if known.
        valid: ``(W,)`` bool, True at real tokens (``None``: all are); the other positions are left out.
    """
    if ids.dim() != 1 or mask.shape != ids.shape:
        raise ValueError(
            f"format_window: ids must be (W,) and mask the same shape, got {tuple(ids.shape)} and {tuple(mask.shape)}"
        )
    if valid is not None:
        if valid.shape != ids.shape:
            raise ValueError(
                f"format_window: valid must have the shape of ids {tuple(ids.shape)}, got {tuple(valid.shape)}"
            )
        ids, mask = ids[valid], mask[valid]
    if class_text is not None:
        mask_text = class_text[: len(class_text) - len(class_text.lstrip())] + mask_text
    pieces: list[str] = []
    run: list[int] = []
    for token, masked in zip(ids.tolist(), mask.tolist(), strict=True):
        if masked:
            if run:
                pieces.append(tokenizer.decode(run))
                run = []
            pieces.append(mask_text)
        else:
            run.append(int(token))
    if run:
        pieces.append(tokenizer.decode(run))
    return "".join(pieces).replace("\n", "⏎")


def _format_task(
    episode: Any,
    tokenizer: Any,
    task: int | None,
    limit: int,
    mask_text: str,
    class_names: Sequence[str] | None,
) -> list[str]:
    def pick(name: str) -> torch.Tensor | None:
        value = getattr(episode, name, None)
        return value if task is None or value is None else value[task]

    token_ids = pick("class_token_ids")  # SMLMT: the class token behind each label
    class_ids = token_ids if token_ids is not None else pick("class_ids")
    padded = getattr(episode, "padded", True)  # an Episode is never padded: skip its all-True masks
    lines: list[str] = []
    for label, class_id in enumerate(class_ids.tolist()):
        class_text: str | None = None
        if token_ids is not None:
            class_text = tokenizer.decode([int(class_id)])
            lines.append(f"label {label}: class token {class_text!r} (id {int(class_id)})")
        else:
            name = f"{class_names[int(class_id)]!r} " if class_names is not None else ""
            lines.append(f"label {label}: class {name}(id {int(class_id)})")
        for part in ("support", "query"):
            ids, labels, mask = pick(f"{part}_ids"), pick(f"{part}_labels"), pick(f"{part}_mask")
            valid = pick(f"{part}_valid") if padded else None
            rows = torch.nonzero(labels == label).flatten().tolist()
            for row in rows[:limit]:
                text = format_window(
                    ids[row], mask[row], tokenizer, mask_text, class_text,
                    valid=valid[row] if valid is not None else None,
                )  # fmt: skip
                lines.append(f"  {part:<7} | {text}")
            if len(rows) > limit:
                lines.append(f"  {part:<7} | ... {len(rows) - limit} more")
    return lines


def format_episode(
    episode: Any,
    tokenizer: Any,
    max_windows_per_class: int = 2,
    *,
    mask_text: str = "[MASK]",
    class_names: Sequence[str] | None = None,
) -> str:
    """Text of an episode: for each label, what it stands for and some support and query windows decoded.

    Uses only the episode fields ``support_ids``/``support_labels``/``support_mask``, the query
    counterparts, ``class_token_ids`` (an SMLMT episode: each label's class token is decoded) or else
    ``class_ids`` (a text episode: each label's dataset label), and ``support_valid``/``query_valid`` when
    present (padding is left out). A stacked episode (leading task dimension) is shown task by task.

    Args:
        episode: An [`picomaml.Episode`][picomaml.meta.episode.Episode], a
            [`picomaml.eval.leopard.TextEpisode`][picomaml.eval.leopard.TextEpisode], or any object with those
            attributes.
        tokenizer: Anything with ``decode(list[int]) -> str`` (e.g. a
            [`TokenizerWrapper`][picomaml.data.tokenizer.TokenizerWrapper]).
        max_windows_per_class: Windows shown per label and per part (support, query).
        mask_text: What a masked position looks like.
        class_names: Names of the ``class_ids`` of an episode without class tokens (e.g. the dataset's
            ``label_names``), shown beside each id.

    Returns:
        A multi-line string.
    """
    if not isinstance(max_windows_per_class, int) or isinstance(max_windows_per_class, bool):
        raise ValueError(
            f"format_episode: max_windows_per_class must be an int, got {max_windows_per_class!r}"
        )
    if max_windows_per_class < 0:
        raise ValueError(f"format_episode: max_windows_per_class must be >= 0, got {max_windows_per_class}")
    missing = [name for name in _ROW_FIELDS if not hasattr(episode, name)]
    if not hasattr(episode, "class_token_ids") and not hasattr(episode, "class_ids"):
        missing.append("class_token_ids (or class_ids)")
    if missing:
        raise TypeError(f"format_episode: episode lacks the attributes {missing}")
    ids = episode.support_ids
    if ids.dim() == 2:
        return "\n".join(
            _format_task(episode, tokenizer, None, max_windows_per_class, mask_text, class_names)
        )
    if ids.dim() != 3:
        raise ValueError(
            f"format_episode: support_ids must be (N*K, W) or (T, N*K, W), got {tuple(ids.shape)}"
        )
    lines: list[str] = []
    for task in range(ids.shape[0]):
        lines.append(f"task {task}")
        lines.extend(
            "  " + line
            for line in _format_task(episode, tokenizer, task, max_windows_per_class, mask_text, class_names)
        )
    return "\n".join(lines)
