"""Every ```python block of README.md and docs/pages runs as written, so the examples cannot rot.

Each fenced ``python`` block is one test case with the id ``<file>:<line>`` (the line of its opening
fence). It runs with ``exec`` in a fresh namespace, in a fresh temporary working directory (configs are read by their shipped names), with the network refused
(the Hugging Face Hub is unreachable in CI; blocks that stand in for a Hub call use local files of the
same schema) and the embedded corpus cached once per session. A block that raises fails its case, and
the traceback points at the Markdown line.

An HTML comment on the line right before a fence changes how its block runs:

* ``<!-- docs-test: continue -->``: run in the namespace of the previous python block of the same page
  (that block, and the chain before it, runs first). For a block that is plainly the next step of the
  one before it.
* ``<!-- docs-test: skip REASON -->``: not run; reported as skipped with REASON. Only for a block that
  cannot run here at all (e.g. it needs a GPU).
"""

from __future__ import annotations

import builtins
import dataclasses
import random
import re
import socket
import traceback
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs" / "pages").rglob("*.md"))]

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,}|~{3,})[ \t]*(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<what>\w+)\s*(?P<reason>.*?)\s*-->\s*$")
_MARKERS = ("continue", "skip")


@dataclasses.dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    code: str  # the block's text, dedented by the fence's indent
    marker: str | None = None  # "continue", "skip" or None
    reason: str = ""
    previous: Block | None = None  # the page's previous python block (for "continue")

    @property
    def id(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path.as_posix()}:{self.line}"


def python_blocks(path: Path) -> list[Block]:
    """The fenced python blocks of one Markdown file, in order (other languages are ignored)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        indent, ticks = m["indent"], m["ticks"]
        lang = (m["info"].split() or [""])[0].lower()
        end = i + 1
        while end < len(lines) and not re.match(rf"^[ \t]*{re.escape(ticks)}{ticks[0]}*[ \t]*$", lines[end]):
            end += 1
        if end == len(lines):
            raise ValueError(f"{path}:{i + 1}: the fence opened here is never closed")
        if lang in ("python", "py"):
            body = [ln[len(indent) :] if ln.startswith(indent) else ln.lstrip() for ln in lines[i + 1 : end]]
            marker, reason = None, ""
            before = _MARKER.match(lines[i - 1]) if i > 0 else None
            if before is not None:
                marker, reason = before["what"], before["reason"]
                if marker not in _MARKERS:
                    raise ValueError(
                        f"{path}:{i}: unknown docs-test marker {marker!r}; use one of {_MARKERS}"
                    )
                if marker == "skip" and not reason:
                    raise ValueError(f"{path}:{i}: a docs-test skip needs a reason")
                if marker == "continue" and not blocks:
                    raise ValueError(f"{path}:{i}: docs-test continue on the page's first python block")
            previous = blocks[-1] if blocks else None
            blocks.append(Block(path, i + 1, "\n".join(body) + "\n", marker, reason, previous))
        i = end + 1
    return blocks


BLOCKS = [b for path in DOC_FILES for b in python_blocks(path)]


def _chain(block: Block) -> list[Block]:
    """The blocks to run, in order: the continued ones first, then ``block``."""
    chain = [block]
    while chain[0].marker == "continue":
        assert chain[0].previous is not None
        chain.insert(0, chain[0].previous)
    return chain


def _refuse_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection to a non-loopback address raises: no block may download anything."""
    real_connect = socket.socket.connect

    def connect(sock, address):
        host = address[0] if isinstance(address, tuple) else None
        if host is not None and host not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"docs example tried to reach {address!r}: blocks must not use the network")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # the same path as tests/eval's corpus fixtures, so a full run builds the embedded corpus once
    return tmp_path_factory.getbasetemp() / "eval-corpus"


def test_blocks_are_found():
    assert any(b.path.name == "README.md" for b in BLOCKS)
    assert len({b.path for b in BLOCKS}) >= 5, [b.id for b in BLOCKS]


def test_parser_takes_python_blocks_and_markers(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text(
        "# t\n\n```bash\nls\n```\n\n```python\nx = 1\n```\n\n<!-- docs-test: continue -->\n"
        "```python\ny = x\n```\n\n```yaml\na: 1\n```\n\n<!-- docs-test: skip needs a GPU -->\n"
        "```python\nimport cuda_only\n```\n\n1. a list\n\n    ```python\n    z = 3\n    ```\n"
    )
    blocks = python_blocks(page)
    assert [(b.line, b.code, b.marker, b.reason) for b in blocks] == [
        (7, "x = 1\n", None, ""),
        (12, "y = x\n", "continue", ""),
        (21, "import cuda_only\n", "skip", "needs a GPU"),
        (27, "z = 3\n", None, ""),
    ]
    assert _chain(blocks[1]) == blocks[:2] and _chain(blocks[3]) == blocks[3:]
    for bad, message in (
        ("<!-- docs-test: skip -->\n```python\npass\n```\n", "needs a reason"),
        ("<!-- docs-test: maybe -->\n```python\npass\n```\n", "unknown docs-test marker"),
        ("<!-- docs-test: continue -->\n```python\npass\n```\n", "first python block"),
        ("```python\npass\n", "never closed"),
    ):
        page.write_text(bad)
        with pytest.raises(ValueError, match=message):
            python_blocks(page)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_docs_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, corpus_cache: Path):
    chain = _chain(block)
    skipped = [b for b in chain if b.marker == "skip"]
    if skipped:
        pytest.skip(f"{skipped[0].id}: {skipped[0].reason}")
    tmp_path.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PICOMAML_CACHE", str(corpus_cache))
    _refuse_network(monkeypatch)
    torch.manual_seed(0)
    random.seed(0)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    for b in chain:
        # padded so that tracebacks name the Markdown file and line of the failing statement
        source = "\n" * b.line + b.code
        try:
            exec(compile(source, str(b.path), "exec"), namespace)
        except (Exception, SystemExit) as exc:
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next))
            pytest.fail(f"the python block at {b.id} raised {type(exc).__name__}:\n{tb}", pytrace=False)


def test_runner_skips_fails_and_continues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nx = 41\n```\n<!-- docs-test: continue -->\n```python\nassert x + 1 == 42\n```\n"
        "<!-- docs-test: skip needs a GPU -->\n```python\nraise SystemExit\n```\n"
        "```python\nx = 1\n\n1 / 0\n```\n"
    )
    ok, continued, skipped, broken = python_blocks(page)
    for block in (ok, continued):
        test_docs_block_runs(block, tmp_path / f"run{block.line}", monkeypatch, tmp_path)
    with pytest.raises(pytest.skip.Exception, match="needs a GPU"):
        test_docs_block_runs(skipped, tmp_path / "skip", monkeypatch, tmp_path)
    with pytest.raises(pytest.fail.Exception, match=r"(?s)page.md:12 raised ZeroDivisionError.*line 15"):
        test_docs_block_runs(broken, tmp_path / "broken", monkeypatch, tmp_path)


def test_the_docs_hold_no_stray_files():
    """Editors and atomic writers leave hidden or ``*.tmp`` files beside a page; mkdocs would publish them."""
    stray = [
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "docs").rglob("*")
        if p.is_file() and (p.name.startswith(".") or p.suffix in (".tmp", ".swp", ".bak") or p.name.endswith("~"))
    ]
    assert stray == [], f"stray files in docs/ (remove them): {stray}"
