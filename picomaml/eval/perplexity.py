"""Held-out perplexity, token-weighted: ``exp(sum of token NLL / number of predicted tokens)``.

This is the corpus-level perplexity: every predicted token counts once, wherever it sits. The mean of
per-row (per-document) perplexities is a different, larger number (Jensen: the mean of ``exp`` exceeds
the ``exp`` of the mean) that over-weights short or hard rows, and is not what is reported here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from picomaml.params import check_int

__all__ = ["perplexity", "token_nll"]

IGNORE = -100


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _as_rows(rows: Tensor | Sequence[Any] | Iterable[Any]) -> list[Tensor]:
    """(N, L) tensor or a sequence of 1-D rows (tensors or int lists, any lengths) -> list of 1-D long tensors."""
    if isinstance(rows, Tensor):
        if rows.dim() == 1:
            raise ValueError(
                "rows: expected (N, L) token ids or a list of rows, got one 1-D tensor; wrap it in a list"
            )
        if rows.dim() != 2:
            raise ValueError(f"rows: expected (N, L) token ids, got shape {tuple(rows.shape)}")
        return list(rows)
    out = []
    for i, r in enumerate(rows):
        t = r if isinstance(r, Tensor) else torch.as_tensor(r)
        if t.dim() != 1:
            raise ValueError(f"rows[{i}]: expected a 1-D row of token ids, got shape {tuple(t.shape)}")
        out.append(t)
    return out


def token_nll(
    model: nn.Module, ids: Tensor, ignore_index: int | None = None, lengths: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Summed next-token negative log-likelihood of one batch and the number of predicted tokens.

    Args:
        model: Maps (B, L) ids to (B, L, V) logits (or a tuple whose first item is the logits).
        ids: (B, L) long token ids.
        ignore_index: Targets equal to this id (e.g. padding) are not predicted or counted.
        lengths: (B,) true lengths of right-padded rows; positions at or beyond a row's length are not
            targets.

    Returns:
        ``(nll_sum, count)``: float64 and long scalars.
    """
    logits = model(ids[:, :-1])  # the last position predicts nothing: a row of L tokens has L-1 targets
    if isinstance(logits, tuple):
        logits = logits[0]
    targets = ids[:, 1:].clone()
    if ignore_index is not None:
        targets[targets == ignore_index] = IGNORE
    if lengths is not None:
        pos = torch.arange(1, ids.shape[1], device=ids.device)
        targets[pos.unsqueeze(0) >= lengths.unsqueeze(1)] = IGNORE
    counted = targets != IGNORE
    hi = int(targets.masked_fill(~counted, 0).max())
    if hi >= logits.shape[-1] or bool((targets < 0).logical_and(counted).any()):
        raise ValueError(
            f"ids: target ids must lie in [0, {logits.shape[-1]}) (the model's vocabulary), got max {hi}; "
            f"mark padding with ignore_index"
        )
    nll = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return nll.double(), (targets != IGNORE).sum()


def perplexity(
    model: nn.Module,
    rows: Tensor | Sequence[Any],
    batch_size: int = 8,
    ignore_index: int | None = None,
    pad_id: int = 0,
    max_rows: int | None = None,
) -> dict[str, float]:
    """Token-weighted perplexity of ``model`` on held-out rows.

    Runs under ``torch.no_grad`` in eval mode and restores the model's previous train/eval mode.

    Args:
        model: A causal LM: (B, L) ids -> (B, L, V) logits (a
            [`picomaml.PicoDecoder`][picomaml.model.decoder.PicoDecoder]).
        rows: (N, L) token ids, or a list of 1-D rows of any lengths (right-padded per batch with
            ``pad_id``; the padding is never a target).
        batch_size: Rows per forward pass.
        ignore_index: A token id never used as a target (e.g. a padding id inside the rows).
        pad_id: Filler for batching rows of different lengths (any valid id; it is only an input).
        max_rows: Evaluate only the first ``max_rows`` rows.

    Returns:
        ``{"perplexity": exp(loss), "loss": mean NLL per predicted token (nats), "tokens": count, "rows": n}``;
        a model with NaN/Inf outputs gives ``nan``/``inf`` (and a ``RuntimeWarning``), never an error.
    """
    check_int("batch_size", batch_size, ge=1)
    data = _as_rows(rows)
    if max_rows is not None:
        data = data[:max_rows]
    if not data:
        raise ValueError("rows: no rows to evaluate")
    device = _model_device(model)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(data), batch_size):
                chunk = data[start : start + batch_size]
                lengths = torch.tensor([len(r) for r in chunk], device=device)
                width = int(lengths.max())
                if width < 2:
                    continue  # nothing to predict in rows of length < 2
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long, device=device)
                for i, r in enumerate(chunk):
                    ids[i, : len(r)] = r.to(device=device, dtype=torch.long)
                same = bool((lengths == width).all())
                nll, n = token_nll(model, ids, ignore_index, None if same else lengths)
                total += nll
                count += n
    finally:
        model.train(was_training)
    tokens = int(count)
    if tokens == 0:
        raise ValueError("rows: no predicted tokens (every row is shorter than 2 tokens or fully ignored)")
    loss = float(total) / tokens
    if not math.isfinite(loss):  # a model with NaN/Inf weights: reported, not raised
        warnings.warn(f"perplexity: the mean loss is {loss} (non-finite model outputs)", RuntimeWarning, 2)
    try:
        ppl = math.exp(loss)  # nan for nan, inf for inf
    except OverflowError:  # a finite loss past ~709.8 nats: the perplexity exceeds every float
        ppl = math.inf
    return {"perplexity": ppl, "loss": loss, "tokens": tokens, "rows": len(data)}
