"""Lazy imports of optional dependencies with errors that name the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingDependencyError", "require", "is_available"]


class MissingDependencyError(ImportError):
    """An optional dependency is not installed; the message names the pip extra that provides it."""


def require(module: str, extra: str, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming ``pip install picomaml[extra]``.

    Args:
        module: Dotted module name, e.g. ``"transformers"``.
        extra: The picomaml extra that installs it, e.g. ``"hf"``.
        purpose: Optional words on what needs it, for the message.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        what = f" (needed for {purpose})" if purpose else ""
        raise MissingDependencyError(
            f"The optional dependency '{module.split('.')[0]}' is not installed{what}. "
            f"Install it with: pip install 'picomaml[{extra}]'"
        ) from exc


def is_available(module: str) -> bool:
    """True when ``module`` imports without error (any exception counts as unavailable)."""
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - a broken install is as unavailable as a missing one
        return False
    return True
