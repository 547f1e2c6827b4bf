"""Few-shot text classification data: the SMLMT/LEOPARD file format and N-way K-shot token episodes.

**Files.** One file per split, either JSON lines (``.jsonl``: one object per line, blank lines skipped) or
a ``.json`` file holding a JSON array of objects (the layout of the original LEOPARD release). Each
object has

* ``sentence1``: a non-empty string (required);
* ``sentence2``: a string (optional; sentence-pair tasks; ``null`` is the same as absent);
* ``label``: a string or an integer (required; integers are read as their decimal text).

Other keys are ignored. File names follow ``<task>_train_<k>_<seed>.jsonl`` for the k-shot training
splits and ``<task>_<split>.jsonl`` (``eval``/``test``/``dev``) otherwise;
[`parse_leopard_name`][picomaml.eval.leopard.parse_leopard_name] reads them. The original release writes
``<task>_train_<seed>_<k>.json``: when exactly one of the two numbers equals the per-label count of the file,
that one is taken as ``k`` (see [`load_leopard_file`][picomaml.eval.leopard.load_leopard_file]).

**Episodes.** [`to_episodes`][picomaml.eval.leopard.to_episodes] tokenizes each example (``sentence1``, then
EOS and ``sentence2`` for a pair), truncates to ``window_len`` tokens and right-pads with the tokenizer's pad
id. Each episode picks ``n_way`` labels uniformly among those with enough examples, gives them task-local
labels ``[0, N)`` by a fresh random permutation, and draws ``k_shot`` support and ``n_query`` query examples
per label without replacement (from ``query_dataset`` when one is given, e.g. the ``eval`` file beside a
``train_<k>`` file). All random choices use one seeded ``torch.Generator``. The result is a
[`TextEpisode`][picomaml.eval.leopard.TextEpisode], whose fields mean what they mean on
[`picomaml.Episode`][picomaml.meta.episode.Episode] (``*_valid`` marks the real tokens, ``*_mask`` the masked
class tokens, of which text has none, and ``class_ids`` the dataset label of each task-local label).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from picomaml.params import check_int

__all__ = [
    "LeopardFormatError",
    "FewShotDataset",
    "TextEpisode",
    "load_leopard_file",
    "parse_leopard_name",
    "tokenize_examples",
    "to_episodes",
]

_NAME = re.compile(r"^(?P<task>.+?)_(?P<split>train|eval|test|dev)(?:_(?P<a>\d+)_(?P<b>\d+))?\.jsonl?$")


class LeopardFormatError(ValueError):
    """A few-shot data file is malformed; the message names the file, the line and the field."""


@dataclasses.dataclass
class FewShotDataset:
    """Labelled texts for few-shot classification.

    Attributes:
        texts: The examples (``sentence1``).
        labels: Index of each example's label in ``label_names``.
        label_names: Distinct label names, sorted.
        text_pairs: ``sentence2`` of each example (``None`` where absent), or ``None`` for single texts.
        task: Task name (from the file name), if known.
        split: ``"train"``, ``"eval"``, ... (from the file name), if known.
        k_shot: ``k`` of a ``train_<k>_<seed>`` file, if known.
        seed: The split's seed, if known.
        source: Where the data came from (a path), for messages.
    """

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    text_pairs: list[str | None] | None = None
    task: str | None = None
    split: str | None = None
    k_shot: int | None = None
    seed: int | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.texts):
            raise ValueError(f"labels: {len(self.labels)} labels for {len(self.texts)} texts")
        if self.text_pairs is not None and len(self.text_pairs) != len(self.texts):
            raise ValueError(f"text_pairs: {len(self.text_pairs)} pairs for {len(self.texts)} texts")
        bad = [y for y in self.labels if not 0 <= y < len(self.label_names)]
        if bad:
            raise ValueError(f"labels: {bad[:5]} out of range [0, {len(self.label_names)})")

    def __len__(self) -> int:
        return len(self.texts)

    def counts(self) -> list[int]:
        """Number of examples of each label, in ``label_names`` order."""
        out = [0] * len(self.label_names)
        for y in self.labels:
            out[y] += 1
        return out


@dataclasses.dataclass
class TextEpisode:
    """One N-way K-shot text task (or ``T`` stacked along a leading dimension), label-major like
    [`picomaml.Episode`][picomaml.meta.episode.Episode].

    Its fields mean what the fields of the same name mean on
    [`picomaml.Episode`][picomaml.meta.episode.Episode] (the names in `picomaml.meta.episode.COMMON_FIELDS`),
    so one featuriser ([`picomaml.meta.objectives.episode_features`][picomaml.meta.features.episode_features])
    and one display ([`picomaml.format_episode`][picomaml.data.display.format_episode]) serve both. A text
    window masks no class token and may end in padding; an SMLMT window is the other way round.

    Attributes:
        support_ids: ``([T,] N*K, W)`` long token ids, right-padded with the pad id.
        support_labels: ``([T,] N*K,)`` long in ``[0, N)``; row ``i`` has label ``i // K``.
        support_mask: ``([T,] N*K, W)`` bool, True where a class token was masked: all False (text
            examples keep all their tokens).
        query_ids: ``([T,] N*Q, W)``, as ``support_ids`` for the query rows.
        query_labels: ``([T,] N*Q,)``; row ``j`` has label ``j // Q``.
        query_mask: ``([T,] N*Q, W)`` bool, all False.
        class_ids: ``([T,] N)`` long, what each task-local label stands for in the source: here the index
            of the dataset label (into `FewShotDataset.label_names`); on an
            [`Episode`][picomaml.meta.episode.Episode] the class token id.
        support_valid: ``([T,] N*K, W)`` bool, True at real (non-pad) tokens, a prefix of each row.
        query_valid: ``([T,] N*Q, W)`` bool, as ``support_valid``.
    """

    support_ids: Tensor
    support_labels: Tensor
    support_mask: Tensor
    query_ids: Tensor
    query_labels: Tensor
    query_mask: Tensor
    class_ids: Tensor
    support_valid: Tensor
    query_valid: Tensor

    @property
    def padded(self) -> bool:
        """True: rows may end in padding, so poolings read `support_valid` / `query_valid`."""
        return True

    def slice(self, start: int, stop: int) -> TextEpisode:
        """Tasks ``start:stop`` of a stacked episode (views, no copies)."""
        return TextEpisode(*(getattr(self, f.name)[start:stop] for f in dataclasses.fields(self)))


def parse_leopard_name(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"task", "split", "numbers"}`` from ``<task>_<split>[_<a>_<b>].jsonl`` (``numbers`` may be ``()``).

    Raises:
        LeopardFormatError: the name does not follow the pattern.
    """
    name = Path(path).name
    m = _NAME.match(name)
    if m is None:
        raise LeopardFormatError(
            f"{path}: file name {name!r} does not match <task>_<train|eval|test|dev>[_<k>_<seed>].jsonl (or .json)"
        )
    numbers = (int(m["a"]), int(m["b"])) if m["a"] is not None else ()
    return {"task": m["task"], "split": m["split"], "numbers": numbers}


def _records(path: Path) -> list[tuple[int, Any]]:
    """``(line number, parsed object)`` of a JSON-lines file or of a JSON array (line numbers 1-based;
    for an array, the element index + 1)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LeopardFormatError(f"{path}: not UTF-8 text ({exc})") from exc
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LeopardFormatError(f"{path}: line {exc.lineno}: invalid JSON ({exc.msg})") from exc
        return [(i + 1, obj) for i, obj in enumerate(data)]
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise LeopardFormatError(f"{path}: line {lineno}: invalid JSON ({exc.msg})") from exc
    return out


def load_leopard_file(path: str | os.PathLike[str], *, strict_name: bool = False) -> FewShotDataset:
    """Read one few-shot split (see the module docstring for the format).

    Args:
        path: A ``.jsonl`` or ``.json`` file.
        strict_name: Require the file name to follow
            [`parse_leopard_name`][picomaml.eval.leopard.parse_leopard_name] (otherwise task, split, k and
            seed are simply left unknown when it does not).

    Returns:
        A [`FewShotDataset`][picomaml.eval.leopard.FewShotDataset] whose ``k_shot``/``seed`` come from the
        name of a ``train_<a>_<b>`` file: the number equal to the per-label count of the file is ``k`` (when
        exactly one is), else ``a``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        LeopardFormatError: invalid JSON, a record that is not an object, a missing or empty
            ``sentence1``, a ``sentence2`` that is not a string, a missing label or one that is not a
            string or integer, or no records at all. The message names the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"few-shot data file {str(path)!r} does not exist")
    try:
        meta: dict[str, Any] = parse_leopard_name(path)
    except LeopardFormatError:
        if strict_name:
            raise
        meta = {"task": None, "split": None, "numbers": ()}
    texts: list[str] = []
    pairs: list[str | None] = []
    raw_labels: list[str] = []
    for lineno, obj in _records(path):
        where = f"{path}: line {lineno}"
        if not isinstance(obj, dict):
            raise LeopardFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        s1 = obj.get("sentence1")
        if "sentence1" not in obj:
            raise LeopardFormatError(f"{where}: missing field 'sentence1' (keys: {sorted(obj)})")
        if not isinstance(s1, str) or not s1.strip():
            raise LeopardFormatError(f"{where}: field 'sentence1' must be a non-empty string, got {s1!r}")
        s2 = obj.get("sentence2")
        if s2 is not None and not isinstance(s2, str):
            raise LeopardFormatError(f"{where}: field 'sentence2' must be a string or absent, got {s2!r}")
        if "label" not in obj:
            raise LeopardFormatError(f"{where}: missing field 'label' (keys: {sorted(obj)})")
        label = obj["label"]
        if (
            isinstance(label, bool)
            or not isinstance(label, (str, int))
            or (isinstance(label, str) and not label)
        ):
            raise LeopardFormatError(
                f"{where}: field 'label' must be a non-empty string or an integer, got {label!r}"
            )
        texts.append(s1)
        pairs.append(s2)
        raw_labels.append(str(label))
    if not texts:
        raise LeopardFormatError(f"{path}: no records")
    names = sorted(set(raw_labels))
    index = {n: i for i, n in enumerate(names)}
    ds = FewShotDataset(
        texts=texts,
        labels=[index[y] for y in raw_labels],
        label_names=names,
        text_pairs=pairs if any(p is not None for p in pairs) else None,
        task=meta["task"],
        split=meta["split"],
        source=str(path),
    )
    numbers = meta["numbers"]
    if numbers:
        per_label = set(ds.counts())
        matches = [i for i, v in enumerate(numbers) if per_label == {v}]
        k_pos = matches[0] if len(matches) == 1 else 0
        ds.k_shot, ds.seed = numbers[k_pos], numbers[1 - k_pos]
    return ds


def tokenize_examples(dataset: FewShotDataset, tokenizer: Any, window_len: int) -> tuple[Tensor, Tensor]:
    """Token windows of every example: ``(ids (n, W) long, valid (n, W) bool)``.

    A pair is ``sentence1 + [EOS] + sentence2``. Windows are truncated to ``window_len`` and right-padded
    with ``tokenizer.pad_token_id`` (EOS, then 0, when it has none); ``valid`` is True at real tokens.
    """
    check_int("window_len", window_len, ge=1)
    pad = getattr(tokenizer, "pad_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = pad if pad is not None else (eos if eos is not None else 0)
    encoded = tokenizer.encode_batch(list(dataset.texts))
    if dataset.text_pairs is not None:
        sep = [eos] if eos is not None else []
        second = [tokenizer.encode(p) if p else [] for p in dataset.text_pairs]
        encoded = [
            a + sep + b if p else a for a, b, p in zip(encoded, second, dataset.text_pairs, strict=True)
        ]
    ids = torch.full((len(encoded), window_len), pad, dtype=torch.long)
    valid = torch.zeros((len(encoded), window_len), dtype=torch.bool)
    for i, toks in enumerate(encoded):
        toks = toks[:window_len]
        if not toks:
            raise ValueError(f"{dataset.source or 'dataset'}: example {i} tokenizes to nothing")
        ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        valid[i, : len(toks)] = True
    return ids, valid


def _by_label(labels: Sequence[int], n_labels: int) -> list[Tensor]:
    groups: list[list[int]] = [[] for _ in range(n_labels)]
    for i, y in enumerate(labels):
        groups[y].append(i)
    return [torch.tensor(g, dtype=torch.long) for g in groups]


def to_episodes(
    dataset: FewShotDataset,
    tokenizer: Any,
    *,
    n_way: int,
    k_shot: int,
    n_query: int,
    window_len: int,
    episodes: int,
    seed: int = 0,
    query_dataset: FewShotDataset | None = None,
    generator: torch.Generator | None = None,
) -> TextEpisode:
    """``episodes`` N-way K-shot text tasks, stacked: every tensor has a leading ``T = episodes`` dimension.

    Args:
        dataset: The labelled examples (the support pool; also the query pool without ``query_dataset``).
        tokenizer: Anything with ``encode``/``encode_batch`` and ``pad_token_id``/``eos_token_id`` (a
            [`picomaml.data.tokenizer.TokenizerWrapper`][picomaml.data.tokenizer.TokenizerWrapper]).
        n_way: Classes per episode (>= 2).
        k_shot: Support examples per class (>= 1).
        n_query: Query examples per class (>= 1).
        window_len: Tokens per window.
        episodes: Number of tasks ``T``.
        seed: Seed of the episode generator (ignored when ``generator`` is given).
        query_dataset: Draw the queries from here instead (labels matched by name), e.g. LEOPARD's eval file.
        generator: A ``torch.Generator`` to draw from (advanced in place).

    Raises:
        ValueError: fewer than ``n_way`` labels have ``k_shot`` (+ ``n_query``) examples; the message
            gives the per-label counts.
    """
    for name, value, low in (
        ("n_way", n_way, 2),
        ("k_shot", k_shot, 1),
        ("n_query", n_query, 1),
        ("episodes", episodes, 1),
    ):
        check_int(name, value, ge=low)
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    s_ids, s_valid = tokenize_examples(dataset, tokenizer, window_len)
    s_groups = _by_label(dataset.labels, len(dataset.label_names))
    if query_dataset is None:
        q_ids, q_valid, q_groups = s_ids, s_valid, s_groups
        need = [(g.numel() >= k_shot + n_query) for g in s_groups]
    else:
        q_ids, q_valid = tokenize_examples(query_dataset, tokenizer, window_len)
        q_index = {n: i for i, n in enumerate(query_dataset.label_names)}
        by_q = _by_label(query_dataset.labels, len(query_dataset.label_names))
        empty = torch.empty(0, dtype=torch.long)
        q_groups = [by_q[q_index[n]] if n in q_index else empty for n in dataset.label_names]
        need = [s.numel() >= k_shot and q.numel() >= n_query for s, q in zip(s_groups, q_groups, strict=True)]
    eligible = torch.tensor([i for i, ok in enumerate(need) if ok], dtype=torch.long)
    if eligible.numel() < n_way:
        counts = dict(zip(dataset.label_names, dataset.counts(), strict=True))
        raise ValueError(
            f"{dataset.source or 'dataset'}: {n_way}-way {k_shot}-shot episodes with {n_query} queries need "
            f"{n_way} labels with enough examples, only {eligible.numel()} have them; examples per label: {counts}"
        )
    out: dict[str, list[Tensor]] = {k: [] for k in ("si", "sv", "qi", "qv", "cls")}
    for _ in range(episodes):
        classes = eligible[torch.randperm(eligible.numel(), generator=gen)[:n_way]]  # position = task label
        s_rows, q_rows = [], []
        for c in classes.tolist():
            if query_dataset is None:
                pick = s_groups[c][torch.randperm(s_groups[c].numel(), generator=gen)[: k_shot + n_query]]
                s_rows.append(pick[:k_shot])
                q_rows.append(pick[k_shot:])
            else:
                s_rows.append(s_groups[c][torch.randperm(s_groups[c].numel(), generator=gen)[:k_shot]])
                q_rows.append(q_groups[c][torch.randperm(q_groups[c].numel(), generator=gen)[:n_query]])
        s, q = torch.cat(s_rows), torch.cat(q_rows)
        out["si"].append(s_ids[s])
        out["sv"].append(s_valid[s])
        out["qi"].append(q_ids[q])
        out["qv"].append(q_valid[q])
        out["cls"].append(classes)
    labels = torch.arange(n_way)
    support_ids, query_ids = torch.stack(out["si"]), torch.stack(out["qi"])
    return TextEpisode(
        support_ids=support_ids,
        support_labels=labels.repeat_interleave(k_shot).expand(episodes, -1).clone(),
        support_mask=torch.zeros_like(support_ids, dtype=torch.bool),
        query_ids=query_ids,
        query_labels=labels.repeat_interleave(n_query).expand(episodes, -1).clone(),
        query_mask=torch.zeros_like(query_ids, dtype=torch.bool),
        class_ids=torch.stack(out["cls"]),
        support_valid=torch.stack(out["sv"]),
        query_valid=torch.stack(out["qv"]),
    )
