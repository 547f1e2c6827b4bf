"""Rebuild what few-shot evaluation needs from a trainer checkpoint or a Hugging Face export.

[`load_for_eval`][picomaml.train.loading.load_for_eval] takes a step directory, a checkpoint root, a run
directory or a directory written by ``save_pretrained`` and returns an
[`EvalBundle`][picomaml.train.loading.EvalBundle]: the backbone, the meta-learned head and inner loop (for a
checkpoint), the tokenizer, the held-out rows, and the
[`picomaml.eval.suite.run_suite`][picomaml.eval.suite.run_suite] arguments that follow the run's config
(window length, pooling, frequency band, held-out class split).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["IncompatibleCheckpointError", "EvalBundle", "load_for_eval"]

logger = logging.getLogger(__name__)


class IncompatibleCheckpointError(ValueError):
    """A checkpoint or model directory exists but cannot be rebuilt (no config, shapes that do not match,
    an unknown config key, a missing component); the message names the path and the cause."""


@dataclasses.dataclass
class EvalBundle:
    """What [`load_for_eval`][picomaml.train.loading.load_for_eval] rebuilds.

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
        config: The resolved [`picomaml.ExperimentConfig`][picomaml.train.config.ExperimentConfig] (``None``
            for an HF export).
        corpus: The embedded corpus when it was loaded (for the downstream task), else ``None``.
        suite_kwargs: Keyword arguments of [`picomaml.eval.suite.run_suite`][picomaml.eval.suite.run_suite]
            that follow the run's config.
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
    from picomaml.params import ConfigError, one_line
    from picomaml.train import checkpoint as ckpt
    from picomaml.train.build import build_run, eval_episode_kwargs
    from picomaml.train.config import ExperimentConfig, upgrade_config_dict

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
    data, renamed = upgrade_config_dict(loaded.config)
    if renamed:
        logger.info("%s/config.yaml uses keys of an earlier release: %s", where, ", ".join(renamed))
    try:
        cfg = ExperimentConfig.from_dict(data)
    except ConfigError as exc:
        raise IncompatibleCheckpointError(f"{where}/config.yaml: {exc}") from exc
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
    # exactly what training built (same head seed, inner-loop backend and learned-LR layout)
    run = build_run(cfg, mask_token_id=tok.mask_token_id, special_ids=special, optimizer=False, compile=False)
    try:  # every state is checked (shapes, dtypes, finite values) before any is loaded
        loaded.load_into({"model": run.model, "head": run.head, "inner_loop": run.inner_loop})
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise IncompatibleCheckpointError(
            f"{where}: a saved state does not fit the modules its config.yaml describes: {one_line(exc, 400)}"
        ) from exc
    s = cfg.sampler
    return EvalBundle(
        model=run.model.eval(), head=run.head.eval(), inner_loop=run.inner_loop.eval(), tokenizer=tok,
        heldout_rows=rows, source="checkpoint", path=where, step=loaded.step, config=cfg, corpus=corpus,
        suite_kwargs=eval_episode_kwargs(cfg, special_ids=special), train_setting=(s.n_way, s.k_shot),
    )  # fmt: skip


def load_for_eval(
    path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None, tokenizer: Any = None
) -> EvalBundle:
    """Rebuild model, head, inner loop, tokenizer and held-out rows from a checkpoint or an HF export.

    Args:
        path: A trainer step directory (``.../checkpoints/step_300``), a checkpoint root (its newest
            complete checkpoint), a run directory (its ``checkpoints/``), or a directory written by
            ``save_pretrained`` (a Llama ``config.json`` and weights; e.g. a checkpoint's ``hf/``).
        cache_dir: Cache root of the embedded corpus (default: the run's ``data.cache_dir``, else the
            usual default).
        tokenizer: For an HF export: a tokenizer (name, path or object); default: the export's own
            tokenizer files, else the embedded corpus tokenizer.

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no complete checkpoint or model, or ``tokenizer``
            is a local path (absolute, ``./``, ``~``) that does not exist.
        IncompatibleCheckpointError: the checkpoint cannot be rebuilt (see the class), or ``tokenizer`` is
            given for a trainer checkpoint (its rows come from its run's tokenizer).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {path}: no such file or directory")
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint {path}: expected a directory, got a file")
    if isinstance(tokenizer, (str, os.PathLike)) and _is_local_path(str(tokenizer)) and not Path(tokenizer).expanduser().exists():
        raise FileNotFoundError(f"--tokenizer {tokenizer}: no such file or directory")
    if _is_hf_dir(path):
        return _load_hf(path, tokenizer, cache_dir)
    if tokenizer is not None:  # a trainer checkpoint's rows and token ids come from its own run's tokenizer
        raise IncompatibleCheckpointError(
            f"--tokenizer {tokenizer}: applies to a Hugging Face export only; {path} is a trainer checkpoint, "
            "which is evaluated with its run's tokenizer (leave --tokenizer out)"
        )
    return _load_checkpoint_dir(path, cache_dir)


def _is_local_path(name: str) -> bool:
    """A tokenizer given as a path, not a Hub id (``org/name``): absolute, ``./``, ``../``, ``~``, or with
    more than one ``/``."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1
