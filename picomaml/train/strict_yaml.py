"""Strict YAML for configs: safe tags only, no duplicate keys, ``1e-3`` read as a number, clear errors.

PyYAML's safe loader follows YAML 1.1, which reads ``1e-3`` as a string and lets a repeated key silently
win; both are config mistakes that surface late. [`load_yaml`][picomaml.train.strict_yaml.load_yaml] reads
every YAML 1.2 float spelling as a float, refuses duplicate keys, and turns every parse error into a
[`ConfigError`][picomaml.params.ConfigError] that names the source (a file or a ``--set`` override) and the
line. Like this whole layer it imports no torch and nothing of the experiment schema.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from picomaml.params import ConfigError, short_repr

__all__ = ["load_yaml", "load_yaml_file", "apply_overrides"]

# YAML 1.2 floats, which YAML 1.1 partly misses: 1e-3, 1E5, .5e2, 3., -2.5e+4, .inf, .nan
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats and an error on a repeated mapping key."""


_StrictLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:float"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            line = key_node.start_mark.line + 1
            first = seen[key].start_mark.line + 1
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {short_repr(key)} (line {line}; first at line {first})",
                key_node.start_mark,
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML ``text`` strictly; ``source`` (a path or ``override 'k=v'``) prefixes every error.

    Raises:
        ConfigError: a syntax error, an unsafe tag such as ``!!python/object``, or a duplicate key, with
            the source and the line; the message is bounded in length.
    """
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: invalid YAML{where}: {str(problem)[:200]}") from None


def load_yaml_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file whose top level is a mapping (an empty file gives ``{}``).

    Raises:
        ConfigError: the file is missing, a directory, unreadable, not UTF-8, invalid YAML, or its top
            level is not a mapping; the message names the file.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a YAML config file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read as UTF-8 text: {exc}") from None
    loaded = load_yaml(text, str(path))
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
    return loaded or {}


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides (values parsed as strict YAML) to a nested dict, in place.

    Example: ``apply_overrides(d, ["model.d_model=128", "hybrid.ratio=0.25"])``. Unknown keys are not
    rejected here; [`from_dict`][picomaml.params.from_dict] rejects them afterwards with the full path.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {short_repr(item)}: expected KEY=VALUE, e.g. model.d_model=128")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {short_repr(item)}: empty key segment")
        value = load_yaml(raw, f"override {short_repr(item)}") if raw.strip() else ""
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {short_repr(item)}: '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data
