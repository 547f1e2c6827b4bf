"""Start-up stays light: ``import picomaml`` and ``picomaml info`` import nothing heavy, and the first corpus
build is cached and reported (a progress bar on a terminal, log lines otherwise; the library never prints)."""

from __future__ import annotations

import io
import json
import logging
import string
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# optional packages that cost seconds to import: neither `import picomaml` nor `picomaml info` may load them
HEAVY = (
    "transformers",
    "lightning",
    "datasets",
    "matplotlib",
    "tokenizers",
    "wandb",
    "higher",
    "tensorboard",
)


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)


def test_import_picomaml_imports_nothing_heavy_not_even_torch():
    # the public names resolve lazily (PEP 562): a bare import loads no third-party package at all
    code = (
        "import sys, json\n"
        "import picomaml\n"
        f"print(json.dumps(sorted(m for m in {(*HEAVY, 'torch')!r} if m in sys.modules)))\n"
    )
    result = _fresh(code)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_picomaml_info_imports_no_optional_package():
    # torch is imported (CUDA availability needs it); the optional packages' versions come from metadata.
    # Only what `info` adds beyond torch's own imports counts.
    code = (
        "import sys, json, io, contextlib, torch\n"
        "before = set(sys.modules)\n"
        "from picomaml.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    rc = main(['info'])\n"
        "added = set(sys.modules) - before\n"
        f"print(json.dumps([rc, sorted(m for m in {HEAVY!r} if m in added), out.getvalue()]))\n"
    )
    result = _fresh(code)
    assert result.returncode == 0, result.stderr
    rc, heavy, out = json.loads(result.stdout.splitlines()[-1])
    assert rc == 0 and heavy == []
    for name in ("picomaml", "torch", "lightning", "transformers", "tokenizers", "higher", "learn2learn"):
        assert name in out


def test_picomaml_info_runs_as_a_command():
    result = subprocess.run(
        [sys.executable, "-m", "picomaml.cli", "info"], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("picomaml ") and "cuda available:" in result.stdout


def test_info_check_imports_reports_import_time_or_missing(monkeypatch, capsys):
    from picomaml import cli

    monkeypatch.setattr(cli, "_OPTIONAL", {"json": "core", "picomaml_no_such_package": "data"})
    assert cli.main(["info", "--check-imports"]) == 0
    out = capsys.readouterr().out
    assert "imports in " in out  # json: installed (no metadata) and importable
    assert "picomaml_no_such_package missing -> pip install 'picomaml[data]'" in out


# -- the first corpus build: cached, reported --------------------------------------------------------------


@pytest.fixture
def small_stdlib(monkeypatch):
    """The corpus build on four stdlib modules (plus the pydoc topics) instead of the whole stdlib: seconds."""
    pytest.importorskip("tokenizers")
    from picomaml.data import corpus

    files = [(m.__name__, Path(m.__file__)) for m in (json, string, textwrap, logging)]
    monkeypatch.setattr(corpus, "_stdlib_module_files", lambda stdlib: files)
    fresh = corpus._collect_documents_once.__wrapped__  # not the process-wide cached full document list
    monkeypatch.setattr(corpus, "_collect_documents_once", lambda: fresh())
    return corpus


def test_first_build_is_cached_and_logged_where_and_how_long(small_stdlib, tmp_path, caplog, capsys):
    corpus = small_stdlib
    with caplog.at_level(logging.DEBUG, logger="picomaml.data.corpus"):
        first = corpus.load_default_corpus(seq_len=16, cache_dir=tmp_path)
    built = [r.getMessage() for r in caplog.records if r.getMessage().startswith("built and cached")]
    assert len(built) == 1 and str(first.cache_dir) in built[0] and " s: documents " in built[0]
    assert caplog.records[0].levelno == logging.INFO and "first use only" in caplog.records[0].getMessage()
    # not a terminal here: each phase is a log line instead of a bar
    phases = [r.getMessage() for r in caplog.records if r.getMessage().startswith("corpus ")]
    assert [p.split(":")[0] for p in phases] == ["corpus 1/3", "corpus 2/3", "corpus 3/3"]
    assert all(r.levelno == logging.INFO for r in caplog.records if r.getMessage() in phases)

    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="picomaml.data.corpus"):
        again = corpus.load_default_corpus(seq_len=16, cache_dir=tmp_path)
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert len(messages) == 1 and messages[0][0] == logging.DEBUG
    assert messages[0][1].startswith(f"loaded the embedded corpus from its cache {again.cache_dir}")
    assert again.stats == first.stats
    assert capsys.readouterr().out == ""  # library code logs, never prints


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_first_build_shows_a_progress_bar_on_a_terminal(small_stdlib, tmp_path, monkeypatch, caplog):
    pytest.importorskip("tqdm")
    corpus = small_stdlib
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    with caplog.at_level(logging.DEBUG, logger="picomaml.data.corpus"):
        corpus.load_default_corpus(seq_len=16, cache_dir=tmp_path)
    shown = term.getvalue()
    for label in ("corpus 1/3: stdlib docstrings", "corpus 2/3: BPE tokenizer", "corpus 3/3: encode"):
        assert label in shown
    assert "100%" in shown
    # with a bar, the phase lines go to DEBUG; where and how long stays at INFO
    levels = {r.getMessage().split(":")[0]: r.levelno for r in caplog.records}
    assert levels["corpus 1/3"] == logging.DEBUG
    assert any(
        r.levelno == logging.INFO and r.getMessage().startswith("built and cached") for r in caplog.records
    )


def test_no_bar_when_stderr_is_not_a_terminal(monkeypatch):
    from picomaml.data import corpus

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert corpus._bars_enabled() is False
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert corpus._bars_enabled() is (corpus.importlib.util.find_spec("tqdm") is not None)
