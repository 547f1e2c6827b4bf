"""Small functions of the inner loop: per-task losses and accuracy, inner-gradient norms and clipping, and
the written-out gradient of a linear head. The SGD steps themselves are
[`picomaml.meta.engine.sgd_steps`][picomaml.meta.engine.sgd_steps].

Every tensor here carries a leading task dimension ``T``: parameters ``(T, ...)``, features ``(T, n, D)``,
labels ``(T, n)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "accuracy",
    "task_cross_entropy",
    "global_grad_norm",
    "clip_grads",
    "clip_and_norm",
    "closed_form_linear_grads",
]

def accuracy(scores: Tensor, labels: Tensor, *, per_task: bool = False) -> Tensor:
    """Fraction of rows predicted right: the one accuracy of the library (training metrics and evaluation).

    Args:
        scores: Logits ``(..., n, N)`` (the prediction is their arg-max; ties go to the lowest index, as
            ``argmax``) or predicted labels ``(..., n)`` long, e.g. from a nearest-class-mean rule.
        labels: ``(..., n)`` long (moved to the device of ``scores``).
        per_task: Average over the rows ``n`` only, one accuracy per leading index (e.g. ``(T,)`` for
            ``T`` tasks); default: one mean over all rows and tasks.

    Returns:
        A float tensor: 0-dim, or shaped ``scores.shape[:-2]`` / ``labels.shape[:-1]`` with ``per_task``.

    Raises:
        ValueError: ``scores`` is neither ``labels``-shaped nor ``labels``-shaped plus a class dim.
    """
    pred = scores.argmax(-1) if scores.dim() == labels.dim() + 1 else scores
    if pred.shape != labels.shape:
        raise ValueError(
            f"scores: shape {tuple(scores.shape)} fits neither labels {tuple(labels.shape)} (predictions) nor "
            f"labels plus a class dim (logits)"
        )
    hits = (pred == labels.to(pred.device)).float()
    return hits.mean(-1) if per_task else hits.mean()


def task_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy per task: ``(T, n, N), (T, n) -> (T,)`` (computed in at least float32)."""
    t, n, c = logits.shape
    ce = F.cross_entropy(logits.reshape(t * n, c), labels.reshape(t * n), reduction="none")
    return ce.view(t, n).mean(1)


def global_grad_norm(grads: Sequence[Tensor]) -> Tensor:
    """Per-task L2 norm over all tensors: ``[(T, ...)] -> (T,)``."""
    low = (torch.float16, torch.bfloat16)
    sq = [(g.float() if g.dtype in low else g).reshape(g.shape[0], -1).pow(2).sum(1) for g in grads]
    # the floor keeps the derivative finite at a zero gradient (sqrt'(0) is inf: NaN meta-gradients when clipping)
    return torch.stack(sq, 0).sum(0).clamp_min(1e-30).sqrt()


def clip_grads(grads: Sequence[Tensor], norm: Tensor, max_norm: float) -> list[Tensor]:
    """Scale each task's gradients so their global norm is at most ``max_norm`` (as ``clip_grad_norm_``)."""
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # (T,)
    return [g * scale.view(-1, *([1] * (g.dim() - 1))).to(g.dtype) for g in grads]


def clip_and_norm(grads: Sequence[Tensor], grad_clip: float | None) -> tuple[list[Tensor], Tensor]:
    """``(grads clipped to grad_clip per task, their norms (T,) before clipping, detached)``; without
    ``grad_clip`` the gradients are unchanged and the norm is a metric kept out of the graph."""
    if grad_clip is not None:  # the clip factor is part of the graph
        norm = global_grad_norm(grads)
        return clip_grads(grads, norm, grad_clip), norm.detach()
    with torch.no_grad():
        return list(grads), global_grad_norm(grads)


def closed_form_linear_grads(
    weight: Tensor, bias: Tensor, feats: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradient of the mean cross-entropy of a linear head, written out (no ``autograd.grad``).

    For logits ``z = X W^T + b`` and ``P = softmax(z)``: ``dL/dz = (P - Y) / n``, so
    ``dL/dW = (P - Y)^T X / n`` and ``dL/db = sum_rows (P - Y) / n``. These are ordinary differentiable
    ops, so a second-order meta-gradient flows through them by plain autograd.

    Args:
        weight: ``(T, N, D)``; bias: ``(T, N)``; feats: ``(T, n, D)``; labels: ``(T, n)``.

    Returns:
        ``(grad_weight (T, N, D), grad_bias (T, N))``.
    """
    n = feats.shape[1]
    z = torch.baddbmm(bias.unsqueeze(1), feats, weight.transpose(1, 2))  # (T, n, N)
    probs = torch.softmax(z, dim=-1)  # float32 under autocast
    resid = (probs - F.one_hot(labels, weight.shape[1]).to(probs.dtype)) / n  # (T, n, N)
    grad_w = torch.bmm(resid.transpose(1, 2).to(feats.dtype), feats)
    return grad_w.to(weight.dtype), resid.sum(1).to(bias.dtype)
