"""The few-shot evaluation suite: held-out SMLMT episodes and the downstream task, from a model or a checkpoint.

:func:`run_suite` evaluates a backbone (with its meta-learned head and inner loop, if any) on

* held-out SMLMT episodes at each ``(n_way, k_shot)`` setting (:func:`picomaml.eval.fewshot.fewshot_eval`);
* the downstream paragraph-classification task at the same settings
  (:func:`picomaml.eval.downstream.downstream_eval`),

and returns a JSON-ready dict; :func:`format_suite_table` renders it as markdown with chance beside every
accuracy. :func:`load_for_eval` rebuilds what the suite needs from a trainer checkpoint (a step
directory, a checkpoint root or a run directory) or from a Hugging Face export; ``picomaml eval``
(:func:`picomaml.cli.eval_main`) is the command line over them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from picomaml.eval.fewshot import FewShotResult, fewshot_eval, head_for_n_way

__all__ = [
    "DEFAULT_SETTINGS",
    "IncompatibleCheckpointError",
    "EvalBundle",
    "run_suite",
    "format_suite_table",
    "load_for_eval",
]

logger = logging.getLogger(__name__)

DEFAULT_SETTINGS: tuple[tuple[int, int], ...] = ((5, 1), (5, 4))


class IncompatibleCheckpointError(ValueError):
    """A checkpoint or model directory exists but cannot be rebuilt (no config, shapes that do not match,
    an unknown config key, a missing component); the message names the path and the cause."""


# ----------------------------------------------------------------------------------------------
# the suite
# ----------------------------------------------------------------------------------------------


def _result_dict(task: str, r: FewShotResult) -> dict[str, Any]:
    row = {"task": task, "setting": r.setting, **dataclasses.asdict(r)}
    row["per_episode_before"] = list(r.per_episode_before)
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
    pooling: str = "mask",
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
) -> dict[str, Any]:
    """Run held-out SMLMT episodes and the downstream task at every setting.

    Args:
        model: The backbone (a :class:`picomaml.PicoDecoder`).
        tokenizer: Its tokenizer (``mask_token_id``, ``special_token_ids``, ``encode_batch``).
        heldout_rows: ``(B, L)`` long held-out token rows for SMLMT episodes.
        head: The meta-learned :class:`picomaml.MetaHead`, or ``None`` (nearest class mean only). A head
            that cannot serve a setting's ``n_way`` (not prototype-init) gives "after" only at its own.
        inner_loop: The :class:`picomaml.InnerLoop` (needed with ``head``).
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
        downstream_pooling: ``"mean"`` or ``"last"`` (see :func:`picomaml.eval.downstream.pool_text_features`).
        downstream_dataset: The downstream :class:`~picomaml.eval.leopard.FewShotDataset` (default: the
            held-out paragraphs of the embedded corpus).
        cache_dir: Cache root of the embedded corpus.
        confidence: Coverage of the intervals.
        episodes_per_batch: Episodes per backbone forward.
        sampler_kwargs: Further :class:`picomaml.SMLMTSampler` arguments of the SMLMT episodes, e.g.
            ``holdout_fraction``/``holdout_seed``/``class_split="heldout"`` so that evaluation classes are
            never training classes (a checkpoint's :attr:`EvalBundle.suite_kwargs` sets them from its run).

    Returns:
        ``{"episodes", "seed", "confidence", "settings", "smlmt": [row, ...], "downstream": [row, ...],
        "skipped": [{"task", "setting", "reason"}, ...], "seconds"}``; a row holds the fields of
        :class:`~picomaml.eval.fewshot.FewShotResult` plus ``task`` and ``setting`` (per-episode lists
        included, so two models can be compared episode by episode).
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
                episodes_per_batch=episodes_per_batch, sampler_kwargs=sampler_kwargs,
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
            )  # fmt: skip
            out["downstream"].append(_result_dict("downstream", res))
        except ValueError as exc:
            out["skipped"].append({"task": "downstream", "setting": setting, "reason": str(exc)})
            logger.warning("downstream %s skipped: %s", setting, exc)
    out["seconds"] = round(time.perf_counter() - start, 3)
    return out


def _cell(value: float | None, ci: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f} ± {ci:.3f}" if ci is not None else f"{value:.3f}"


def format_suite_table(results: dict[str, Any]) -> str:
    """Markdown table of a :func:`run_suite` result, chance beside every accuracy, skipped parts listed.

    Example::

        | task | setting | episodes | NCM before (95% CI) | linear probe (95% CI) | after inner loop (95% CI) | chance |
        |---|---|---|---|---|---|---|
        | SMLMT held-out | 5-way 1-shot (4 query) | 500 | 0.312 ± 0.012 | 0.305 ± 0.012 | 0.334 ± 0.013 | 0.200 |
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
                f"{_cell(r['acc_before'], r['acc_before_ci'])} | "
                f"{_cell(r.get('acc_probe'), r.get('acc_probe_ci'))} | "
                f"{_cell(r['acc_after'], r['acc_after_ci'])} | {r['chance']:.3f} |"
            )
    for s in results.get("skipped", []):
        lines.append(f"\nskipped: {s['task']} {s['setting']}: {s['reason']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# loading a checkpoint or an HF export
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalBundle:
    """What :func:`load_for_eval` rebuilds.

    Attributes:
        model: The backbone, in eval mode, on the CPU.
        head: The meta-learned head (``None`` for an HF export).
        inner_loop: The inner loop of the run (for an HF export: ``InnerLoop`` defaults, used with a fresh
            prototype head only when the caller builds one).
        tokenizer: The tokenizer wrapper.
        heldout_rows: ``(B, L)`` held-out token rows for SMLMT episodes.
        source: ``"checkpoint"`` or ``"hf"``.
        path: The directory the weights came from (the resolved step directory for a checkpoint).
        step: The checkpoint's optimizer step (``None`` for an HF export).
        config: The resolved :class:`picomaml.ExperimentConfig` (``None`` for an HF export).
        corpus: The embedded corpus when it was loaded (for the downstream task), else ``None``.
        suite_kwargs: Keyword arguments of :func:`run_suite` that follow the run's config.
        train_setting: The run's ``(n_way, k_shot)`` (``None`` for an HF export).
    """

    model: nn.Module
    head: nn.Module | None
    inner_loop: nn.Module | None
    tokenizer: Any
    heldout_rows: Tensor
    source: str
    path: Path
    step: int | None = None
    config: Any = None
    corpus: Any = None
    suite_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    train_setting: tuple[int, int] | None = None


def _is_hf_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "model_type" in json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def _rows_for(tokenizer: Any, corpus: Any, row_len: int) -> Tensor:
    """Held-out rows of the embedded corpus for ``tokenizer`` (re-tokenized when it is another one)."""
    from picomaml.data.corpus import pack_rows

    if corpus.tokenizer.vocab_size == tokenizer.vocab_size and corpus.tokenizer.encode(
        "the cat"
    ) == tokenizer.encode("the cat"):
        return (
            corpus.heldout_rows
            if corpus.heldout_rows.shape[1] == row_len
            else pack_rows(corpus.heldout_tokens, row_len)
        )
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer.encode_batch([t for _, t in corpus.heldout_documents]):
        stream.extend(ids + ([eos] if eos is not None else []))
    return pack_rows(torch.tensor(stream, dtype=torch.long), row_len)


def _load_hf(path: Path, tokenizer: Any, cache_dir: Any) -> EvalBundle:
    from picomaml.data.corpus import load_default_corpus
    from picomaml.data.tokenizer import TokenizerWrapper, load_tokenizer
    from picomaml.meta.inner_loop import InnerLoop
    from picomaml.model.decoder import PicoDecoder

    try:
        model = PicoDecoder.from_hf(path)
    except (ValueError, OSError, KeyError) as exc:
        raise IncompatibleCheckpointError(f"{path}: not a Llama model PicoDecoder can import: {exc}") from exc
    corpus = load_default_corpus(seq_len=64, cache_dir=cache_dir)
    if tokenizer is not None:
        tok = (
            load_tokenizer(tokenizer)
            if isinstance(tokenizer, (str, os.PathLike))
            else TokenizerWrapper.from_object(tokenizer)
        )
    elif (path / "tokenizer_config.json").is_file():
        tok = load_tokenizer(path)
    elif (path / "tokenizer.json").is_file():
        tok = load_tokenizer(path / "tokenizer.json")
    else:
        tok = corpus.tokenizer
        logger.info("%s has no tokenizer files: using the embedded corpus tokenizer", path)
    if tok.vocab_size > model.config.vocab_size:
        raise IncompatibleCheckpointError(
            f"{path}: the tokenizer has {tok.vocab_size} ids but the model's vocabulary is "
            f"{model.config.vocab_size}; pass the model's tokenizer (--tokenizer)"
        )
    return EvalBundle(
        model=model.eval(),
        head=None,
        inner_loop=InnerLoop(steps=5, lr=0.1),
        tokenizer=tok,
        heldout_rows=_rows_for(tok, corpus, 257),
        source="hf",
        path=path,
        corpus=corpus,
    )


def _load_checkpoint_dir(path: Path, cache_dir: Any) -> EvalBundle:
    from picomaml import checkpoint as ckpt
    from picomaml.config import ConfigError, ExperimentConfig
    from picomaml.eval.during_training import eval_class_split
    from picomaml.meta.head import MetaHead
    from picomaml.meta.inner_loop import InnerLoop
    from picomaml.model.decoder import PicoDecoder

    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path  # a run directory
    try:
        loaded = ckpt.load_checkpoint(root, components=("model", "head", "inner_loop"))
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"--checkpoint {path}: no complete trainer checkpoint there (expected a step directory with a "
            f"{ckpt.MARKER} file, a checkpoint root, a run directory holding checkpoints/, or a Hugging Face "
            f"export with config.json): {exc}"
        ) from exc
    except KeyError as exc:
        raise IncompatibleCheckpointError(f"{path}: {exc.args[0]}") from exc
    where = loaded.path
    if loaded.config is None:
        raise IncompatibleCheckpointError(f"{where}: no config.yaml, so the model cannot be rebuilt")
    try:
        cfg = ExperimentConfig.from_dict(loaded.config)
    except ConfigError as exc:
        raise IncompatibleCheckpointError(f"{where}/config.yaml: {exc}") from exc
    model = PicoDecoder(cfg.model)
    head = MetaHead(in_dim=cfg.model.d_model, n_way=cfg.sampler.n_way, **vars(cfg.head))
    loop = InnerLoop(**(vars(cfg.inner_loop) | {"backend": "torch"}))  # every backend gives the same numbers
    if cfg.inner_loop.learn_lr:
        loop.bind(head)
    for name, module in (("model", model), ("head", head), ("inner_loop", loop)):
        try:
            module.load_state_dict(loaded.states[name])
        except (RuntimeError, KeyError, TypeError) as exc:
            raise IncompatibleCheckpointError(
                f"{where}: the saved {name!r} state does not fit the module its config.yaml describes: {exc}"
            ) from exc
    corpus = None
    cache = cache_dir if cache_dir is not None else cfg.data.cache_dir
    if cfg.data.source == "embedded":
        from picomaml.data.corpus import load_default_corpus

        corpus = load_default_corpus(seq_len=cfg.data.seq_len + 1, cache_dir=cache)
        tok, rows = corpus.tokenizer, corpus.heldout_rows
        special = tuple(tok.special_token_ids)
    else:
        from picomaml.data.pipeline import build_training_data

        data = build_training_data(cfg.data, seed=cfg.seed, eval_rows=max(cfg.eval.rows, 512))
        tok, rows, special = data.tokenizer, data.heldout_rows, data.special_ids
    if rows.shape[0] == 0:
        raise IncompatibleCheckpointError(f"{where}: the run's data has no held-out rows to evaluate on")
    s = cfg.sampler
    kwargs = {
        "n_query": s.n_query,
        "window_len": s.window_len,
        "pooling": cfg.meta.pooling,
        "feature_norm": cfg.meta.feature_norm,
        "seed": cfg.seed,
        "min_freq": s.min_freq,
        "max_freq": s.max_freq,
        "exclude_token_ids": tuple(s.exclude_token_ids) + tuple(special),
        "sampler_kwargs": eval_class_split(s),  # evaluation classes = the run's held-out token types
    }
    return EvalBundle(
        model=model.eval(), head=head.eval(), inner_loop=loop.eval(), tokenizer=tok, heldout_rows=rows,
        source="checkpoint", path=where, step=loaded.step, config=cfg, corpus=corpus, suite_kwargs=kwargs,
        train_setting=(s.n_way, s.k_shot),
    )  # fmt: skip


def load_for_eval(
    path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None, tokenizer: Any = None
) -> EvalBundle:
    """Rebuild model, head, inner loop, tokenizer and held-out rows from a checkpoint or an HF export.

    Args:
        path: A trainer step directory (``.../checkpoints/step_000300``), a checkpoint root (its newest
            complete checkpoint), a run directory (its ``checkpoints/``), or a directory written by
            ``save_pretrained`` (a Llama ``config.json`` and weights; e.g. a checkpoint's ``hf/``).
        cache_dir: Cache root of the embedded corpus (default: the run's ``data.cache_dir``, else the
            usual default).
        tokenizer: For an HF export: a tokenizer (name, path or object); default: the export's own
            tokenizer files, else the embedded corpus tokenizer.

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no complete checkpoint or model.
        IncompatibleCheckpointError: the checkpoint cannot be rebuilt (see the class).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {path}: no such file or directory")
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint {path}: expected a directory, got a file")
    if _is_hf_dir(path):
        return _load_hf(path, tokenizer, cache_dir)
    return _load_checkpoint_dir(path, cache_dir)


# ----------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------
