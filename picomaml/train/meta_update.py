"""How a meta step's gradient reaches the weights: rescaled to a fraction of the AR steps' gradient norm
(``optim.meta_grad_norm``), through its own AdamW moments (``optim.meta_moments=separate``), and the
update norms that show what each kind of step did to the backbone (``eval.update_norms``).

Why: a meta gradient is often 5-15x an AR gradient before clipping. With one shared set of AdamW moments, a
large meta gradient also inflates the second moment that later AR steps are divided by, so a hybrid run's
AR steps may move the weights less than a pure AR run's ("dilution"). Rescaling the meta gradient to a
fraction of a running AR norm, and keeping separate moments, remove the two routes; the update norms
(the L2 norm of the change of the backbone's weights in one optimizer step, after clipping and AdamW)
measure whether that happens.

The functional core ([`ema`][picomaml.train.meta_update.ema],
[`rescale_grads_`][picomaml.train.meta_update.rescale_grads_],
[`update_norm`][picomaml.train.meta_update.update_norm]) has a thin stateful class over it,
[`MetaGradScale`][picomaml.train.meta_update.MetaGradScale], which the trainer checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ema", "grad_norm", "rescale_grads_", "update_norm", "step_kind", "MetaGradScale"]


def ema(previous: float | None, value: float, decay: float) -> float:
    """Exponential moving average: ``value`` itself when there is no ``previous``."""
    return value if previous is None else decay * previous + (1.0 - decay) * value


def grad_norm(params: Iterable[nn.Parameter]) -> float:
    """The L2 norm of all gradients together (0 without any; ``inf``/``nan`` when one is non-finite)."""
    norms = [torch.linalg.vector_norm(p.grad.detach()) for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def rescale_grads_(params: Sequence[nn.Parameter], target: float) -> float:
    """Scale every gradient of ``params`` in place so that their global L2 norm is ``target``.

    Args:
        params: Parameters; those without a gradient are left alone.
        target: The global norm after scaling (``>= 0``).

    Returns:
        The global norm before scaling. A zero or non-finite norm leaves the gradients unchanged (the
        trainer's non-finite guard skips such a step).
    """
    norm = grad_norm(params)
    if norm > 0 and math.isfinite(norm):
        factor = target / norm
        for p in params:
            if p.grad is not None:
                p.grad.mul_(factor)
    return norm


def update_norm(params: Sequence[Tensor], before: Sequence[Tensor]) -> float:
    """The L2 norm of ``params - before`` over all tensors together: the size of one optimizer update.

    Args:
        params: The tensors after the update.
        before: Detached copies taken before it, in the same order and shapes.
    """
    if len(params) != len(before):
        raise ValueError(f"update_norm: {len(params)} tensors after the update, {len(before)} before")
    if not params:
        return 0.0
    diffs = [torch.linalg.vector_norm(p.detach() - b) for p, b in zip(params, before, strict=True)]
    return float(torch.linalg.vector_norm(torch.stack(diffs)))


def step_kind(objectives: Iterable[str]) -> str:
    """``"ar"`` or ``"meta"`` for a step of one objective, ``"mixed"`` for a weighted step of both."""
    kinds = set(objectives)
    return kinds.pop() if len(kinds) == 1 else "mixed"


class MetaGradScale:
    """The running norm of the AR steps' (clipped) gradients, and the rescaling of meta gradients to a
    fraction of it (``optim.meta_grad_norm``, ``optim.meta_grad_decay``).

    Until the first AR step there is no running norm, and a meta gradient is only clipped.

    Args:
        fraction: Target norm of a meta gradient as a fraction of the running AR norm; ``None``: the
            running norm is kept (for the logs) and nothing is rescaled.
        decay: EMA decay of the running AR norm, in ``[0, 1)``.

    Examples:
        >>> scale = MetaGradScale(0.5)
        >>> scale.observe_ar(0.8)
        >>> scale.target
        0.4
    """

    def __init__(self, fraction: float | None = None, decay: float = 0.9) -> None:
        if fraction is not None and not (isinstance(fraction, (int, float)) and 0 < fraction and math.isfinite(fraction)):
            raise ValueError(f"fraction must be a finite number > 0 or None, got {fraction!r}")
        if not (isinstance(decay, (int, float)) and 0 <= decay < 1):
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        self.fraction, self.decay = fraction, float(decay)
        self.ar_norm: float | None = None
        self.ar_seen = 0

    def observe_ar(self, norm: float) -> None:
        """Fold one AR step's clipped gradient norm into the running norm (a non-finite one is ignored)."""
        if math.isfinite(norm):
            self.ar_norm = ema(self.ar_norm, float(norm), self.decay)
            self.ar_seen += 1

    @property
    def target(self) -> float | None:
        """The norm a meta gradient is rescaled to now (``None``: not rescaled)."""
        if self.fraction is None or self.ar_norm is None:
            return None
        return self.fraction * self.ar_norm

    def rescale_(self, params: Sequence[nn.Parameter]) -> float | None:
        """Rescale a meta step's gradients in place to [`target`][picomaml.train.meta_update.MetaGradScale.target];
        returns their norm before, or ``None`` when nothing was rescaled."""
        target = self.target
        return None if target is None else rescale_grads_(params, target)

    def state_dict(self) -> dict[str, Any]:
        return {"ar_norm": self.ar_norm, "ar_seen": self.ar_seen}

    def load_state_dict(self, state: Any) -> None:
        """Restore a saved state; a malformed one is refused, naming the key."""
        if not isinstance(state, dict) or set(state) != {"ar_norm", "ar_seen"}:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"meta_grad_scale: expected the keys ['ar_norm', 'ar_seen'], got {got}")
        norm, seen = state["ar_norm"], state["ar_seen"]
        if norm is not None and not (isinstance(norm, (int, float)) and math.isfinite(norm) and norm >= 0):
            raise ValueError(f"meta_grad_scale: 'ar_norm' must be a finite number >= 0 or None, got {norm!r}")
        if isinstance(seen, bool) or not isinstance(seen, int) or seen < 0 or (norm is None) != (seen == 0):
            raise ValueError(f"meta_grad_scale: 'ar_seen' must be an int >= 0, 0 exactly when 'ar_norm' is None, got {seen!r}")
        self.ar_norm, self.ar_seen = (None if norm is None else float(norm)), seen
