"""Checking a checkpoint's states against the components built from the config, before any is loaded.

``load_state_dict`` trusts what it is given: a module copies int64 tensors into float parameters and NaNs
into weights, an optimizer takes moments of any shape (and fails only at its first step), a ``LambdaLR``
takes any epoch. A checkpoint's files are hashed, but the checkpoint may still be foreign: another run's,
edited by hand, or written by other code. [`check_states`][picomaml.train.state_check.check_states] compares
every saved tensor's shape, dtype and values with what the run built from its config expects, and every
counter with the checkpoint's step, and names the first difference:

    model: 'layers.0.attn.q_proj.weight' is (64, 32) in the checkpoint, the model built from the config has (128, 32)

Components without tensors (the data position, the sampler) check their own states in their
``load_state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from picomaml.params import short_repr

__all__ = ["StateMismatchError", "check_states", "check_module_state", "check_optimizer_state"]

_MAX_COUNT = 2**62  # far above any real step, token or FLOP count, far below what overflows an int64


class StateMismatchError(ValueError):
    """A saved state does not fit the component built from the config; the message names the component,
    the key and what was expected."""


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def _check_tensor(where: str, saved: Any, expected: Tensor, what: str) -> None:
    """``saved`` has ``expected``'s shape and dtype, and no NaN or infinity when floating."""
    if not isinstance(saved, Tensor):
        raise StateMismatchError(f"{where} is {short_repr(saved)} in the checkpoint, not a tensor")
    if saved.shape != expected.shape:
        raise StateMismatchError(
            f"{where} is {_shape(saved)} in the checkpoint, {what} has {_shape(expected)}"
        )
    if saved.dtype != expected.dtype:
        hint = ""
        if saved.is_floating_point() and expected.is_floating_point():
            hint = " (a change of trainer.precision? resume in the precision the checkpoint was saved in)"
        raise StateMismatchError(f"{where} is {saved.dtype} in the checkpoint, {what} has {expected.dtype}{hint}")
    if saved.is_floating_point() or saved.is_complex():
        bad = int((~torch.isfinite(saved)).sum())
        if bad:
            raise StateMismatchError(
                f"{where} holds {bad} NaN or infinite value(s) of {saved.numel()}: the checkpoint is damaged or "
                "was saved after the weights diverged"
            )


def check_module_state(name: str, module: nn.Module, saved: Any) -> None:
    """Every entry of ``module.state_dict()`` is in ``saved`` with the same shape and dtype, finite, and
    ``saved`` has nothing else.

    Args:
        name: The component's name in the checkpoint (for the message).
        module: The module built from the config.
        saved: Its saved state.

    Raises:
        StateMismatchError: The first difference, naming the key.
    """
    if not isinstance(saved, Mapping):
        raise StateMismatchError(f"{name}: the checkpoint holds {short_repr(saved)}, not a state dict")
    expected = module.state_dict()
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if missing or unexpected:
        parts = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else ""]
        raise StateMismatchError(
            f"{name}: the checkpoint's keys differ from the {type(module).__name__} built from the config: "
            + "; ".join(p for p in parts if p)
        )
    for key, value in expected.items():
        if isinstance(value, Tensor):
            _check_tensor(f"{name}: {key!r}", saved[key], value, f"the {type(module).__name__} built from the config")
        # other entries (``_extra_state``) are the module's own to check in ``set_extra_state``


def check_optimizer_state(name: str, optimizer: torch.optim.Optimizer, saved: Any) -> None:
    """Groups and parameter counts as ``optimizer``'s; every per-parameter tensor (moments) the parameter's
    shape and floating, every scalar (``step``) finite and non-negative.

    Raises:
        StateMismatchError: The first difference, naming the parameter index and the entry.
    """
    if not isinstance(saved, Mapping) or not isinstance(saved.get("state"), Mapping):
        raise StateMismatchError(f"{name}: the checkpoint holds {short_repr(saved)}, not an optimizer state")
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in groups):
        raise StateMismatchError(f"{name}: 'param_groups' is {short_repr(groups)}, not a list of groups")
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    saved_sizes = [len(g["params"]) for g in groups]
    if saved_sizes != sizes:
        raise StateMismatchError(
            f"{name}: parameter groups of sizes {saved_sizes} in the checkpoint, the optimizer built from the "
            f"config has {sizes}"
        )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for g_saved in groups:
        for key in ("lr", "initial_lr", "weight_decay"):
            value = g_saved.get(key)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise StateMismatchError(f"{name}: param_groups {key!r} is {short_repr(value)}, not a finite number >= 0")
    for index, entry in saved["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(params):
            raise StateMismatchError(
                f"{name}: state for parameter {short_repr(index)}; the optimizer has parameters 0..{len(params) - 1}"
            )
        if not isinstance(entry, Mapping):
            raise StateMismatchError(f"{name}: state of parameter {index} is {short_repr(entry)}, not a mapping")
        param = params[index]
        for key, value in entry.items():
            where = f"{name}: parameter {index} {key!r}"
            if isinstance(value, Tensor) and value.ndim > 0:
                _check_tensor(where, value, param.detach(), f"its parameter {tuple(param.shape)}")
            elif isinstance(value, Tensor) or isinstance(value, (int, float)):
                number = float(value)
                if not (math.isfinite(number) and 0 <= number <= _MAX_COUNT):
                    raise StateMismatchError(f"{where} is {short_repr(number)}, not a finite count >= 0")


def check_scheduler_state(name: str, saved: Any, step: int) -> None:
    """A ``LambdaLR``-style state whose ``last_epoch`` is the checkpoint's ``step`` (the trainer steps the
    schedule once per optimizer step), with finite base learning rates."""
    if not isinstance(saved, Mapping):
        raise StateMismatchError(f"{name}: the checkpoint holds {short_repr(saved)}, not a scheduler state")
    epoch = saved.get("last_epoch")
    if epoch != step or isinstance(epoch, bool):
        raise StateMismatchError(
            f"{name}: 'last_epoch' is {short_repr(epoch)}, but the checkpoint is for step {step} (the schedule "
            "steps once per optimizer step)"
        )
    base = saved.get("base_lrs", [])
    if not isinstance(base, list) or not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in base):
        raise StateMismatchError(f"{name}: 'base_lrs' is {short_repr(base)}, not finite learning rates")


def check_counters(counters: Mapping[str, Any], known: tuple[str, ...], step: int) -> None:
    """The trainer's counters: known names, finite numbers in ``[0, 2**62]``, step counts at most ``step``.

    Raises:
        StateMismatchError: Names the counter and what is allowed.
    """
    for key, value in counters.items():
        if key not in known:
            raise StateMismatchError(f"trainer_state.json: unknown counter {key!r}; known: {list(known)}")
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not 0 <= value <= _MAX_COUNT:
            raise StateMismatchError(
                f"trainer_state.json: counter {key!r} is {short_repr(value)}, not a finite number in [0, 2**62]"
            )
        if key in ("ar_steps", "meta_steps", "noop_steps", "nonfinite_skipped", "nonfinite_consecutive") and value > step:
            raise StateMismatchError(
                f"trainer_state.json: counter {key!r} is {value:g}, more than the checkpoint's step {step}"
            )


def check_states(objects: Mapping[str, Any], states: Mapping[str, Any], step: int) -> None:
    """Check each saved state against the object it is about to be loaded into.

    Modules ([`check_module_state`][picomaml.train.state_check.check_module_state]), optimizers
    ([`check_optimizer_state`][picomaml.train.state_check.check_optimizer_state]) and LR schedulers
    (``last_epoch`` against ``step``) are checked here; other objects validate in their own
    ``load_state_dict``. Names with no saved state are left to the loader (which names them).

    Args:
        objects: ``name -> component`` as passed to the loader.
        states: ``name -> saved state`` from the checkpoint.
        step: The checkpoint's step.

    Raises:
        StateMismatchError: The first saved state that does not fit.
    """
    for name, obj in objects.items():
        if name not in states:
            continue
        saved = states[name]
        if isinstance(obj, nn.Module):
            check_module_state(name, obj, saved)
        elif isinstance(obj, torch.optim.Optimizer):
            check_optimizer_state(name, obj, saved)
        elif isinstance(obj, torch.optim.lr_scheduler.LRScheduler):
            check_scheduler_state(name, saved, step)
