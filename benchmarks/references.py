"""The inner loop's independent references: MAML through higher and learn2learn, one task at a time.

picomaml's :class:`~picomaml.InnerLoop` is checked against these in the test suite
(``tests/meta/test_references.py``) and timed against them in ``benchmarks/inner_loop.py``. Each function
runs the textbook loop of its library on any module: for every task, adapt on the support set with
plain SGD, score the query set, and return the mean query loss over tasks, whose ``backward()`` is the
library's meta-gradient.

Install: ``pip install 'picomaml[higher]'``; learn2learn 0.2.0 with ``picomaml._optional.L2L_INSTALL``
(loaded by :func:`picomaml._optional.load_learn2learn` without its vision/gym imports).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

import picomaml as pm
from picomaml._optional import load_learn2learn, require

__all__ = ["head_as_sequential", "learn2learn_maml", "learn2learn_meta_sgd", "higher_maml"]

Loss = Callable[[Tensor, Tensor], Tensor]
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def head_as_sequential(head: pm.MetaHead) -> nn.Sequential:
    """An ``nn.Sequential`` computing ``head``'s logits that *shares* its parameters (gradients reach the
    head). Not for prototype heads, whose output layer is built per episode."""
    if head.out is None:
        raise ValueError("head_as_sequential: a prototype head has no stored output layer")
    layers: list[nn.Module] = []
    for lin in [*head.hidden, head.out]:
        shell = nn.Linear(lin.in_features, lin.out_features)
        shell.weight, shell.bias = lin.weight, lin.bias  # the same Parameters
        layers += [shell, _ACTIVATIONS[head.activation]()]
    return nn.Sequential(*layers[:-1])


def learn2learn_maml(
    module: nn.Module, support: tuple, query: tuple, loss: Loss, steps: int, lr: float, first_order: bool = False
) -> Tensor:
    """Mean query loss after ``steps`` SGD steps per task through learn2learn's ``MAML.clone()/adapt()``."""
    maml = load_learn2learn("maml").MAML(module, lr=lr, first_order=first_order, allow_unused=True, allow_nograd=True)
    (xs, ys), (xq, yq) = support, query
    total = 0.0
    for t in range(len(xs)):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(loss(learner(xs[t]), ys[t]))
        total = total + loss(learner(xq[t]), yq[t])
    return total / len(xs)


def learn2learn_meta_sgd(
    module: nn.Module, support: tuple, query: tuple, loss: Loss, lrs: Sequence[Tensor], first_order: bool = False
) -> tuple[Tensor, list[nn.Parameter]]:
    """Mean query loss after one Meta-SGD step per task through learn2learn's ``MetaSGD`` (per-element
    LRs set to ``lrs``), and its LR parameters (whose ``.grad`` the backward fills)."""
    meta = load_learn2learn("meta_sgd").MetaSGD(module, lr=1.0, first_order=first_order)
    with torch.no_grad():
        for mine, theirs in zip(lrs, meta.lrs, strict=True):
            theirs.copy_(mine)
    (xs, ys), (xq, yq) = support, query
    total = 0.0
    for t in range(len(xs)):
        learner = meta.clone()
        learner.adapt(loss(learner(xs[t]), ys[t]))
        total = total + loss(learner(xq[t]), yq[t])
    return total / len(xs), list(meta.lrs)


def higher_maml(
    module: nn.Module, support: tuple, query: tuple, loss: Loss, steps: int, lr: float | Sequence[Tensor],
    grad_clip: float | None = None,
) -> Tensor:  # fmt: skip
    """Mean query loss after ``steps`` SGD steps per task through ``higher.innerloop_ctx`` (second order).

    Args:
        lr: One LR, or one (differentiable) LR per parameter of ``module``.
        grad_clip: Clip each step's global gradient norm to this value (a ``grad_callback``).
    """
    higher = require("higher", "higher", "the higher reference")
    params = list(module.parameters())
    opt = torch.optim.SGD([{"params": [p]} for p in params], lr=1.0)
    lrs = [lr] * len(params) if isinstance(lr, float) else list(lr)
    (xs, ys), (xq, yq) = support, query

    def clip(grads: tuple[Tensor, ...]) -> list[Tensor]:
        if grad_clip is None:
            return list(grads)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads).clamp_min(1e-30))
        scale = (grad_clip / (norm + 1e-6)).clamp(max=1.0)
        return [g * scale for g in grads]

    total = 0.0
    for t in range(len(xs)):
        with higher.innerloop_ctx(module, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(loss(fmodel(xs[t]), ys[t]), override={"lr": lrs}, grad_callback=clip)
            total = total + loss(fmodel(xq[t]), yq[t])
    return total / len(xs)
