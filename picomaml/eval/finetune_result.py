"""The results of the fine-tuning evaluations of [`picomaml.eval.finetune`][picomaml.eval.finetune]: one
[`TaggingResult`][picomaml.eval.finetune_result.TaggingResult] or
[`ClassificationResult`][picomaml.eval.finetune_result.ClassificationResult] per fine-tune, and a
[`FinetuneSummary`][picomaml.eval.finetune_result.FinetuneSummary] of several seeds.
``picomaml.eval.finetune`` re-exports the three names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TaggingResult", "ClassificationResult", "FinetuneSummary"]


def _keyed(values: dict[str, float | None], prefix: str) -> dict[str, float]:
    return {(f"{prefix}/{k}" if prefix else k): v for k, v in values.items() if v is not None}


@dataclass(frozen=True)
class TaggingResult:
    """The test scores of one tagging fine-tune.

    Attributes:
        mode: ``"head"`` or ``"full"``.
        seed: The fine-tuning seed.
        token_accuracy: Fraction of test words tagged right.
        macro_f1: Per-tag F1 averaged over the tags of the gold and predicted test tags.
        entity_precision, entity_recall, entity_f1: Entity-level (BIO chunk) scores; ``None`` when the tags are
            not BIO or ``entity_f1=False``.
        tags: The tag set (the training tags, sorted); the head has one output per tag.
        n_train, n_test: Sentences.
        n_test_words: Words in the test set (every one is scored).
        n_unscored_words: Test words the model never saw (cut off by ``max_len`` or tokenising to nothing); they
            are predicted as ``O`` (or the most frequent training tag) and counted in every metric.
        train_loss: Mean training loss of the last epoch.
        predictions: The predicted tags, one list per test sentence.
    """

    mode: str
    seed: int
    token_accuracy: float
    macro_f1: float
    entity_precision: float | None
    entity_recall: float | None
    entity_f1: float | None
    tags: tuple[str, ...]
    n_train: int
    n_test: int
    n_test_words: int
    n_unscored_words: int
    train_loss: float
    predictions: list[list[str]] = field(repr=False, default_factory=list)

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """The scores by name (``prefix/name`` with a prefix); entity scores only when computed."""
        names = ("token_accuracy", "macro_f1", "entity_precision", "entity_recall", "entity_f1")
        return _keyed({n: getattr(self, n) for n in names}, prefix)


@dataclass(frozen=True)
class ClassificationResult:
    """The test scores of one sentence-classification fine-tune.

    Attributes:
        mode: ``"head"`` or ``"full"``.
        seed: The seed of the k-shot sample and of the fine-tuning.
        k_per_class: Training examples per class (``None``: all of them).
        accuracy: Fraction of test texts classified right.
        macro_f1: Per-label F1 averaged over the labels of the gold and predicted test labels.
        labels: The label set (the training labels, sorted).
        n_train: Training examples used; n_test: test examples.
        train_loss: Mean training loss of the last epoch.
        predictions: The predicted label of each test text.
    """

    mode: str
    seed: int
    k_per_class: int | None
    accuracy: float
    macro_f1: float
    labels: tuple[str, ...]
    n_train: int
    n_test: int
    train_loss: float
    predictions: list[str] = field(repr=False, default_factory=list)

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """The scores by name (``prefix/name`` with a prefix)."""
        return _keyed({"accuracy": self.accuracy, "macro_f1": self.macro_f1}, prefix)


@dataclass(frozen=True)
class FinetuneSummary:
    """Fine-tuning scores over several seeds.

    Attributes:
        task: ``"tagging"`` or ``"classification"``.
        mode: ``"head"`` or ``"full"``.
        seeds: The fine-tuning seeds, in run order.
        confidence: Coverage of the intervals.
        metrics: ``name -> (mean, half-width)`` over the seeds (Student t; the half-width is NaN for one seed).
        runs: The result of each seed.
    """

    task: str
    mode: str
    seeds: tuple[int, ...]
    confidence: float
    metrics: dict[str, tuple[float, float]]
    runs: tuple[TaggingResult | ClassificationResult, ...] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the settings, ``{name: {"mean", "ci"}}`` (``ci`` None for one seed, as strict JSON
        has no NaN) and each run's scores."""
        return {
            "task": self.task, "mode": self.mode, "seeds": list(self.seeds), "confidence": self.confidence,
            "metrics": {k: {"mean": m, "ci": None if math.isnan(h) else h} for k, (m, h) in self.metrics.items()},
            "runs": [{"seed": r.seed, **r.metrics()} for r in self.runs],
        }  # fmt: skip

    def format(self) -> str:
        """One line per metric: ``entity_f1  0.8123 ± 0.0150``."""
        width = max(map(len, self.metrics), default=0)
        head = f"{self.task} ({self.mode}), {len(self.seeds)} seeds, {self.confidence:.0%} CI"
        return "\n".join([head] + [f"{k:<{width}}  {m:.4f} ± {h:.4f}" for k, (m, h) in self.metrics.items()])
