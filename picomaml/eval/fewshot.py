"""Few-shot episode accuracy on held-out rows, before and after inner-loop adaptation.

For each of ``episodes`` SMLMT episodes drawn by a fresh, seeded
[`picomaml.SMLMTSampler`][picomaml.meta.sampler.SMLMTSampler] (so every call with the same rows and seed sees
the same episodes, and evaluations at different checkpoints are paired), the backbone runs over the support
and query windows under ``torch.no_grad`` (several episodes per forward pass), and:

* ``acc_ncm``: nearest class mean on the frozen pooled features. Each query window goes to the class
  whose support mean is closest in Euclidean distance (the Prototypical Networks rule). It needs no
  head, so it measures what the backbone features alone already separate.
* ``acc_probe``: a linear probe, the classic "fit a linear classifier on frozen features" baseline: an
  L2-penalised multinomial logistic regression fitted on each episode's support set and scored on its
  query set (see [`picomaml.eval.probe`][picomaml.eval.probe]). Unlike the inner loop it starts from zero (not
  from a meta-learned initialisation), works on features standardised by the support set's own statistics, and
  runs to convergence (Newton steps) instead of a few fixed gradient steps, so it shows how much a fully
  fitted linear readout gets out of the features with no meta-learning at all.
* ``acc_after``: the head adapted from its (meta-learned) initial weights by the inner loop on the
  support set, scored on the query set. This is what meta-training optimises.

All three are reported as a mean over episodes with a Student-t confidence interval across episodes (queries
of one episode share its classes and support set, so the episode is the independent unit). Chance is
``1 / n_way``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from picomaml.eval.fewshot_result import FewShotResult, format_fewshot_table, summarize_accuracies
from picomaml.eval.probe import linear_probe_accuracy
from picomaml.meta.backbone import unwrap_model
from picomaml.meta.functional import accuracy
from picomaml.meta.objectives import episode_features, meta_loss
from picomaml.params import check_int

__all__ = [
    "FewShotResult",
    "fewshot_eval",
    "score_tasks",
    "score_episode_batch",
    "eval_mode",
    "summarize_accuracies",
    "nearest_class_mean",
    "format_fewshot_table",
    "head_for_n_way",
]

logger = logging.getLogger(__name__)


def nearest_class_mean(
    support_feats: Tensor, support_labels: Tensor, query_feats: Tensor, n_way: int
) -> Tensor:
    """Predict query labels by the closest support class mean (Euclidean distance).

    Args:
        support_feats: (n_s, D) features.
        support_labels: (n_s,) long in ``[0, n_way)``; every class needs at least one row.
        query_feats: (n_q, D) features.
        n_way: Number of classes.

    Returns:
        (n_q,) long predicted labels.
    """
    xs, xq = support_feats.float(), query_feats.float()
    onehot = torch.nn.functional.one_hot(support_labels, n_way).to(xs.dtype)  # (n_s, N)
    counts = onehot.sum(0)
    if bool((counts == 0).any()):
        missing = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"support_labels: classes {missing} have no support row")
    means = onehot.T @ xs / counts.unsqueeze(1)  # (N, D)
    return torch.cdist(xq.unsqueeze(0), means.unsqueeze(0)).squeeze(0).argmin(1)


def head_for_n_way(head: nn.Module, n_way: int) -> nn.Module:
    """``head`` itself when it is ``n_way``-way; for a prototype-init head, a copy built for ``n_way`` classes.

    A prototype-init [`picomaml.MetaHead`][picomaml.meta.head.MetaHead] stores only its hidden layers (the
    output layer comes from the support class means), so its meta-learned initialisation carries over to any
    number of classes. Other heads have a fixed ``n_way`` output layer; evaluate them at their own ``n_way``
    or pass a factory.
    """
    if getattr(head, "n_way", None) == n_way:
        return head
    if getattr(head, "init", None) == "prototype" and getattr(head, "out", 1) is None:
        new = type(head)(
            head.in_dim,
            n_way,
            hidden_dims=head.hidden_dims,
            activation=head.activation,
            dropout=head.dropout,
            init="prototype",
            seed=head.seed,
        )
        new.load_state_dict(head.state_dict())
        ref = next(head.parameters(), None)
        return new.to(ref.device, ref.dtype) if ref is not None else new
    raise ValueError(
        f"head: a {getattr(head, 'n_way', '?')}-way head with init={getattr(head, 'init', '?')!r} cannot score "
        f"{n_way}-way episodes; evaluate at n_way={getattr(head, 'n_way', '?')}, use a prototype-init head, or "
        f"pass a factory `lambda n_way: MetaHead(...)`"
    )


def fewshot_eval(
    model: nn.Module,
    rows: Tensor,
    *,
    n_way: int,
    k_shot: int,
    n_query: int,
    mask_token_id: int,
    window_len: int,
    episodes: int = 100,
    head: nn.Module | Callable[[int], nn.Module] | None = None,
    inner_loop: nn.Module | None = None,
    pooling: str = "before_mask",
    feature_norm: str = "none",
    seed: int = 0,
    min_freq: float | None = None,
    max_freq: float | None = None,
    exclude_token_ids: Sequence[int] = (),
    confidence: float = 0.95,
    sampler_kwargs: dict[str, Any] | None = None,
    episodes_per_batch: int = 16,
    adapt_layers: int = 0,
    features: Callable[[Tensor], Tensor] | None = None,
    adapt: Any = None,
    progress: Callable[[int], None] | None = None,
) -> FewShotResult:
    """Evaluate few-shot episode accuracy on held-out token rows.

    Args:
        model: The backbone as it is held (a [`picomaml.PicoDecoder`][picomaml.model.decoder.PicoDecoder], a
            ``transformers`` model, a compiled, peft or DDP-wrapped model; see
            [`picomaml.meta_loss`][picomaml.meta.objectives.meta_loss]); run under ``no_grad`` in eval mode,
            its mode restored afterwards. May be ``None`` with ``features``.
        rows: (B, L) long held-out token rows; episodes' windows are cut from them.
        n_way: Classes per episode (see [`picomaml.SMLMTSampler`][picomaml.meta.sampler.SMLMTSampler] for this
            and the next four).
        k_shot: Support windows per class.
        n_query: Query windows per class.
        mask_token_id: The id that replaces the class token.
        window_len: Tokens per window.
        episodes: Number of episodes (>= 1).
        head: The [`picomaml.MetaHead`][picomaml.meta.head.MetaHead] whose initial weights the inner loop
            adapts (the trained head, or a fresh one), or a factory ``n_way -> head``. A prototype-init head
            of another ``n_way`` is rebuilt for this ``n_way`` (see
            [`head_for_n_way`][picomaml.eval.fewshot.head_for_n_way]). ``None``: only the nearest-class-mean
            accuracy is computed.
        inner_loop: The [`picomaml.InnerLoop`][picomaml.meta.inner_loop.InnerLoop] (needed with ``head``);
            ``loop.adapt`` runs with gradients enabled for the inner steps only.
        pooling: ``"mask"``, ``"before_mask"``, ``"last"`` or ``"mean"`` (see
            [`picomaml.pool_features`][picomaml.meta.features.pool_features]).
        feature_norm: Per-task normalisation of the features, as in training (see
            [`picomaml.meta.objectives.normalize_task_features`][picomaml.meta.features.normalize_task_features]);
            Euclidean nearest-class-mean accuracy does not depend on it.
        seed: Seed of the evaluation's own sampler (the training sampler is never touched).
        min_freq: Lower end of the sampler's class-frequency band (``None``: the sampler default).
        max_freq: Upper end of the band (``None``: the sampler default).
        exclude_token_ids: Ids never used as classes.
        confidence: Coverage of the reported intervals.
        sampler_kwargs: Further [`picomaml.SMLMTSampler`][picomaml.meta.sampler.SMLMTSampler] keyword
            arguments.
        episodes_per_batch: Episodes that share one backbone forward and one vectorised inner loop
            (memory vs speed; the results do not depend on it).
        adapt_layers: The top blocks that adapt with the head for the accuracy after adaptation, as in
            training (``meta.adapt_layers``; see [`picomaml.meta_loss`][picomaml.meta.objectives.meta_loss]).
            The nearest-class-mean and probe accuracies always use the frozen backbone's features.
        features: ``ids (B, W) -> hidden (B, W, D)`` for a backbone that gives no hidden states itself (see
            [`picomaml.meta_loss`][picomaml.meta.objectives.meta_loss]).
        adapt: Backbone tensors that adapt with the head for the accuracy after adaptation (names, globs
            or a predicate, as in [`picomaml.meta_loss`][picomaml.meta.objectives.meta_loss]).
        progress: Called with the number of episodes just scored, after each batch (a progress bar's
            ``update``).

    Returns:
        A [`FewShotResult`][picomaml.eval.fewshot_result.FewShotResult].
    """
    from picomaml.meta.sampler import SMLMTSampler

    check_int("episodes", episodes, ge=1)
    check_int("episodes_per_batch", episodes_per_batch, ge=1)
    if head is not None and inner_loop is None:
        raise ValueError("inner_loop: needed when a head is given (acc_after adapts the head with it)")
    if head is not None and not isinstance(head, nn.Module):
        head = head(n_way)
    if head is not None:
        head = head_for_n_way(head, n_way)
    kwargs: dict[str, Any] = dict(sampler_kwargs or {})
    if min_freq is not None:
        kwargs["min_freq"] = min_freq
    if max_freq is not None:
        kwargs["max_freq"] = max_freq
    sampler = SMLMTSampler(
        n_way=n_way,
        k_shot=k_shot,
        n_query=n_query,
        mask_token_id=mask_token_id,
        window_len=window_len,
        exclude_token_ids=tuple(exclude_token_ids),
        seed=seed,
        **kwargs,
    )
    index = sampler.index(rows.detach().cpu())
    before: list[float] = []
    after: list[float] = []
    probe: list[float] = []
    if model is None and features is None:
        raise ValueError("model: pass a backbone, or a features callable ids -> (B, L, D) as features=")
    if model is not None:
        model = unwrap_model(model)
    with eval_mode(model, head, inner_loop):
        done = 0
        while done < episodes:
            t = min(episodes_per_batch, episodes - done)
            ep = sampler.sample(index, n_tasks=t)  # the same episodes as t single draws, in order
            done += t
            b, a, p = score_episode_batch(
                model, ep, pooling, n_way, head, inner_loop, feature_norm, adapt_layers, features=features, adapt=adapt
            )
            before += b
            after += a
            probe += p
            if progress is not None:
                progress(t)
    result = summarize_accuracies(n_way, k_shot, n_query, before, after, confidence, probe=probe)
    logger.debug("few-shot %s: before %.4f, after %s", result.setting, result.acc_ncm, result.acc_after)
    return result


@contextlib.contextmanager
def eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    """Put the given modules (``None`` skipped) in eval mode; restore each one's mode afterwards."""
    present = [m for m in modules if m is not None]
    modes = [m.training for m in present]
    try:
        for m in present:
            m.eval()
        yield
    finally:
        for m, mode in zip(present, modes, strict=True):
            m.train(mode)


def score_episode_batch(
    model: nn.Module,
    episode: Any,
    pooling: str,
    n_way: int,
    head: nn.Module | None = None,
    inner_loop: nn.Module | None = None,
    feature_norm: str = "none",
    adapt_layers: int = 0,
    *,
    features: Callable[[Tensor], Tensor] | None = None,
    adapt: Any = None,
) -> tuple[list[float], list[float], list[float]]:
    """Score a stack of ``T`` episodes with one backbone forward (see
    [`score_tasks`][picomaml.eval.fewshot.score_tasks]).

    The episodes are featurised as in training, by
    [`picomaml.meta.objectives.episode_features`][picomaml.meta.features.episode_features] (under
    ``no_grad``), with the features in the head's dtype.

    Args:
        model: The backbone, run under ``no_grad``.
        episode: A stacked [`Episode`][picomaml.meta.episode.Episode] or
            [`TextEpisode`][picomaml.eval.leopard.TextEpisode] (``support_*`` ``(T, N*K, ...)``, ``query_*``
            ``(T, N*Q, ...)``; see [`episode_features`][picomaml.meta.features.episode_features]).
        pooling: ``"mask"``, ``"before_mask"``, ``"last"`` or ``"mean"`` (see
            [`picomaml.pool_features`][picomaml.meta.features.pool_features]; ``"last"`` and ``"mean"`` use
            only the real tokens of a padded text episode).
        n_way: Classes per task.
        head: Head adapted by the inner loop, or ``None`` for nearest-class-mean accuracy only.
        inner_loop: The inner loop (needed with ``head``).
        feature_norm: Per-task feature normalisation (see
            [`picomaml.meta.objectives.normalize_task_features`][picomaml.meta.features.normalize_task_features]).
        adapt_layers: Top blocks adapted with the head for ``after`` (see
            [`fewshot_eval`][picomaml.eval.fewshot.fewshot_eval]).
        features: The backbone's featuriser, if it gives no hidden states itself (see
            [`fewshot_eval`][picomaml.eval.fewshot.fewshot_eval]).
        adapt: Backbone tensors adapted with the head for ``after`` (see
            [`fewshot_eval`][picomaml.eval.fewshot.fewshot_eval]).

    Returns:
        ``(before, after, probe)``: one accuracy per task each (see
        [`score_tasks`][picomaml.eval.fewshot.score_tasks]).
    """
    param = next(head.parameters(), None) if head is not None else None
    with torch.no_grad():  # one backbone forward for the t episodes
        xs, ys, xq, yq = episode_features(
            model, episode, pooling, feature_norm, dtype=param.dtype if param is not None else None, features=features
        )
    if head is None or not (adapt_layers or adapt is not None):
        return score_tasks(xs, ys, xq, yq, n_way, head, inner_loop)
    before, _, probe = score_tasks(xs, ys, xq, yq, n_way)
    with torch.no_grad():  # the inner loop enables gradients for its steps itself
        out = meta_loss(model, head, inner_loop, episode, pooling, feature_norm, "propagate",
                        adapt_layers=adapt_layers, adapt=adapt, features=features)  # fmt: skip
    after = accuracy(out.query_logits.reshape(*yq.shape, -1), yq, per_task=True)
    finite = torch.isfinite(out.query_logits.reshape(yq.shape[0], -1)).all(1)
    return before, after.masked_fill(~finite, float("nan")).tolist(), probe


def score_tasks(
    xs: Tensor,
    ys: Tensor,
    xq: Tensor,
    yq: Tensor,
    n_way: int,
    head: nn.Module | None = None,
    inner_loop: nn.Module | None = None,
) -> tuple[list[float], list[float], list[float]]:
    """Query accuracy of each task: nearest class mean, after the inner loop, and of a linear probe.

    A task whose features hold NaN or Inf (a model with NaN weights), or whose adapted head gives
    non-finite logits, scores NaN, with a ``RuntimeWarning``: an evaluation never stops a run.

    Args:
        xs: ``(T, N*K, D)`` support features; ys: ``(T, N*K)`` labels.
        xq: ``(T, N*Q, D)`` query features; yq: ``(T, N*Q)`` labels.
        n_way: Classes per task.
        head: The head the inner loop adapts, or ``None`` for the nearest-class-mean accuracy only.
        inner_loop: The inner loop (needed with ``head``).

    Returns:
        ``(before, after, probe)``: one float per task each (``after`` empty without a head); ``probe`` is
        the query accuracy of a linear probe fitted on the support features
        ([`picomaml.eval.probe.linear_probe_accuracy`][picomaml.eval.probe.linear_probe_accuracy]).
    """
    finite = (torch.isfinite(xs).flatten(1).all(1) & torch.isfinite(xq).flatten(1).all(1)).tolist()
    if all(finite):
        return _score_finite(xs, ys, xq, yq, n_way, head, inner_loop)
    warnings.warn(
        f"few-shot evaluation: the features of {finite.count(False)} of {len(finite)} episodes hold NaN or Inf "
        f"(NaN model weights?); their accuracies are NaN",
        RuntimeWarning,
        stacklevel=2,
    )
    keep = [i for i, ok in enumerate(finite) if ok]
    scores = _score_finite(xs[keep], ys[keep], xq[keep], yq[keep], n_way, head, inner_loop) if keep else ([],) * 3

    def spread(values: list[float]) -> list[float]:  # the finite tasks' scores in place, NaN elsewhere
        it = iter(values)
        return [next(it) if ok else float("nan") for ok in finite]

    before, after, probe = scores
    return spread(before), spread(after) if head is not None else [], spread(probe)


def _score_finite(
    xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, n_way: int, head: nn.Module | None, inner_loop: nn.Module | None
) -> tuple[list[float], list[float], list[float]]:
    """[`score_tasks`][picomaml.eval.fewshot.score_tasks] for features without NaN or Inf."""
    ncm = torch.stack([nearest_class_mean(xs[i], ys[i], xq[i], n_way) for i in range(xs.shape[0])])
    before = accuracy(ncm, yq, per_task=True).tolist()
    probe = linear_probe_accuracy(xs, ys, xq, yq, n_way)
    if head is None:
        return before, [], probe
    param = next(head.parameters(), None)
    dtype = param.dtype if param is not None else xs.dtype  # the head keeps its own precision
    with torch.no_grad():  # adapt() enables gradients for the inner steps itself
        params = inner_loop.adapt(head, xs.to(dtype), ys)  # vectorised over the tasks
        logits = head.functional(params, xq.to(dtype))  # (T, N*Q, N)
    after = accuracy(logits, yq, per_task=True)
    diverged = ~torch.isfinite(logits).flatten(1).all(1)  # e.g. a NaN head, or an inner loop that overflowed
    if bool(diverged.any()):
        warnings.warn(
            f"few-shot evaluation: the adapted head gives NaN or Inf logits on {int(diverged.sum())} of "
            f"{xs.shape[0]} episodes; their accuracy after adaptation is NaN",
            RuntimeWarning,
            stacklevel=3,
        )
    return before, after.masked_fill(diverged, float("nan")).tolist(), probe
