"""The few-shot evaluation suite: held-out SMLMT episodes and the downstream task, from a model or a checkpoint.

[`run_suite`][picomaml.eval.suite.run_suite] evaluates a backbone (with its meta-learned head and inner loop,
if any) on

* held-out SMLMT episodes at each ``(n_way, k_shot)`` setting
  ([`picomaml.eval.fewshot.fewshot_eval`][picomaml.eval.fewshot.fewshot_eval]);
* the downstream paragraph-classification task at the same settings
  ([`picomaml.eval.downstream.downstream_eval`][picomaml.eval.downstream.downstream_eval]),

and returns a JSON-ready dict; [`format_suite_table`][picomaml.eval.suite.format_suite_table] renders it as
markdown with chance beside every accuracy.
[`picomaml.train.loading.load_for_eval`][picomaml.train.loading.load_for_eval] rebuilds what the suite needs
from a trainer checkpoint or a Hugging Face export; ``picomaml eval`` (`picomaml.cli.eval_main`) is the
command line over them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from picomaml.eval.fewshot import FewShotResult, fewshot_eval, head_for_n_way

__all__ = [
    "DEFAULT_SETTINGS",
    "run_suite",
    "format_suite_table",
]

logger = logging.getLogger(__name__)

DEFAULT_SETTINGS: tuple[tuple[int, int], ...] = ((5, 1), (5, 4))


# ----------------------------------------------------------------------------------------------
# the suite
# ----------------------------------------------------------------------------------------------


def _result_dict(task: str, r: FewShotResult) -> dict[str, Any]:
    row = {"task": task, "setting": r.setting, **dataclasses.asdict(r)}
    row["per_episode_ncm"] = list(r.per_episode_ncm)
    row["per_episode_after"] = list(r.per_episode_after)
    row["per_episode_probe"] = list(r.per_episode_probe)
    for key, value in row.items():  # JSON has no NaN: a single episode has no interval
        if isinstance(value, float) and math.isnan(value):
            row[key] = None
    return row


def _head_for(head: nn.Module | None, n_way: int) -> tuple[nn.Module | None, str | None]:
    if head is None:
        return None, None
    try:
        return head_for_n_way(head, n_way), None
    except ValueError as exc:
        return None, str(exc)


def run_suite(
    model: nn.Module,
    tokenizer: Any,
    heldout_rows: Tensor,
    head: nn.Module | None = None,
    inner_loop: nn.Module | None = None,
    settings: Sequence[tuple[int, int]] = DEFAULT_SETTINGS,
    episodes: int = 500,
    *,
    n_query: int = 4,
    window_len: int = 32,
    pooling: str = "before_mask",
    feature_norm: str = "none",
    seed: int = 0,
    min_freq: float | None = None,
    max_freq: float | None = None,
    exclude_token_ids: Sequence[int] | None = None,
    downstream: bool = True,
    downstream_window_len: int = 64,
    downstream_pooling: str = "mean",
    downstream_dataset: Any = None,
    cache_dir: str | os.PathLike[str] | None = None,
    confidence: float = 0.95,
    episodes_per_batch: int = 16,
    sampler_kwargs: dict[str, Any] | None = None,
    adapt_layers: int = 0,
    progress: Callable[[int, str], None] | None = None,
) -> dict[str, Any]:
    """Run held-out SMLMT episodes and the downstream task at every setting.

    Args:
        model: The backbone (a [`picomaml.PicoDecoder`][picomaml.model.decoder.PicoDecoder]).
        tokenizer: Its tokenizer (``mask_token_id``, ``special_token_ids``, ``encode_batch``).
        heldout_rows: ``(B, L)`` long held-out token rows for SMLMT episodes.
        head: The meta-learned [`picomaml.MetaHead`][picomaml.meta.head.MetaHead], or ``None`` (nearest class
            mean only). A head that cannot serve a setting's ``n_way`` (not prototype-init) gives "after" only
            at its own.
        inner_loop: The [`picomaml.InnerLoop`][picomaml.meta.inner_loop.InnerLoop] (needed with ``head``).
        settings: ``(n_way, k_shot)`` pairs.
        episodes: Episodes per setting and task.
        n_query: Queries per class.
        window_len: SMLMT window length.
        pooling: Pooling of SMLMT windows, as in training (``meta.pooling``).
        feature_norm: Per-task feature normalisation, as in training (``meta.feature_norm``).
        seed: Seed of the evaluation samplers: equal seeds give equal episodes for every model.
        min_freq: Lower end of the SMLMT class-frequency band (``None``: the sampler default).
        max_freq: Upper end of the band (``None``: the sampler default).
        exclude_token_ids: Never SMLMT classes (default: the tokenizer's special tokens).
        downstream: Also run the downstream task.
        downstream_window_len: Tokens per paragraph window (capped at the model's ``max_seq_len``).
        downstream_pooling: ``"mean"`` over a paragraph window's real tokens or its ``"last"`` real token
            (see [`picomaml.pool_features`][picomaml.meta.features.pool_features] with ``valid``).
        downstream_dataset: The downstream [`FewShotDataset`][picomaml.eval.leopard.FewShotDataset] (default:
            the held-out paragraphs of the embedded corpus).
        cache_dir: Cache root of the embedded corpus.
        confidence: Coverage of the intervals.
        episodes_per_batch: Episodes per backbone forward.
        sampler_kwargs: Further [`picomaml.SMLMTSampler`][picomaml.meta.sampler.SMLMTSampler] arguments of the
            SMLMT episodes, e.g. ``holdout_fraction``/``holdout_seed``/``class_split="heldout"`` so that
            evaluation classes are never training classes (a checkpoint's
            `picomaml.train.loading.EvalBundle.suite_kwargs` sets them from its run).
        adapt_layers: Top blocks adapted with the head on SMLMT episodes, as in training (``meta.adapt_layers``);
            the downstream task adapts the head only.
        progress: Called as ``progress(episodes_done, part)`` after each batch of episodes (``part`` such as
            ``"smlmt 5w1s"``); the whole suite is ``len(settings) * episodes`` episodes, twice that with
            ``downstream``. ``picomaml eval`` draws its progress bar and estimate from it.

    Returns:
        ``{"episodes", "seed", "confidence", "settings", "smlmt": [row, ...], "downstream": [row, ...],
        "skipped": [{"task", "setting", "reason"}, ...], "seconds"}``; a row holds the fields of
        [`FewShotResult`][picomaml.eval.fewshot_result.FewShotResult] plus ``task`` and ``setting``
        (per-episode lists included, so two models can be compared episode by episode).
    """
    from picomaml.eval.downstream import downstream_eval, load_downstream_dataset
    from picomaml.meta.smlmt import SamplingError

    if tokenizer.mask_token_id is None:
        raise ValueError("tokenizer: has no mask token; SMLMT episodes need one")
    if exclude_token_ids is None:
        exclude_token_ids = tuple(tokenizer.special_token_ids)
    start = time.perf_counter()
    out: dict[str, Any] = {
        "episodes": episodes,
        "seed": seed,
        "confidence": confidence,
        "settings": [list(s) for s in settings],
        "class_split": dict(sampler_kwargs or {}),
        "smlmt": [],
        "downstream": [],
        "skipped": [],
    }
    max_len = getattr(getattr(model, "config", None), "max_seq_len", None)
    text_window = min(downstream_window_len, max_len) if max_len else downstream_window_len
    for n_way, k_shot in settings:
        setting = f"{n_way}w{k_shot}s"
        smlmt_done = _tick(progress, f"smlmt {setting}")
        h, why = _head_for(head, n_way)
        if why:
            out["skipped"].append({"task": "after inner loop", "setting": setting, "reason": why})
            logger.warning("%s: no inner-loop accuracy: %s", setting, why)
        try:
            res = fewshot_eval(
                model, heldout_rows, n_way=n_way, k_shot=k_shot, n_query=n_query,
                mask_token_id=tokenizer.mask_token_id, window_len=window_len, episodes=episodes,
                head=h, inner_loop=inner_loop if h is not None else None, pooling=pooling,
                feature_norm=feature_norm, seed=seed, min_freq=min_freq, max_freq=max_freq,
                exclude_token_ids=exclude_token_ids, confidence=confidence,
                episodes_per_batch=episodes_per_batch, sampler_kwargs=sampler_kwargs, adapt_layers=adapt_layers,
                progress=smlmt_done,
            )  # fmt: skip
            out["smlmt"].append(_result_dict("smlmt", res))
        except (SamplingError, ValueError) as exc:
            out["skipped"].append({"task": "smlmt", "setting": setting, "reason": str(exc)})
            logger.warning("smlmt %s skipped: %s", setting, exc)
        if not downstream:
            continue
        if downstream_dataset is None:
            downstream_dataset = load_downstream_dataset("heldout", cache_dir=cache_dir)
        try:
            res = downstream_eval(
                model, tokenizer, n_way=n_way, k_shot=k_shot, n_query=n_query, window_len=text_window,
                episodes=episodes, head=h, inner_loop=inner_loop if h is not None else None,
                pooling=downstream_pooling, seed=seed, feature_norm=feature_norm,
                dataset=downstream_dataset, confidence=confidence, episodes_per_batch=episodes_per_batch,
                progress=_tick(progress, f"downstream {setting}"),
            )  # fmt: skip
            out["downstream"].append(_result_dict("downstream", res))
        except ValueError as exc:
            out["skipped"].append({"task": "downstream", "setting": setting, "reason": str(exc)})
            logger.warning("downstream %s skipped: %s", setting, exc)
    out["seconds"] = round(time.perf_counter() - start, 3)
    return out


def _tick(progress: Callable[[int, str], None] | None, part: str) -> Callable[[int], None] | None:
    """A per-part ``progress(n)`` that reports ``(n, part)`` to the suite's callback."""
    if progress is None:
        return None
    return lambda n: progress(n, part)


def _cell(value: float | None, ci: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f} ± {ci:.3f}" if ci is not None else f"{value:.3f}"


def format_suite_table(results: dict[str, Any]) -> str:
    """Markdown table of a [`run_suite`][picomaml.eval.suite.run_suite] result, chance beside every accuracy,
    skipped parts listed.

    Examples:
        ```markdown
        | task | setting | episodes | NCM before (95% CI) | linear probe (95% CI) | after inner loop (95% CI) | chance |
        |---|---|---|---|---|---|---|
        | SMLMT held-out | 5-way 1-shot (4 query) | 500 | 0.312 ± 0.012 | 0.305 ± 0.012 | 0.334 ± 0.013 | 0.200 |
        ```
    """
    pct = f"{int(round(100 * results.get('confidence', 0.95)))}% CI"
    lines = [
        f"| task | setting | episodes | NCM before ({pct}) | linear probe ({pct}) | after inner loop ({pct}) "
        "| chance |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {"smlmt": "SMLMT held-out", "downstream": "downstream (pydoc paragraphs)"}
    for task in ("smlmt", "downstream"):
        for r in results.get(task, []):
            lines.append(
                f"| {names[task]} | {r['n_way']}-way {r['k_shot']}-shot ({r['n_query']} query) | {r['episodes']} | "
                f"{_cell(r['acc_ncm'], r['acc_ncm_ci'])} | "
                f"{_cell(r.get('acc_probe'), r.get('acc_probe_ci'))} | "
                f"{_cell(r['acc_after'], r['acc_after_ci'])} | {r['chance']:.3f} |"
            )
    for s in results.get("skipped", []):
        lines.append(f"\nskipped: {s['task']} {s['setting']}: {s['reason']}")
    return "\n".join(lines)
