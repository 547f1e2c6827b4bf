"""Outer optimisation: AdamW parameter groups and warm-up + decay learning-rate schedules.

Weight decay applies only to matrices of linear layers; norms, biases, embeddings and the learned inner
learning rates are not decayed (decaying an embedding pulls rare tokens to zero; decaying a learning
rate would bias it towards no adaptation).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["param_groups", "build_optimizer", "lr_multiplier", "build_lr_scheduler"]


def _no_decay(name: str, param: torch.Tensor, module: nn.Module | None) -> bool:
    if param.ndim < 2:  # biases, norm weights, scalar learned LRs
        return True
    return isinstance(module, nn.Embedding) or "embed" in name


def param_groups(
    modules: dict[str, nn.Module],
    weight_decay: float,
    lr: float,
    lr_overrides: dict[str, float | None] | None = None,
) -> list[dict[str, Any]]:
    """AdamW parameter groups: decayed matrices vs. everything else, per named module.

    Args:
        modules: ``{"model": backbone, "head": head, "inner_loop": loop}``; a parameter shared by two
            modules (tied weights) is placed once.
        weight_decay: Decay for linear-layer matrices.
        lr: Base learning rate.
        lr_overrides: Optional per-module learning rate (``None`` keeps ``lr``).

    Returns:
        Groups with keys ``params``, ``weight_decay``, ``lr`` and ``name`` (``"<module>/decay"`` or
        ``"<module>/no_decay"``); empty groups are dropped.
    """
    lr_overrides = lr_overrides or {}
    seen: set[int] = set()
    groups: list[dict[str, Any]] = []
    for mod_name, module in modules.items():
        owner = {id(p): m for m in module.modules() for p in m.parameters(recurse=False)}
        decay, no_decay = [], []
        for name, param in module.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if _no_decay(name, param, owner.get(id(param))) else decay).append(param)
        group_lr = lr_overrides.get(mod_name) or lr
        for suffix, params, wd in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0)):
            if params:
                groups.append(
                    {"params": params, "weight_decay": wd, "lr": group_lr, "name": f"{mod_name}/{suffix}"}
                )
    return groups


def build_optimizer(
    modules: dict[str, nn.Module],
    lr: float,
    weight_decay: float,
    betas: Iterable[float] = (0.9, 0.95),
    eps: float = 1e-8,
    lr_overrides: dict[str, float | None] | None = None,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` of ``modules``."""
    groups = param_groups(modules, weight_decay, lr, lr_overrides)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


def lr_multiplier(
    step: int, warmup_steps: int, total_steps: int, decay: str = "cosine", min_ratio: float = 0.1
) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based).

    Linear warm-up from ``1/warmup_steps`` to 1 over ``warmup_steps`` steps, then ``cosine`` or ``linear``
    decay to ``min_ratio`` at ``total_steps``, or ``constant``.
    """
    if decay not in ("cosine", "linear", "constant"):
        raise ValueError(f"decay must be 'cosine', 'linear' or 'constant', got {decay!r}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if decay == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    decay: str = "cosine",
    min_ratio: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_multiplier` to every parameter group (step it once per update)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, warmup_steps, total_steps, decay, min_ratio)
    )
