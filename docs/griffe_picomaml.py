"""Griffe extension for the API reference (loaded by mkdocstrings, see ``docs/mkdocs.yml``).

Two things the static analysis of ``picomaml`` gets wrong for the rendered pages:

* **Defaults taken from a config class.** Signatures such as ``pooling: str = MetaConfig.pooling`` keep one
  source of truth for a default (the hyperparameter declaration), but statically the default is the
  expression ``MetaConfig.pooling``, which renders as the bare name ``pooling``. Such a default (and one
  that names a private module constant, ``_STREAM``) is replaced by the ``repr`` of its value, read by
  importing the module, when that value is a plain literal (str, number, bool, ``None``, or a
  tuple/list/frozenset of those). Anything else is left as written.
* **Re-exports.** A module that re-exports a name in its ``__all__`` (``KVCache`` in
  ``picomaml.model.decoder``, ``pool_features`` in ``picomaml.meta.objectives``, ...) would render the object
  a second time. Such aliases are marked non-public, so every object is rendered once, under its defining
  module, which is also the target that cross-references use.
"""

from __future__ import annotations

import importlib
from typing import Any

import griffe

PACKAGE = "picomaml"
_SCALARS = (str, int, float, bool, type(None))


def _is_literal(value: Any) -> bool:
    if isinstance(value, _SCALARS):
        return True
    if isinstance(value, (tuple, list, frozenset)):
        return all(isinstance(v, _SCALARS) for v in value)
    return False


def _runtime_value(path: str) -> tuple[bool, Any]:
    """The value at a dotted ``picomaml`` path, by import: ``(found, value)``."""
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for name in parts[split:]:
                obj = getattr(obj, name)
        except AttributeError:
            return False, None
        return True, obj
    return False, None


def _literal_default(default: Any) -> str | None:
    """``repr`` of a config-class default such as ``MetaConfig.pooling``, or ``None`` to keep it as written."""
    if isinstance(default, griffe.ExprName):
        if not default.name.startswith("_"):  # a public constant renders as its (linked) name
            return None
    elif not isinstance(default, griffe.ExprAttribute):
        return None
    try:
        path = default.canonical_path
    except Exception:  # noqa: BLE001 - an unresolvable expression stays as written
        return None
    if not path.startswith(PACKAGE + "."):
        return None
    found, value = _runtime_value(path)
    if not found or not _is_literal(value):
        return None
    return repr(value)


def _functions(obj: griffe.Object) -> Any:
    for member in obj.members.values():
        if member.is_alias:
            continue
        if member.is_function:
            yield member
        elif member.is_class or (member.is_module and member.path.startswith(PACKAGE)):
            yield from _functions(member)


def _modules(module: griffe.Module) -> Any:
    yield module
    for member in module.members.values():
        if not member.is_alias and member.is_module:
            yield from _modules(member)


class PicomamlDocs(griffe.Extension):
    """Literal values for config-class defaults, and no second rendering of re-exported names."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name != PACKAGE:
            return
        for function in _functions(pkg):
            for parameter in function.parameters:
                literal = _literal_default(parameter.default)
                if literal is not None:
                    parameter.default = literal
        for module in _modules(pkg):
            for member in module.members.values():
                if member.is_alias and member.target_path.startswith(PACKAGE + "."):
                    member.public = False
