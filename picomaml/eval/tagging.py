"""Token tagging pieces: word-to-subword alignment and the metrics the papers report.

**Alignment.** [`align_subwords`][picomaml.eval.tagging.align_subwords] tokenises a sentence word by word, so
every subword belongs to exactly one word, and labels one subword per word (the first, by default; the
others get ``-100``, the index ``cross_entropy`` ignores).

**Metrics** over word-level tag sequences (lists of strings, one list per sentence):

- [`token_accuracy`][picomaml.eval.tagging.token_accuracy]: the fraction of words tagged right;
- [`macro_f1`][picomaml.eval.tagging.macro_f1]: the F1 of each tag (one-vs-rest), averaged over the tags that
  occur in the gold or the predicted sequences (as scikit-learn's ``f1_score(average="macro")``);
- [`entity_scores`][picomaml.eval.tagging.entity_scores]: entity-level (chunk) precision, recall and F1 of
  BIO / IOB tags with the semantics of the CoNLL ``conlleval`` script (and ``seqeval``'s default mode): a
  chunk starts at ``B-X``, and at ``I-X`` after ``O`` or after a tag of another type; it continues over
  following ``I-X``; a predicted chunk counts when its type, start and end equal a gold chunk's.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "IGNORE_INDEX",
    "AlignedSentence",
    "EntityScores",
    "align_subwords",
    "entity_chunks",
    "entity_scores",
    "is_bio",
    "macro_f1",
    "token_accuracy",
]

IGNORE_INDEX = -100  # the label of subwords that are not scored (cross_entropy's default ignore_index)
_BIO = re.compile(r"^[BI]-.+$")
SUBWORDS = ("first", "last")


def is_bio(tags: Sequence[str]) -> bool:
    """True when every tag is ``O``, ``B-<type>`` or ``I-<type>`` (IOB1 and IOB2 alike)."""
    return all(t == "O" or _BIO.match(t) is not None for t in tags)


def entity_chunks(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The entity chunks of one sentence's BIO tags, ``conlleval`` semantics.

    Args:
        tags: One tag per word: ``O``, ``B-<type>`` or ``I-<type>``.

    Returns:
        ``(type, start, end)`` of each chunk, ``end`` inclusive, in order.

    Raises:
        ValueError: A tag that is not BIO.
    """
    chunks: list[tuple[str, int, int]] = []
    open_type: str | None = None  # the type of the chunk that runs up to the previous word
    start = 0
    for i, tag in enumerate(tags):
        if tag != "O" and _BIO.match(tag) is None:
            raise ValueError(f"tags: {tag!r} at position {i} is not a BIO tag (O, B-<type> or I-<type>)")
        prefix, kind = (tag[0], tag[2:]) if tag != "O" else ("O", None)
        # an I- tag continues only a chunk of its own type; B- and O always close the open chunk
        if open_type is not None and (prefix != "I" or kind != open_type):
            chunks.append((open_type, start, i - 1))
            open_type = None
        if prefix != "O" and open_type is None:
            open_type, start = kind, i
    if open_type is not None:
        chunks.append((open_type, start, len(tags) - 1))
    return chunks


@dataclass(frozen=True)
class EntityScores:
    """Entity-level (chunk) scores, micro-averaged over all chunks of all sentences.

    Attributes:
        precision: Correct predicted chunks / predicted chunks (0 when nothing was predicted).
        recall: Correct predicted chunks / gold chunks (0 when there is no gold chunk).
        f1: Their harmonic mean (0 when both are 0).
        n_gold: Gold chunks.
        n_pred: Predicted chunks.
        n_correct: Predicted chunks equal to a gold chunk.
        per_type: ``type -> (precision, recall, f1)`` for every type among the gold and predicted chunks.
    """

    precision: float
    recall: float
    f1: float
    n_gold: int
    n_pred: int
    n_correct: int
    per_type: dict[str, tuple[float, float, float]]


def _prf(correct: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    p = correct / n_pred if n_pred else 0.0
    r = correct / n_gold if n_gold else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def _check_pairs(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> None:
    if len(gold) != len(pred):
        raise ValueError(f"pred: {len(pred)} sentences for {len(gold)} gold sentences")
    for i, (g, p) in enumerate(zip(gold, pred, strict=True)):
        if len(g) != len(p):
            raise ValueError(f"pred: sentence {i} has {len(p)} tags for {len(g)} gold tags")


def entity_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> EntityScores:
    """Entity precision, recall and F1 of predicted BIO tags against gold ones.

    Args:
        gold: Gold tags, one list per sentence.
        pred: Predicted tags, the same lengths. Chunks never cross sentences.

    Returns:
        [`EntityScores`][picomaml.eval.tagging.EntityScores].

    Raises:
        ValueError: Lengths that differ, or a tag that is not BIO (see
            [`is_bio`][picomaml.eval.tagging.is_bio]).
    """
    _check_pairs(gold, pred)
    gold_set = {(i, *c) for i, tags in enumerate(gold) for c in entity_chunks(tags)}
    pred_set = {(i, *c) for i, tags in enumerate(pred) for c in entity_chunks(tags)}
    hits = gold_set & pred_set
    per_type = {}
    for kind in sorted({c[1] for c in gold_set | pred_set}):
        n_g = sum(c[1] == kind for c in gold_set)
        n_p = sum(c[1] == kind for c in pred_set)
        per_type[kind] = _prf(sum(c[1] == kind for c in hits), n_p, n_g)
    p, r, f = _prf(len(hits), len(pred_set), len(gold_set))
    return EntityScores(p, r, f, len(gold_set), len(pred_set), len(hits), per_type)


def token_accuracy(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> float:
    """Fraction of words whose predicted tag equals the gold tag (NaN when there are no words)."""
    _check_pairs(gold, pred)
    n = sum(len(g) for g in gold)
    right = sum(a == b for g, p in zip(gold, pred, strict=True) for a, b in zip(g, p, strict=True))
    return right / n if n else math.nan


def macro_f1(
    gold: Sequence[Sequence[str]] | Sequence[str], pred: Sequence[Sequence[str]] | Sequence[str]
) -> float:
    """Per-tag F1 averaged over the tags found in ``gold`` or ``pred``.

    A tag that is predicted but never gold has F1 0 (so do gold tags never predicted), as in scikit-learn's
    ``f1_score(average="macro", zero_division=0)``.

    Args:
        gold: Gold labels: one list per sentence, or one flat list (sentence classification).
        pred: Predicted labels, the same shape.

    Returns:
        The macro F1 (NaN when there are no labels).
    """
    nested = bool(gold) and not isinstance(gold[0], str)
    if nested:
        _check_pairs(gold, pred)  # type: ignore[arg-type]
        flat_g = [t for s in gold for t in s]
        flat_p = [t for s in pred for t in s]
    else:
        if len(gold) != len(pred):
            raise ValueError(f"pred: {len(pred)} labels for {len(gold)} gold labels")
        flat_g, flat_p = list(gold), list(pred)
    if not flat_g:
        return math.nan
    n_gold, n_pred = Counter(flat_g), Counter(flat_p)
    n_hit = Counter(g for g, p in zip(flat_g, flat_p, strict=True) if g == p)
    labels = set(n_gold) | set(n_pred)
    return sum(_prf(n_hit[t], n_pred[t], n_gold[t])[2] for t in labels) / len(labels)


class AlignedSentence(NamedTuple):
    """A sentence tokenised word by word.

    Attributes:
        ids: The subword ids, at most ``max_len``.
        labels: One per id: the word's label id at its labelled subword, ``IGNORE_INDEX`` (-100) elsewhere.
        positions: One per word: the index in ``ids`` of its labelled subword, or -1 when the word was cut off
            by ``max_len`` or tokenises to nothing (the word is then not scored by the model).
    """

    ids: list[int]
    labels: list[int]
    positions: list[int]


def align_subwords(
    words: Sequence[str],
    tokenizer: Any,
    *,
    max_len: int,
    label_ids: Sequence[int] | None = None,
    subword: str = "first",
    space_after: Sequence[bool] | None = None,
    word_prefix: str = " ",
) -> AlignedSentence:
    """Tokenise ``words`` one by one and label one subword of each.

    Each word is encoded on its own, preceded by ``word_prefix`` when a space precedes it in the running
    text (every word but the first, unless ``space_after`` says otherwise), so a byte-level BPE sees the
    ``" word"`` it sees in running text. Causal decoders should keep ``subword="first"`` for
    comparability with the papers; ``"last"`` labels the last subword, whose state has seen the whole word.

    Args:
        words: The sentence's words.
        tokenizer: Anything with ``encode(text) -> list[int]`` (a
            [`TokenizerWrapper`][picomaml.data.tokenizer.TokenizerWrapper]).
        max_len: Most subwords kept; the rest (and the words they belong to) are cut off.
        label_ids: One label id per word (``None``: every scored position gets label 0).
        subword: ``"first"`` or ``"last"``: which subword of a word carries its label.
        space_after: Whether a space follows each word (CoNLL-U's ``SpaceAfter``); ``None``: always.
        word_prefix: Text put before a word that follows a space (``""`` for tokenizers that mark word starts
            themselves, such as SentencePiece ones).

    Returns:
        [`AlignedSentence`][picomaml.eval.tagging.AlignedSentence] ``(ids, labels, positions)``.
    """
    if subword not in SUBWORDS:
        raise ValueError(f"subword: must be one of {list(SUBWORDS)}, got {subword!r}")
    if label_ids is not None and len(label_ids) != len(words):
        raise ValueError(f"label_ids: {len(label_ids)} labels for {len(words)} words")
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for i, word in enumerate(words):
        spaced = i > 0 and (space_after is None or space_after[i - 1])
        pieces = [int(t) for t in tokenizer.encode((word_prefix if spaced else "") + word)]
        room = max_len - len(ids)
        at = len(ids) + (0 if subword == "first" else len(pieces) - 1)
        if not pieces or at >= max_len:
            positions.append(-1)
        else:
            positions.append(at)
        ids.extend(pieces[: max(room, 0)])
        labels.extend([IGNORE_INDEX] * min(len(pieces), max(room, 0)))
        if positions[-1] >= 0:
            labels[at] = label_ids[i] if label_ids is not None else 0
        if len(ids) >= max_len:  # the remaining words are cut off: no need to encode them
            positions.extend([-1] * (len(words) - i - 1))
            break
    return AlignedSentence(ids, labels, positions)
