"""Featurising an episode: one backbone forward over its windows, one pooled vector per window.

[`episode_features`][picomaml.meta.features.episode_features] runs the backbone exactly once over the support
and query windows of every task together, pools one feature vector per window
([`pool_features`][picomaml.meta.features.pool_features]) and normalises them per task from support statistics
([`normalize_task_features`][picomaml.meta.features.normalize_task_features]). Training
([`picomaml.meta_loss`][picomaml.meta.objectives.meta_loss]) and every few-shot evaluation
([`picomaml.eval.fewshot`][picomaml.eval.fewshot], [`picomaml.eval.downstream`][picomaml.eval.downstream])
featurise their episodes with it. [`picomaml.meta.objectives`][picomaml.meta.objectives] re-exports every name
here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from picomaml.checks import check_values
from picomaml.meta.backbone import backbone_hidden
from picomaml.params import choices

__all__ = [
    "Pooling",
    "FeatureNorm",
    "POOLINGS",
    "FEATURE_NORMS",
    "backbone_hidden",
    "pool_features",
    "normalize_task_features",
    "EpisodeFeatures",
    "episode_features",
    "check_episode",
    "EpisodeRows",
    "episode_rows",
]

Pooling = Literal["mask", "before_mask", "last", "mean"]
FeatureNorm = Literal["none", "center", "standardize"]
POOLINGS = choices(Pooling)
FEATURE_NORMS = choices(FeatureNorm)


def pool_features(
    hidden: Tensor,
    mask: Tensor | None = None,
    pooling: str = "before_mask",
    *,
    valid: Tensor | None = None,
    owner: Any = None,
) -> Tensor:
    """One feature vector per window: the one place where every pooling is defined.

    Args:
        hidden: ``(B, L, D)`` hidden states.
        mask: ``(B, L)`` bool, True at the masked (class-token) positions; needed for ``"mask"`` and
            ``"before_mask"``, ignored by the others.
        pooling: ``"mask"`` (mean over the masked positions; every row needs at least one),
            ``"before_mask"`` (mean over the positions just before the masked ones: in a causal LM the
            state that predicts the class token; a mask at position 0 uses itself), ``"last"`` (the last
            valid position, which sees the whole window in a causal decoder) or ``"mean"`` (mean over the
            valid positions).
        valid: ``(B, L)`` bool, True at real (non-pad) tokens; ``None`` (SMLMT windows): every position
            is valid. Used by ``"last"`` and ``"mean"``; every row needs at least one valid position.
            Masked positions are real tokens, so ``"mask"`` and ``"before_mask"`` ignore it.
        owner: Who pools (the backbone): the row checks read their result only until they passed once for
            this owner and shape, then run without a host sync
            ([`picomaml.checks.check_values`][picomaml.checks.check_values]).

    Returns:
        ``(B, D)`` in the dtype of ``hidden`` (sums accumulate in float32 for low-precision input).

    Raises:
        ValueError: an unknown ``pooling``, a ``hidden``/``mask``/``valid`` of the wrong shape, a missing
            ``mask``, or a row without a masked (or valid) position; the message names the rows.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, L, D), got shape {tuple(hidden.shape)}")
    if valid is not None and valid.shape != hidden.shape[:2]:
        raise ValueError(f"valid has shape {tuple(valid.shape)}, expected {tuple(hidden.shape[:2])}")
    if pooling in ("last", "mean") and valid is not None:
        _check_rows(valid.sum(1), "valid", "valid (non-pad) position", owner)
    if pooling == "last":
        if valid is None:
            return hidden[:, -1]
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        last = torch.where(valid, positions, -1).amax(1)  # the last real token of each row
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    acc = hidden.float() if hidden.dtype in (torch.float16, torch.bfloat16) else hidden
    if pooling == "mean":
        if valid is None:
            return acc.mean(1).to(hidden.dtype)
        weights = valid
    else:
        if mask is None:
            raise ValueError(f"pooling={pooling!r} needs the (B, L) mask of masked positions")
        if mask.shape != hidden.shape[:2]:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(hidden.shape[:2])}")
        if pooling == "before_mask":
            shifted = torch.zeros_like(mask)
            shifted[:, :-1] = mask[:, 1:]
            shifted[:, 0] |= mask[:, 0]
            mask = shifted
        weights = mask
    weights = weights.to(acc.dtype)
    counts = weights.sum(1)  # (B,)
    if pooling != "mean":
        _check_rows(counts, f"pooling={pooling!r}", "masked position (use pooling='last' or 'mean')", owner)
    pooled = torch.einsum("bl,bld->bd", weights, acc) / counts.unsqueeze(1)
    return pooled.to(hidden.dtype)


def _check_rows(counts: Tensor, what: str, needs: str, owner: Any = None) -> None:
    """Raise naming the (first five) rows whose ``counts`` are zero."""
    check_values(
        owner, ("pool", what, tuple(counts.shape), str(counts.device)), counts > 0,
        lambda: f"{what}: rows {(counts == 0).nonzero().flatten()[:5].tolist()} have no {needs}",
        f"{what}: a row has no {needs}",
    )  # fmt: skip


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

    Returns:
        ``(xs, xq)`` normalised, shapes unchanged.
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


class EpisodeFeatures(NamedTuple):
    """Pooled features and labels of an episode, always with a leading task dimension ``T``.

    Attributes:
        support_feats: ``(T, N*K, D)``.
        support_labels: ``(T, N*K)`` long, on the device of the features.
        query_feats: ``(T, N*Q, D)``.
        query_labels: ``(T, N*Q)`` long, on the device of the features.
    """

    support_feats: Tensor
    support_labels: Tensor
    query_feats: Tensor
    query_labels: Tensor


def _device_of(*modules: Any) -> torch.device | None:
    """Device of the first parameter of the first ``nn.Module`` among ``modules`` that has one."""
    for m in modules:
        param = next(iter(m.parameters()), None) if isinstance(m, nn.Module) else None
        if param is not None:
            return param.device
    return None


_EPISODE_TENSORS = ("support_ids", "support_labels", "support_mask", "query_ids", "query_labels", "query_mask")


def check_episode(episode: Any) -> None:
    """Raise ``TypeError`` naming ``episode`` unless it has the tensors a featuriser reads, ids integer."""
    missing = [name for name in _EPISODE_TENSORS if not isinstance(getattr(episode, name, None), Tensor)]
    if missing:
        what = "None" if episode is None else f"a {type(episode).__name__} without the tensors {missing}"
        raise TypeError(f"episode: expected an Episode (or TextEpisode), got {what}")
    for name in ("support_ids", "query_ids"):
        if getattr(episode, name).is_floating_point() or getattr(episode, name).dtype == torch.bool:
            raise TypeError(f"episode: {name} must hold integer token ids, got {getattr(episode, name).dtype}")


def check_head_n_way(head: Any, episode: Any) -> None:
    """Raise ``ValueError`` unless ``head`` has as many outputs as ``episode`` has classes.

    A 5-way head trained on 3-way episodes would learn two classes that never occur; a prototype head's
    means of empty classes are undefined. The episode's classes are its ``class_ids`` (``([T,] N)``), which
    must also divide its support rows into equal shares.
    """
    n_head, classes = getattr(head, "n_way", None), getattr(episode, "class_ids", None)
    if not isinstance(n_head, int) or not isinstance(classes, Tensor) or classes.dim() == 0:
        return
    n_episode, rows = int(classes.shape[-1]), int(episode.support_ids.shape[-2])
    if n_episode < 1 or rows % n_episode:
        raise ValueError(
            f"episode: class_token_ids names {n_episode} classes, but its {rows} support rows are not "
            f"{n_episode} equal shares"
        )
    if n_head != n_episode:
        labels = getattr(episode, "support_labels", None)
        top = int(labels.max()) + 1 if isinstance(labels, Tensor) and labels.numel() else 0  # read on the error path only
        if top > n_episode:  # the episode itself is inconsistent: say so rather than blame the head
            raise ValueError(
                f"episode: class_token_ids names {n_episode} classes, but support_labels go up to {top - 1}; "
                "class_token_ids needs one token per class (Episode.validate() checks every invariant)"
            )
        raise ValueError(
            f"head: a {n_head}-way head cannot score a {n_episode}-way episode; build the head with "
            f"n_way={n_episode} (a prototype head: picomaml.eval.fewshot.head_for_n_way)"
        )


def episode_features(
    model: nn.Module | None,
    episode: Any,
    pooling: str = "before_mask",
    feature_norm: str = "none",
    dtype: torch.dtype | None = None,
    *,
    features: Callable[[Tensor], Tensor] | None = None,
) -> EpisodeFeatures:
    """Featurise an episode (one task or a stack of ``T``) with a single backbone forward.

    The support and query windows of all tasks are concatenated into one ``(T*(N*K + N*Q), W)`` batch,
    run through the backbone once, pooled ([`pool_features`][picomaml.meta.features.pool_features]), cast to
    ``dtype``, split per task and normalised per task from support statistics
    ([`normalize_task_features`][picomaml.meta.features.normalize_task_features]). Training
    ([`meta_loss`][picomaml.meta.objectives.meta_loss]) and every evaluation path featurise episodes through
    this function. Gradients flow unless the caller disables them (evaluation runs it under
    ``torch.no_grad()``).

    Args:
        model: The backbone: a PicoDecoder, a ``transformers`` model or a module whose forward takes
            ``return_hidden=True`` (see
            [`picomaml.meta.backbone.backbone_hidden`][picomaml.meta.backbone.backbone_hidden]). May be
            ``None`` when ``features`` is given.
        episode: An [`Episode`][picomaml.meta.episode.Episode] or a
            [`TextEpisode`][picomaml.eval.leopard.TextEpisode] (or any object with their fields):
            ``support_ids`` ``([T,] N*K, W)`` long, ``support_labels`` ``([T,] N*K)``, ``support_mask``
            ``([T,] N*K, W)`` bool (True at masked class tokens; read for ``"mask"``/``"before_mask"``), the
            ``query_*`` counterparts with ``N*Q`` rows, and optionally ``support_valid``/``query_valid`` (True
            at real tokens; read for ``"last"``/``"mean"`` unless ``episode.padded`` is False, as for SMLMT
            episodes whose every position is real).
        pooling: ``"mask"``, ``"before_mask"``, ``"last"`` or ``"mean"`` (see
            [`pool_features`][picomaml.meta.features.pool_features]).
        feature_norm: ``"none"``, ``"center"`` or ``"standardize"`` (see
            [`normalize_task_features`][picomaml.meta.features.normalize_task_features]).
        dtype: Dtype of the returned features, normally the head's. ``None``: float32 for float16/bfloat16
            features (a small head keeps full precision), else the backbone's dtype.
        features: ``ids (B, W) -> hidden (B, W, D)``, used instead of
            [`backbone_hidden`][picomaml.meta.backbone.backbone_hidden] on ``model`` (e.g. the trunk of a
            module that is not a language model).

    Returns:
        [`EpisodeFeatures`][picomaml.meta.features.EpisodeFeatures]
        ``(support_feats (T, N*K, D), support_labels (T, N*K), query_feats (T, N*Q, D), query_labels (T, N*Q))``,
        with ``T = 1`` for a single-task episode. The ids move to the device of the backbone's (or
        ``features``') first parameter; the labels follow the features.

    Raises:
        TypeError: ``episode`` lacks a tensor field (``None``, a dict, ...) or its ids are not integers.
        ValueError: ids that are not ``(rows, W)`` or ``(T, rows, W)``, labels that do not match them,
            hidden states of the wrong shape, or a pooling error (see
            [`pool_features`][picomaml.meta.features.pool_features]).
    """
    if model is None and features is None:
        raise ValueError("model: pass a backbone, or a features callable ids -> (B, L, D) as features=")
    if pooling not in POOLINGS:  # before the forward, not after it
        raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
    if feature_norm not in FEATURE_NORMS:
        raise ValueError(f"feature_norm must be one of {list(FEATURE_NORMS)}, got {feature_norm!r}")
    rows = episode_rows(episode, pooling, _device_of(features, model))
    ids, mask, valid = rows.ids, rows.mask, rows.valid
    hidden = backbone_hidden(model, ids, features)  # the one forward
    if hidden.dim() != 3 or hidden.shape[:2] != ids.shape:
        raise ValueError(
            f"{'features' if features is not None else 'model'}: hidden states of shape "
            f"{tuple(hidden.shape)}, expected (B, L, D) with (B, L) = {tuple(ids.shape)}"
        )
    feats = pool_features(hidden, mask, pooling, valid=valid, owner=model)  # (T*(ns+nq), D)
    if dtype is None:
        dtype = torch.float32 if feats.dtype in (torch.float16, torch.bfloat16) else feats.dtype
    ns = rows.support_labels.shape[1]
    feats = feats.to(dtype).view(rows.support_labels.shape[0], ns + rows.query_labels.shape[1], -1)
    xs, xq = normalize_task_features(feats[:, :ns], feats[:, ns:], feature_norm)
    return EpisodeFeatures(xs, rows.support_labels.to(feats.device), xq, rows.query_labels.to(feats.device))


class EpisodeRows(NamedTuple):
    """An episode's windows as one batch: support then query rows of each task.

    Attributes:
        ids: ``(T*(N*K + N*Q), W)`` long.
        mask: The same shape, bool, True at masked class tokens (``None`` unless the pooling reads it).
        valid: The same shape, bool, True at real tokens (``None`` when every position is real or the pooling
            does not read it).
        support_labels: ``(T, N*K)`` long; query_labels: ``(T, N*Q)`` long, on the device of ``ids``.
    """

    ids: Tensor
    mask: Tensor | None
    valid: Tensor | None
    support_labels: Tensor
    query_labels: Tensor


def episode_rows(episode: Any, pooling: str, device: torch.device | None = None) -> EpisodeRows:
    """The windows of an episode (one task or ``T``) as one batch of rows on ``device``; see
    [`episode_features`][picomaml.meta.features.episode_features] for the fields read and the errors."""
    check_episode(episode)
    s_ids, q_ids = episode.support_ids, episode.query_ids
    if s_ids.dim() not in (2, 3) or q_ids.dim() != s_ids.dim() or q_ids.shape[:-2] != s_ids.shape[:-2]:
        raise ValueError(
            f"episode: ids must be (rows, W) or (T, rows, W); got support_ids {tuple(s_ids.shape)}, "
            f"query_ids {tuple(q_ids.shape)}"
        )
    for part, ids in (("support", s_ids), ("query", q_ids)):
        labels = getattr(episode, f"{part}_labels")
        if labels.shape != ids.shape[:-1]:
            raise ValueError(
                f"episode: {part}_labels has shape {tuple(labels.shape)}, expected {tuple(ids.shape[:-1])}"
            )
    width = s_ids.shape[-1]
    ns, nq = s_ids.shape[-2], q_ids.shape[-2]
    t = s_ids.shape[0] if s_ids.dim() == 3 else 1

    def rows(name: str) -> Tensor:  # (T*(ns+nq), W): support then query rows of each task
        s, q = getattr(episode, f"support_{name}"), getattr(episode, f"query_{name}")
        return torch.cat([s.reshape(t, ns, width), q.reshape(t, nq, width)], 1).reshape(-1, width)

    ids = rows("ids")
    mask = rows("mask") if pooling in ("mask", "before_mask") else None
    valid = None
    padded = getattr(episode, "padded", True)  # an Episode has no padding: skip the all-True mask
    if pooling in ("last", "mean") and padded and getattr(episode, "support_valid", None) is not None:
        valid = rows("valid")
    if device is not None and ids.device != device:
        ids = ids.to(device)
        mask = mask.to(device) if mask is not None else None
        valid = valid.to(device) if valid is not None else None
    ys = episode.support_labels.reshape(t, ns).to(ids.device)
    yq = episode.query_labels.reshape(t, nq).to(ids.device)
    return EpisodeRows(ids, mask, valid, ys, yq)
