"""The glue a training loop calls: the autoregressive loss and the meta loss of one episode.

``meta_loss`` featurises the episode with [`episode_features`][picomaml.meta.features.episode_features]
(re-exported here with the rest of [`picomaml.meta.features`][picomaml.meta.features]), which runs the
backbone exactly once over the support and query windows of every task together and pools one feature vector
per window, and hands the features to the [`InnerLoop`][picomaml.meta.inner_loop.InnerLoop]. The inner loop
adapts only the head, so the backbone is never re-run per inner step; ``out.loss.backward()`` reaches the
backbone through the pooled features. With ``adapt=`` (or its shorthand ``adapt_layers=k``) backbone tensors
adapt too: everything below the lowest adapted block runs once and only the part from there up re-runs per
inner step, or the whole backbone where that split does not reproduce the model
([`picomaml.meta.adapted_features`][picomaml.meta.adapted_features]). Any backbone works as it is held: a
PicoDecoder, a ``transformers`` causal LM, a peft, compiled or DDP-wrapped model, or any module through
``features=`` ([`picomaml.meta.backbone`][picomaml.meta.backbone]).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from picomaml.checks import check_values
from picomaml.meta.adapted_features import (
    adapted_features,
    adapted_inner_loop,
    backbone_selection,
    support_needs_graph,
)
from picomaml.meta.backbone import (
    backbone_hidden,
    compiled_loss,
    ddp_step,
    find_ddp,
    hidden_size,
    lm_logits,
    next_token_ce,
    unwrap_model,
    vocab_size,
)
from picomaml.meta.engine import Adapt
from picomaml.meta.features import (
    FEATURE_NORMS,
    POOLINGS,
    EpisodeFeatures,
    FeatureNorm,
    Pooling,
    check_episode,
    check_head_n_way,
    episode_features,
    episode_rows,
    normalize_task_features,
    pool_features,
)
from picomaml.meta.top_blocks import check_adapt_layers
from picomaml.params import Params, choices, hparam

__all__ = [
    "MetaConfig",
    "Pooling",
    "FeatureNorm",
    "NonFinite",
    "GradSurgery",
    "lm_loss",
    "backbone_hidden",
    "pool_features",
    "normalize_task_features",
    "EpisodeFeatures",
    "episode_features",
    "meta_loss",
    "POOLINGS",
    "FEATURE_NORMS",
    "NONFINITE",
]

NonFinite = Literal["raise", "propagate"]
NONFINITE = choices(NonFinite)
GradSurgery = Literal["none", "pcgrad"]


@dataclasses.dataclass
class MetaConfig(Params):
    """How a meta step turns an episode into a loss (YAML section ``meta``): the keyword arguments of
    [`meta_loss`][picomaml.meta.objectives.meta_loss] and
    [`HybridLearner`][picomaml.meta.learner.HybridLearner], and the tasks per step."""

    pooling: Pooling = hparam(
        "before_mask", doc="window feature: masked positions, the ones before them (learns in a causal LM), last, mean"
    )
    feature_norm: FeatureNorm = hparam("none", doc="per-task normalisation by support statistics")
    n_tasks: int = hparam(1, ge=1, doc="tasks (episodes) per meta step, adapted together")
    adapt_layers: int = hparam(0, ge=0, doc="top backbone blocks (and final norm) adapted with the head; 0: head only")
    grad_surgery: GradSurgery = hparam(
        "none", doc="weighted mode: pcgrad removes the meta gradient's component against the AR gradient"
    )
    grad_blocks: int | None = hparam(
        None, ge=0, doc="top backbone blocks the meta loss trains (its gradient stops below them; 0: the head "
        "only); null: every block"
    )
    nonfinite: NonFinite = hparam(
        "propagate", doc="NaN/Inf features: propagate (a NaN loss: the step is skipped) or raise"
    )
    lora_rank: int = hparam(
        0, ge=0, le=1024, doc="rank of per-task LoRA factors the inner loop adapts with the head (the backbone "
        "re-runs per inner step); 0: off"
    )
    lora_targets: tuple[str, ...] = hparam(
        ("q_proj", "v_proj"), doc="linear layers that get the LoRA factors, by name or glob of their last name part"
    )


def lm_loss(
    model: nn.Module,
    tokens: Tensor,
    pad_id: int | None = None,
    ignore_index: int = -100,
    *,
    full_sequence: bool = False,
) -> Tensor:
    """Next-token cross-entropy: the logits at position ``i`` predict ``tokens[:, i + 1]``.

    Args:
        model: Maps ``(B, L')`` token ids to ``(B, L', V)`` logits, or to a tuple whose first item they are
            (``(logits, hidden)``), or to an object with ``.logits`` (a ``transformers`` ``ModelOutput``; a
            ``transformers`` model is called with ``use_cache=False``). See
            [`picomaml.meta.backbone.lm_logits`][picomaml.meta.backbone.lm_logits].
        tokens: ``(B, L)`` long, ``L >= 2``.
        pad_id: Targets equal to this id are ignored (``None``: none are).
        ignore_index: Targets equal to this value are ignored too.
        full_sequence: Run the model on all ``L`` tokens and drop the last position's logits (it has no
            target), instead of running it on ``tokens[:, :-1]``. A causal model gives the same loss
            either way (up to kernel rounding); this is for forward hooks that must see every position
            of ``tokens`` (learning-dynamics capture).

    Returns:
        Scalar mean loss over the counted targets (computed in float32 or wider).

    Raises:
        TypeError: ``tokens`` is not an integer tensor, or the model's output holds no logits.
        ValueError: logits that are not ``(B, L', V)`` for the ids, ``tokens`` is not ``(B, L)`` with
            ``B >= 1``, ``L >= 2``, or a counted target lies outside ``[0, V)`` for the ``V`` of the logits
            (checked before the loss: no IndexError or device assert).
    """
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens: expected a (B, L) torch.LongTensor, got {type(tokens).__name__}")
    if tokens.dim() != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise ValueError(f"tokens: must be (B, L) with B >= 1 and L >= 2, got shape {tuple(tokens.shape)}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"tokens: expected integer token ids (torch.long), got dtype {tokens.dtype}")
    if tokens.is_meta:
        raise ValueError("tokens: on the meta device (shapes only, no values); move the model and tokens to a real device")
    tokens = tokens.long()  # int32/int16/uint8 ids too (the loss needs long targets); a no-op for long
    targets = tokens[:, 1:]
    if pad_id is not None:
        targets = targets.masked_fill(targets == pad_id, ignore_index)
    counted = targets != ignore_index
    fused, vocab = (None, None) if full_sequence else (compiled_loss(model), vocab_size(model))
    if fused is not None and vocab is not None:
        # checked before the graph: inside it an out-of-vocabulary target is an in-graph assert
        _check_targets(model, targets, counted, vocab, ignore_index, pad_id)
        return fused(tokens[:, :-1], targets, ignore_index)  # forward + cross-entropy in one compiled graph
    logits = lm_logits(model, tokens if full_sequence else tokens[:, :-1])
    if full_sequence:
        logits = logits[:, :-1]
    _check_targets(model, targets, counted, logits.shape[-1], ignore_index, pad_id)
    return next_token_ce(logits, targets, ignore_index)


def _check_targets(
    model: nn.Module, targets: Tensor, counted: Tensor, vocab: int, ignore_index: int, pad_id: int | None
) -> None:
    """Raise naming ``tokens`` when a counted target leaves ``[0, vocab)``: a clear error instead of torch's
    IndexError or a device-side assert; read once per shape, then queued without a host sync."""
    ok = ~counted | ((targets >= 0) & (targets < vocab))
    allowed = f"[0, {vocab}) (the model's vocabulary, the last dim of its logits) or equal ignore_index={ignore_index}"
    allowed += "" if pad_id is None else f" / pad_id={pad_id}"

    def detailed() -> str:
        real = targets[counted]
        return f"tokens: target ids must lie in {allowed}; got min {int(real.min())} and max {int(real.max())}"

    check_values(model, ("targets", tuple(targets.shape), str(targets.device), vocab), ok, detailed,
                 f"tokens: target ids must lie in {allowed}")  # fmt: skip


def check_head_width(head: nn.Module, width: Any, what: str) -> None:
    """Raise naming ``head.in_dim`` when features of ``width`` (an int; anything else is unknown) do not fit."""
    in_dim = getattr(head, "in_dim", None)
    if isinstance(width, int) and in_dim is not None and width != in_dim:
        raise ValueError(f"head.in_dim: the head takes {in_dim}-dim features but {what} is {width}")


def check_meta_options(pooling: str, feature_norm: str, nonfinite: str, adapt_layers: Any) -> None:
    """Raise a ``ValueError`` naming the argument when a [`meta_loss`][picomaml.meta.objectives.meta_loss]
    option is not an allowed value."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
    if feature_norm not in FEATURE_NORMS:
        raise ValueError(f"feature_norm must be one of {list(FEATURE_NORMS)}, got {feature_norm!r}")
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite: must be one of {list(NONFINITE)}, got {nonfinite!r}")
    check_adapt_layers(adapt_layers)


def meta_loss(
    model: nn.Module | None,
    head: nn.Module,
    loop: nn.Module,
    episode: Any,
    pooling: str = MetaConfig.pooling,
    feature_norm: str = MetaConfig.feature_norm,
    nonfinite: NonFinite = MetaConfig.nonfinite,
    *,
    features: Callable[[Tensor], Tensor] | None = None,
    adapt_layers: int = MetaConfig.adapt_layers,
    adapt: Adapt = None,
) -> Any:
    """Meta loss of an episode (one task or a stack of ``T``) with a single backbone forward.

    Args:
        model: The backbone: a [`PicoDecoder`][picomaml.model.decoder.PicoDecoder], any ``transformers``
            causal LM as it is (its base model runs; the vocabulary projection never does), a module whose
            forward takes ``return_hidden=True``, or any module with ``features=`` (see
            [`picomaml.meta.backbone`][picomaml.meta.backbone]).
        head: The [`MetaHead`][picomaml.meta.head.MetaHead]; the features are cast to the dtype of its
            parameters.
        loop: The [`InnerLoop`][picomaml.meta.inner_loop.InnerLoop].
        episode: An [`Episode`][picomaml.meta.episode.Episode]: ``support_ids (.., N*K, W)``,
            ``support_labels``, ``support_mask``, ``query_ids (.., N*Q, W)``, ``query_labels``,
            ``query_mask``, with an optional leading task dim ``T`` on every tensor (see
            [`episode_features`][picomaml.meta.features.episode_features]).
        pooling: ``"before_mask"`` (default: the state that predicts the masked token in a causal LM),
            ``"mask"``, ``"last"`` or ``"mean"`` (see
            [`pool_features`][picomaml.meta.features.pool_features]).
        feature_norm: ``"none"``, ``"center"`` or ``"standardize"`` per task, from support statistics
            (see [`normalize_task_features`][picomaml.meta.features.normalize_task_features]).
        nonfinite: What a NaN/Inf in the features does. ``"propagate"`` (for training loops, no host sync):
            the metric ``nonfinite_features`` is 1; the inner loop runs on the features with those values set to zero and the loss is NaN, still
            attached to the graph, so ``loss.backward()`` runs as usual (under DDP every rank reaches the
            gradient all-reduce) and leaves NaN gradients, and a loop that checks the loss or gradient
            norm skips the step. ``"raise"``: a ``ValueError``. Finite features give the same loss and
            gradients either way.
        features: ``ids (B, W) long -> hidden (B, W, D)`` used instead of the backbone (e.g. a method of
            the user's model that runs it without its output layer).
        adapt_layers: The top ``k`` blocks and the final norm adapt in the inner loop together with the
            head (``0``, default: the head only); a shorthand for ``adapt`` naming their tensors. Needs a
            model whose block list is found
            ([`picomaml.meta.backbone.decoder_layout`][picomaml.meta.backbone.decoder_layout]).
        adapt: Backbone tensors that adapt with the head: names or ``fnmatch`` globs of the model's
            parameters (``["*lora_A*", "*lora_B*"]``, ``["*norm*"]``; names of a wrapped model are
            accepted) or a predicate ``fn(name, tensor) -> bool``. Everything below the lowest adapted block
            runs once; the rest re-runs per inner step, or the whole backbone where that split does not
            reproduce the model's hidden states at this call's window length (checked per call shape; see
            [`picomaml.meta.adapted_features`][picomaml.meta.adapted_features]). With learned inner
            LRs, bind the loop first: ``loop.bind(head, model, adapt=...)`` /
            ``loop.bind(head, model, adapt_layers=k)``.

    Returns:
        The [`InnerLoopOutput`][picomaml.meta.engine.InnerLoopOutput] of the inner loop (``.loss``,
        ``.metrics``, ...); for a single-task episode the loop sees ``(N*K, D)`` / ``(N*Q, D)`` features
        without a task dim. Its metrics add ``nonfinite_features``: 1.0 when non-finite features were
        propagated, else 0.0. With ``adapt_layers``, ``.params`` holds the adapted block tensors too, under
        the model's names.

    Raises:
        TypeError: ``episode`` is not an episode; a model that gives no hidden states (the message states
            the ``features=`` contract); ``adapt_layers`` with a model that holds no block list.
        ValueError: features (or a ``model.config`` hidden size, checked before the forward) whose width is
            not ``head.in_dim``, ``adapt_layers`` outside ``[0, n_blocks]``, an ``adapt`` pattern that
            matches nothing, or a bad episode (see
            [`episode_features`][picomaml.meta.features.episode_features]).
    """
    check_meta_options(pooling, feature_norm, nonfinite, adapt_layers)
    check_episode(episode)
    check_head_n_way(head, episode)
    ddp = find_ddp(model) if model is not None and torch.is_grad_enabled() else None
    if ddp is not None:  # DDP's own forward would never run: frame the step as it does (see ddp_step)
        with ddp_step(ddp) as finish:
            out = meta_loss(
                unwrap_model(model), head, loop, episode, pooling, feature_norm, nonfinite, features=features,
                adapt_layers=adapt_layers, adapt=adapt,
            )  # fmt: skip
            out.loss = finish(out.loss)
        return out
    if model is not None:
        model = unwrap_model(model)
    if features is None:  # checked before the forward: PicoDecoder's d_model, transformers' hidden_size
        check_head_width(head, hidden_size(model), "the backbone's hidden size (model.config)")
    head_param = next(iter(head.parameters()), None)
    dtype = head_param.dtype if head_param is not None else None  # the head keeps its own precision
    if adapt_layers or adapt is not None:
        return _meta_loss_adapted(
            model, head, loop, episode, pooling, feature_norm, nonfinite, dtype, features, adapt_layers, adapt
        )
    xs, ys, xq, yq = episode_features(model, episode, pooling, feature_norm, dtype, features=features)
    check_head_width(head, xs.shape[-1], "the width of the backbone's features")
    if episode.support_ids.dim() == 2:
        xs, xq, ys, yq = xs[0], xq[0], ys[0], yq[0]
    bad: Tensor | bool = False
    if nonfinite == "propagate":  # no sync: zeros let the inner loop run, the NaN factor reaches the loss
        bad = ~(torch.isfinite(xs).all() & torch.isfinite(xq).all())
        xs, xq = (torch.where(torch.isfinite(x), x, 0.0) for x in (xs, xq))
    return _flag_nonfinite(loop(head, xs, ys, xq, yq), bad)


def _flag_nonfinite(out: Any, bad: Tensor | bool) -> Any:
    """With non-finite features (``bad``, a bool tensor nobody reads here) the loss becomes NaN, still
    attached to the graph, and the metric ``nonfinite_features`` is 1."""
    if isinstance(bad, Tensor):
        out.loss = torch.where(bad, float("nan"), 1.0).to(out.loss.dtype) * out.loss
        out.metrics["nonfinite_features"] = bad.detach().float()
        out.metrics["query_loss"] = out.loss.detach()
    else:
        out.metrics["nonfinite_features"] = torch.zeros((), device=out.loss.device)
    return out


def _meta_loss_adapted(
    model: Any, head: nn.Module, loop: Any, episode: Any, pooling: str, feature_norm: str, nonfinite: str,
    dtype: Any, features: Any, adapt_layers: int, adapt: Adapt,
) -> Any:  # fmt: skip
    """[`meta_loss`][picomaml.meta.objectives.meta_loss] with backbone tensors adapting (see
    [`picomaml.meta.adapted_features`][picomaml.meta.adapted_features])."""
    if model is None:
        raise ValueError("model: adapt / adapt_layers need the backbone whose tensors adapt, got None")
    selection = backbone_selection(model, adapt_layers, adapt, features)
    param = next(iter(selection.model.parameters()), None)
    rows = episode_rows(episode, pooling, param.device if param is not None else None)
    support_grad = torch.is_grad_enabled() and support_needs_graph(loop, head, feature_norm)
    feats, bad = adapted_features(
        selection, rows, features, pooling, feature_norm, dtype if dtype is not None else torch.float32,
        support_grad, nonfinite,
    )  # fmt: skip
    out = adapted_inner_loop(loop, head, feats, rows.support_labels, rows.query_labels)
    if episode.support_ids.dim() == 2:
        out.params = {k: v[0] for k, v in out.params.items()}
        out.query_logits = out.query_logits[0]
    return _flag_nonfinite(out, bad)
