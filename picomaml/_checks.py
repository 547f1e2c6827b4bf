"""Argument checks shared by the library's functions: one rule, one message."""

from __future__ import annotations

from typing import Any

__all__ = ["int_at_least"]


def int_at_least(name: str, value: Any, minimum: int = 1) -> int:
    """Return ``value`` if it is an ``int`` (not a ``bool``) of at least ``minimum``.

    Raises:
        ValueError: ``"<name> must be an integer >= <minimum>, got <value!r>"``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value
