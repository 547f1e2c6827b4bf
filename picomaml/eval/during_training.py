"""The evaluation a training loop runs every few hundred steps: held-out perplexity and few-shot accuracy.

It takes its own [`EvalConfig`][picomaml.eval.during_training.EvalConfig] and the episode arguments (window
length, frequency band, pooling, class split, ...) as a plain mapping, so it depends on no training schema;
the builder ([`picomaml.train.build.eval_episode_kwargs`][picomaml.train.build.eval_episode_kwargs]) derives
those arguments from an experiment config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from picomaml.eval.fewshot import fewshot_eval, head_for_n_way
from picomaml.eval.perplexity import perplexity
from picomaml.params import ConfigError, Params, hparam

__all__ = ["EvalConfig", "evaluate_during_training", "check_eval_episodes"]


@dataclasses.dataclass
class EvalConfig(Params):
    """Evaluation during training (YAML section ``eval``): held-out perplexity and few-shot accuracy.

    ``settings`` are ``(n_way, k_shot)`` pairs; the first is logged as ``eval/fewshot_*``, further ones as
    ``eval/fewshot_<N>w<K>s_*``.
    """

    rows: int = hparam(64, ge=1, doc="held-out rows (perplexity and the episodes' windows)")
    batch_size: int = hparam(8, ge=1, doc="rows per perplexity forward")
    # a bound far beyond any useful evaluation: 10**9 episodes would never finish
    episodes: int = hparam(100, ge=0, le=1_000_000, doc="few-shot episodes per setting (0: perplexity only)")
    settings: tuple[tuple[int, int], ...] = hparam(((5, 4),), ge=1, doc="(n_way, k_shot) few-shot settings")
    grad_cos_every: int = hparam(
        0, ge=0, doc="steps between AR-vs-meta gradient cosines (diag/grad_cos*); 0: off"
    )
    update_norms: bool = hparam(
        False, doc="log each step's backbone update norm and clipped gradient norm by step kind (train/update_norm_ar, "
        "train/update_norm_meta, train/clipped_grad_norm_*)"
    )


def _fewshot_prefix(index: int, n_way: int, k_shot: int) -> str:
    return "eval/fewshot" if index == 0 else f"eval/fewshot_{n_way}w{k_shot}s"


def evaluate_during_training(
    model: nn.Module,
    head: nn.Module,
    loop: nn.Module,
    heldout_rows: torch.Tensor,
    config: EvalConfig,
    episode_kwargs: Mapping[str, Any],
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Held-out perplexity and few-shot episode accuracy, as ``eval/*`` metrics.

    The first setting of ``config.settings`` is logged as ``eval/fewshot_acc`` (with ``_ci``,
    ``eval/fewshot_chance`` and the baselines of
    [`metrics`][picomaml.eval.fewshot_result.FewShotResult.metrics]); further settings as
    ``eval/fewshot_<N>w<K>s_*``. Every evaluation with the same arguments sees the same episodes.

    Args:
        model: The backbone (run under ``no_grad``; its train/eval mode is restored).
        head: The meta head whose initial weights the inner loop adapts.
        loop: The inner loop.
        heldout_rows: ``(R, L)`` held-out token rows, of which the first ``config.rows`` are used (the trainer
            may hold more, e.g. for learning dynamics); empty rows give an empty dict.
        config: How much to evaluate.
        episode_kwargs: Keyword arguments of [`fewshot_eval`][picomaml.eval.fewshot.fewshot_eval] other than
            the setting and the episode count: ``mask_token_id``, ``n_query``, ``window_len``, ``pooling``,
            ``feature_norm``, ``seed``, ``min_freq``, ``max_freq``, ``exclude_token_ids``,
            ``sampler_kwargs`` (see
            [`picomaml.train.build.eval_episode_kwargs`][picomaml.train.build.eval_episode_kwargs]).
        progress: Called with the number of episodes scored after each batch; an exception it raises
            (a trainer's stop request) ends the evaluation there.
    """
    heldout_rows = heldout_rows[: config.rows]
    if heldout_rows.shape[0] == 0:
        return {}
    ppl = perplexity(model, heldout_rows, batch_size=config.batch_size)
    out = {"eval/perplexity": ppl["perplexity"], "eval/lm_loss": ppl["loss"]}
    if config.episodes == 0:
        return out
    for i, (n_way, k_shot) in enumerate(config.settings):
        res = fewshot_eval(
            model, heldout_rows, n_way=n_way, k_shot=k_shot, head=head, inner_loop=loop,
            episodes=config.episodes, progress=progress, **episode_kwargs,
        )  # fmt: skip
        out.update(res.metrics(_fewshot_prefix(i, n_way, k_shot)))
    return out


def check_eval_episodes(
    heldout_rows: torch.Tensor,
    config: EvalConfig,
    episode_kwargs: Mapping[str, Any],
    head: nn.Module | None = None,
) -> None:
    """Fail before training when an evaluation setting cannot be scored.

    Args:
        heldout_rows: ``(R, L)`` held-out rows.
        config: The evaluation config.
        episode_kwargs: As for
            [`evaluate_during_training`][picomaml.eval.during_training.evaluate_during_training].
        head: The meta head; a setting it cannot score (another ``n_way``, unless it is a prototype head) is
            refused too.

    Raises:
        ConfigError: naming ``eval.settings`` and what to change (more ``eval.rows``, a smaller setting, a
            wider band, a larger ``sampler.holdout_fraction``, or settings that match ``sampler.n_way``).
    """
    from picomaml.meta.sampler import SamplingError, SMLMTSampler

    heldout_rows = heldout_rows[: config.rows]
    if config.episodes == 0 or heldout_rows.shape[0] == 0:
        return
    kw = dict(episode_kwargs)
    sampler_args = {k: kw[k] for k in ("n_query", "mask_token_id", "window_len", "exclude_token_ids")}
    sampler_args |= {k: kw[k] for k in ("min_freq", "max_freq") if kw.get(k) is not None}
    sampler_args |= dict(kw.get("sampler_kwargs") or {})
    for n_way, k_shot in config.settings:
        try:
            SMLMTSampler(n_way=n_way, k_shot=k_shot, **sampler_args).sample(heldout_rows.cpu())
        except SamplingError as exc:
            raise ConfigError(
                f"eval.settings: no {n_way}-way {k_shot}-shot episode can be drawn from the "
                f"{heldout_rows.shape[0]} held-out rows (eval.rows): {exc}"
            ) from exc
        if head is not None:
            try:
                head_for_n_way(head, n_way)
            except ValueError as exc:
                raise ConfigError(f"eval.settings: {exc} (the head is sampler.n_way-way)") from exc
