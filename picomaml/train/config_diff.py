"""What changed between a checkpoint's saved config and the current one, and which changes break it.

A resume may change most settings (learning rates, the hybrid ratio, the run length): those are listed and
recorded. A change that alters parameter shapes or the optimizer's parameter groups cannot load the
checkpoint's states at all: every ``model.*`` field, ``sampler.n_way`` (the head's outputs), the head's layers
and init, learned inner learning rates, and ``inner_loop.steps`` while those are learned per step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from picomaml.params import ConfigError, short_repr
from picomaml.train.config import ExperimentConfig, upgrade_config_dict

__all__ = ["ABSENT", "ConfigChange", "changes_shapes", "compare_configs"]

#: the value shown for a key that one of the two configs lacks
ABSENT = "<absent>"

# keys whose change alters parameter shapes or the optimizer's groups: a checkpoint cannot be loaded then
_SHAPE_KEYS = ("sampler.n_way", "head.hidden_dims", "head.init", "inner_loop.learn_lr")


def changes_shapes(key: str, per_step_lrs: bool) -> bool:
    """Whether changing config ``key`` changes parameter shapes (``model.*``, ``sampler.n_way``, the
    head's layers, learned inner LRs, and ``inner_loop.steps`` when LRs are learned per step)."""
    return key.startswith("model.") or key in _SHAPE_KEYS or (key == "inner_loop.steps" and per_step_lrs)


@dataclasses.dataclass(frozen=True)
class ConfigChange:
    """One config value that differs between a checkpoint and the current run.

    Attributes:
        key: The dotted key (``optim.lr``).
        old: The checkpoint's value (`ABSENT` when it had none).
        new: The current value (`ABSENT` when the current config has none).
        architecture: Whether the change alters parameter shapes (see
            [`changes_shapes`][picomaml.train.config_diff.changes_shapes]).
    """

    key: str
    old: Any
    new: Any
    architecture: bool

    def __str__(self) -> str:
        return f"{self.key}: {short_repr(self.old)} -> {short_repr(self.new)}"


def _normalised(data: Mapping[str, Any]) -> dict[str, Any]:
    """Today's full config dict (defaults filled in); the raw dict when today's schema refuses it."""
    try:
        return ExperimentConfig.from_dict(data).to_dict()
    except ConfigError:
        return dict(data)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, Mapping):
        return {prefix: list(data) if isinstance(data, tuple) else data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out |= _flatten(value, f"{prefix}{key}.") if isinstance(value, Mapping) else _flatten(value, f"{prefix}{key}")
    return out


def compare_configs(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[ConfigChange]:
    """The differences between a checkpoint's saved config and the current one, key by key.

    Args:
        saved: The checkpoint's ``config.yaml`` (keys of earlier releases are upgraded first).
        current: The current config as a nested dict (``ExperimentConfig.to_dict()``).

    Returns:
        One [`ConfigChange`][picomaml.train.config_diff.ConfigChange] per differing dotted key (`ABSENT` for a
        key one side lacks).
    """
    old, new = _flatten(_normalised(upgrade_config_dict(saved)[0])), _flatten(_normalised(current))
    per_step = "per_step" in (old.get("inner_loop.learn_lr"), new.get("inner_loop.learn_lr"))
    keys = list(new) + [k for k in old if k not in new]
    return [
        ConfigChange(k, old.get(k, ABSENT), new.get(k, ABSENT), changes_shapes(k, per_step))
        for k in keys
        if old.get(k, ABSENT) != new.get(k, ABSENT)
    ]
