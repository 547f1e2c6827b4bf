"""Fine-tuning evaluations, as the papers report few-shot gains: token tagging and k-shot sentence classification.

[`finetune_tagger`][picomaml.eval.finetune.finetune_tagger] trains a linear head over the backbone's per-word
hidden states (one subword per word, see [`align_subwords`][picomaml.eval.tagging.align_subwords]) and reports
token accuracy, macro token F1 and, for BIO tags, entity-level precision, recall and F1
([`picomaml.eval.tagging`][picomaml.eval.tagging]).
[`finetune_classifier`][picomaml.eval.finetune.finetune_classifier] samples ``k`` training examples per class
and trains a linear head over pooled text features (accuracy and macro F1).
[`finetune_eval`][picomaml.eval.finetune.finetune_eval] repeats either over seeds and reports each metric's
mean with a Student-t confidence interval.

Two modes: ``"head"`` freezes the backbone (its features are computed once, then only the head trains) and
``"full"`` fine-tunes a copy of the backbone with the head. The caller's model is never modified: its weights,
``requires_grad`` flags and train/eval mode are as before. All randomness (batch order, the k-shot sample) comes
from a ``torch.Generator`` seeded by ``seed`` and owned by the call; the head starts from zeros.

Sequences are right-padded in a batch; with a causal decoder the hidden states of real tokens do not depend on
the padding to their right, so no attention mask is needed.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from picomaml.data.labelled import LabelledText, TaggedSentence
from picomaml.eval._finetune_core import (
    FINETUNE_MODES,
    Encoded,
    check_common,
    check_examples,
    check_vocab,
    fit_predict,
    make_encoded,
    pad_id_of,
    resolve_device,
)
from picomaml.eval.finetune_result import ClassificationResult, FinetuneSummary, TaggingResult
from picomaml.eval.stats import mean_ci
from picomaml.eval.tagging import align_subwords, entity_scores, is_bio, macro_f1, token_accuracy
from picomaml.params import check_int

__all__ = [
    "FINETUNE_MODES",
    "ClassificationResult",
    "FinetuneSummary",
    "TaggingResult",
    "finetune_classifier",
    "finetune_eval",
    "finetune_tagger",
]

logger = logging.getLogger(__name__)


def finetune_tagger(
    backbone: nn.Module,
    tokenizer: Any,
    train: Sequence[TaggedSentence],
    test: Sequence[TaggedSentence],
    *,
    mode: str = "head",
    epochs: int = 5,
    lr: float | None = None,
    batch_size: int = 16,
    seed: int = 0,
    max_len: int | None = None,
    device: str | torch.device | None = None,
    subword: str = "first",
    word_prefix: str = " ",
    entity_f1: bool | None = None,
    eval_batch_size: int = 64,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
) -> TaggingResult:
    """Fine-tune a linear tagging head (and, with ``mode="full"``, a copy of the backbone); score the test set.

    Each sentence is tokenised word by word (see [`align_subwords`][picomaml.eval.tagging.align_subwords]);
    the head maps the hidden state ``(D,)`` of each word's labelled subword to one logit per training tag and
    is trained with cross-entropy by AdamW at a constant learning rate.

    Args:
        backbone: A PicoDecoder, a ``transformers`` model or any module
            [`backbone_hidden`][picomaml.meta.backbone.backbone_hidden] reads hidden states ``(B, L, D)`` from.
            Never modified.
        tokenizer: Anything with ``encode(text) -> list[int]``; its ``pad_token_id`` (else ``eos_token_id``,
            else 0) pads batches.
        train: Training sentences; their tags make the tag set (at least two tags).
        test: Test sentences; a tag not in the tag set can never be predicted (logged as a warning).
        mode: ``"head"`` (frozen backbone, features computed once) or ``"full"`` (everything trains).
        epochs: Passes over ``train``.
        lr: AdamW learning rate (default 1e-3 for ``"head"``, 1e-4 for ``"full"``).
        batch_size: Sentences per step.
        seed: Seeds the batch order.
        max_len: Most subwords per sentence (at most the model's positions; ``None``: the model's positions,
            or 512 when its config does not say).
        device: Where to train (default: the backbone's device; another device gets a copy of the backbone).
        subword: ``"first"`` or ``"last"`` subword of a word carries its label.
        word_prefix: Text put before each word that follows a space (see
            [`align_subwords`][picomaml.eval.tagging.align_subwords]).
        entity_f1: Compute entity scores: ``None`` when every tag is BIO, ``True`` always (falls back to token
            metrics with a warning when the tags are not BIO), ``False`` never.
        eval_batch_size: Sentences per forward when no gradient is needed.
        weight_decay: AdamW weight decay.
        max_grad_norm: Gradient-norm clip per step (``None``: no clipping).

    Returns:
        [`TaggingResult`][picomaml.eval.finetune_result.TaggingResult].

    Raises:
        ValueError: An unknown ``mode`` or ``subword``, a bad number (the message names it), empty data, a
            training set with fewer than two tags, ``max_len`` beyond the model's positions, or token ids
            outside the model's vocabulary.
        TypeError: ``train``/``test`` items that are not [`TaggedSentence`][picomaml.data.labelled.TaggedSentence].
    """
    lr, max_len = check_common(
        backbone, tokenizer, mode, epochs, lr, batch_size, seed, max_len, eval_batch_size, weight_decay, max_grad_norm
    )  # fmt: skip
    check_examples("train", train, TaggedSentence)
    check_examples("test", test, TaggedSentence)
    for name, data in (("train", train), ("test", test)):
        empty = next((i for i, s in enumerate(data) if not s.tokens), None)
        if empty is not None:
            raise ValueError(f"{name}: sentence {empty} has no words")
    counts = Counter(t for s in train for t in s.tags)
    tags = tuple(sorted(counts))
    if len(tags) < 2:
        raise ValueError(f"train: every word has the tag {tags[0]!r}; tagging needs at least two tags")
    unseen = sorted({t for s in test for t in s.tags} - set(tags))
    if unseen:
        logger.warning("test tags %s never occur in train: the head cannot predict them", unseen[:10])
    all_bio = is_bio([*tags, *unseen])
    use_entities = all_bio if entity_f1 is None else bool(entity_f1)
    if use_entities and not all_bio:
        warnings.warn(
            "entity_f1: the tags are not BIO (O, B-X, I-X); reporting token metrics only", stacklevel=2
        )
        use_entities = False
    index = {t: i for i, t in enumerate(tags)}

    def encode(data: Sequence[TaggedSentence], with_targets: bool) -> tuple[Encoded, list[list[int]]]:
        ids, positions, targets, word_pos = [], [], [], []
        for s in data:
            label_ids = [index.get(t, -1) for t in s.tags]
            a = align_subwords(
                s.tokens, tokenizer, max_len=max_len, subword=subword, space_after=s.space_after,
                word_prefix=word_prefix,
            )  # fmt: skip
            scored = [w for w, p in enumerate(a.positions) if p >= 0]
            ids.append(a.ids)
            positions.append([a.positions[w] for w in scored])
            targets += [label_ids[w] for w in scored] if with_targets else []
            word_pos.append(a.positions)
        return make_encoded(ids, positions, targets), word_pos

    train_enc, _ = encode(train, True)
    test_enc, test_pos = encode(test, False)
    check_vocab(backbone, [train_enc, test_enc])
    pred, loss = fit_predict(
        backbone, train_enc, test_enc, len(tags), mode=mode, epochs=epochs, lr=lr, batch_size=batch_size,
        eval_batch_size=eval_batch_size, seed=seed, device=resolve_device(backbone, device), pad_id=pad_id_of(tokenizer),
        pooling="mean", weight_decay=weight_decay, max_grad_norm=max_grad_norm,
    )  # fmt: skip
    fallback = "O" if "O" in index else counts.most_common(1)[0][0]
    it = iter(pred.tolist())
    predictions = [[tags[next(it)] if p >= 0 else fallback for p in pos] for pos in test_pos]
    unscored = sum(p < 0 for pos in test_pos for p in pos)
    if unscored:
        logger.warning("%d test words were cut off by max_len=%d or tokenise to nothing; predicted %r", unscored,
                       max_len, fallback)  # fmt: skip
    gold = [s.tags for s in test]
    ents = entity_scores(gold, predictions) if use_entities else None
    return TaggingResult(
        mode=mode, seed=seed, token_accuracy=token_accuracy(gold, predictions), macro_f1=macro_f1(gold, predictions),
        entity_precision=ents.precision if ents else None, entity_recall=ents.recall if ents else None,
        entity_f1=ents.f1 if ents else None, tags=tags, n_train=len(train), n_test=len(test),
        n_test_words=sum(map(len, gold)), n_unscored_words=unscored, train_loss=loss, predictions=predictions,
    )  # fmt: skip


def _k_shot(
    train: Sequence[LabelledText], k: int | None, labels: tuple[str, ...], gen: torch.Generator
) -> list[int]:
    """Indices of ``k`` examples of each label (all examples when ``k`` is None), drawn with ``gen``."""
    by_label: dict[str, list[int]] = {y: [] for y in labels}
    for i, x in enumerate(train):
        by_label[x.label].append(i)
    if k is None:
        return list(range(len(train)))
    smallest = min(labels, key=lambda y: len(by_label[y]))
    if k > len(by_label[smallest]):
        raise ValueError(
            f"k_per_class: {k} is larger than the smallest class of train, {smallest!r} with "
            f"{len(by_label[smallest])} examples"
        )
    return [
        by_label[y][j] for y in labels for j in torch.randperm(len(by_label[y]), generator=gen)[:k].tolist()
    ]


def finetune_classifier(
    backbone: nn.Module,
    tokenizer: Any,
    train: Sequence[LabelledText],
    test: Sequence[LabelledText],
    *,
    k_per_class: int | None = None,
    mode: str = "head",
    epochs: int = 10,
    lr: float | None = None,
    batch_size: int = 16,
    seed: int = 0,
    max_len: int | None = None,
    device: str | torch.device | None = None,
    pooling: str = "mean",
    eval_batch_size: int = 64,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
) -> ClassificationResult:
    """Fine-tune a linear classifier on ``k_per_class`` examples of each label; score the whole test set.

    Each text is tokenised (truncated to ``max_len``), run through the backbone and pooled to one vector
    ``(D,)`` ([`pool_features`][picomaml.meta.features.pool_features] over its real tokens); the head maps it
    to one logit per training label.

    Args:
        backbone: The backbone (see [`finetune_tagger`][picomaml.eval.finetune.finetune_tagger]); never modified.
        tokenizer: Anything with ``encode(text) -> list[int]``.
        train: The labelled pool the k-shot sample is drawn from (at least two labels).
        test: Test examples; a label not among the training labels can never be predicted.
        k_per_class: Examples drawn per label with the seeded generator; ``None`` uses all of ``train``.
        mode: ``"head"`` (frozen backbone) or ``"full"`` (everything trains, on a copy).
        epochs: Passes over the sample.
        lr: AdamW learning rate (default 1e-3 for ``"head"``, 1e-4 for ``"full"``).
        batch_size: Texts per step.
        seed: Seeds the k-shot sample and the batch order.
        max_len: Most tokens per text (``None``: the model's positions, or 512 when its config does not say).
        device: Where to train (default: the backbone's device).
        pooling: ``"mean"`` over the real tokens or the ``"last"`` real token (which has seen the whole text in a
            causal decoder).
        eval_batch_size: Texts per forward when no gradient is needed.
        weight_decay: AdamW weight decay.
        max_grad_norm: Gradient-norm clip per step (``None``: no clipping).

    Returns:
        [`ClassificationResult`][picomaml.eval.finetune_result.ClassificationResult].

    Raises:
        ValueError: An unknown ``mode`` or ``pooling``, a bad number (named), empty data, fewer than two training
            labels, ``k_per_class`` larger than the smallest class, a text that tokenises to nothing, or token ids
            outside the model's vocabulary.
    """
    lr, max_len = check_common(
        backbone, tokenizer, mode, epochs, lr, batch_size, seed, max_len, eval_batch_size, weight_decay, max_grad_norm
    )  # fmt: skip
    if pooling not in ("mean", "last"):
        raise ValueError(f"pooling: must be 'mean' or 'last' for texts, got {pooling!r}")
    if k_per_class is not None:
        check_int("k_per_class", k_per_class, ge=1)
    check_examples("train", train, LabelledText)
    check_examples("test", test, LabelledText)
    labels = tuple(sorted({x.label for x in train}))
    if len(labels) < 2:
        raise ValueError(
            f"train: every example has the label {labels[0]!r}; classification needs at least two"
        )
    unseen = sorted({x.label for x in test} - set(labels))
    if unseen:
        logger.warning("test labels %s never occur in train: the head cannot predict them", unseen[:10])
    chosen = _k_shot(train, k_per_class, labels, torch.Generator().manual_seed(seed))
    index = {y: i for i, y in enumerate(labels)}

    def encode(name: str, data: Sequence[LabelledText], with_targets: bool) -> Encoded:
        ids = []
        for i, x in enumerate(data):
            toks = [int(t) for t in tokenizer.encode(x.text)][:max_len]
            if not toks:
                raise ValueError(f"{name}: example {i} ({x.text!r:.40}) tokenises to nothing")
            ids.append(toks)
        return make_encoded(ids, None, [index[x.label] for x in data] if with_targets else [])

    train_enc = encode("train", [train[i] for i in chosen], True)
    test_enc = encode("test", test, False)
    check_vocab(backbone, [train_enc, test_enc])
    # the same seed drives the sample above and, through a fresh generator, the batch order
    pred, loss = fit_predict(
        backbone, train_enc, test_enc, len(labels), mode=mode, epochs=epochs, lr=lr, batch_size=batch_size,
        eval_batch_size=eval_batch_size, seed=seed, device=resolve_device(backbone, device), pad_id=pad_id_of(tokenizer),
        pooling=pooling, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
    )  # fmt: skip
    predictions = [labels[i] for i in pred.tolist()]
    gold = [x.label for x in test]
    return ClassificationResult(
        mode=mode, seed=seed, k_per_class=k_per_class,
        accuracy=sum(g == p for g, p in zip(gold, predictions, strict=True)) / len(gold),
        macro_f1=macro_f1(gold, predictions), labels=labels, n_train=len(chosen), n_test=len(test),
        train_loss=loss, predictions=predictions,
    )  # fmt: skip


def finetune_eval(
    backbone: nn.Module,
    tokenizer: Any,
    train: Sequence[TaggedSentence] | Sequence[LabelledText],
    test: Sequence[TaggedSentence] | Sequence[LabelledText],
    *,
    seeds: Sequence[int] = (0, 1, 2),
    confidence: float = 0.95,
    **kwargs: Any,
) -> FinetuneSummary:
    """Fine-tune once per seed and report each metric's mean with a confidence interval over the seeds.

    The task follows the data: [`TaggedSentence`][picomaml.data.labelled.TaggedSentence] items run
    [`finetune_tagger`][picomaml.eval.finetune.finetune_tagger],
    [`LabelledText`][picomaml.data.labelled.LabelledText] items run
    [`finetune_classifier`][picomaml.eval.finetune.finetune_classifier] (where the seed also draws the k-shot
    sample, as in the papers' k-shot evaluations).

    Args:
        backbone: The backbone; never modified.
        tokenizer: Anything with ``encode(text) -> list[int]``.
        train: Training data of either kind.
        test: Test data of the same kind.
        seeds: Distinct fine-tuning seeds, at least one (intervals need two).
        confidence: Coverage of the intervals (Student t over seeds, see
            [`mean_ci`][picomaml.eval.stats.mean_ci]).
        **kwargs: Passed to the fine-tuning function (``mode``, ``epochs``, ``lr``, ``k_per_class``, ...).

    Returns:
        [`FinetuneSummary`][picomaml.eval.finetune_result.FinetuneSummary].
    """
    if "seed" in kwargs:
        raise ValueError("seed: finetune_eval runs one fine-tune per seed; pass seeds=[...]")
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not seeds:
        raise ValueError(f"seeds: must be a non-empty list of integers, got {seeds!r}")
    for s in seeds:
        check_int("seeds", s, ge=0)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: must be distinct (a repeated seed repeats the same run), got {list(seeds)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: must be in (0, 1), got {confidence!r}")
    if isinstance(train, Sequence) and train and isinstance(train[0], TaggedSentence):
        task, run = "tagging", finetune_tagger
    elif isinstance(train, Sequence) and train and isinstance(train[0], LabelledText):
        task, run = "classification", finetune_classifier
    else:
        raise ValueError(
            "train: must be a non-empty list of TaggedSentence (tagging) or LabelledText (classification)"
        )
    runs = tuple(run(backbone, tokenizer, train, test, seed=int(s), **kwargs) for s in seeds)
    metrics = {name: mean_ci([r.metrics()[name] for r in runs], confidence) for name in runs[0].metrics()}
    summary = FinetuneSummary(task, runs[0].mode, tuple(int(s) for s in seeds), confidence, metrics, runs)
    logger.info("%s", summary.format())
    return summary
