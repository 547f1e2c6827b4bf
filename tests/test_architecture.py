"""Structure that keeps the library cheap to change: no import cycles, no upward imports, a self-contained meta/.

Run ``python tests/test_architecture.py`` to print the figures these tests check.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "picomaml"


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """``module -> picomaml modules it imports``, lazy (in-function) and ``TYPE_CHECKING`` imports included."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            for name in names:
                target = resolve(name) if name.startswith("picomaml") else None
                # the top-level package only maps public names to modules (lazily): not an edge back
                if target and target != module and module != "picomaml":
                    graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_inside_the_package():
    assert cycles(import_graph()) == []


def test_meta_is_self_contained():
    """meta/ (episodes, sampler, head, the inner-loop engine, features, objectives, HybridLearner) imports only
    itself, model/ and the small checks and params modules: never training, evaluation or interop code."""
    allowed = ("picomaml.meta", "picomaml.model", "picomaml.checks", "picomaml.params")
    outside = {
        module: sorted(d for d in deps if not d.startswith(allowed))
        for module, deps in import_graph().items()
        if module.startswith("picomaml.meta")
    }
    assert {m: d for m, d in outside.items() if d} == {}


# the layers, bottom up: a module imports only from its own layer or the ones below it
LAYERS = [
    ("picomaml._version", "picomaml._optional", "picomaml.params", "picomaml.checks"),
    ("picomaml.model",),
    ("picomaml.data",),
    ("picomaml.meta",),
    ("picomaml.eval",),
    ("picomaml.interop",),
    ("picomaml.train",),
    ("picomaml.cli",),
]


def layer_of(module: str) -> int | None:
    for rank, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return rank
    return None


def test_no_module_imports_a_layer_above_its_own():
    upward = {
        module: sorted(d for d in deps if (layer_of(d) or 0) > (layer_of(module) or 0))
        for module, deps in import_graph().items()
        if module != "picomaml"
    }
    assert {m: d for m, d in upward.items() if d} == {}
    assert all(layer_of(m) is not None for m in import_graph() if m != "picomaml"), "a module outside every layer"


def test_the_top_level_holds_only_the_entry_points():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert top == ["__init__", "_optional", "_version", "checks", "cli", "params"], top


def test_the_graph_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_model_config_needs_no_torch_and_no_other_module():
    assert import_graph()["picomaml.model.config"] == {"picomaml.params"}
    assert import_graph()["picomaml.params"] == set()
    source = (PACKAGE / "model" / "config.py").read_text() + (PACKAGE / "params.py").read_text()
    assert "import torch" not in source


if __name__ == "__main__":
    found = cycles(import_graph())
    print(f"import cycles: {len(found)}", *(" <-> ".join(c) for c in found), sep="\n  ")
