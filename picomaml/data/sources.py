"""Token rows from local files: parquet, JSON lines and plain text.

Every file yields *sequences*. A sequence is either pretokenized (an ``input_ids`` column or field: used as
is) or text (a ``text`` column or field, or a whole ``.txt`` file: tokenized, with EOS appended so documents
stay separated). Sequences are concatenated in file order into one stream that is cut into non-overlapping
rows of ``seq_len`` tokens; the short tail is dropped. Pretokenized sequences get no EOS added, since they are
usually fixed-length chunks of an already-joined stream (as in pretokenized Dolma).

Files are read lazily (parquet in record batches), so
[`iter_token_rows`][picomaml.data.sources.iter_token_rows] works on data larger than memory;
[`load_token_rows`][picomaml.data.sources.load_token_rows] gathers everything into one tensor for small data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from picomaml._optional import require
from picomaml.params import check_int

__all__ = [
    "DataError",
    "decode_utf8",
    "json_object",
    "MissingFieldError",
    "SUPPORTED_EXTENSIONS",
    "TokenRows",
    "iter_sequences",
    "iter_token_rows",
    "load_token_rows",
    "resolve_files",
]

SUPPORTED_EXTENSIONS = (".parquet", ".jsonl", ".txt")
PathLike = str | os.PathLike[str]


class DataError(ValueError):
    """A data file cannot be used as it is; the message names the file (and line or row) and what is wrong."""


class MissingFieldError(DataError, KeyError):
    """A record or file without the ids or text field (a ``KeyError`` too, as before)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _token_ids(value: Any, where: str) -> list[int]:
    """``value`` as token ids, or a [`DataError`][picomaml.data.sources.DataError]: a list of integers >= 0
    (a float such as 3.7 is refused, not truncated; so is a bool)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise DataError(f"{where}: token ids must be a list of integers, got {type(value).__name__}")
    ids = list(value)
    for i, v in enumerate(ids):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise DataError(f"{where}: token id #{i} is {v!r}, not an integer >= 0")
    return ids


def decode_utf8(raw: bytes, where: str) -> str:
    """``raw`` as UTF-8 text.

    Raises:
        DataError: Not UTF-8; the message starts with ``where`` (``file:line``) and shows the bad bytes.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{where}: not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 4]!r}); a binary file, or "
            "text in another encoding (convert it to UTF-8)"
        ) from None


def resolve_files(paths: PathLike | Sequence[PathLike]) -> list[Path]:
    """Expand files and directories (recursively, sorted) into the list of data files to read.

    Raises:
        FileNotFoundError: A path does not exist, or a directory holds no supported file.
        ValueError: A file's extension is not one of `SUPPORTED_EXTENSIONS`.
    """
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise ValueError("resolve_files: paths is empty; give at least one file or directory")
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"data file or directory {str(path)!r} does not exist")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUPPORTED_EXTENSIONS)
            if not found:
                raise FileNotFoundError(
                    f"directory {str(path)!r} holds no data files with extensions {list(SUPPORTED_EXTENSIONS)}"
                )
            files.extend(found)
        elif path.suffix in SUPPORTED_EXTENSIONS:
            files.append(path)
        else:
            raise DataError(
                f"unsupported data file extension {path.suffix!r} for {str(path)!r}; "
                f"allowed: {list(SUPPORTED_EXTENSIONS)}"
            )
    return files


def json_object(line: str, where: str) -> dict[str, Any]:
    """One JSON-lines record, which must be an object.

    Raises:
        DataError: Not JSON, or not an object; the message starts with ``where`` (``file:line``).
    """
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: each line must be a JSON object, got {type(record).__name__}")
    return record


def _text_ids(text: str, tokenizer: Any, where: str) -> list[int]:
    if not isinstance(text, str):
        raise DataError(f"{where}: text must be a string, got {type(text).__name__}")
    if tokenizer is None:
        raise ValueError(
            f"{where} holds text; pass tokenizer= (e.g. picomaml.data.load_tokenizer(...)) to read it"
        )
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(f"{where}: the tokenizer has no eos_token_id to separate documents")
    return [*tokenizer.encode(text), int(eos)]


def _iter_parquet(path: Path, tokenizer: Any, ids_key: str, text_key: str) -> Iterator[list[int]]:
    pq = require("pyarrow.parquet", "data", "reading parquet files")
    try:
        handle = pq.ParquetFile(str(path))
    except Exception as exc:  # noqa: BLE001 - pyarrow's ArrowInvalid and OSError: not a parquet file
        raise DataError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0][:160]})") from None
    columns = handle.schema_arrow.names
    if ids_key in columns:
        key = ids_key
    elif text_key in columns:
        key = text_key
    else:
        raise MissingFieldError(
            f"parquet file {str(path)!r} has neither an {ids_key!r} nor a {text_key!r} column; "
            f"columns found: {columns}"
        )
    row = 0
    for batch in handle.iter_batches(columns=[key], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            if value is None:
                continue
            where = f"{path} row {row}"
            yield _text_ids(value, tokenizer, where) if key == text_key else _token_ids(value, where)


def _iter_jsonl(path: Path, tokenizer: Any, ids_key: str, text_key: str) -> Iterator[list[int]]:
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            where = f"{path}:{lineno}"
            line = decode_utf8(raw, where)
            if not line.strip():
                continue
            record = json_object(line, where)
            if ids_key in record:
                yield _token_ids(record[ids_key], f"{where} {ids_key}")
            elif text_key in record:
                yield _text_ids(record[text_key], tokenizer, where)
            else:
                raise MissingFieldError(
                    f"{where}: record has neither an {ids_key!r} nor a {text_key!r} field; "
                    f"fields found: {sorted(record)}"
                )


def iter_sequences(
    paths: PathLike | Sequence[PathLike],
    tokenizer: Any = None,
    *,
    ids_key: str = "input_ids",
    text_key: str = "text",
) -> Iterator[list[int]]:
    """Token sequences of the files in order: pretokenized ones as stored, text ones tokenized plus EOS.

    Args:
        paths: Files and/or directories (see [`resolve_files`][picomaml.data.sources.resolve_files]).
        tokenizer: Anything with ``encode(text) -> list[int]`` and ``eos_token_id``; needed only for text.
        ids_key: Column/field of pretokenized ids (preferred when both exist).
        text_key: Column/field of raw text.

    Yields:
        One list of token ids per row, record or text file.
    """
    for path in resolve_files(paths):
        if path.suffix == ".parquet":
            yield from _iter_parquet(path, tokenizer, ids_key, text_key)
        elif path.suffix == ".jsonl":
            yield from _iter_jsonl(path, tokenizer, ids_key, text_key)
        else:  # .txt: the whole file is one document
            yield _text_ids(decode_utf8(path.read_bytes(), str(path)), tokenizer, str(path))


def _pack(sequences: Iterable[list[int]], seq_len: int) -> Iterator[torch.Tensor]:
    """Rows ``(seq_len,)`` long cut from the concatenation of ``sequences``; the tail is dropped."""
    buffer: list[int] = []
    start = 0
    for ids in sequences:
        buffer.extend(ids)
        while len(buffer) - start >= seq_len:
            yield torch.tensor(buffer[start : start + seq_len], dtype=torch.long)
            start += seq_len
        if start > 1 << 16:  # drop consumed tokens now and then, keeping appends amortised O(1)
            del buffer[:start]
            start = 0


def iter_token_rows(
    paths: PathLike | Sequence[PathLike],
    seq_len: int,
    tokenizer: Any = None,
    *,
    batch_size: int | None = None,
    drop_last: bool = True,
    ids_key: str = "input_ids",
    text_key: str = "text",
) -> Iterator[torch.Tensor]:
    """Stream fixed-length token rows (or batches of them) from local files.

    Args:
        paths: Files and/or directories (``.parquet``, ``.jsonl``, ``.txt``).
        seq_len: Tokens per row (>= 2).
        tokenizer: Needed only when the files hold text.
        batch_size: None yields rows ``(seq_len,)``; an int yields batches ``(batch_size, seq_len)``.
        drop_last: Drop a final batch smaller than ``batch_size`` (otherwise yield it short).
        ids_key: Column/field of pretokenized ids.
        text_key: Column/field of raw text.

    Returns:
        An iterator of long tensors ``(seq_len,)`` or ``(B, seq_len)``.
    """
    check_int("seq_len", seq_len, ge=2)
    if batch_size is not None:
        check_int("batch_size", batch_size, ge=1)
    files = resolve_files(paths)  # a plain function: missing files or bad extensions fail at the call
    rows = _pack(iter_sequences(files, tokenizer, ids_key=ids_key, text_key=text_key), seq_len)
    return rows if batch_size is None else _batched(rows, batch_size, drop_last)


def _batched(rows: Iterator[torch.Tensor], batch_size: int, drop_last: bool) -> Iterator[torch.Tensor]:
    pending: list[torch.Tensor] = []
    for row in rows:
        pending.append(row)
        if len(pending) == batch_size:
            yield torch.stack(pending)
            pending = []
    if pending and not drop_last:
        yield torch.stack(pending)


def load_token_rows(
    paths: PathLike | Sequence[PathLike],
    seq_len: int,
    tokenizer: Any = None,
    *,
    max_rows: int | None = None,
    ids_key: str = "input_ids",
    text_key: str = "text",
) -> torch.Tensor:
    """All rows of the files in one ``(n_rows, seq_len)`` long tensor (for small data).

    Args:
        paths: Files and/or directories.
        seq_len: Tokens per row.
        tokenizer: Needed only when the files hold text.
        max_rows: Stop after this many rows.

    Raises:
        ValueError: The files hold fewer than ``seq_len`` tokens (no complete row).
    """
    if max_rows is not None:
        check_int("max_rows", max_rows, ge=1)
    rows: list[torch.Tensor] = []
    for row in iter_token_rows(paths, seq_len, tokenizer, ids_key=ids_key, text_key=text_key):
        rows.append(row)
        if max_rows is not None and len(rows) >= max_rows:
            break
    if not rows:
        names = ", ".join(str(p) for p in resolve_files(paths))[:300]
        raise DataError(f"{names}: fewer than seq_len={seq_len} tokens in all (empty?); no row can be made")
    return torch.stack(rows)


class TokenRows:
    """Re-iterable view of [`iter_token_rows`][picomaml.data.sources.iter_token_rows] (each ``iter()`` reads
    the files again from the start).

    Args:
        paths: Files and/or directories.
        seq_len: Tokens per row.
        tokenizer: Needed only when the files hold text.
        batch_size: None for rows ``(seq_len,)``, an int for batches ``(batch_size, seq_len)``.
        drop_last: Drop a short final batch.
    """

    def __init__(
        self,
        paths: PathLike | Sequence[PathLike],
        seq_len: int,
        tokenizer: Any = None,
        *,
        batch_size: int | None = None,
        drop_last: bool = True,
    ) -> None:
        check_int("seq_len", seq_len, ge=2)
        if batch_size is not None:
            check_int("batch_size", batch_size, ge=1)
        self.files = resolve_files(paths)
        self.seq_len = seq_len
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.drop_last = drop_last

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter_token_rows(
            self.files, self.seq_len, self.tokenizer, batch_size=self.batch_size, drop_last=self.drop_last
        )

    def to_tensor(self, max_rows: int | None = None) -> torch.Tensor:
        """All rows as ``(n_rows, seq_len)`` long."""
        return load_token_rows(self.files, self.seq_len, self.tokenizer, max_rows=max_rows)
