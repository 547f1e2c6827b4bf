"""``HybridLearner``: backbone, meta head and inner loop in one module, for one wrapped forward per step.

Distributed wrappers (DDP, FSDP) synchronise gradients of the module they wrap and need the step's
computation to go through that module's ``forward``. Bundling the three trainable parts lets a training
loop wrap one module and call it for an AR step, a meta step, or a weighted sum of both.

The rules for DDP with any backbone (PicoDecoder, a ``transformers`` model or the user's own module), all
kept by wrapping the learner, not its parts:

* The head and the learned inner LRs are inside the wrapped module, so DDP broadcasts rank 0's values at
  wrap time: they start equal on every rank even when each rank built them from another seed, and their
  gradients are all-reduced with the backbone's.
* Every backbone call (``hidden_states``, a ``transformers`` base model, the ``features=`` callable, the
  capture of lower blocks for ``adapt_layers``) happens inside
  [`HybridLearner.forward`][picomaml.meta.learner.HybridLearner.forward], so nothing has to be registered with
  ``mark_forward_method``.
* A ``features=`` callable must be a method of (or a function over) ``model`` itself, not of a copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from picomaml.meta.backbone import hidden_size
from picomaml.meta.engine import Adapt
from picomaml.meta.episode import Episode
from picomaml.meta.grad_blocks import check_grad_blocks, stop_gradient_below
from picomaml.meta.grad_conflict import pcgrad_term, shared_parameters
from picomaml.meta.inner_loop import InnerLoopOutput
from picomaml.meta.objectives import (
    GradSurgery,
    MetaConfig,
    NonFinite,
    check_head_width,
    check_meta_options,
    lm_loss,
    meta_loss,
)  # fmt: skip
from picomaml.meta.selection import backbone_selection
from picomaml.meta.task_lora import TaskLoRA

__all__ = ["HybridLearner", "LearnerOutput"]


@dataclass
class LearnerOutput:
    """What one [`HybridLearner`][picomaml.meta.learner.HybridLearner] call computed.

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
        model: The backbone: a [`picomaml.PicoDecoder`][picomaml.model.decoder.PicoDecoder], a
            ``transformers`` causal LM, or any module (with ``features=`` when it gives no hidden states
            itself; see [`picomaml.meta.backbone`][picomaml.meta.backbone]).
        head: The [`picomaml.MetaHead`][picomaml.meta.head.MetaHead] whose initial weights are meta-learned.
        loop: The [`picomaml.InnerLoop`][picomaml.meta.inner_loop.InnerLoop] (its learned inner LRs, if any,
            are trained too).
        pooling: How window features are pooled for the head: ``"mask"``, ``"before_mask"``, ``"last"`` or
            ``"mean"`` (see [`picomaml.meta.objectives.pool_features`][picomaml.meta.features.pool_features]).
        feature_norm: Per-task feature normalisation before the inner loop (see
            [`picomaml.meta_loss`][picomaml.meta.objectives.meta_loss]).
        nonfinite: ``"propagate"`` (default): NaN/Inf backbone features give a NaN meta loss that still
            back-propagates (every DDP rank runs its backward; the trainer then skips the step on all
            ranks), ``"raise"``: a ``ValueError`` (see
            [`picomaml.meta_loss`][picomaml.meta.objectives.meta_loss]).
        features: ``ids (B, W) -> hidden (B, W, D)`` for a backbone that gives no hidden states by itself
            (see [`picomaml.meta_loss`][picomaml.meta.objectives.meta_loss]).
        adapt_layers: Top blocks of ``model`` that adapt with the head (``0``: the head only). With learned
            inner LRs the loop is bound here to the head and these blocks.
        adapt: Backbone tensors that adapt with the head (names, globs or a predicate; see
            [`picomaml.meta_loss`][picomaml.meta.objectives.meta_loss]). With learned inner LRs the loop is
            bound here to the head and them.
        grad_surgery: ``"pcgrad"``: when both losses are computed (weighted mode) and their gradients on the
            backbone conflict, the meta gradient loses its component along the AR gradient
            ([`picomaml.meta.grad_conflict.pcgrad_term`][picomaml.meta.grad_conflict.pcgrad_term]; two extra
            gradient passes per step); the cosine before surgery is ``out.meta.metrics["grad_cos"]``.
            ``"none"`` (default): the plain sum.
        grad_blocks: The meta loss's gradient reaches only the top ``k`` blocks of ``model`` (and its
            final norm): the hidden states entering block ``n - k`` are detached during the meta forward,
            so the lower blocks and the embedding learn from the AR loss alone (``0``: the head and inner
            loop only). ``None`` (default): every block.
        lora_rank: Rank of per-task LoRA factors on the ``lora_targets`` layers, adapted by the inner loop
            with the head ([`TaskLoRA`][picomaml.meta.task_lora.TaskLoRA]; held as ``self.lora``; outside meta
            steps the backbone is unchanged). ``0`` (default): off.
        lora_targets: The linear layers that get the factors (names or globs of their last name part).
        seed: Seed of the factors' fixed init.

    Raises:
        ValueError: a bad ``pooling``, ``feature_norm``, ``nonfinite`` or ``adapt_layers`` (more than the
            model's blocks), a head whose ``in_dim`` is not the backbone's hidden size, or ``lora_rank`` with
            ``adapt_layers``, ``adapt`` or ``features``.
        TypeError: ``adapt_layers`` with a model whose blocks are not recognised.
    """

    def __init__(
        self,
        model: nn.Module,
        head: nn.Module,
        loop: nn.Module,
        pooling: str = MetaConfig.pooling,
        feature_norm: str = MetaConfig.feature_norm,
        nonfinite: NonFinite = MetaConfig.nonfinite,
        *,
        features: Callable[[torch.Tensor], torch.Tensor] | None = None,
        adapt_layers: int = MetaConfig.adapt_layers,
        grad_surgery: GradSurgery = MetaConfig.grad_surgery,
        adapt: Adapt = None,
        grad_blocks: int | None = MetaConfig.grad_blocks,
        lora_rank: int = MetaConfig.lora_rank,
        lora_targets: tuple[str, ...] = MetaConfig.lora_targets,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_meta_options(pooling, feature_norm, nonfinite, adapt_layers)
        self.lora = None
        if lora_rank:
            if adapt_layers or adapt is not None or features is not None:
                raise ValueError("lora_rank: the LoRA factors are the adapted backbone tensors; not with adapt_layers, "
                                 "adapt or features")  # fmt: skip
            self.lora = TaskLoRA(model, lora_rank, lora_targets, seed=seed)
            adapt = list(self.lora.names)
        if grad_surgery not in ("none", "pcgrad"):
            raise ValueError(f"grad_surgery: must be 'none' or 'pcgrad', got {grad_surgery!r}")
        if features is None:
            check_head_width(head, hidden_size(model), "the backbone's hidden size")
        if adapt_layers or adapt is not None:
            adapted = self.lora if self.lora is not None else model
            backbone_selection(adapted, adapt_layers, adapt, features)  # the selection, checked before any work
            if getattr(loop, "learn_lr", None) is not None:
                loop.bind(head, adapted, adapt_layers, adapt=adapt)
        self.model = model
        self.head = head
        self.loop = loop
        self.pooling = pooling
        self.feature_norm = feature_norm
        self.nonfinite = nonfinite
        self.features = features
        self.adapt_layers = int(adapt_layers)
        self.adapt = adapt
        self.grad_surgery = grad_surgery
        self.grad_blocks = None if grad_blocks is None else check_grad_blocks(model, grad_blocks)

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
            with stop_gradient_below(self.model, self.grad_blocks):
                meta = meta_loss(
                    self.model if self.lora is None else self.lora,
                    self.head,
                    self.loop,
                    episode,
                    pooling=self.pooling,
                    feature_norm=self.feature_norm,
                    nonfinite=self.nonfinite,
                    features=self.features,
                    adapt_layers=self.adapt_layers,
                    adapt=self.adapt,
                )
            total = w_meta * meta.loss if total is None else total + w_meta * meta.loss
            if self.grad_surgery == "pcgrad" and ar is not None and w_ar > 0 and w_meta > 0:
                term, cosine = pcgrad_term(ar, meta.loss, list(shared_parameters(self.model).values()))
                total = total + w_meta * term
                meta.metrics["grad_cos"] = cosine
        assert total is not None
        return LearnerOutput(loss=total, lm_loss=None if ar is None else ar.detach(), meta=meta)
