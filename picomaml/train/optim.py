"""Outer optimisation: AdamW parameter groups and warm-up + decay learning-rate schedules.

Weight decay applies only to matrices of linear layers; norms, biases, embeddings and the learned inner
learning rates are not decayed (decaying an embedding pulls rare tokens to zero; decaying a learning
rate would bias it towards no adaptation).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from picomaml.meta.inner_loop import InnerLoop
from picomaml.params import Params, hparam

__all__ = ["OptimConfig", "Decay", "MetaMoments", "param_groups", "build_optimizer", "lr_multiplier", "build_lr_scheduler"]

Decay = Literal["cosine", "linear", "constant"]
MetaMoments = Literal["shared", "separate"]


@dataclasses.dataclass
class OptimConfig(Params):
    """Outer optimizer (AdamW) and learning-rate schedule (YAML section ``optim``): the keyword arguments of
    [`build_optimizer`][picomaml.train.optim.build_optimizer] and
    [`build_lr_scheduler`][picomaml.train.optim.build_lr_scheduler], and the gradient clipping of a training
    step."""

    lr: float = hparam(3e-4, gt=0, doc="peak learning rate of the backbone")
    weight_decay: float = hparam(0.1, ge=0, doc="AdamW decay of linear-layer matrices (others: none)")
    betas: tuple[float, float] = hparam((0.9, 0.95), ge=0, lt=1, doc="AdamW betas")
    eps: float = hparam(1e-8, gt=0, doc="AdamW epsilon")
    warmup_steps: int = hparam(100, ge=0, doc="linear warm-up steps")
    decay: Decay = hparam("cosine", doc="LR after warm-up: cosine or linear to min_lr_ratio, or constant")
    min_lr_ratio: float = hparam(0.1, ge=0, le=1, doc="final LR as a fraction of the peak")
    grad_clip: float | None = hparam(1.0, gt=0, doc="clip the global gradient norm; null: off")
    meta_lr: float | None = hparam(
        None, gt=0, doc="outer LR of the head's initial weights and the learned inner LRs; null: lr"
    )
    meta_grad_norm: float | None = hparam(
        None, gt=0, le=100, doc="rescale a meta step's gradient to this fraction of the running AR-step gradient "
        "norm (after clipping), then clip; null: off (not in weighted mode)"
    )
    meta_grad_decay: float = hparam(0.9, ge=0, lt=1, doc="decay of that running AR-step gradient norm (an EMA)")
    meta_moments: MetaMoments = hparam(
        "shared", doc="separate: meta steps keep their own AdamW moments (same LR schedule; not in weighted mode)"
    )


def _no_decay(name: str, param: torch.Tensor, owners: tuple[nn.Module, ...]) -> bool:
    if param.ndim < 2:  # biases, norm weights, per-tensor learned LRs
        return True
    # A tied weight has two owners (embedding and LM head): it is an embedding whichever comes last.
    # An InnerLoop's only parameters are learned LRs, 2-D when learned per step.
    return any(isinstance(m, (nn.Embedding, InnerLoop)) for m in owners) or "embed" in name


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
        owners: dict[int, tuple[nn.Module, ...]] = {}
        for m in module.modules():
            for p in m.parameters(recurse=False):
                owners[id(p)] = (*owners.get(id(p), ()), m)
        decay, no_decay = [], []
        for name, param in module.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if _no_decay(name, param, owners.get(id(param), ())) else decay).append(param)
        override = lr_overrides.get(mod_name)
        group_lr = lr if override is None else override  # an override of 0.0 freezes, it is not "unset"
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
    betas: Iterable[float] = OptimConfig.betas,
    eps: float = OptimConfig.eps,
    lr_overrides: dict[str, float | None] | None = None,
) -> torch.optim.AdamW:
    """AdamW over [`param_groups`][picomaml.train.optim.param_groups] of ``modules``."""
    groups = param_groups(modules, weight_decay, lr, lr_overrides)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


def lr_multiplier(
    step: int,
    warmup_steps: int,
    total_steps: int,
    decay: Decay = OptimConfig.decay,
    min_lr_ratio: float = OptimConfig.min_lr_ratio,
) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based).

    Linear warm-up from ``1/warmup_steps`` to 1 over ``warmup_steps`` steps, then ``cosine`` or ``linear``
    decay to ``min_lr_ratio`` at ``total_steps`` (held afterwards), or ``constant``.

    Args:
        step: Optimizer step, 0-based.
        warmup_steps: Warm-up length (0: none).
        total_steps: Step at which the decay reaches ``min_lr_ratio``.
        decay: ``"cosine"``, ``"linear"`` or ``"constant"``.
        min_lr_ratio: Final multiplier of the decay (config key ``optim.min_lr_ratio``).

    Returns:
        The multiplier, in ``(0, 1]`` for ``min_lr_ratio`` in ``(0, 1]``.
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
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    decay: Decay = OptimConfig.decay,
    min_lr_ratio: float = OptimConfig.min_lr_ratio,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying [`lr_multiplier`][picomaml.train.optim.lr_multiplier] to every parameter group
    (step it once per update).

    Args:
        optimizer: The optimizer; each group's ``lr`` at construction is its base LR.
        warmup_steps: See [`lr_multiplier`][picomaml.train.optim.lr_multiplier].
        total_steps: See [`lr_multiplier`][picomaml.train.optim.lr_multiplier].
        decay: See [`lr_multiplier`][picomaml.train.optim.lr_multiplier].
        min_lr_ratio: See [`lr_multiplier`][picomaml.train.optim.lr_multiplier].
    """
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, warmup_steps, total_steps, decay, min_lr_ratio)
    )
