"""Value checks without host syncs in a training step, and metrics that stay on the device until read.

Reading a tensor's value in Python (``.item()``, ``.tolist()``, ``bool(t)``) makes the host wait for every
queued kernel: on an accelerator, a stall per read. A training step reads nothing:

* :func:`check_values` reads a check's result on the first call with a given key (the shapes, usually),
  and raises the usual ``ValueError`` naming the argument; later calls with that key queue
  ``torch._assert_async`` with the same message (no host sync: on an accelerator the error surfaces as a
  ``RuntimeError`` at the next sync; on the CPU the assert is immediate and raises the same ``ValueError``).
* :class:`Metrics` holds a step's metrics as tensors and reads them all in one transfer when first read
  (when the caller logs them).

``benchmarks/host_syncs.py`` counts the syncs of ``lm_loss`` and ``meta_loss``; on CUDA,
``torch.cuda.set_sync_debug_mode("error")`` finds any that remain in a user's loop.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["check_values", "Metrics"]

# owner (weakly referenced: a module, a loop) -> the keys whose check passed once
_PASSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_values(owner: Any, key: Hashable, ok: Tensor, message: Callable[[], str], static: str) -> None:
    """Raise ``ValueError(message())`` unless ``ok`` (a bool tensor, all must hold).

    Until the check has passed once for ``(owner, key)`` its result is read (one sync) and a failure raises
    the detailed ``message()``; afterwards ``torch._assert_async(ok, static)`` is queued instead (no host
    sync; on the CPU it fails at once and raises the same ``ValueError``). An owner that cannot be weakly
    referenced (``None``) is checked with a read every time.
    """
    ok = ok.all()
    try:
        passed = _PASSED.setdefault(owner, set())
    except TypeError:
        passed = None
    if passed is not None and key in passed:
        if ok.device.type != "cpu":
            torch._assert_async(ok, static)
            return
        try:  # on the CPU the assert is immediate: it becomes the detailed ValueError
            torch._assert_async(ok, static)
        except RuntimeError:
            raise ValueError(message()) from None
        return
    if not bool(ok):
        raise ValueError(message())
    if passed is not None:
        passed.add(key)


class Metrics(dict):
    """A step's metrics: a ``dict`` of floats to the reader, tensors on their device until the first read.

    Values set as tensors (0-dim or one element) are kept detached; the first read of any value (indexing,
    ``get``, ``items``, ``values``, ``repr``, comparison, ``copy``, ``pop``) moves all pending ones to the
    host in one transfer. Iterating the keys reads nothing. ``warn_if(key, text)`` issues a
    ``RuntimeWarning`` at that read when the value is non-zero (a condition found without a sync).
    """

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self._pending: set[str] = set()
        self._warnings: list[tuple[str, str]] = []
        for k, v in (values or {}).items():
            self[k] = v

    def warn_if(self, key: str, text: str) -> None:
        self._warnings.append((key, text))

    def _read(self) -> None:
        if self._pending:
            names = [k for k in dict.keys(self) if k in self._pending]
            tensors = [dict.__getitem__(self, k).float().reshape(()) for k in names]
            for k, v in zip(names, torch.stack(tensors).tolist(), strict=True):  # the one sync
                dict.__setitem__(self, k, v)
            self._pending.clear()
            for key, text in self._warnings:
                if dict.get(self, key):
                    warnings.warn(text, RuntimeWarning, stacklevel=3)
            self._warnings.clear()

    def __setitem__(self, key: str, value: Any) -> None:
        if isinstance(value, Tensor):
            self._pending.add(key)
            dict.__setitem__(self, key, value.detach())
        else:
            self._pending.discard(key)
            dict.__setitem__(self, key, float(value))

    def __getitem__(self, key: str) -> float:
        self._read()
        return dict.__getitem__(self, key)

    def __iter__(self):  # defined, so dict(m) and {**m} copy through __getitem__ (CPython's fast path is off)
        return iter(dict.keys(self))

    def get(self, key: str, default: Any = None) -> Any:
        self._read()
        return dict.get(self, key, default)

    def items(self):  # type: ignore[override]
        self._read()
        return dict.items(self)

    def values(self):  # type: ignore[override]
        self._read()
        return dict.values(self)

    def pop(self, key: str, *default: Any) -> Any:
        self._read()
        return dict.pop(self, key, *default)

    def update(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        for k, v in dict(*args, **kwargs).items():
            self[k] = v

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def copy(self) -> dict[str, float]:  # type: ignore[override]
        self._read()
        return dict(dict.items(self))

    def __eq__(self, other: object) -> bool:
        self._read()
        return dict.__eq__(self, other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        self._read()
        return dict.__repr__(self)

    def __reduce__(self):  # pickles / deep-copies as the plain dict it reads as
        return (dict, (self.copy(),))
