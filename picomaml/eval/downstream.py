"""A downstream few-shot text-classification task with real labels that works offline.

**How the labels are built.** The embedded corpus
([`picomaml.load_default_corpus`][picomaml.data.corpus.load_default_corpus]) has one document per
``pydoc_data.topics`` topic (``"topic:<name>"``, the text ``help()`` shows) and one per pure-Python
standard-library module (``"module:<dotted name>"``, its module, class and function docstrings in source
order). Each document is one label, named by the document: a paragraph of a topic is labelled by its topic, a
paragraph of a module's docstrings by its module. Paragraphs are the blocks between blank lines, with
whitespace collapsed; a paragraph is kept when it has at least ``min_chars`` characters of which at least half
are letters (this drops grammar rules, tables and code), and a paragraph text that occurs under more than one
label is dropped altogether (it could not be classified). By default only documents of the corpus's held-out
split are used (the split is a hash of the document name; see
[`picomaml.data.corpus.is_heldout`][picomaml.data.corpus.is_heldout]), so a model pretrained on the train
split has never seen the text of any evaluation label. A label takes part in an episode when it has at least
``K + Q`` paragraphs.

**Evaluation.** [`downstream_eval`][picomaml.eval.downstream.downstream_eval] draws seeded N-way K-shot
episodes over these labels (see [`picomaml.eval.leopard.to_episodes`][picomaml.eval.leopard.to_episodes]: each
paragraph is tokenized, truncated to ``window_len`` and right-padded), featurises each batch of episodes with
one forward of the frozen backbone, as in training
([`picomaml.meta.objectives.episode_features`][picomaml.meta.features.episode_features]; ``pooling="mean"``
averages a window over its real tokens, ``"last"`` takes its last real token), and reports the
nearest-class-mean accuracy (before adaptation), the accuracy of a linear probe fitted on each support set
(see [`picomaml.eval.probe`][picomaml.eval.probe]) and the accuracy of the head adapted by the inner loop
(after), as a [`picomaml.eval.fewshot.FewShotResult`][picomaml.eval.fewshot_result.FewShotResult] with
Student-t confidence intervals over episodes.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from picomaml.eval.fewshot import (
    FewShotResult,
    eval_mode,
    head_for_n_way,
    score_episode_batch,
    summarize_accuracies,
)
from picomaml.eval.leopard import FewShotDataset, TextEpisode, to_episodes
from picomaml.params import check_int

__all__ = [
    "split_paragraphs",
    "documents_dataset",
    "load_downstream_dataset",
    "downstream_eval",
    "TEXT_POOLINGS",
]

logger = logging.getLogger(__name__)

# the poolings that make sense for a text window: it has padding but no masked class token
TEXT_POOLINGS = ("mean", "last")
_BLANK = re.compile(r"\n\s*\n")
_SPACE = re.compile(r"\s+")


def split_paragraphs(text: str, min_chars: int = 64) -> list[str]:
    """Paragraphs of ``text`` (blocks between blank lines, whitespace collapsed) that are mostly prose:
    at least ``min_chars`` characters, at least half of them letters."""
    out = []
    for block in _BLANK.split(text):
        para = _SPACE.sub(" ", block).strip()
        if len(para) >= min_chars and sum(ch.isalpha() for ch in para) >= 0.5 * len(para):
            out.append(para)
    return out


def documents_dataset(documents: Sequence[tuple[str, str]], min_chars: int = 64) -> FewShotDataset:
    """A [`FewShotDataset`][picomaml.eval.leopard.FewShotDataset] of paragraphs labelled by their document's
    name (``"topic:..."``, ``"module:..."``); paragraph texts that occur under two labels are dropped."""
    pairs = [(name, p) for name, text in documents for p in split_paragraphs(text, min_chars)]
    owners: dict[str, set[str]] = {}
    for name, p in pairs:
        owners.setdefault(p, set()).add(name)
    seen: set[tuple[str, str]] = set()
    kept = []
    for name, p in pairs:
        if len(owners[p]) == 1 and (name, p) not in seen:  # also drop repeats within one document
            seen.add((name, p))
            kept.append((name, p))
    names = sorted({n for n, _ in kept})
    index = {n: i for i, n in enumerate(names)}
    return FewShotDataset(
        texts=[p for _, p in kept], labels=[index[n] for n, _ in kept], label_names=names, task="pydoc"
    )


def load_downstream_dataset(
    split: str = "heldout",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    corpus: Any = None,
    min_chars: int = 64,
) -> FewShotDataset:
    """The downstream task built from the embedded corpus's ``split`` documents.

    Args:
        split: ``"heldout"`` (default: labels never seen in pretraining), ``"train"`` or ``"all"``.
        cache_dir: Cache root of the embedded corpus (see
            [`picomaml.load_default_corpus`][picomaml.data.corpus.load_default_corpus]).
        corpus: An already loaded [`picomaml.data.corpus.EmbeddedCorpus`][picomaml.data.corpus.EmbeddedCorpus]
            (skips loading).
        min_chars: Shortest paragraph kept.
    """
    if split not in ("heldout", "train", "all"):
        raise ValueError(f"split must be 'heldout', 'train' or 'all', got {split!r}")
    if corpus is None:
        from picomaml.data.corpus import load_default_corpus

        corpus = load_default_corpus(seq_len=64, cache_dir=cache_dir)
    docs = {
        "heldout": corpus.heldout_documents,
        "train": corpus.train_documents,
        "all": [*corpus.train_documents, *corpus.heldout_documents],
    }[split]
    ds = documents_dataset(docs, min_chars)
    ds.split = split
    return ds


def downstream_eval(
    model: nn.Module,
    tokenizer: Any,
    *,
    n_way: int = 5,
    k_shot: int = 4,
    n_query: int = 4,
    window_len: int = 64,
    episodes: int = 100,
    head: nn.Module | Callable[[int], nn.Module] | None = None,
    inner_loop: nn.Module | None = None,
    pooling: str = "mean",
    seed: int = 0,
    feature_norm: str = "none",
    dataset: FewShotDataset | None = None,
    query_dataset: FewShotDataset | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    confidence: float = 0.95,
    episodes_per_batch: int = 16,
    progress: Callable[[int], None] | None = None,
) -> FewShotResult:
    """Few-shot accuracy on real text labels: nearest class mean, linear probe and after the inner loop.

    Args:
        model: The backbone (a [`picomaml.PicoDecoder`][picomaml.model.decoder.PicoDecoder]), frozen: run
            under ``no_grad`` in eval mode, its mode restored afterwards. Its vocabulary must cover the
            tokenizer's ids.
        tokenizer: The model's tokenizer (see
            [`picomaml.eval.leopard.tokenize_examples`][picomaml.eval.leopard.tokenize_examples]).
        n_way: Classes per episode.
        k_shot: Support paragraphs per class.
        n_query: Query paragraphs per class.
        window_len: Tokens per paragraph window.
        episodes: Number of episodes.
        head: The [`picomaml.MetaHead`][picomaml.meta.head.MetaHead] the inner loop adapts (a prototype-init
            head of another ``n_way`` is rebuilt for ``n_way``), a factory ``n_way -> head``, or ``None``
            (only the nearest-class-mean accuracy).
        inner_loop: The [`picomaml.InnerLoop`][picomaml.meta.inner_loop.InnerLoop] (needed with ``head``).
        pooling: ``"mean"`` over the real tokens or the ``"last"`` real token (see
            [`picomaml.pool_features`][picomaml.meta.features.pool_features] with ``valid``).
        seed: Seed of the episode generator: the same seed gives the same episodes for any model.
        feature_norm: Per-task feature normalisation as in training (``"none"``, ``"center"``,
            ``"standardize"``).
        dataset: The labelled examples (default:
            [`load_downstream_dataset`][picomaml.eval.downstream.load_downstream_dataset] on the held-out
            split); a LEOPARD file from
            [`picomaml.eval.leopard.load_leopard_file`][picomaml.eval.leopard.load_leopard_file] works too.
        query_dataset: Optional separate query pool (e.g. LEOPARD's eval file).
        cache_dir: Cache root of the embedded corpus (when ``dataset`` is None).
        confidence: Coverage of the intervals.
        episodes_per_batch: Episodes per backbone forward (results do not depend on it).
        progress: Called with the number of episodes just scored, after each batch.

    Returns:
        A [`picomaml.eval.fewshot.FewShotResult`][picomaml.eval.fewshot_result.FewShotResult]
        (``chance = 1 / n_way``).
    """
    check_int("episodes", episodes, ge=1)
    check_int("episodes_per_batch", episodes_per_batch, ge=1)
    if pooling not in TEXT_POOLINGS:
        raise ValueError(f"pooling must be one of {list(TEXT_POOLINGS)} for text windows, got {pooling!r}")
    if head is not None and inner_loop is None:
        raise ValueError("inner_loop: needed when a head is given (acc_after adapts the head with it)")
    if head is not None and not isinstance(head, nn.Module):
        head = head(n_way)
    if head is not None:
        head = head_for_n_way(head, n_way)
    if dataset is None:
        dataset = load_downstream_dataset("heldout", cache_dir=cache_dir)
    # all episodes drawn up front from one generator: batching cannot change them
    eps: TextEpisode = to_episodes(
        dataset, tokenizer, n_way=n_way, k_shot=k_shot, n_query=n_query, window_len=window_len,
        episodes=episodes, seed=seed, query_dataset=query_dataset,
    )  # fmt: skip
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    top = int(torch.maximum(eps.support_ids.max(), eps.query_ids.max()))
    if vocab is not None and top >= vocab:
        raise ValueError(f"tokenizer: token id {top} is outside the model's vocabulary of {vocab}")
    before: list[float] = []
    after: list[float] = []
    probe: list[float] = []
    with eval_mode(model, head, inner_loop):
        for lo in range(0, episodes, episodes_per_batch):
            batch = eps.slice(lo, min(episodes, lo + episodes_per_batch))
            b, a, p = score_episode_batch(model, batch, pooling, n_way, head, inner_loop, feature_norm)
            before += b
            after += a
            probe += p
            if progress is not None:
                progress(len(b))
    result = summarize_accuracies(n_way, k_shot, n_query, before, after, confidence, probe=probe)
    logger.debug(
        "downstream %dw%ds: before %.4f, after %s", n_way, k_shot, result.acc_ncm, result.acc_after
    )
    return result
