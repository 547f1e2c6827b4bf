"""The API reference (docs/pages/api/*.md, built by mkdocstrings) renders what it should, checked without a build.

* Docstrings are Markdown: a Sphinx role (``:class:`X```) renders verbatim, so none may remain; a
  cross-reference is ``[`X`][picomaml.module.X]`` (resolved by mkdocs-autorefs) and must name an object that
  exists.
* An example renders as code: ``Examples:`` (griffe's section, whose ``>>>`` lines become a code block) with
  ``>>>`` lines or a fenced block. A singular ``Example:`` is an admonition whose ``>>>`` lines render as
  nested blockquotes, and an RST ``::`` block is not Markdown.
* Every name in ``picomaml.__all__`` is rendered by some ``:::`` directive of the API pages, each page is in
  the nav, and signature defaults taken from a config class render as values (docs/griffe_picomaml.py).

The strict build itself (``mkdocs build --strict -f docs/mkdocs.yml``) runs in CI; it fails on any
cross-reference that does not resolve to a rendered object.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

import picomaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "picomaml"
API_PAGES = sorted((ROOT / "docs" / "pages" / "api").glob("*.md"))

ROLE = re.compile(r":(class|func|meth|mod|attr|data|exc|obj):`")
XREF = re.compile(r"\]\[(picomaml(?:\.\w+)*)\]")
EXAMPLE_HEADER = re.compile(r"^(?P<indent>\s*)(?P<title>Examples?\b[^:\n]*)(?P<colons>::?)\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def _docstrings() -> list[tuple[str, int, str]]:
    """``(file, first line, text)`` of every docstring in picomaml/: modules, classes, functions, attributes."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            body = getattr(node, "body", None)
            if not isinstance(body, list):
                continue
            for i, stmt in enumerate(body):
                if not (
                    isinstance(stmt, ast.Expr)
                    and isinstance(stmt.value, ast.Constant)
                    and isinstance(stmt.value.value, str)
                ):
                    continue
                # the first statement of a module/class/function, or a string right after an assignment
                if i == 0 or isinstance(body[i - 1], (ast.Assign, ast.AnnAssign)):
                    found.append((rel, stmt.lineno, stmt.value.value))
    return found


DOCSTRINGS = _docstrings()


def _directives() -> list[tuple[str, dict]]:
    """``(identifier, options)`` of every ``::: identifier`` directive of the API pages."""
    found = []
    for page in API_PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"^:::\s+(\S+)\s*$", line)
            if m is None:
                continue
            block = []
            for nxt in lines[i + 1 :]:
                if nxt.strip() and not nxt.startswith((" ", "\t")):
                    break
                block.append(nxt)
            options = (yaml.safe_load("\n".join(block)) or {}).get("options", {}) if block else {}
            found.append((m[1], options))
    return found


def _canonical(obj: object) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def test_no_sphinx_roles_in_docstrings() -> None:
    offenders = sorted(
        (rel, line + text.count("\n", 0, m.start()), text[m.start() : m.end() + 40].splitlines()[0])
        for rel, line, text in DOCSTRINGS
        for m in ROLE.finditer(text)
    )
    per_file = Counter(rel for rel, _, _ in offenders)
    assert not offenders, (
        f"{len(offenders)} Sphinx roles render verbatim in the API reference ({dict(per_file)}); write "
        "[`X`][picomaml.module.X] (or `X` for a private or unrendered name):\n"
        + "\n".join(f"{rel}:{line}: {snippet}" for rel, line, snippet in offenders)
    )


def test_cross_references_name_existing_objects() -> None:
    griffe = pytest.importorskip("griffe")
    pkg = griffe.load("picomaml", search_paths=[str(ROOT)])
    missing = []
    for rel, line, text in DOCSTRINGS:
        for m in XREF.finditer(text):
            path = m[1]
            try:
                obj = pkg if path == "picomaml" else pkg[path[len("picomaml.") :]]
                if obj.is_alias:
                    obj = obj.final_target
            except Exception:  # noqa: BLE001 - any failure to resolve is the finding
                missing.append(f"{rel}:{line}: {path}")
                continue
            if obj.is_alias or obj.path != path:  # autorefs finds an object under its defining module
                missing.append(f"{rel}:{line}: {path} (defined as {obj.path})")
    assert not missing, "cross-references to objects that do not exist:\n" + "\n".join(missing)


def test_examples_render_as_code() -> None:
    offenders = []
    for rel, line, text in DOCSTRINGS:
        lines = text.splitlines()
        in_examples: list[bool] = [False] * len(lines)
        for i, ln in enumerate(lines):
            m = EXAMPLE_HEADER.match(ln)
            if m is None:
                continue
            where = f"{rel}:{line + i}: {ln.strip()!r}"
            if m["title"] != "Examples" or m["colons"] != ":":
                offenders.append(f"{where}: write 'Examples:' (a Google section) with >>> lines or a fence")
                continue
            indent = len(m["indent"])
            body = []
            for j in range(i + 1, len(lines)):
                nxt = lines[j]
                if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                in_examples[j] = True
                body.append(nxt)
            first = next((b.strip() for b in body if b.strip()), "")
            if not (first.startswith(">>>") or FENCE.match(first)):
                offenders.append(f"{where}: the section must start with >>> lines or a fenced block")
        for i, ln in enumerate(lines):
            if ln.lstrip().startswith(">>>") and not in_examples[i]:
                offenders.append(
                    f"{rel}:{line + i}: >>> outside an 'Examples:' section renders as a blockquote"
                )
    assert not offenders, "examples that do not render as code:\n" + "\n".join(sorted(offenders))


def test_every_public_name_is_rendered() -> None:
    directives = _directives()
    assert directives, "no ::: directives found in docs/pages/api"

    def renders(path: str) -> bool:
        for ident, options in directives:
            if path == ident:
                return True
            if not path.startswith(ident + ".") or options.get("members") is False:
                continue
            head = path[len(ident) + 1 :].split(".")[0]
            members = options.get("members")
            if isinstance(members, list):
                if head in members:
                    return True
                continue
            if head.startswith("_"):
                continue
            container = importlib.import_module(ident) if ident == path.rsplit(".", 1)[0] else None
            exported = getattr(container, "__all__", None) if inspect.ismodule(container) else None
            if exported is None or head in exported:
                return True
        return False

    missing, undocumented = [], []
    for name in picomaml.__all__:
        if name == "__version__":
            continue
        obj = getattr(picomaml, name)
        path = _canonical(obj)
        if not renders(path):
            missing.append(f"{name} ({path})")
        if not (obj.__doc__ or "").strip():  # mkdocstrings hides an object without a docstring
            undocumented.append(name)
    assert not missing, "public names that no ::: directive in docs/pages/api renders:\n" + "\n".join(missing)
    assert not undocumented, f"public names without a docstring (not rendered): {undocumented}"


def test_directives_name_importable_objects() -> None:
    bad = []
    for ident, _ in _directives():
        parts = ident.split(".")
        for k in range(len(parts), 0, -1):
            try:
                obj: object = importlib.import_module(".".join(parts[:k]))
            except ImportError:
                continue
            try:
                for attr in parts[k:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                bad.append(ident)
            break
        else:
            bad.append(ident)
    assert not bad, f"::: directives naming nothing: {bad}"


def test_every_api_page_is_in_the_nav() -> None:
    text = (ROOT / "docs" / "mkdocs.yml").read_text(encoding="utf-8")
    nav = set(re.findall(r":\s*(api/[\w-]+\.md)\s*$", text, re.M))
    pages = {p.relative_to(ROOT / "docs" / "pages").as_posix() for p in API_PAGES}
    assert pages == nav, (
        f"API pages not in the nav: {sorted(pages - nav)}; nav entries without a page: {sorted(nav - pages)}"
    )


def test_config_defaults_render_as_values() -> None:
    griffe = pytest.importorskip("griffe")
    extension = griffe.load_extensions(f"{ROOT / 'docs' / 'griffe_picomaml.py'}:PicomamlDocs")
    pkg = griffe.load("picomaml", search_paths=[str(ROOT)], extensions=extension)
    from picomaml.meta.head import MetaHead
    from picomaml.meta.hybrid import HybridScheduler
    from picomaml.meta.inner_loop import InnerLoop
    from picomaml.meta.learner import HybridLearner
    from picomaml.meta.objectives import meta_loss
    from picomaml.meta.sampler import SMLMTSampler

    wrong = []
    for obj in (HybridLearner, InnerLoop, HybridScheduler, SMLMTSampler, MetaHead, meta_loss):
        path = _canonical(obj)
        function = pkg[path[len("picomaml.") :] + (".__init__" if inspect.isclass(obj) else "")]
        runtime = inspect.signature(obj).parameters
        for parameter in function.parameters:
            if parameter.name not in runtime or runtime[parameter.name].default is inspect.Parameter.empty:
                continue
            rendered = str(parameter.default)
            if rendered != repr(runtime[parameter.name].default):
                wrong.append(f"{path}({parameter.name}=...): renders {rendered!r}")
    assert not wrong, "signature defaults that do not render as their value:\n" + "\n".join(wrong)
