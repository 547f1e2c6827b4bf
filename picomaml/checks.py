"""Value checks without host syncs in a training step.

Reading a tensor's value in Python (``.item()``, ``.tolist()``, ``bool(t)``) makes the host wait for every
queued kernel: on an accelerator, a stall per read. A training step reads nothing:

* [`check_values`][picomaml.checks.check_values] reads a check's result on the first call with a given key
  (the shapes, usually), and raises the usual ``ValueError`` naming the argument; later calls with that key
  queue ``torch._assert_async`` with the same message (no host sync: on an accelerator the error surfaces as a
  ``RuntimeError`` at the next sync; on the CPU the assert is immediate and raises the same ``ValueError``).
  On CUDA a failed asynchronous assert is a device-side assert: the process cannot use the device
  afterwards, so a bad batch after the first good one ends the run (with the message) instead of raising
  a catchable error. That is the price of not waiting for the device at every step.
* Metrics stay 0-dim tensors on their device (the inner loop's ``out.metrics``); the caller reads them
  when it logs.

[`SyncCounter`][picomaml.checks.SyncCounter] counts the syncs of any code (``benchmarks/host_syncs.py`` prints
those of ``lm_loss`` and ``meta_loss``); on CUDA, ``torch.cuda.set_sync_debug_mode("error")`` finds any that
remain in a user's loop.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["check_values", "SyncCounter"]

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


class SyncCounter(TorchDispatchMode):
    """Counts host syncs inside a ``with`` block: every ``aten._local_scalar_dense`` (``.item()``,
    ``bool(tensor)``) and every ``.tolist()``/``.numpy()`` call (on CUDA they copy to the host; on the CPU they
    dispatch nothing, so the two methods are wrapped while the block runs). The same count on any device.

    Examples:
        ```python
        with SyncCounter() as syncs:
            pm.meta_loss(model, head, loop, episode).loss.backward()
        print(syncs.count)
        ```
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self._saved: dict[str, object] = {}

    def __enter__(self):
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(tensor, *a, _original=original, **kw):
                self.count += 1
                return _original(tensor, *a, **kw)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))
