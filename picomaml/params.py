"""Hyperparameter declarations: one dataclass field per hyperparameter, checked by one set of rules.

Every configurable component owns a dataclass of its keyword arguments (``HeadConfig`` beside
[`MetaHead`][picomaml.meta.head.MetaHead], ``InnerLoopConfig`` beside
[`InnerLoop`][picomaml.meta.inner_loop.InnerLoop], ...). A field is declared with
[`hparam`][picomaml.params.hparam]: its type annotation gives the allowed values (``Literal`` for choices),
its default is the component's default, and ``ge``/``gt``/``le``/``lt`` give its range.
[`Params`][picomaml.params.Params] validates every field from those declarations when the dataclass is built,
so the component's constructor, the YAML loader and ``--set`` overrides share the same names, defaults, ranges
and messages.

This module imports neither torch nor any other picomaml module, so any module may import it.

Errors: one type, [`ConfigError`][picomaml.params.ConfigError] (a ``ValueError``), whose message starts
with the argument's name (a dotted path inside a config) and says what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import numbers
import reprlib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

__all__ = [
    "ConfigError",
    "check",
    "check_int",
    "check_number",
    "choices",
    "hparam",
    "Params",
    "from_dict",
    "to_dict",
    "field_docs",
    "short_repr",
    "one_line",
]

T = TypeVar("T")
_MAX_REPR = 80  # longest value shown in a message: a huge value never makes a huge message


class ConfigError(ValueError):
    """A bad argument or configuration value. The message names it and what is allowed."""


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 2, 4, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 60, 60, 40


def short_repr(value: Any, limit: int = _MAX_REPR) -> str:
    """A ``repr`` of ``value`` bounded in length *and* in work: nested or huge values (a YAML alias bomb
    expands to billions of items) are abbreviated while they are walked, never built in full."""
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the real error
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 5] + " ...>"


def one_line(text: object, limit: int = 240) -> str:
    """``str(text)`` on one line (whitespace runs collapsed), cut to ``limit`` characters; only the first
    ``2 * limit`` characters are looked at, so a huge text costs nothing."""
    flat = " ".join(str(text)[: 2 * limit].split())
    return flat if len(flat) <= limit else flat[: limit - 4] + " ..."


def check(condition: bool, field: str, message: str) -> None:
    """Raise [`ConfigError`][picomaml.params.ConfigError] ``"<field>: <message>"`` unless ``condition``
    holds."""
    if not condition:
        raise ConfigError(f"{field}: {message}")


def _bounds_text(ge: Any = None, gt: Any = None, le: Any = None, lt: Any = None) -> str:
    parts = [f">= {ge}" if ge is not None else "", f"> {gt}" if gt is not None else ""]
    parts += [f"<= {le}" if le is not None else "", f"< {lt}" if lt is not None else ""]
    return " and ".join(p for p in parts if p)


def _in_bounds(value: float, ge: Any, gt: Any, le: Any, lt: Any) -> bool:
    return (
        (ge is None or value >= ge)
        and (gt is None or value > gt)
        and (le is None or value <= le)
        and (lt is None or value < lt)
    )


def check_int(name: str, value: Any, ge: int | None = None, le: int | None = None) -> int:
    """Return ``value`` as an ``int`` if it is an integer (not a bool) within ``[ge, le]``.

    Raises:
        ConfigError: ``"<name>: must be an integer >= <ge>, got <value>"``.
    """
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or not _in_bounds(int(value), ge, None, le, None):
        bounds = _bounds_text(ge=ge, le=le)
        raise ConfigError(
            f"{name}: must be an integer{' ' + bounds if bounds else ''}, got {short_repr(value)}"
        )
    return int(value)


def count_arg(low: int, high: int | None = None) -> Callable[[str], int]:
    """An ``argparse`` type: an integer in ``[low, high]``; anything else is argparse's one-line usage error,
    which names the option (``argument --n: expected an integer in [1, 10,000], got 0``)."""
    allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high:,}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {value}")
        return value

    return parse


def check_number(
    name: str,
    value: Any,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> float:
    """Return ``value`` as a finite ``float`` within the given bounds (ints are accepted, bools are not).

    Raises:
        ConfigError: ``"<name>: must be a finite number > <gt>, got <value>"``.
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not _in_bounds(float(value), ge, gt, le, lt):
        bounds = _bounds_text(ge, gt, le, lt)
        raise ConfigError(
            f"{name}: must be a finite number{' ' + bounds if bounds else ''}, got {short_repr(value)}"
        )
    return float(value)


def choices(tp: Any) -> tuple[Any, ...]:
    """The allowed values of a ``Literal`` annotation (``None`` included for an optional one)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return tuple(
            v for arg in typing.get_args(tp) for v in (choices(arg) if arg is not type(None) else (None,))
        )
    raise TypeError(f"not a Literal annotation: {tp!r}")


def hparam(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    doc: str = "",
    removed: Mapping[Any, str] | None = None,
) -> Any:
    """Declare one hyperparameter: a dataclass field with its range and a one-line meaning.

    Numbers are range-checked (and must be finite); for a sequence the range applies to every item.
    ``doc`` feeds the generated configuration reference. ``removed`` maps values that were once allowed
    to what replaces them: such a value is an error with that text instead of the list of choices.
    """
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "doc": doc, "removed": dict(removed or {})}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


# ------------------------------------------------------------------------------------------------
# type checking and conversion (one walk over an annotation, shared by constructors and the loader)
# ------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp) if a is not Ellipsis)
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert_field(value: Any, tp: Any, path: str, metadata: Mapping[str, Any], check_range: bool = True) -> Any:
    """`_convert` for a declared field: a removed value names its replacement first; then the range."""
    removed = metadata.get("removed") or {}
    if isinstance(value, typing.Hashable) and not isinstance(value, bool) and value in removed:
        raise ConfigError(f"{path}: {short_repr(value)} {removed[value]}")
    value = _convert(value, tp, path)
    if check_range:
        _check_range(value, metadata, path)
    return value


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``, convert containers; raise naming ``path``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, path=path)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) or value not in allowed:
            raise ConfigError(f"{path}: {short_repr(value)} is not allowed; choose one of {list(allowed)}")
        return value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, path)
            except ConfigError:
                continue
        if type(None) in typing.get_args(tp) and all(
            typing.get_origin(a) is Literal or a is type(None) for a in typing.get_args(tp)
        ):
            raise ConfigError(
                f"{path}: {short_repr(value)} is not allowed; choose one of {list(choices(tp))}"
            )
        raise ConfigError(f"{path}: {short_repr(value)} does not match {_type_name(tp)}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{path}: expected null, got {short_repr(value)}")
        return None
    if origin in (tuple, list, Sequence):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {short_repr(value)}")
        args = typing.get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
            items = [_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))]
        else:
            inner = args[0] if args else Any
            items = [_convert(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else list(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        _, vt = typing.get_args(tp) or (Any, Any)
        return {str(k): _convert(v, vt, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {short_repr(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"{path}: expected an integer, got {short_repr(value)}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{path}: expected a number, got {short_repr(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {short_repr(value)}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {type(value).__name__}")
    return value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The resolved field annotations of a dataclass (resolved once per class: constructors call this)."""
    return typing.get_type_hints(cls)


def _check_range(value: Any, meta: Mapping[str, Any], path: str) -> None:
    bounds = {k: meta.get(k) for k in ("ge", "gt", "le", "lt")}
    if isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            _check_range(item, meta, f"{path}[{i}]")
        return
    if value is None or isinstance(value, (bool, str)) or not isinstance(value, numbers.Real):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: must be a finite number, got {value!r}")
    if not _in_bounds(value, **bounds):
        text = _bounds_text(**bounds)
        kind = "an integer" if isinstance(value, numbers.Integral) else "a number"
        raise ConfigError(f"{path}: must be {kind} {text}, got {short_repr(value)}")


@dataclasses.dataclass
class Params:
    """Base of every hyperparameter dataclass: validates each field from its declaration.

    On construction every field is type-checked against its annotation (lists become tuples where the
    annotation says ``tuple``), numbers are checked finite and inside their [`hparam`][picomaml.params.hparam]
    range, then [`validate`][picomaml.params.Params.validate] runs the cross-field rules of the subclass.
    """

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            value = _convert_field(getattr(self, f.name), hints[f.name], f.name, f.metadata)
            object.__setattr__(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Cross-field rules; subclasses override it and raise [`ConfigError`][picomaml.params.ConfigError]
        naming the field."""


def from_dict(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Build the dataclass ``cls`` from a mapping, strictly.

    Unknown keys raise [`ConfigError`][picomaml.params.ConfigError] naming the key, its dotted path and the
    valid keys (a key listed in the class's ``RENAMED`` mapping names its new spelling); values are
    type-checked against the field annotations; missing keys take the defaults. A class with a ``preset``
    classmethod accepts a ``preset: NAME`` key whose values the other keys override.

    Args:
        cls: A dataclass type.
        data: The mapping (``None`` means all defaults).
        path: Dotted prefix used in error messages.
    """
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    data = dict(data or {})
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    where = f" in '{path}'" if path else ""
    preset = data.pop("preset", None) if hasattr(cls, "preset") else None
    renamed: Mapping[str, str] = getattr(cls, "RENAMED", {})
    for key in data:
        if key not in fields:
            full = f"{path}.{key}" if path else key
            if key in renamed:
                raise ConfigError(f"'{full}' was renamed: write '{renamed[key]}' instead")
            valid = sorted(fields) + (["preset"] if hasattr(cls, "preset") else [])
            raise ConfigError(
                f"unknown key {short_repr(str(key))}{where} (at {short_repr(full)}); valid keys: {', '.join(valid)}"
            )
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}
    kwargs = {k: _convert_field(v, hints[k], f"{path}.{k}" if path else k, meta.get(k, {}), check_range=False)
              for k, v in data.items()}  # fmt: skip
    try:
        if preset is not None:
            try:
                return cls.preset(preset, **kwargs)  # type: ignore[attr-defined]
            except ConfigError:
                raise
            except (KeyError, ValueError) as exc:
                raise ConfigError(f"preset: {exc}") from exc
        return cls(**kwargs)
    except ConfigError as exc:
        if path and not str(exc).startswith(path):
            raise ConfigError(f"{path}.{exc}") from None
        raise


def to_dict(obj: Any) -> Any:
    """Dataclass (nested) -> plain dict/list/scalars suitable for YAML or JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def field_docs(cls: type) -> list[tuple[str, str, Any, str]]:
    """``(name, type, default, meaning)`` of every field of a hyperparameter dataclass, in order."""
    hints = _hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        meta = f.metadata
        bounds = _bounds_text(meta.get("ge"), meta.get("gt"), meta.get("le"), meta.get("lt"))
        doc = meta.get("doc", "") + (f" ({bounds})" if bounds else "")
        rows.append((f.name, _type_name(hints[f.name]), to_dict(default), doc.strip()))
    return rows
