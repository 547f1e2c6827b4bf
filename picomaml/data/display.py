"""Human-readable text of an SMLMT episode: which token each label stands for, and its windows decoded."""

from __future__ import annotations

from typing import Any

import torch

from picomaml.meta.episode import CONTRACT_FIELDS

__all__ = ["format_episode", "format_window"]


def format_window(
    ids: torch.Tensor,
    mask: torch.Tensor,
    tokenizer: Any,
    mask_text: str = "[MASK]",
    class_text: str | None = None,
) -> str:
    """Decode one window, showing every masked position as ``mask_text``.

    Runs of unmasked tokens are decoded together (so byte-level pieces join into words); each masked
    position becomes ``mask_text``, preceded by the leading whitespace of ``class_text`` (byte-level tokens
    such as ``" cat"`` carry their space). Newlines are shown as ``⏎`` to keep one window on one line.

    Args:
        ids: ``(W,)`` token ids.
        mask: ``(W,)`` bool, True where the class token was masked.
        tokenizer: Anything with ``decode(list[int]) -> str``.
        mask_text: What a masked position looks like.
        class_text: The decoded class token, if known.
    """
    if ids.dim() != 1 or mask.shape != ids.shape:
        raise ValueError(
            f"format_window: ids must be (W,) and mask the same shape, got {tuple(ids.shape)} and {tuple(mask.shape)}"
        )
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


def _format_task(episode: Any, tokenizer: Any, task: int | None, limit: int, mask_text: str) -> list[str]:
    def pick(name: str) -> torch.Tensor:
        value = getattr(episode, name)
        return value if task is None else value[task]

    class_ids = pick("class_token_ids")
    lines: list[str] = []
    for label, token_id in enumerate(class_ids.tolist()):
        token_text = tokenizer.decode([int(token_id)])
        lines.append(f"label {label}: class token {token_text!r} (id {int(token_id)})")
        for part in ("support", "query"):
            ids, labels, mask = pick(f"{part}_ids"), pick(f"{part}_labels"), pick(f"{part}_mask")
            rows = torch.nonzero(labels == label).flatten().tolist()
            for row in rows[:limit]:
                lines.append(
                    f"  {part:<7} | {format_window(ids[row], mask[row], tokenizer, mask_text, token_text)}"
                )
            if len(rows) > limit:
                lines.append(f"  {part:<7} | ... {len(rows) - limit} more")
    return lines


def format_episode(
    episode: Any, tokenizer: Any, max_windows_per_class: int = 2, *, mask_text: str = "[MASK]"
) -> str:
    """Text of an episode: for each label, its class token and some support and query windows decoded.

    Uses only the episode fields ``support_ids``/``support_labels``/``support_mask``, the query
    counterparts and ``class_token_ids``; a stacked episode (leading task dimension) is shown task by task.

    Args:
        episode: An :class:`picomaml.Episode` (or any object with those attributes).
        tokenizer: Anything with ``decode(list[int]) -> str`` (e.g. a :class:`TokenizerWrapper`).
        max_windows_per_class: Windows shown per label and per part (support, query).
        mask_text: What a masked position looks like.

    Returns:
        A multi-line string.
    """
    if not isinstance(max_windows_per_class, int) or isinstance(max_windows_per_class, bool):
        raise ValueError(
            f"format_episode: max_windows_per_class must be an int, got {max_windows_per_class!r}"
        )
    if max_windows_per_class < 0:
        raise ValueError(f"format_episode: max_windows_per_class must be >= 0, got {max_windows_per_class}")
    missing = [name for name in CONTRACT_FIELDS if not hasattr(episode, name)]
    if missing:
        raise TypeError(f"format_episode: episode lacks the attributes {missing}")
    ids = episode.support_ids
    if ids.dim() == 2:
        return "\n".join(_format_task(episode, tokenizer, None, max_windows_per_class, mask_text))
    if ids.dim() != 3:
        raise ValueError(
            f"format_episode: support_ids must be (N*K, W) or (T, N*K, W), got {tuple(ids.shape)}"
        )
    lines: list[str] = []
    for task in range(ids.shape[0]):
        lines.append(f"task {task}")
        lines.extend(
            "  " + line for line in _format_task(episode, tokenizer, task, max_windows_per_class, mask_text)
        )
    return "\n".join(lines)
