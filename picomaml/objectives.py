"""The glue a training loop calls: the autoregressive loss and the meta loss of one episode.

``meta_loss`` featurises the episode with :func:`~picomaml.features.episode_features` (re-exported here
with the rest of :mod:`picomaml.features`), which runs the backbone exactly once over the support and
query windows of every task together and pools one feature vector per window, and hands the features to
the :class:`~picomaml.InnerLoop`. The inner loop adapts only the head, so the backbone is never re-run per
inner step; ``out.loss.backward()`` reaches the backbone through the pooled features.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from picomaml.features import (
    FEATURE_NORMS,
    POOLINGS,
    EpisodeFeatures,
    FeatureNorm,
    Pooling,
    backbone_hidden,
    check_episode,
    episode_features,
    normalize_task_features,
    pool_features,
)
from picomaml.params import Params, choices, hparam

__all__ = [
    "MetaConfig",
    "Pooling",
    "FeatureNorm",
    "NonFinite",
    "lm_loss",
    "backbone_hidden",
    "pool_features",
    "normalize_task_features",
    "EpisodeFeatures",
    "episode_features",
    "meta_loss",
    "POOLINGS",
    "FEATURE_NORMS",
    "NONFINITE",
]

NonFinite = Literal["raise", "propagate"]
NONFINITE = choices(NonFinite)


@dataclasses.dataclass
class MetaConfig(Params):
    """How a meta step turns an episode into a loss (YAML section ``meta``): the keyword arguments of
    :func:`meta_loss` and :class:`~picomaml.HybridLearner`, and the tasks per step."""

    pooling: Pooling = hparam("mask", doc="window feature: masked positions, the ones before them, last, mean")
    feature_norm: FeatureNorm = hparam("none", doc="per-task normalisation by support statistics")
    n_tasks: int = hparam(1, ge=1, doc="tasks (episodes) per meta step, adapted together")
    nonfinite: NonFinite = hparam(
        "propagate", doc="NaN/Inf features: propagate (a NaN loss: the step is skipped) or raise"
    )


def lm_loss(
    model: nn.Module,
    tokens: Tensor,
    pad_id: int | None = None,
    ignore_index: int = -100,
    *,
    full_sequence: bool = False,
) -> Tensor:
    """Next-token cross-entropy: the logits at position ``i`` predict ``tokens[:, i + 1]``.

    Args:
        model: Maps ``(B, L')`` token ids to ``(B, L', V)`` logits, or to a tuple whose first item they are
            (``(logits, hidden)``), or to an object with ``.logits`` (a ``transformers`` ``ModelOutput``).
        tokens: ``(B, L)`` long, ``L >= 2``.
        pad_id: Targets equal to this id are ignored (``None``: none are).
        ignore_index: Targets equal to this value are ignored too.
        full_sequence: Run the model on all ``L`` tokens and drop the last position's logits (it has no
            target), instead of running it on ``tokens[:, :-1]``. A causal model gives the same loss
            either way (up to kernel rounding); this is for forward hooks that must see every position
            of ``tokens`` (learning-dynamics capture).

    Returns:
        Scalar mean loss over the counted targets (computed in float32 or wider).

    Raises:
        TypeError: ``tokens`` is not an integer tensor.
        ValueError: ``tokens`` is not ``(B, L)`` with ``B >= 1``, ``L >= 2``, or a counted target lies outside
            ``[0, V)`` for the ``V`` of the logits (checked before the loss: no IndexError or device assert).
    """
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens: expected a (B, L) torch.LongTensor, got {type(tokens).__name__}")
    if tokens.dim() != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise ValueError(f"tokens: must be (B, L) with B >= 1 and L >= 2, got shape {tuple(tokens.shape)}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"tokens: expected integer token ids (torch.long), got dtype {tokens.dtype}")
    targets = tokens[:, 1:]
    if pad_id is not None:
        targets = targets.masked_fill(targets == pad_id, ignore_index)
    counted = targets != ignore_index
    # queued before the forward, read after it: one sync, and a clear error instead of torch's IndexError
    # (or a device-side assert on CUDA) for a target outside the vocabulary
    bounds = torch.stack([targets.masked_fill(~counted, 0).amin(), targets.masked_fill(~counted, 0).amax()])
    out = model(tokens if full_sequence else tokens[:, :-1])
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
    if full_sequence:
        logits = logits[:, :-1]
    lo, hi = bounds.tolist()
    if lo < 0 or hi >= logits.shape[-1]:
        raise ValueError(
            f"tokens: target ids must lie in [0, {logits.shape[-1]}) (the model's vocabulary, the last dim of its "
            f"logits) or equal ignore_index={ignore_index}{'' if pad_id is None else f' / pad_id={pad_id}'}; "
            f"got min {lo} and max {hi}"
        )
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index
    )

def _check_width(head: nn.Module, width: Any, what: str) -> None:
    """Raise naming ``head.in_dim`` when features of ``width`` (an int; anything else is unknown) do not fit."""
    in_dim = getattr(head, "in_dim", None)
    if isinstance(width, int) and in_dim is not None and width != in_dim:
        raise ValueError(f"head.in_dim: the head takes {in_dim}-dim features but {what} is {width}")


def meta_loss(
    model: nn.Module | None,
    head: nn.Module,
    loop: nn.Module,
    episode: Any,
    pooling: str = "mask",
    feature_norm: str = "none",
    nonfinite: NonFinite = "propagate",
    *,
    features: Callable[[Tensor], Tensor] | None = None,
) -> Any:
    """Meta loss of an episode (one task or a stack of ``T``) with a single backbone forward.

    Args:
        model: The backbone; ``model.hidden_states(ids)`` when present, else ``model(ids, return_hidden=True)``.
        head: The :class:`~picomaml.MetaHead`; the features are cast to the dtype of its parameters.
        loop: The :class:`~picomaml.InnerLoop`.
        episode: An :class:`~picomaml.Episode`: ``support_ids (.., N*K, W)``, ``support_labels``,
            ``support_mask``, ``query_ids (.., N*Q, W)``, ``query_labels``, ``query_mask``, with an
            optional leading task dim ``T`` on every tensor (see :func:`episode_features`).
        pooling: ``"mask"``, ``"before_mask"``, ``"last"`` or ``"mean"`` (see :func:`pool_features`).
        feature_norm: ``"none"``, ``"center"`` or ``"standardize"`` per task, from support statistics
            (see :func:`normalize_task_features`).
        nonfinite: What a NaN/Inf in the features does. ``"propagate"`` (for training loops): a warning;
            the inner loop runs on the features with those values set to zero and the loss is NaN, still
            attached to the graph, so ``loss.backward()`` runs as usual (under DDP every rank reaches the
            gradient all-reduce) and leaves NaN gradients, and a loop that checks the loss or gradient
            norm skips the step. ``"raise"``: the inner loop's ``ValueError``. Finite features give the
            same loss and gradients either way.
        features: ``ids (B, W) -> hidden (B, W, D)`` used instead of the backbone (see :func:`episode_features`).

    Returns:
        The :class:`~picomaml.InnerLoopOutput` of the inner loop (``.loss``, ``.metrics``, ...); for a
        single-task episode the loop sees ``(N*K, D)`` / ``(N*Q, D)`` features without a task dim. Its
        metrics add ``nonfinite_features``: 1.0 when non-finite features were propagated, else 0.0.

    Raises:
        TypeError: ``episode`` is not an episode.
        ValueError: features (or a ``model.config`` hidden size, checked before the forward) whose width is
            not ``head.in_dim``, or a bad episode (see :func:`episode_features`).
    """
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite: must be one of {list(NONFINITE)}, got {nonfinite!r}")
    check_episode(episode)
    if features is None:  # PicoDecoder's config says d_model, a transformers model's hidden_size
        config = getattr(model, "config", None)
        hidden = getattr(config, "d_model", getattr(config, "hidden_size", None))
        _check_width(head, hidden, "the backbone's hidden size (model.config)")
    head_param = next(iter(head.parameters()), None)
    dtype = head_param.dtype if head_param is not None else None  # the head keeps its own precision
    xs, ys, xq, yq = episode_features(model, episode, pooling, feature_norm, dtype, features=features)
    _check_width(head, xs.shape[-1], "the width of the backbone's features")
    if episode.support_ids.dim() == 2:
        xs, xq, ys, yq = xs[0], xq[0], ys[0], yq[0]
    bad = nonfinite == "propagate" and not bool(torch.isfinite(xs).all() & torch.isfinite(xq).all())
    if bad:  # zeros let the inner loop run; the NaN factor reaches the loss and every gradient through it
        warnings.warn("meta_loss: the backbone's features hold NaN or Inf; the loss is NaN", RuntimeWarning, 2)
        xs, xq = (torch.where(torch.isfinite(x), x, torch.zeros_like(x)) for x in (xs, xq))
    out = loop(head, xs, ys, xq, yq)
    out.metrics["nonfinite_features"] = float(bad)
    if bad:
        out.loss = out.loss * float("nan")
        out.metrics["query_loss"] = float("nan")
    return out
