"""Functional core of the inner loop: batched SGD on a head's parameter dict, general and closed form.

Every tensor here carries a leading task dimension ``T``: parameters ``(T, ...)``, features ``(T, n, D)``,
labels ``(T, n)``. Tasks are independent, so the gradient of the *sum* of per-task losses with respect to
the ``(T, ...)`` parameters is, slice by slice, the gradient of each task's own loss: one
``torch.autograd.grad`` call adapts all tasks at once.

Nothing here touches ``.grad`` or an optimizer; updates build new tensors ``p - lr * g``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

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
    "sgd_steps",
]

LrFn = Callable[[int, int], "float | Tensor"]


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


def sgd_steps(
    logits_fn: Callable[[dict, Tensor, Any], Tensor],
    params: dict[str, Tensor],
    feats: Tensor,
    labels: Tensor,
    steps: int,
    lr_fn: LrFn,
    *,
    create_graph: bool,
    grad_clip: float | None = None,
    closed_form: bool = False,
    masks_fn: Callable[[], Any] | None = None,
    keep_history: bool = False,
) -> tuple[list[dict[str, Tensor]], Tensor]:
    """Plain SGD on the support loss, every task at once.

    Args:
        logits_fn: ``(params, feats, masks) -> logits (T, n, N)``.
        params: ``name -> (T, ...)`` initial tensors (their graph reaches the meta-parameters).
        feats: ``(T, n, D)`` support features; labels: ``(T, n)``.
        steps: Number of SGD steps.
        lr_fn: ``(step, tensor_index) -> lr`` (a float or a 0-dim tensor, e.g. a learned LR).
        create_graph: Second order: keep the graph of each inner gradient so the outer backward
            differentiates through it. ``False`` is first order (FOMAML): gradients are computed on detached
            copies, the update ``p - lr * g`` keeps the graph to ``p`` and ``lr`` only.
        grad_clip: Clip each task's global inner-gradient norm to this value.
        closed_form: Use :func:`closed_form_linear_grads` (only for a linear head: keys ``out.weight`` and
            ``out.bias`` and nothing else).
        masks_fn: Called once per step for dropout masks (``None`` means no dropout).
        keep_history: Return the parameters after every step, not only the last.

    Returns:
        ``(history, grad_norms)``: ``history`` is ``[params_0, ..., params_S]`` (or ``[params_0, params_S]``
        without ``keep_history``); ``grad_norms`` is ``(steps, T)``, detached, before clipping.
    """
    names = list(params)
    history = [params]
    norms = []
    for s in range(steps):
        if closed_form:
            w, b, x = params["out.weight"], params["out.bias"], feats
            if not create_graph:
                w, b, x = w.detach(), b.detach(), x.detach()
            grads = list(closed_form_linear_grads(w, b, x, labels))
        else:
            if create_graph:
                # a tensor without history (frozen head, no-grad call) still needs to be a graph input
                leaves = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in params.items()}
                x = feats
            else:
                leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
                x = feats.detach()
            masks = masks_fn() if masks_fn is not None else None
            loss = task_cross_entropy(logits_fn(leaves, x, masks), labels).sum()
            grads = list(torch.autograd.grad(loss, [leaves[k] for k in names], create_graph=create_graph))
        grads, norm = clip_and_norm(grads, grad_clip)
        norms.append(norm)
        params = {k: params[k] - lr_fn(s, i) * g for i, (k, g) in enumerate(zip(names, grads, strict=True))}
        if keep_history:
            history.append(params)
    if not keep_history and steps > 0:
        history.append(params)
    grad_norms = torch.stack(norms) if norms else feats.new_zeros((0, feats.shape[0]), dtype=torch.float32)
    return history, grad_norms
