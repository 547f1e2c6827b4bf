"""The embedded default corpus: English prose that ships with every Python installation.

Two sources, read without network access and without importing anything with side effects:

* ``pydoc_data.topics.topics`` — the language-reference topics shown by ``help()`` (one document each);
* the docstrings of the pure-Python standard library, read from source with `ast` (one document per
  module: its module, class and function docstrings in source order).

Documents are split into train and held-out parts by a hash of their name, a byte-level BPE tokenizer is
trained on the train part only, and each part is tokenized, joined with EOS after every document and packed
into rows of ``seq_len`` tokens. The result is cached on disk under a key that covers the Python version, the
``tokenizers`` version and the build recipe, so a warm load takes milliseconds.

The first build takes seconds (about 10 on two CPU cores). It shows a progress bar per phase (``tqdm`` on
``stderr``, only when ``stderr`` is a terminal and ``tqdm`` is installed; log lines otherwise) and logs, at
INFO, where it was cached and how long it took; a cache hit is logged at DEBUG. Nothing here prints.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from picomaml._optional import require
from picomaml.data.tokenizer import TokenizerWrapper
from picomaml.params import check_int

__all__ = [
    "CORPUS_FORMAT_VERSION",
    "EmbeddedCorpus",
    "build_corpus_files",
    "collect_documents",
    "corpus_cache_dir",
    "is_heldout",
    "load_default_corpus",
    "pack_rows",
    "train_bpe_tokenizer",
]

logger = logging.getLogger(__name__)

# Bump when anything that changes the cached files changes (document rules, split, tokenizer recipe).
CORPUS_FORMAT_VERSION = 1
VOCAB_SIZE = 8192
SPECIAL_TOKENS = ("<|eos|>", "<|pad|>", "<|mask|>")  # ids 0, 1, 2
HELDOUT_PER_MILLE = 75  # ~7.5% of documents are held out
# Top-level stdlib packages/modules never read: tests, GUI/demo code, vendored or deprecated trees, and
# modules whose "docstring" is not prose.
_EXCLUDED = frozenset(
    {
        "test", "tests", "idlelib", "tkinter", "turtledemo", "turtle", "lib2to3", "ensurepip", "venv",
        "site-packages", "dist-packages", "__pycache__", "__phello__", "antigravity", "this",
        "pydoc_data",  # its topics are the other source; the module docstring is empty
    }
)  # fmt: skip
_FILES = ("tokenizer.json", "train_tokens.pt", "heldout_tokens.pt", "documents.json", "manifest.json")


def _cache_key() -> str:
    tokenizers = require("tokenizers", "data", "the embedded corpus")
    recipe = {
        "format": CORPUS_FORMAT_VERSION,
        "python": sys.version,
        "implementation": sys.implementation.name,
        "tokenizers": tokenizers.__version__,
        "vocab_size": VOCAB_SIZE,
        "specials": SPECIAL_TOKENS,
        "heldout_per_mille": HELDOUT_PER_MILLE,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def corpus_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Directory of the cached corpus: ``<root>/corpus-<key>``.

    The root is ``cache_dir`` if given, else ``$PICOMAML_CACHE``, else ``~/.cache/picomaml``.
    """
    if cache_dir is not None:
        root = Path(cache_dir)
    elif os.environ.get("PICOMAML_CACHE"):
        root = Path(os.environ["PICOMAML_CACHE"])
    else:
        root = Path.home() / ".cache" / "picomaml"
    return root.expanduser() / f"corpus-{_cache_key()}"


# -- progress of a cold build --------------------------------------------------------------------------


def _bars_enabled() -> bool:
    """A progress bar only on a terminal (``stderr``) and only when ``tqdm`` is installed."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        tty = bool(isatty and isatty())
    except (ValueError, OSError):  # a closed or detached stream
        tty = False
    return tty and importlib.util.find_spec("tqdm") is not None


@contextmanager
def _phase(desc: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
    """One phase of a cold build: yields ``advance(n)``; a tqdm bar on a terminal, else an INFO log line."""
    bar = None
    if _bars_enabled():
        from tqdm import tqdm  # the terminal bar (stderr is a tty here)

        bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
    level = logging.DEBUG if bar is not None else logging.INFO
    logger.log(level, "%s (%d %s%s)", desc, total, unit, "" if total == 1 else "s")
    try:
        yield (bar.update if bar is not None else lambda n=1: None)
    finally:
        if bar is not None:
            bar.close()


# -- documents ------------------------------------------------------------------------------------------


def _docstrings_in_order(tree: ast.Module) -> list[str]:
    """Module, class and function docstrings, depth-first in source order."""
    out: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                out.append(doc.strip())
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child)

    visit(tree)
    return out


def _stdlib_module_files(stdlib: Path) -> list[tuple[str, Path]]:
    """(dotted module name, file) of the pure-Python stdlib, sorted by name."""
    found: list[tuple[str, Path]] = []
    for root, dirs, files in os.walk(stdlib):
        rel = Path(root).relative_to(stdlib).parts
        # prune excluded trees before descending (site-packages alone can be large)
        dirs[:] = sorted(
            d
            for d in dirs
            if d not in _EXCLUDED
            and d not in {"idle_test", "__pycache__"}
            and "-" not in d
            and "." not in d
            and (rel or not d.startswith("__"))
        )
        if rel and not (Path(root) / "__init__.py").is_file():
            continue  # a data directory, not a package
        for fname in files:
            if not fname.endswith(".py"):
                continue
            stem = fname[:-3]
            if not rel and (stem in _EXCLUDED or stem.startswith("__")):
                continue
            if stem == "__main__" or "-" in stem:
                continue
            names = [*rel] if stem == "__init__" else [*rel, stem]
            found.append((".".join(names), Path(root) / fname))
    return sorted(found)


def collect_documents() -> list[tuple[str, str]]:
    """All documents of the embedded corpus as ``(name, text)``, sorted by name.

    Names are ``"topic:<pydoc topic>"`` and ``"module:<dotted module>"``. Only source text is read
    (``ast.parse``); nothing from the standard library is imported except ``pydoc_data.topics``. The result
    is remembered for the life of the process (parsing the stdlib is most of a cold build's time).
    """
    return list(_collect_documents_once())


@functools.lru_cache(maxsize=1)
def _collect_documents_once() -> tuple[tuple[str, str], ...]:
    from pydoc_data.topics import topics  # a plain dict literal: importing it has no side effects

    docs = [(f"topic:{name}", text.strip()) for name, text in topics.items() if text.strip()]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = _stdlib_module_files(stdlib)
    with warnings.catch_warnings(), _phase("corpus 1/3: stdlib docstrings", len(files), "file") as advance:
        warnings.simplefilter("ignore", SyntaxWarning)  # old escape sequences in some stdlib sources
        for name, path in files:
            advance(1)
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # e.g. a template file that is not Python: skip, deterministically
            parts = _docstrings_in_order(tree)
            if parts:
                docs.append((f"module:{name}", "\n\n".join(parts)))
    return tuple(sorted(docs))


def is_heldout(name: str) -> bool:
    """Whether a document belongs to the held-out split: a hash of its name, about 7.5% of documents."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < HELDOUT_PER_MILLE


# -- tokenizer and packing --------------------------------------------------------------------------------


@contextmanager
def _single_threaded_tokenizers():
    """Ask ``tokenizers`` for sequential training so merges never depend on thread timing."""
    saved = {k: os.environ.get(k) for k in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")}
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def train_bpe_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> Any:
    """Train a byte-level BPE ``tokenizers.Tokenizer`` with specials ``<|eos|>``=0, ``<|pad|>``=1, ``<|mask|>``=2.

    Args:
        texts: Training texts (the train split only).
        vocab_size: Final vocabulary size, specials included.

    Returns:
        The trained ``tokenizers.Tokenizer``.
    """
    tk = require("tokenizers", "data", "training the corpus tokenizer")
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    with _single_threaded_tokenizers():
        tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def _encode_documents(
    tokenizer: TokenizerWrapper,
    texts: list[str],
    advance: Callable[[int], None] | None = None,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token stream of ``texts`` with EOS after each, and the start offset of every document.

    Documents are encoded ``chunk`` at a time (each is tokenized on its own, so the result does not depend
    on the chunking), calling ``advance(n)`` after each chunk for a progress bar.

    Returns:
        ``(tokens (T,) int32, offsets (D + 1,) int64)``; document ``i`` is ``tokens[offsets[i]:offsets[i+1]]``.
    """
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    offsets = [0]
    for start in range(0, len(texts), chunk):
        part = texts[start : start + chunk]
        for ids in tokenizer.encode_batch(part):
            stream.extend(ids)
            stream.append(eos)
            offsets.append(len(stream))
        if advance is not None:
            advance(len(part))
    return torch.tensor(stream, dtype=torch.int32), torch.tensor(offsets, dtype=torch.int64)


def pack_rows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a token stream into non-overlapping rows of ``seq_len`` tokens, dropping the short tail.

    Args:
        tokens: ``(T,)`` token stream.
        seq_len: Tokens per row.

    Returns:
        ``(T // seq_len, seq_len)`` long tensor.
    """
    seq_len = check_int("seq_len", seq_len, ge=2)
    n_rows = tokens.numel() // seq_len
    return tokens[: n_rows * seq_len].to(torch.long).reshape(n_rows, seq_len)


# -- build and cache ---------------------------------------------------------------------------------------


def build_corpus_files(target: Path) -> dict[str, Any]:
    """Build the corpus into directory ``target`` (written under a temporary name, then renamed).

    Returns:
        The manifest (statistics and build time).
    """
    start = time.perf_counter()
    logger.info("building the embedded corpus (first use only; cached in %s afterwards)", target)
    docs = collect_documents()
    train = [(n, t) for n, t in docs if not is_heldout(n)]
    heldout = [(n, t) for n, t in docs if is_heldout(n)]
    t_collect = time.perf_counter()
    with _phase("corpus 2/3: BPE tokenizer", 1, "step") as advance:
        raw = train_bpe_tokenizer([t for _, t in train])
        advance(1)
    t_train = time.perf_counter()
    wrapper = TokenizerWrapper(raw)
    with _phase("corpus 3/3: encode", len(docs), "doc") as advance:
        train_tokens, train_offsets = _encode_documents(wrapper, [t for _, t in train], advance)
        heldout_tokens, heldout_offsets = _encode_documents(wrapper, [t for _, t in heldout], advance)
    t_encode = time.perf_counter()

    def stats(part: list[tuple[str, str]], tokens: torch.Tensor) -> dict[str, int]:
        return {
            "documents": len(part),
            "topics": sum(n.startswith("topic:") for n, _ in part),
            "modules": sum(n.startswith("module:") for n, _ in part),
            "characters": sum(len(t) for _, t in part),
            "tokens": int(tokens.numel()),
        }

    manifest = {
        "format": CORPUS_FORMAT_VERSION,
        "key": target.name,
        "python": sys.version,
        "vocab_size": wrapper.vocab_size,
        "special_tokens": {"eos": 0, "pad": 1, "mask": 2},
        "train": stats(train, train_tokens),
        "heldout": stats(heldout, heldout_tokens),
        "build_seconds": None,
        "phase_seconds": {
            "collect_documents": round(t_collect - start, 3),
            "train_tokenizer": round(t_train - t_collect, 3),
            "encode": round(t_encode - t_train, 3),
        },
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        raw.save(str(tmp / "tokenizer.json"))
        torch.save({"tokens": train_tokens, "offsets": train_offsets}, tmp / "train_tokens.pt")
        torch.save({"tokens": heldout_tokens, "offsets": heldout_offsets}, tmp / "heldout_tokens.pt")
        (tmp / "documents.json").write_text(
            json.dumps({"train": train, "heldout": heldout}), encoding="utf-8"
        )
        manifest["build_seconds"] = round(time.perf_counter() - start, 3)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        if target.exists():  # an incomplete earlier build: replace it
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not all((target / f).is_file() for f in _FILES):  # not a concurrent builder's complete copy
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    phases = manifest["phase_seconds"]
    logger.info(
        "built and cached the embedded corpus in %s (%.2f s: documents %.2f s, tokenizer %.2f s, encode %.2f s;"
        " %d train + %d held-out tokens); later runs load it from there",
        target, manifest["build_seconds"], phases["collect_documents"], phases["train_tokenizer"],
        phases["encode"], manifest["train"]["tokens"], manifest["heldout"]["tokens"],
    )  # fmt: skip
    return manifest


@dataclass
class EmbeddedCorpus:
    """The embedded corpus, packed for training.

    Attributes:
        train_rows: ``(N_train, seq_len)`` long token rows of the train split.
        heldout_rows: ``(N_heldout, seq_len)`` long token rows of the held-out split.
        tokenizer: The corpus tokenizer (vocab 8192; eos 0, pad 1, mask 2).
        stats: The manifest: documents, characters and tokens per split, build time, cache key.
        train_documents: ``(name, text)`` of every train document.
        heldout_documents: ``(name, text)`` of every held-out document.
        train_tokens: ``(T_train,)`` int32 token stream (EOS after each document), before packing.
        heldout_tokens: ``(T_heldout,)`` int32 token stream.
        train_offsets: ``(D_train + 1,)`` start of each train document in ``train_tokens``.
        heldout_offsets: ``(D_heldout + 1,)`` likewise.
        cache_dir: Where the files live.
    """

    train_rows: torch.Tensor
    heldout_rows: torch.Tensor
    tokenizer: TokenizerWrapper
    stats: dict[str, Any]
    train_documents: list[tuple[str, str]] = field(repr=False)
    heldout_documents: list[tuple[str, str]] = field(repr=False)
    train_tokens: torch.Tensor = field(repr=False)
    heldout_tokens: torch.Tensor = field(repr=False)
    train_offsets: torch.Tensor = field(repr=False)
    heldout_offsets: torch.Tensor = field(repr=False)
    cache_dir: Path = field(repr=False)

    def document_tokens(self, split: str, index: int) -> torch.Tensor:
        """Token ids ``(n,)`` of one document of ``split`` ("train" or "heldout"), its EOS included."""
        if split not in ("train", "heldout"):
            raise ValueError(f"document_tokens: split must be 'train' or 'heldout', got {split!r}")
        tokens = self.train_tokens if split == "train" else self.heldout_tokens
        offsets = self.train_offsets if split == "train" else self.heldout_offsets
        if not 0 <= index < offsets.numel() - 1:
            raise IndexError(f"document_tokens: index {index} out of range [0, {offsets.numel() - 1})")
        return tokens[offsets[index] : offsets[index + 1]].to(torch.long)


def load_default_corpus(
    seq_len: int = 256, cache_dir: str | os.PathLike[str] | None = None, *, rebuild: bool = False
) -> EmbeddedCorpus:
    """Load (building and caching on first use) the embedded corpus packed into rows of ``seq_len`` tokens.

    Rows are plain windows of the token stream: a model trained next-token on a row of ``seq_len`` tokens
    predicts ``seq_len - 1`` targets (ask for ``seq_len + 1`` to get ``seq_len`` predictions per row).

    Args:
        seq_len: Tokens per row (>= 2).
        cache_dir: Cache root (default ``$PICOMAML_CACHE`` or ``~/.cache/picomaml``); the files go in
            ``<root>/corpus-<key>/`` where the key covers the Python and ``tokenizers`` versions.
        rebuild: Build again even when a cached copy exists.

    Returns:
        The [`EmbeddedCorpus`][picomaml.data.corpus.EmbeddedCorpus].
    """
    seq_len = check_int("seq_len", seq_len, ge=2)
    tk = require("tokenizers", "data", "the embedded corpus")
    target = corpus_cache_dir(cache_dir)
    complete = all((target / f).is_file() for f in _FILES)
    start = time.perf_counter()
    built = rebuild or not complete
    if built:
        build_corpus_files(target)
    manifest = json.loads((target / "manifest.json").read_text(encoding="utf-8"))
    documents = json.loads((target / "documents.json").read_text(encoding="utf-8"))
    train = torch.load(target / "train_tokens.pt", weights_only=True)
    heldout = torch.load(target / "heldout_tokens.pt", weights_only=True)
    tokenizer = TokenizerWrapper(tk.Tokenizer.from_file(str(target / "tokenizer.json")))
    if not built:
        logger.debug(
            "loaded the embedded corpus from its cache %s (%.3f s)", target, time.perf_counter() - start
        )
    return EmbeddedCorpus(
        train_rows=pack_rows(train["tokens"], seq_len),
        heldout_rows=pack_rows(heldout["tokens"], seq_len),
        tokenizer=tokenizer,
        stats=manifest,
        train_documents=[(n, t) for n, t in documents["train"]],
        heldout_documents=[(n, t) for n, t in documents["heldout"]],
        train_tokens=train["tokens"],
        heldout_tokens=heldout["tokens"],
        train_offsets=train["offsets"],
        heldout_offsets=heldout["offsets"],
        cache_dir=target,
    )
