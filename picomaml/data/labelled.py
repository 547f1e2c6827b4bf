"""Labelled data for fine-tuning evaluations: tagged sentences and labelled texts, from the formats users have.

Token tagging (part of speech, named entities in BIO tags) comes as CoNLL-U
([`read_conllu`][picomaml.data.labelled.read_conllu], the Universal Dependencies format) or as whitespace
columns with a blank line between sentences ([`read_conll`][picomaml.data.labelled.read_conll], the
CoNLL-2003 / IOB format). Sentence classification comes as a CSV or TSV file with a header row, or as JSON
lines ([`read_text_labels`][picomaml.data.labelled.read_text_labels]).

Every reader returns a list of plain dataclasses and raises
[`DataError`][picomaml.data.sources.DataError] (a ``ValueError``) for a file it cannot use, naming the file,
the line and what is allowed.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import gzip
import logging
import lzma
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from picomaml.data.sources import DataError, decode_utf8, json_object

__all__ = [
    "CONLLU_COLUMNS",
    "LabelledText",
    "TaggedSentence",
    "format_suffix",
    "open_data",
    "read_conll",
    "read_conllu",
    "read_text_labels",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
# the ten columns of a CoNLL-U word line, in order
CONLLU_COLUMNS = ("id", "form", "lemma", "upos", "xpos", "feats", "head", "deprel", "deps", "misc")
_TEXT_SUFFIXES = (".csv", ".tsv", ".jsonl")


@dataclass
class TaggedSentence:
    """One sentence of words, one tag per word.

    Attributes:
        tokens: The words, as written.
        tags: One tag per word (``"NOUN"``, ``"B-PER"``, ...).
        space_after: Whether a space follows each word in the running text (CoNLL-U's ``SpaceAfter=No``);
            ``None`` when the format does not say (every word is followed by a space).
    """

    tokens: list[str]
    tags: list[str]
    space_after: list[bool] | None = None

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.tags):
            raise ValueError(
                f"tags: {len(self.tags)} tags for {len(self.tokens)} tokens; give one tag per token"
            )
        if self.space_after is not None and len(self.space_after) != len(self.tokens):
            raise ValueError(
                f"space_after: {len(self.space_after)} flags for {len(self.tokens)} tokens; give one per token"
            )


@dataclass
class LabelledText:
    """A text and its class label."""

    text: str
    label: str


def _lines(path: Path, keep_ends: bool = False) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 file, without the line break unless ``keep_ends``; a byte-order mark
    is dropped."""
    with open_data(path) as handle, _unreadable(path):
        for lineno, raw in enumerate(handle, start=1):
            line = decode_utf8(raw, f"{path}:{lineno}")
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            yield lineno, line if keep_ends else line.rstrip("\r\n")


#: compressed files are read as they are (``train.csv.gz``, ``rotten_tomatoes.csv.bz2``)
_COMPRESSED: dict[str, Callable[..., IO[bytes]]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def open_data(path: Path) -> IO[bytes]:
    """``path`` opened for reading bytes, decompressed when its suffix is ``.gz``, ``.bz2`` or ``.xz``."""
    opener = _COMPRESSED.get(path.suffix.lower())
    return opener(path, "rb") if opener is not None else path.open("rb")


def format_suffix(path: str | Path) -> str:
    """The suffix that names a file's format, under a compression suffix: ``.csv`` for ``a.csv.gz``."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


@contextlib.contextmanager
def _unreadable(path: Path) -> Iterator[None]:
    """A broken compressed stream (or an unreadable file) as a ``DataError`` naming the file."""
    try:
        yield
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
        raise DataError(f"{path}: cannot be read as {path.suffix or 'a'} file ({exc})") from None


def _existing(path: PathLike) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"labelled data file {str(p)!r} does not exist (or is not a file)")
    return p


def _require_sentences(sentences: list[TaggedSentence], path: Path, what: str) -> list[TaggedSentence]:
    if not sentences:
        raise DataError(f"{path}: empty file; no {what} sentence found")
    logger.debug(
        "read %d sentences (%d words) from %s", len(sentences), sum(len(s.tokens) for s in sentences), path
    )
    return sentences


def read_conllu(path: PathLike, column: str = "upos") -> list[TaggedSentence]:
    """Sentences of a CoNLL-U file, each word tagged by one of its columns.

    Comment lines (``#``), multiword-token lines (ID ``1-2``) and empty nodes (ID ``1.1``) are skipped, so the
    words are the syntactic words of the treebank. ``SpaceAfter=No`` in the MISC column is kept in
    [`TaggedSentence.space_after`][picomaml.data.labelled.TaggedSentence].

    Args:
        path: A ``.conllu`` file (UTF-8).
        column: The column that gives the tag, by name: one of
            [`CONLLU_COLUMNS`][picomaml.data.labelled.CONLLU_COLUMNS] (``"upos"``, ``"xpos"``, ``"deprel"``,
            ...; case-insensitive). The value is taken as written (``"_"`` when unspecified).

    Returns:
        The sentences in file order.

    Raises:
        DataError: An unknown ``column``, a word line without exactly 10 tab-separated columns, an ID that is
            not an integer, invalid UTF-8, or a file without sentences; the message names the file and line.
        FileNotFoundError: ``path`` is not a file.
    """
    if not isinstance(column, str) or column.lower() not in CONLLU_COLUMNS:
        raise DataError(f"column: unknown CoNLL-U column {column!r}; allowed: {list(CONLLU_COLUMNS)}")
    p = _existing(path)
    index = CONLLU_COLUMNS.index(column.lower())
    sentences: list[TaggedSentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    spaces: list[bool] = []

    def flush() -> None:
        if tokens:
            sentences.append(TaggedSentence(list(tokens), list(tags), list(spaces)))
        tokens.clear()
        tags.clear()
        spaces.clear()

    for lineno, line in _lines(p):
        if not line.strip():
            flush()
            continue
        if line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != len(CONLLU_COLUMNS):
            raise DataError(
                f"{p}:{lineno}: a CoNLL-U word line has {len(CONLLU_COLUMNS)} tab-separated columns "
                f"({', '.join(c.upper() for c in CONLLU_COLUMNS)}), got {len(fields)}"
            )
        word_id = fields[0]
        if "-" in word_id or "." in word_id:  # multiword token or empty node: not a syntactic word
            continue
        if not word_id.isdigit():
            raise DataError(f"{p}:{lineno}: ID {word_id!r} is not an integer, a range 1-2 or a decimal 1.1")
        tokens.append(fields[1])
        tags.append(fields[index])
        spaces.append("SpaceAfter=No" not in fields[9].split("|"))
    flush()
    return _require_sentences(sentences, p, "CoNLL-U")


def read_conll(
    path: PathLike, token_col: int = 0, tag_col: int = -1, sep: str | None = None
) -> list[TaggedSentence]:
    """Sentences of a CoNLL / IOB column file: one word per line, a blank line between sentences.

    Every non-blank line must have as many columns as the first one. ``-DOCSTART-`` lines (document
    boundaries in CoNLL-2003) are skipped.

    Args:
        path: The file (UTF-8).
        token_col: Column of the word (negative counts from the end).
        tag_col: Column of the tag (default: the last, as in CoNLL-2003 NER).
        sep: Column separator; ``None`` splits on runs of whitespace.

    Returns:
        The sentences in file order.

    Raises:
        DataError: A line with another number of columns than the first, a ``token_col``/``tag_col`` outside
            the columns, invalid UTF-8, or a file without sentences; the message names the file and line.
        FileNotFoundError: ``path`` is not a file.
    """
    for name, value in (("token_col", token_col), ("tag_col", tag_col)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataError(f"{name}: must be an integer column index, got {value!r}")
    if sep is not None and (not isinstance(sep, str) or not sep):
        raise DataError(f"sep: must be None (any whitespace) or a non-empty string, got {sep!r}")
    p = _existing(path)
    sentences: list[TaggedSentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    n_cols: int | None = None
    first_line = 0
    for lineno, line in _lines(p):
        if not line.strip():
            if tokens:
                sentences.append(TaggedSentence(tokens, tags))
                tokens, tags = [], []
            continue
        fields = line.split(sep) if sep is not None else line.split()
        if fields[0] == "-DOCSTART-":
            continue
        if n_cols is None:
            n_cols, first_line = len(fields), lineno
            for name, col in (("token_col", token_col), ("tag_col", tag_col)):
                if not -n_cols <= col < n_cols:
                    raise DataError(
                        f"{p}:{lineno}: {name}={col} is outside the {n_cols} columns of the file; "
                        f"allowed: {-n_cols} to {n_cols - 1}"
                    )
        elif len(fields) != n_cols:
            raise DataError(
                f"{p}:{lineno}: {len(fields)} columns, but line {first_line} has {n_cols}; every word line "
                "needs the same columns (sentences are separated by blank lines)"
            )
        tokens.append(fields[token_col])
        tags.append(fields[tag_col])
    if tokens:
        sentences.append(TaggedSentence(tokens, tags))
    return _require_sentences(sentences, p, "CoNLL")


def _label(value: object, where: str, field: str) -> str:
    # JSON labels may be numbers (0/1 sentiment); containers, booleans and null are refused
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: {field!r} must be a non-empty string or an integer, got {value!r}")


def _text(value: object, where: str, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {field!r} must be a non-empty string, got {value!r}")
    return value


def _read_jsonl(p: Path, text_field: str, label_field: str) -> list[LabelledText]:
    out = []
    for lineno, line in _lines(p):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        record = json_object(line, where)
        for field in (text_field, label_field):
            if field not in record:
                raise DataError(f"{where}: record has no {field!r} field; fields found: {sorted(record)}")
        out.append(
            LabelledText(
                _text(record[text_field], where, text_field), _label(record[label_field], where, label_field)
            )
        )
    return out


def _read_table(p: Path, delimiter: str, text_field: str, label_field: str) -> list[LabelledText]:
    # TSV fields hold raw text with stray quotes, so only CSV honours quoting
    quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
    # decode line by line first (invalid UTF-8 is reported with its line); csv reads the decoded lines, with
    # their line breaks, so a quoted CSV field may span lines
    lines = (line for _, line in _lines(p, keep_ends=True))
    reader = csv.reader(lines, delimiter=delimiter, quoting=quoting, strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(
                f"{p}: empty file; a header row naming {text_field!r} and {label_field!r} is required"
            )
        columns = [c.strip() for c in header]
        for field in (text_field, label_field):
            if field not in columns:
                raise DataError(
                    f"{p}:1: the header row has no {field!r} column; columns found: {columns} (a header row is "
                    "required; choose columns with text_field=/label_field=)"
                )
        i_text, i_label = columns.index(text_field), columns.index(label_field)
        out = []
        for row in reader:
            where = f"{p}:{reader.line_num}"
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) != len(columns):
                raise DataError(
                    f"{where}: {len(row)} columns, but the header row has {len(columns)}: {columns}"
                )
            out.append(
                LabelledText(_text(row[i_text], where, text_field), _label(row[i_label], where, label_field))
            )
    except csv.Error as exc:
        raise DataError(
            f"{p}:{reader.line_num}: malformed {'CSV' if delimiter == ',' else 'TSV'} ({exc})"
        ) from None
    return out


def read_text_labels(
    path: PathLike, text_field: str = "text", label_field: str = "label"
) -> list[LabelledText]:
    """Labelled texts from a CSV or TSV file with a header row, or from JSON lines.

    The format follows the suffix: ``.csv`` (comma-separated, standard quoting), ``.tsv`` (tab-separated, no
    quoting) or ``.jsonl`` (one JSON object per line), each also compressed (``.csv.gz``, ``.csv.bz2``,
    ``.jsonl.xz``, ...). Blank lines are skipped. Integer labels of JSON lines become strings (``1`` -> ``"1"``).

    Args:
        path: The file (UTF-8).
        text_field: Column or field of the text.
        label_field: Column or field of the label.

    Returns:
        The examples in file order.

    Raises:
        DataError: Another suffix, a missing header column or field, a row with another number of columns than
            the header, an empty text or label, invalid JSON or UTF-8, or a file without examples; the message
            names the file and line.
        FileNotFoundError: ``path`` is not a file.
    """
    p = _existing(path)
    suffix = format_suffix(p)
    if suffix not in _TEXT_SUFFIXES:
        raise DataError(
            f"{p}: unsupported suffix {p.suffix!r} for labelled texts; allowed: {list(_TEXT_SUFFIXES)}"
        )
    if suffix == ".jsonl":
        out = _read_jsonl(p, text_field, label_field)
    else:
        out = _read_table(p, "," if suffix == ".csv" else "\t", text_field, label_field)
    if not out:
        raise DataError(f"{p}: empty file; no labelled example found")
    logger.debug("read %d labelled texts (%d labels) from %s", len(out), len({x.label for x in out}), p)
    return out
