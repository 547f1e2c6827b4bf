"""The evaluation a training loop runs every few hundred steps: held-out perplexity and few-shot accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from picomaml.config import ExperimentConfig, SamplerConfig
from picomaml.eval.fewshot import fewshot_eval
from picomaml.eval.perplexity import perplexity

__all__ = ["evaluate_during_training", "fewshot_kwargs", "eval_class_split", "check_eval_episodes"]


def fewshot_kwargs(cfg: ExperimentConfig, exclude_token_ids: Sequence[int] = ()) -> dict[str, Any]:
    """Keyword arguments of :func:`~picomaml.eval.fewshot.fewshot_eval` and
    :func:`~picomaml.eval.suite.run_suite` that follow a run's config: its episode shape, window length,
    frequency band, pooling, feature normalisation, seed, excluded ids (the config's plus
    ``exclude_token_ids``) and held-out class split, so evaluation episodes look like training episodes.
    """
    s = cfg.sampler
    return {
        "n_query": s.n_query,
        "window_len": s.window_len,
        "pooling": cfg.meta.pooling,
        "feature_norm": cfg.meta.feature_norm,
        "seed": cfg.seed,
        "min_freq": s.min_freq,
        "max_freq": s.max_freq,
        "exclude_token_ids": tuple(s.exclude_token_ids) + tuple(exclude_token_ids),
        "sampler_kwargs": eval_class_split(s),  # evaluation classes = the run's held-out token types
    }


def eval_class_split(sampler: SamplerConfig) -> dict[str, object]:
    """Sampler keyword arguments that make evaluation episodes use only the run's held-out token types.

    Empty when the run holds none out (``holdout_fraction == 0``): then evaluation classes may also have
    been training classes (on other documents).
    """
    if sampler.holdout_fraction == 0:
        return {}
    return {
        "holdout_fraction": sampler.holdout_fraction,
        "holdout_seed": sampler.holdout_seed,
        "class_split": "heldout",
    }


def evaluate_during_training(
    cfg: ExperimentConfig,
    model: nn.Module,
    head: nn.Module,
    loop: nn.Module,
    heldout_rows: torch.Tensor,
    mask_token_id: int,
    exclude_token_ids: Sequence[int] = (),
) -> dict[str, float]:
    """Held-out perplexity and few-shot episode accuracy, as ``eval/*`` metrics.

    The first setting of ``cfg.eval.fewshot_settings`` is logged as ``eval/fewshot_acc`` (with
    ``_ci``, ``_before``, ``_before_ci`` and ``eval/fewshot_chance``); further settings as
    ``eval/fewshot_<N>w<K>s_*``. Episodes use the training sampler's window length, frequency band,
    pooling and feature normalisation, and the experiment seed, so every evaluation sees the same
    episodes; with ``sampler.holdout_fraction > 0`` their classes are the held-out token types only
    (see :func:`eval_class_split`).

    Args:
        cfg: The experiment config (its ``eval``, ``sampler`` and ``meta`` sections are used).
        model: The backbone (run under ``no_grad``; its train/eval mode is restored).
        head: The meta head whose initial weights the inner loop adapts.
        loop: The inner loop.
        heldout_rows: ``(R, L)`` held-out token rows; empty rows give an empty dict.
        mask_token_id: The tokenizer's mask id.
        exclude_token_ids: Token ids never used as classes (special tokens), besides the config's.
    """
    if heldout_rows.shape[0] == 0:
        return {}
    ppl = perplexity(model, heldout_rows, batch_size=cfg.eval.batch_size)
    out = {"eval/perplexity": ppl["perplexity"], "eval/lm_loss": ppl["loss"]}
    if cfg.eval.fewshot_episodes == 0:
        return out
    episode_args = fewshot_kwargs(cfg, exclude_token_ids) | {
        "mask_token_id": mask_token_id,
        "episodes": cfg.eval.fewshot_episodes,
    }
    for i, (n_way, k_shot) in enumerate(cfg.eval.fewshot_settings):
        res = fewshot_eval(
            model, heldout_rows, n_way=n_way, k_shot=k_shot, head=head, inner_loop=loop, **episode_args
        )
        out.update(res.metrics("eval/fewshot" if i == 0 else f"eval/fewshot_{n_way}w{k_shot}s"))
    return out


def check_eval_episodes(
    cfg: ExperimentConfig,
    heldout_rows: torch.Tensor,
    mask_token_id: int,
    exclude_token_ids: Sequence[int] = (),
) -> None:
    """Fail before training when an evaluation setting cannot draw episodes from the held-out rows.

    Raises:
        ConfigError: naming ``eval.fewshot_settings`` and what to change (more ``eval.rows``, a smaller
            setting, a wider band, a larger ``sampler.holdout_fraction``).
    """
    from picomaml.config import ConfigError
    from picomaml.meta.sampler import SamplingError, SMLMTSampler

    if cfg.eval.fewshot_episodes == 0 or heldout_rows.shape[0] == 0:
        return
    kw = fewshot_kwargs(cfg, exclude_token_ids)
    for n_way, k_shot in cfg.eval.fewshot_settings:
        sampler = SMLMTSampler(
            n_way=n_way, k_shot=k_shot, n_query=kw["n_query"], mask_token_id=mask_token_id,
            window_len=kw["window_len"], min_freq=kw["min_freq"], max_freq=kw["max_freq"],
            exclude_token_ids=kw["exclude_token_ids"], **kw["sampler_kwargs"],
        )  # fmt: skip
        try:
            sampler.sample(heldout_rows.cpu())
        except SamplingError as exc:
            raise ConfigError(
                f"eval.fewshot_settings: no {n_way}-way {k_shot}-shot episode can be drawn from the "
                f"{heldout_rows.shape[0]} held-out rows (eval.rows): {exc}"
            ) from exc
