"""The glue a training loop calls: the autoregressive loss and the meta loss of one episode.

``meta_loss`` runs the backbone exactly once over the support and query windows of every task together,
pools one feature vector per window, and hands the features to the :class:`~picomaml.InnerLoop`. The inner
loop adapts only the head, so the backbone is never re-run per inner step; ``out.loss.backward()`` reaches
the backbone through the pooled features.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "lm_loss",
    "backbone_hidden",
    "pool_features",
    "normalize_task_features",
    "meta_loss",
    "POOLINGS",
    "FEATURE_NORMS",
]

POOLINGS = ("mask", "before_mask", "last", "mean")
FEATURE_NORMS = ("none", "center", "standardize")


def lm_loss(model: nn.Module, tokens: Tensor, pad_id: int | None = None, ignore_index: int = -100) -> Tensor:
    """Next-token cross-entropy: inputs ``tokens[:, :-1]``, targets ``tokens[:, 1:]``.

    Args:
        model: Maps ``(B, L-1)`` token ids to ``(B, L-1, V)`` logits.
        tokens: ``(B, L)`` long, ``L >= 2``.
        pad_id: Targets equal to this id are ignored (``None``: none are).
        ignore_index: Targets equal to this value are ignored too.

    Returns:
        Scalar mean loss over the counted targets (computed in float32 or wider).
    """
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be (B, L) with L >= 2, got shape {tuple(tokens.shape)}")
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if pad_id is not None:
        targets = targets.masked_fill(targets == pad_id, ignore_index)
    logits = model(inputs)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index
    )


def pool_features(hidden: Tensor, mask: Tensor | None = None, pooling: str = "mask") -> Tensor:
    """One feature vector per window.

    Args:
        hidden: ``(B, L, D)`` hidden states.
        mask: ``(B, L)`` bool, True at the masked (class-token) positions; needed for ``"mask"``.
        pooling: ``"mask"`` (mean over the masked positions; every row needs at least one),
            ``"before_mask"`` (mean over the positions just before the masked ones: in a causal LM the
            state that predicts the class token; a mask at position 0 uses itself), ``"last"`` (the last
            position, which sees the whole window in a causal decoder) or ``"mean"`` (mean over all).

    Returns:
        ``(B, D)`` in the dtype of ``hidden`` (sums accumulate in float32 for low-precision input).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, L, D), got shape {tuple(hidden.shape)}")
    if pooling == "last":
        return hidden[:, -1]
    acc = hidden.float() if hidden.dtype in (torch.float16, torch.bfloat16) else hidden
    if pooling == "mean":
        return acc.mean(1).to(hidden.dtype)
    if mask is None:
        raise ValueError("pooling='mask' needs the (B, L) mask of masked positions")
    if mask.shape != hidden.shape[:2]:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(hidden.shape[:2])}")
    if pooling == "before_mask":
        shifted = torch.zeros_like(mask)
        shifted[:, :-1] = mask[:, 1:]
        shifted[:, 0] |= mask[:, 0]
        mask = shifted
    weights = mask.to(acc.dtype)
    counts = weights.sum(1)  # (B,)
    if not bool((counts > 0).all()):
        rows = (counts == 0).nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"pooling='mask': rows {rows} have no masked position (use pooling='last' or 'mean')"
        )
    pooled = torch.einsum("bl,bld->bd", weights, acc) / counts.unsqueeze(1)
    return pooled.to(hidden.dtype)


def backbone_hidden(model: nn.Module, ids: Tensor) -> Tensor:
    """Final hidden states ``(B, L, D)`` of ``ids`` ``(B, L)``, skipping the vocabulary projection if possible."""
    if hasattr(model, "hidden_states"):
        return model.hidden_states(ids)  # skips the vocabulary projection
    return model(ids, return_hidden=True)[1]


def normalize_task_features(xs: Tensor, xq: Tensor, mode: str = "none") -> tuple[Tensor, Tensor]:
    """Centre (and scale) one task's features by statistics of its support set.

    ``"center"`` subtracts the support mean from support and query features; ``"standardize"`` also
    divides both by the root-mean-square of the centred support features (one scalar per task). Both are
    differentiable and use support statistics only, so no query information reaches the adaptation. They
    remove the cheapest way to lower an over-confident query loss, collapsing all windows onto one
    direction, which otherwise stalls meta-training from scratch.

    Args:
        xs: Support features ``(..., N*K, D)``.
        xq: Query features ``(..., N*Q, D)``.
        mode: ``"none"``, ``"center"`` or ``"standardize"``.
    """
    if mode not in FEATURE_NORMS:
        raise ValueError(f"feature_norm must be one of {list(FEATURE_NORMS)}, got {mode!r}")
    if mode == "none":
        return xs, xq
    mu = xs.mean(-2, keepdim=True)
    xs, xq = xs - mu, xq - mu
    if mode == "standardize":
        scale = xs.pow(2).mean((-2, -1), keepdim=True).clamp_min(1e-12).sqrt()
        xs, xq = xs / scale, xq / scale
    return xs, xq


def meta_loss(
    model: nn.Module,
    head: nn.Module,
    loop: nn.Module,
    episode: Any,
    pooling: str = "mask",
    feature_norm: str = "none",
) -> Any:
    """Meta loss of an episode (one task or a stack of ``T``) with a single backbone forward.

    Args:
        model: The backbone; ``model.hidden_states(ids)`` when present, else ``model(ids, return_hidden=True)``.
        head: The :class:`~picomaml.MetaHead`.
        loop: The :class:`~picomaml.InnerLoop`.
        episode: An :class:`~picomaml.Episode`: ``support_ids (.., N*K, W)``, ``support_labels``,
            ``support_mask``, ``query_ids (.., N*Q, W)``, ``query_labels``, ``query_mask``, with an
            optional leading task dim ``T`` on every tensor.
        pooling: ``"mask"``, ``"last"`` or ``"mean"`` (see :func:`pool_features`).
        feature_norm: ``"none"``, ``"center"`` or ``"standardize"`` per task, from support statistics
            (see :func:`normalize_task_features`).

    Returns:
        The :class:`~picomaml.InnerLoopOutput` of the inner loop (``.loss``, ``.metrics``, ...).
    """
    s_ids, q_ids = episode.support_ids, episode.query_ids
    if s_ids.dim() not in (2, 3) or q_ids.dim() != s_ids.dim():
        raise ValueError(
            f"episode ids must be (rows, W) or (T, rows, W); got support {tuple(s_ids.shape)}, "
            f"query {tuple(q_ids.shape)}"
        )
    stacked = s_ids.dim() == 3
    width = s_ids.shape[-1]
    ns, nq = s_ids.shape[-2], q_ids.shape[-2]
    t = s_ids.shape[0] if stacked else 1
    ids = torch.cat([s_ids.reshape(t, ns, width), q_ids.reshape(t, nq, width)], 1).reshape(-1, width)
    mask = None
    if pooling in ("mask", "before_mask"):
        s_mask, q_mask = episode.support_mask, episode.query_mask
        mask = torch.cat([s_mask.reshape(t, ns, width), q_mask.reshape(t, nq, width)], 1).reshape(-1, width)
    param = next(iter(model.parameters()), None)
    if param is not None and ids.device != param.device:
        ids = ids.to(param.device)
        mask = mask.to(param.device) if mask is not None else None
    feats = pool_features(
        backbone_hidden(model, ids), mask, pooling
    )  # (T*(ns+nq), D): the one backbone forward
    head_param = next(iter(head.parameters()), None)
    low = feats.dtype in (torch.float16, torch.bfloat16)
    dtype = head_param.dtype if head_param is not None else (torch.float32 if low else feats.dtype)
    feats = feats.to(dtype)  # the head is tiny: keep it in its own (usually float32) precision
    feats = feats.view(t, ns + nq, -1)
    xs, xq = normalize_task_features(feats[:, :ns], feats[:, ns:], feature_norm)
    ys = episode.support_labels.reshape(t, ns).to(feats.device)
    yq = episode.query_labels.reshape(t, nq).to(feats.device)
    if not stacked:
        xs, xq, ys, yq = xs[0], xq[0], ys[0], yq[0]
    return loop(head, xs, ys, xq, yq)
