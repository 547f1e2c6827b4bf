"""A linear probe: multinomial logistic regression fitted on each task's support set, vectorised over tasks.

This is the classic "fit a linear classifier on frozen features" baseline. For each task separately,

1. the support features are standardised by the support set's own per-dimension mean and standard
   deviation (dimensions that are constant on the support are left unscaled: they carry no information
   and their weights stay zero up to rounding), so the regularisation strength means the same for any backbone;
2. ``W, b`` minimise ``mean_i CE(x_i W + b, y_i) + l2 / 2 * (|W|^2 + |b|^2)`` from zero. The bias is
   penalised too: on centred features its optimum is near zero anyway, and the penalty makes the
   objective strictly convex, so the optimum is unique and the Hessian is invertible;
3. the returned ``W, b`` fold the standardisation back in, so they apply to the raw features.

**Optimiser: damped Newton, vectorised.** With the support smaller than the feature width (``S < D``,
the usual few-shot case) the classes are always separable and ``l2`` is the only curvature left at the
optimum, so the condition number is about ``lambda_max / l2`` (~1e4 here); gradient descent, even with
Nesterov momentum, is still far from the optimum after hundreds of steps. Newton's method converges
quadratically in about ten steps. Its cost stays small because the penalised optimum lies in the span of
the (centred) support rows (the representer theorem; every gradient lies there too): with the thin SVD
``X = U diag(s) V^T`` we fit ``C`` on the ``r = min(S, D)``-dimensional features ``U diag(s)`` with the
same penalty (``W = V C`` has ``|W| = |C|``), so each task's Hessian is ``((r + 1) N)^2``, not ``((D + 1) N)^2``.
Each step is a batched Cholesky solve followed by an Armijo check of the full step; only when some task
rejects it, a backtracking line search over ``1, 1/2, ..., 2^-11`` (all tasks and sizes at once). A task whose gradient norm is below ``tol`` stops
moving, so every task follows the same path alone as in any batch. No autograd is used (the gradient and
Hessian are explicit), so it runs the same inside ``torch.no_grad()``, in float32, and touches no model.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from picomaml.meta.functional import accuracy
from picomaml.params import check_int

__all__ = ["fit_linear_probe", "linear_probe_predict", "linear_probe_accuracy"]

_ALPHAS = 0.5 ** torch.arange(12, dtype=torch.float32)  # line-search step sizes, largest first
_ARMIJO = 1e-4  # sufficient-decrease constant of the line search


def _check(xs: Tensor, ys: Tensor, n_way: int, steps: int, l2: float) -> None:
    check_int("n_way", n_way, ge=2)
    if xs.dim() != 3:
        raise ValueError(f"xs must be (T, S, D) features, got shape {tuple(xs.shape)}")
    if ys.shape != xs.shape[:2]:
        raise ValueError(f"ys must be (T, S) = {tuple(xs.shape[:2])} labels, got shape {tuple(ys.shape)}")
    if ys.numel() and (int(ys.min()) < 0 or int(ys.max()) >= n_way):
        raise ValueError(f"ys: labels must lie in [0, {n_way}), got [{int(ys.min())}, {int(ys.max())}]")
    check_int("steps", steps, ge=1)
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0 (it makes the fit strictly convex), got {l2!r}")


def _objective(feats: Tensor, onehot: Tensor, theta: Tensor, l2: float) -> Tensor:
    """``mean CE + l2/2 |theta|^2`` per task; ``theta (..., T, r+1, N)`` broadcasts over leading dims."""
    z = feats @ theta  # (..., T, S, N)
    ce = (torch.logsumexp(z, -1) - (z * onehot).sum(-1)).mean(-1)
    return ce + 0.5 * l2 * theta.pow(2).sum((-2, -1))


def fit_linear_probe(
    xs: Tensor, ys: Tensor, n_way: int, steps: int = 25, l2: float = 1e-3, tol: float = 1e-5
) -> tuple[Tensor, Tensor]:
    """Fit an L2-penalised multinomial logistic regression on each task's support set.

    Args:
        xs: ``(T, S, D)`` support features of ``T`` tasks (any float dtype; fitted in float32).
        ys: ``(T, S)`` long labels in ``[0, n_way)``.
        n_way: Number of classes (>= 2).
        steps: Most Newton steps (each task stops once its gradient norm is below ``tol``; about ten suffice).
        l2: Penalty on the weights and bias, relative to the mean cross-entropy, on standardised features.
        tol: Gradient-norm threshold (in the standardised coordinates) at which a task stops.

    Returns:
        ``(W, b)``: ``(T, D, N)`` and ``(T, N)`` float32, such that ``x @ W[t] + b[t]`` are task ``t``'s logits
        for raw ``(.., D)`` features ``x``. A task whose support features hold NaN or Inf (a model with NaN
        weights) gets NaN weights and a ``RuntimeWarning``, not an error.
    """
    _check(xs, ys, n_way, steps, l2)
    x = xs.detach().float()
    t, s, d = x.shape
    bad = ~torch.isfinite(x).flatten(1).all(1)  # (T,) NaN/Inf features (e.g. NaN weights): no probe
    x = torch.where(bad.view(t, 1, 1), torch.zeros_like(x), x)
    mu = x.mean(1, keepdim=True)
    sd = x.std(1, keepdim=True, unbiased=False)
    # dims constant on the support (relative to the widest dim) are not scaled: their weight stays zero
    sd = torch.where(sd > 1e-6 * sd.amax(-1, keepdim=True), sd, torch.ones_like(sd))
    z = (x - mu) / sd
    bad |= ~torch.isfinite(z).flatten(1).all(1)  # finite features too large to standardise in float32
    if bool(bad.any()):  # fit those tasks on zeros (svd refuses NaN), then report their probes as NaN
        warnings.warn(
            f"linear probe: the support features of {int(bad.sum())} of {t} tasks hold NaN or Inf (or overflow "
            f"float32); their probe weights are NaN",
            RuntimeWarning,
            stacklevel=2,
        )
        z = torch.where(bad.view(t, 1, 1), torch.zeros_like(z), z)
    u, sv, vh = torch.linalg.svd(z, full_matrices=False)  # z = u diag(sv) vh, r = min(S, D)
    r = sv.shape[-1]
    feats = torch.cat([u * sv.unsqueeze(1), x.new_ones(t, s, 1)], -1)  # (T, S, r+1): reduced coords + bias
    onehot = torch.nn.functional.one_hot(ys.long(), n_way).float()
    p_dim = n_way * (r + 1)
    eye = torch.eye(p_dim, dtype=x.dtype, device=x.device)
    classes = torch.arange(n_way, device=x.device)
    alphas = _ALPHAS.to(x.device)
    theta = x.new_zeros(t, r + 1, n_way)
    for _ in range(steps):
        prob = torch.softmax(feats @ theta, -1)  # (T, S, N)
        grad = feats.transpose(1, 2) @ (prob - onehot) / s + l2 * theta  # (T, r+1, N)
        active = grad.flatten(1).norm(dim=1) > tol
        if not bool(active.any()):
            break
        # Hessian over (class k, feature a): mean_i f_ia f_ib (p_ik [k=l] - p_ik p_il) + l2 I
        g = (prob.unsqueeze(-1) * feats.unsqueeze(-2)).reshape(t, s, p_dim)  # (T, S, N*(r+1))
        hess = -(g.transpose(1, 2) @ g).view(t, n_way, r + 1, n_way, r + 1)
        diag = torch.einsum("tsk,tsa,tsb->ktab", prob, feats, feats)  # (N, T, r+1, r+1)
        hess[:, classes, :, classes, :] += diag
        hess = hess.reshape(t, p_dim, p_dim) / s + l2 * eye
        rhs = grad.transpose(1, 2).reshape(t, p_dim, 1)  # class-major, like the Hessian
        # SPD (>= l2 I): Cholesky; batched LU (linalg.solve) also fails in some MKL builds for n >= ~200
        step = -torch.cholesky_solve(rhs, torch.linalg.cholesky(hess))
        step = step.view(t, n_way, r + 1).transpose(1, 2)  # (T, r+1, N)
        # backtracking: the largest step size with sufficient decrease, per task (all candidates at once)
        f0 = _objective(feats, onehot, theta, l2)
        slope = (grad * step).sum((-2, -1))
        full = _objective(feats, onehot, theta + step, l2) <= f0 + _ARMIJO * slope
        if bool((full | ~active).all()):  # the usual case: the full Newton step is accepted by every task
            alpha = torch.ones_like(f0)
        else:
            trial = _objective(feats, onehot, theta + alphas.view(-1, 1, 1, 1) * step, l2)  # (A, T)
            ok = trial <= f0 + _ARMIJO * alphas.unsqueeze(1) * slope
            first = torch.where(ok.any(0), ok.float().argmax(0), torch.full_like(f0, -1, dtype=torch.long))
            alpha = torch.where(first >= 0, alphas[first.clamp_min(0)], torch.zeros_like(f0))
        theta = theta + (alpha * active).view(t, 1, 1) * step
    w_std = vh.transpose(1, 2) @ theta[:, :r]  # (T, D, N) on standardised features
    w = w_std / sd.transpose(1, 2)  # fold the standardisation into the raw-feature weights
    b = theta[:, r] - ((mu / sd) @ w_std).squeeze(1)  # (T, N)
    w = w.masked_fill(bad.view(t, 1, 1), float("nan"))
    return w, b.masked_fill(bad.view(t, 1), float("nan"))


def linear_probe_predict(w: Tensor, b: Tensor, xq: Tensor) -> Tensor:
    """Predicted labels ``(T, Q)`` of raw query features ``xq (T, Q, D)`` under probes ``W (T, D, N)``, ``b (T, N)``."""
    if xq.dim() != 3 or xq.shape[0] != w.shape[0] or xq.shape[2] != w.shape[1]:
        raise ValueError(
            f"xq must be (T, Q, D) = ({w.shape[0]}, Q, {w.shape[1]}) features, got shape {tuple(xq.shape)}"
        )
    return (xq.detach().float() @ w + b.unsqueeze(1)).argmax(-1)


def linear_probe_accuracy(
    xs: Tensor,
    ys: Tensor,
    xq: Tensor,
    yq: Tensor,
    n_way: int,
    steps: int = 25,
    l2: float = 1e-3,
    tol: float = 1e-5,
) -> list[float]:
    """Query accuracy of a linear probe fitted on each task's support set (see
    [`fit_linear_probe`][picomaml.eval.probe.fit_linear_probe]).

    Args:
        xs: ``(T, S, D)`` support features.
        ys: ``(T, S)`` support labels in ``[0, n_way)``.
        xq: ``(T, Q, D)`` query features.
        yq: ``(T, Q)`` query labels.
        n_way: Number of classes (>= 2).
        steps: Most Newton steps (see [`fit_linear_probe`][picomaml.eval.probe.fit_linear_probe]).
        l2: Penalty on the standardised weights and bias.
        tol: Gradient-norm threshold at which a task stops.

    Returns:
        One accuracy per task: NaN (with a ``RuntimeWarning``) for a task whose support or query features
        hold NaN or Inf.
    """
    _check(xs, ys, n_way, steps, l2)
    if xq.dim() != 3 or xq.shape[0] != xs.shape[0] or xq.shape[2] != xs.shape[2]:
        raise ValueError(
            f"xq must be (T, Q, D) = ({xs.shape[0]}, Q, {xs.shape[2]}) features, got shape {tuple(xq.shape)}"
        )
    if yq.shape != xq.shape[:2]:
        raise ValueError(f"yq must be (T, Q) = {tuple(xq.shape[:2])} labels, got shape {tuple(yq.shape)}")
    w, b = fit_linear_probe(xs, ys, n_way, steps=steps, l2=l2, tol=tol)
    acc = accuracy(linear_probe_predict(w, b, xq), yq, per_task=True)
    fitted = torch.isfinite(w).flatten(1).all(1) & torch.isfinite(b).all(1)
    scored = torch.isfinite(xq.detach()).flatten(1).all(1)
    if not bool((scored | ~fitted).all()):
        warnings.warn(
            f"linear probe: the query features of {int((fitted & ~scored).sum())} of {xs.shape[0]} tasks hold "
            f"NaN or Inf; their accuracy is NaN",
            RuntimeWarning,
            stacklevel=2,
        )
    return acc.masked_fill(~(fitted & scored), float("nan")).tolist()
