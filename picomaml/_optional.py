"""Lazy imports of optional dependencies with errors that name the extra to install.

It also loads the inner loop's references for the test suite and the benchmarks: ``higher`` imports as
usual; learn2learn 0.2.0 needs `load_learn2learn`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import types
from pathlib import Path
from types import ModuleType

__all__ = ["MissingDependencyError", "require", "is_available", "load_learn2learn", "L2L_INSTALL"]

L2L_INSTALL = (
    "pip install cython && pip install --no-deps --no-build-isolation "
    "--config-settings=--global-option=build_ext learn2learn==0.2.0"
)
_L2L: dict[str, ModuleType] = {}


class MissingDependencyError(ImportError):
    """An optional dependency is not installed; the message names the pip extra that provides it."""


def require(module: str, extra: str, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise [`MissingDependencyError`][picomaml._optional.MissingDependencyError] naming
    ``pip install picomaml[extra]``.

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


def load_learn2learn(module: str = "maml") -> ModuleType:
    """``learn2learn.algorithms.<module>`` (``"maml"``: ``MAML``; ``"meta_sgd"``: ``MetaSGD``) without running
    ``learn2learn/__init__.py``.

    learn2learn 0.2.0 does not build on Python 3.11 with a plain install (`L2L_INSTALL` works), and
    its package ``__init__`` imports torchvision and gym, which must not be pulled in (they would replace the
    CPU torch). The package directory is found from the installed distribution's metadata; while the
    module loads, empty stand-ins for the parent packages sit in ``sys.modules`` and are removed
    afterwards, so a later real ``import learn2learn`` is unaffected.

    Raises:
        MissingDependencyError: learn2learn is not installed (the message gives the install command).
    """
    if module in _L2L:
        return _L2L[module]
    if "learn2learn" in sys.modules and hasattr(sys.modules["learn2learn"], "__file__"):
        _L2L[module] = importlib.import_module(f"learn2learn.algorithms.{module}")  # already fully imported
        return _L2L[module]
    try:
        pkg = Path(str(importlib.metadata.distribution("learn2learn").locate_file("learn2learn")))
    except importlib.metadata.PackageNotFoundError as exc:
        raise MissingDependencyError(f"learn2learn 0.2.0 is not installed. Install it with: {L2L_INSTALL}") from exc
    if not (pkg / "algorithms" / f"{module}.py").is_file():
        raise MissingDependencyError(f"learn2learn is installed but {pkg}/algorithms/{module}.py is missing; {L2L_INSTALL}")
    touched = ["learn2learn", "learn2learn.algorithms", "learn2learn.algorithms.base_learner", "learn2learn.utils"]
    touched.append(f"learn2learn.algorithms.{module}")
    saved = {name: sys.modules.get(name) for name in touched}
    try:
        for name, path in (("learn2learn", pkg), ("learn2learn.algorithms", pkg / "algorithms")):
            stub = types.ModuleType(name)
            stub.__path__ = [str(path)]  # a package whose __init__ is never run
            sys.modules[name] = stub
        _L2L[module] = importlib.import_module(f"learn2learn.algorithms.{module}")
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return _L2L[module]
