"""From a [`picomaml.train.config.DataConfig`][picomaml.data.pipeline.DataConfig] to what a training loop
consumes.

[`build_training_data`][picomaml.data.pipeline.build_training_data] returns the tokenizer (and so the mask
token), held-out rows for evaluation, and a resumable batch source. In-memory sources (the embedded corpus,
small local files) give every rank the same *global* batch, so episodes are sampled identically on any number
of devices; streaming sources (pretokenized Hugging Face datasets) give each rank its own shard.

Rows carry ``seq_len + 1`` tokens, so the next-token loss has exactly ``seq_len`` predictions per row.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from itertools import islice
from typing import Any, Literal, Protocol

import torch

from picomaml.data.row_batcher import RowBatcher
from picomaml.data.sources import DataError
from picomaml.params import ConfigError, Params, check, hparam

__all__ = ["DataConfig", "BatchSource", "InMemoryBatches", "StreamBatches", "TrainingData", "build_training_data"]


@dataclasses.dataclass
class DataConfig(Params):
    """Where token rows come from (YAML section ``data``).

    ``source``: ``embedded`` (the built-in Python-docs corpus and its BPE tokenizer), ``hf`` (a
    pretokenized Hugging Face dataset such as ``pico-lm/pretokenized-dolma``, streamed) or ``local``
    (parquet / jsonl / text files in ``paths``, tokenized with ``tokenizer``).
    """

    source: Literal["embedded", "hf", "local"] = hparam("embedded", doc="embedded corpus, a Hub dataset, or local files")
    dataset: str = hparam("pico-lm/pretokenized-dolma", doc="Hub dataset of pretokenized rows (source hf)")
    split: str = hparam("train", doc="split of the Hub dataset")
    eval_dataset: str | None = hparam(None, doc="Hub dataset of held-out rows; null: rows held out of dataset")
    paths: list[str] = hparam(default_factory=list, doc="parquet / jsonl / text files (source local)")
    eval_paths: list[str] = hparam(default_factory=list, doc="held-out files; []: rows held out of paths")
    tokenizer: str | None = hparam(None, doc="tokenizer name or path; null: the source's own")
    seq_len: int = hparam(256, ge=1, doc="next-token predictions per row (rows hold seq_len + 1 tokens)")
    batch_size: int = hparam(8, ge=1, doc="rows per micro-batch (the global batch on in-memory sources)")
    grad_accum: int = hparam(1, ge=1, doc="micro-batches per optimizer step")
    cache_dir: str | None = hparam(None, doc="cache of the embedded corpus and downloads; null: the default")
    seed: int | None = hparam(
        None, ge=0, doc="shuffling seed of in-memory training rows (the data order); null: the experiment's seed"
    )

    def validate(self) -> None:
        check(self.source != "local" or bool(self.paths), "paths", "source 'local' needs at least one path")

log = logging.getLogger(__name__)


class BatchSource(Protocol):
    """A resumable source of token batches."""

    shared: bool  # True: ``next_batch`` returns the global batch, identical on every rank

    def next_batch(self) -> torch.Tensor:
        """The next batch; raises ``StopIteration`` at the end of finite data."""

    def local(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a batch from [`next_batch`][picomaml.data.pipeline.BatchSource.next_batch]."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class InMemoryBatches:
    """A [`BatchSource`][picomaml.data.pipeline.BatchSource] over rows in memory: every rank gets the same
    global batch of a [`RowBatcher`][picomaml.data.row_batcher.RowBatcher] and keeps its slice (`local`)."""

    shared = True

    def __init__(self, batcher: RowBatcher) -> None:
        self.batcher = batcher

    def next_batch(self) -> torch.Tensor:
        return self.batcher.next_global()

    def local(self, batch: torch.Tensor) -> torch.Tensor:
        return self.batcher.local(batch)

    def state_dict(self) -> dict[str, Any]:
        return self.batcher.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batcher.load_state_dict(state)


class StreamBatches:
    """Adapts a [`picomaml.data.PretokenizedStream`][picomaml.data.hub.PretokenizedStream] (this rank's shard)
    to [`BatchSource`][picomaml.data.pipeline.BatchSource]."""

    shared = False

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self._it: Any = None

    def next_batch(self) -> torch.Tensor:
        fresh = self._it is None
        if fresh:
            self._it = iter(self.stream)
        try:
            return next(self._it)
        except StopIteration:
            start = self.stream.rows_consumed
            if fresh and start:  # a restored position past the end: say so rather than end at once
                raise DataError(
                    f"data position: rows_consumed={start} is at or beyond the end of this rank's rows of "
                    f"{self.stream.name or self.stream.data_files}: nothing is left to train on"
                ) from None
            raise

    def local(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
        self._it = None  # the next iter() resumes at the restored position


@dataclass
class TrainingData:
    """What [`build_training_data`][picomaml.data.pipeline.build_training_data] returns.

    Attributes:
        train: The batch source for training steps.
        heldout_rows: ``(R, seq_len + 1)`` rows for perplexity and few-shot evaluation.
        tokenizer: The tokenizer wrapper (``mask_token_id``, ``eos_token_id``, ``vocab_size``, ``decode``).
        special_ids: Ids of special tokens (EOS, PAD, ...) never used as SMLMT classes.
    """

    train: BatchSource
    heldout_rows: torch.Tensor
    tokenizer: Any
    special_ids: tuple[int, ...]


def _special_ids(tokenizer: Any) -> tuple[int, ...]:
    # every special token, the mask included: none of them may become an SMLMT class
    ids = set(tokenizer.special_token_ids)
    ids |= {getattr(tokenizer, f"{role}_token_id", None) for role in ("bos", "unk")} - {None}
    return tuple(sorted(ids))


def build_training_data(
    cfg: DataConfig, *, seed: int = 0, rank: int = 0, world_size: int = 1, eval_rows: int = 64
) -> TrainingData:
    """Build the tokenizer, the training batch source and the held-out rows for ``cfg``.

    Args:
        cfg: The data section of the experiment config.
        seed: Shuffling seed of in-memory sources (``cfg.seed`` takes precedence when set).
        rank: This process's data-parallel rank.
        world_size: Number of data-parallel processes (must divide ``cfg.batch_size``).
        eval_rows: Held-out rows to keep for evaluation (0: none).

    Raises:
        ConfigError: A ``data.*`` value does not fit (the message names the key).
        ValueError: ``eval_rows`` is negative.
    """
    if eval_rows < 0:
        raise ValueError(f"build_training_data: eval_rows must be >= 0, got {eval_rows}")
    if cfg.batch_size % world_size:
        raise ConfigError(f"data.batch_size: {cfg.batch_size} must be divisible by the {world_size} devices")
    row_len = cfg.seq_len + 1
    if cfg.source == "embedded":
        from picomaml.data.corpus import load_default_corpus

        corpus = load_default_corpus(seq_len=row_len, cache_dir=cfg.cache_dir)
        tokenizer, train_rows, heldout = corpus.tokenizer, corpus.train_rows, corpus.heldout_rows
    elif cfg.source == "local":
        from picomaml.data.sources import load_token_rows
        from picomaml.data.tokenizer import load_tokenizer

        if cfg.tokenizer is None:
            raise ConfigError("data.tokenizer: source 'local' needs a tokenizer (name or path)")
        tokenizer = load_tokenizer(cfg.tokenizer)
        train_rows = load_token_rows(cfg.paths, row_len, tokenizer)
        heldout = load_token_rows(cfg.eval_paths, row_len, tokenizer) if cfg.eval_paths else train_rows[:0]
        if heldout.shape[0] == 0 and eval_rows > 0:
            log.warning(
                "data.eval_paths is empty: the last %d training rows are held out for evaluation", eval_rows
            )
            cut = max(0, train_rows.shape[0] - eval_rows)  # not train_rows[-eval_rows:]: -0 would take all
            heldout, train_rows = train_rows[cut:], train_rows[:cut]
    else:  # hf
        from picomaml.data.hub import PretokenizedStream
        from picomaml.data.tokenizer import load_tokenizer

        if cfg.tokenizer is None:
            raise ConfigError("data.tokenizer: source 'hf' needs the tokenizer the data was made with")
        tokenizer = load_tokenizer(cfg.tokenizer)
        files = cfg.paths or None
        stream = PretokenizedStream(
            cfg.dataset,
            data_files=files,
            split=cfg.split,
            seq_len=row_len,
            batch_size=cfg.batch_size // world_size,
            rank=rank,
            world_size=world_size,
        )
        eval_files = cfg.eval_paths or None
        eval_name = cfg.eval_dataset or cfg.dataset
        if eval_files is None and cfg.eval_dataset is None:
            log.warning("no data.eval_dataset / data.eval_paths: evaluating on the first training rows")
            eval_files = files  # the training files, when training reads local files rather than the hub
        eval_stream = PretokenizedStream(
            eval_name, data_files=eval_files, split=cfg.split, seq_len=row_len, batch_size=1, drop_last=False
        )
        heldout_list = [b[0] for b in islice(iter(eval_stream), eval_rows)]
        heldout = torch.stack(heldout_list) if heldout_list else torch.empty(0, row_len, dtype=torch.long)
        return TrainingData(StreamBatches(stream), heldout, tokenizer, _special_ids(tokenizer))
    if train_rows.shape[0] < cfg.batch_size:
        raise ConfigError(
            f"data.batch_size: {cfg.batch_size} exceeds the {train_rows.shape[0]} training rows of "
            f"{row_len} tokens; lower data.batch_size or data.seq_len"
        )
    seed = seed if cfg.seed is None else cfg.seed  # a data order of its own (e.g. the same run on new data order)
    batcher = RowBatcher(train_rows, cfg.batch_size, seed=seed, rank=rank, world_size=world_size)
    return TrainingData(InMemoryBatches(batcher), heldout[:eval_rows], tokenizer, _special_ids(tokenizer))
