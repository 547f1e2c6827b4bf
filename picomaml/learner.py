"""``HybridLearner``: backbone, meta head and inner loop in one module, for one wrapped forward per step.

Distributed wrappers (DDP, FSDP) synchronise gradients of the module they wrap and need the step's
computation to go through that module's ``forward``. Bundling the three trainable parts lets a training
loop wrap one module and call it for an AR step, a meta step, or a weighted sum of both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from picomaml.meta.episode import Episode
from picomaml.meta.inner_loop import InnerLoopOutput
from picomaml.objectives import NONFINITE, POOLINGS, NonFinite, lm_loss, meta_loss

__all__ = ["HybridLearner", "LearnerOutput"]


@dataclass
class LearnerOutput:
    """What one :class:`HybridLearner` call computed.

    Attributes:
        loss: Scalar to back-propagate: ``w_ar * lm_loss + w_meta * meta_loss`` over the parts computed.
        lm_loss: Next-token loss (detached), or ``None`` when no rows were given.
        meta: The inner loop's output (``.loss`` attached to the graph, ``.metrics`` floats), or ``None``.
    """

    loss: torch.Tensor
    lm_loss: torch.Tensor | None
    meta: InnerLoopOutput | None


class HybridLearner(nn.Module):
    """The trainable parts of hybrid AR + SMLMT meta-training.

    Args:
        model: The backbone (e.g. :class:`picomaml.PicoDecoder`).
        head: The :class:`picomaml.MetaHead` whose initial weights are meta-learned.
        loop: The :class:`picomaml.InnerLoop` (its learned inner LRs, if any, are trained too).
        pooling: How window features are pooled for the head: ``"mask"``, ``"before_mask"``, ``"last"`` or
            ``"mean"`` (see :func:`picomaml.objectives.pool_features`).
        feature_norm: Per-task feature normalisation before the inner loop (see :func:`picomaml.meta_loss`).
        nonfinite: ``"propagate"`` (default): NaN/Inf backbone features give a NaN meta loss that still
            back-propagates (every DDP rank runs its backward; the trainer then skips the step on all
            ranks), ``"raise"``: a ``ValueError`` (see :func:`picomaml.meta_loss`).
    """

    def __init__(
        self,
        model: nn.Module,
        head: nn.Module,
        loop: nn.Module,
        pooling: str = "mask",
        feature_norm: str = "none",
        nonfinite: NonFinite = "propagate",
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite: must be one of {list(NONFINITE)}, got {nonfinite!r}")
        self.model = model
        self.head = head
        self.loop = loop
        self.pooling = pooling
        self.feature_norm = feature_norm
        self.nonfinite = nonfinite

    def forward(
        self,
        rows: torch.Tensor | None = None,
        episode: Episode | None = None,
        w_ar: float = 1.0,
        w_meta: float = 1.0,
    ) -> LearnerOutput:
        """Compute the AR loss on ``rows`` and/or the meta loss on ``episode``.

        Args:
            rows: Token rows ``(B, L)`` for the next-token loss, or ``None``.
            episode: An episode (optionally with a leading task dimension), or ``None``.
            w_ar: Weight of the AR loss in ``loss``.
            w_meta: Weight of the meta loss in ``loss``.
        """
        if rows is None and episode is None:
            raise ValueError("HybridLearner needs rows (AR), an episode (meta), or both")
        total = None
        ar = meta = None
        if rows is not None:
            ar = lm_loss(self.model, rows)
            total = w_ar * ar
        if episode is not None:
            meta = meta_loss(
                self.model,
                self.head,
                self.loop,
                episode,
                pooling=self.pooling,
                feature_norm=self.feature_norm,
                nonfinite=self.nonfinite,
            )
            total = w_meta * meta.loss if total is None else total + w_meta * meta.loss
        assert total is not None
        return LearnerOutput(loss=total, lm_loss=None if ar is None else ar.detach(), meta=meta)
