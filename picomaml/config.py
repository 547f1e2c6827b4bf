"""Strict, nested dataclass configuration: YAML in, validated objects out, YAML back.

Every component that takes hyperparameters has one dataclass whose field names are exactly the
component's keyword arguments, so a hyperparameter has one spelling everywhere (constructor, YAML,
``--set`` override, logged config). :func:`from_dict` walks the type hints of a dataclass and rejects
unknown keys (naming the key, its dotted path and the valid keys) and values of the wrong type; range
checks live in each dataclass's ``__post_init__`` and raise :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = [
    "ConfigError",
    "check",
    "from_dict",
    "to_dict",
    "apply_overrides",
    "SamplerConfig",
    "HeadConfig",
    "InnerLoopConfig",
    "MetaConfig",
    "HybridConfig",
    "DataConfig",
    "OptimConfig",
    "TrainerConfig",
    "EvalConfig",
    "CheckpointConfig",
    "ExperimentConfig",
    "load_config",
    "dump_config",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range. The message names it."""


def check(condition: bool, field: str, message: str) -> None:
    """Raise :class:`ConfigError` ``"<field>: <message>"`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{field}: {message}")


# ----------------------------------------------------------------------------------------------
# generic dict <-> dataclass conversion
# ----------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert containers; raise naming ``path``."""
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
        if value not in allowed:
            raise ConfigError(f"{path}: {value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{path}: {value!r} does not match {_type_name(tp)}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{path}: expected null, got {value!r}")
        return None
    if origin in (tuple, list, Sequence):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
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
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {type(value).__name__}")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Build the dataclass ``cls`` from a mapping, strictly.

    Unknown keys raise :class:`ConfigError` naming the key, its dotted path and the valid keys; values
    are type-checked against the field annotations; missing keys take the dataclass defaults. A class
    with a ``preset`` classmethod accepts a ``preset: NAME`` key whose values the other keys override.

    Args:
        cls: A dataclass type.
        data: The mapping (``None`` means all defaults).
        path: Dotted prefix used in error messages.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    where = f" in '{path}'" if path else ""
    preset = data.pop("preset", None) if hasattr(cls, "preset") else None
    for key in data:
        if key not in fields:
            valid = sorted(fields) + (["preset"] if hasattr(cls, "preset") else [])
            full = f"{path}.{key}" if path else key
            raise ConfigError(f"unknown key '{key}'{where} (at '{full}'); valid keys: {', '.join(valid)}")
    kwargs = {k: _convert(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    if preset is not None:
        try:
            return cls.preset(preset, **kwargs)  # type: ignore[attr-defined]
        except ConfigError:
            raise
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"{path + '.' if path else ''}preset: {exc}") from exc
    try:
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


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides (values parsed as YAML) to a nested dict, in place.

    Example: ``apply_overrides(d, ["model.d_model=128", "hybrid.ratio=0.25"])``. Unknown keys are not
    rejected here; :func:`from_dict` rejects them afterwards with the full path.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. model.d_model=128")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: empty key segment")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


# ----------------------------------------------------------------------------------------------
# component and experiment sections (field names == component keyword arguments)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SamplerConfig:
    """Keyword arguments of :class:`picomaml.SMLMTSampler` (``mask_token_id`` comes from the tokenizer)."""

    n_way: int = 8
    k_shot: int = 4
    n_query: int = 4
    window_len: int = 32
    min_freq: float = 4
    max_freq: float = 0.5
    exclude_token_ids: tuple[int, ...] = ()
    class_sampling: Literal["uniform", "count_power"] = "uniform"
    power: float = 0.3
    holdout_fraction: float = 0.0
    holdout_seed: int = 0
    class_split: Literal["train", "heldout"] = "train"

    def __post_init__(self) -> None:
        for name in ("n_way", "k_shot", "n_query", "window_len"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(self.n_way >= 2, "n_way", f"must be >= 2 (a 1-way task has nothing to learn), got {self.n_way}")
        check(self.min_freq >= 0, "min_freq", f"must be >= 0, got {self.min_freq}")
        check(self.max_freq > 0, "max_freq", f"must be > 0, got {self.max_freq}")
        check(self.power > 0, "power", f"must be > 0, got {self.power}")
        check(
            0.0 <= self.holdout_fraction < 1.0,
            "holdout_fraction",
            f"must be in [0, 1), got {self.holdout_fraction}",
        )
        check(
            self.class_split == "train" or self.holdout_fraction > 0,
            "class_split",
            "'heldout' draws classes only from the held-out token types, so it needs holdout_fraction > 0",
        )


@dataclasses.dataclass
class HeadConfig:
    """Keyword arguments of :class:`picomaml.MetaHead` (``in_dim`` and ``n_way`` are derived)."""

    hidden_dims: tuple[int, ...] = ()
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    dropout: float = 0.0
    init: Literal["xavier", "kaiming", "normal", "zeros", "prototype"] = "prototype"

    def __post_init__(self) -> None:
        check(
            all(h >= 1 for h in self.hidden_dims),
            "hidden_dims",
            f"sizes must be >= 1, got {self.hidden_dims}",
        )
        check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")


@dataclasses.dataclass
class InnerLoopConfig:
    """Keyword arguments of :class:`picomaml.InnerLoop`."""

    steps: int = 5
    lr: float = 0.1
    first_order: bool = False
    backend: Literal["torch", "higher", "learn2learn"] = "torch"
    learn_lr: Literal["per_tensor", "per_step"] | None = None
    multi_step_loss: bool = False
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        check(self.steps >= 0, "steps", f"must be >= 0, got {self.steps}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(
            self.grad_clip is None or self.grad_clip > 0,
            "grad_clip",
            f"must be > 0 or null, got {self.grad_clip}",
        )


@dataclasses.dataclass
class MetaConfig:
    """How a meta step turns an episode into a loss (:func:`picomaml.meta_loss` arguments)."""

    pooling: Literal["mask", "before_mask", "last", "mean"] = "mask"
    feature_norm: Literal["none", "center", "standardize"] = "none"
    n_tasks: int = 1
    head_lr: float | None = None  # outer LR of the head and learned inner LRs; null = optim.lr

    def __post_init__(self) -> None:
        check(self.n_tasks >= 1, "n_tasks", f"must be >= 1, got {self.n_tasks}")
        check(self.head_lr is None or self.head_lr > 0, "head_lr", f"must be > 0 or null, got {self.head_lr}")


@dataclasses.dataclass
class HybridConfig:
    """Keyword arguments of :class:`picomaml.HybridScheduler` (its seed is the experiment seed)."""

    ratio: float = 0.5
    mode: Literal["bernoulli", "interleave", "weighted"] = "bernoulli"
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None  # end of a linear/cosine ratio schedule; null = trainer.max_steps
    final_ratio: float = 0.0  # ratio reached at total_steps by linear/cosine schedules

    def __post_init__(self) -> None:
        check(0.0 <= self.ratio <= 1.0, "ratio", f"must be in [0, 1], got {self.ratio}")
        check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(0.0 <= self.final_ratio <= 1.0, "final_ratio", f"must be in [0, 1], got {self.final_ratio}")
        check(
            self.total_steps is None or self.total_steps >= 1,
            "total_steps",
            f"must be >= 1 or null, got {self.total_steps}",
        )


@dataclasses.dataclass
class DataConfig:
    """Where token rows come from.

    ``source``: ``embedded`` (the built-in Python-docs corpus and its BPE tokenizer), ``hf`` (a
    pretokenized Hugging Face dataset such as ``pico-lm/pretokenized-dolma``, streamed) or ``local``
    (parquet / jsonl / text files in ``paths``, tokenized with ``tokenizer``).
    """

    source: Literal["embedded", "hf", "local"] = "embedded"
    dataset: str = "pico-lm/pretokenized-dolma"
    split: str = "train"
    eval_dataset: str | None = None
    paths: list[str] = dataclasses.field(default_factory=list)
    eval_paths: list[str] = dataclasses.field(default_factory=list)
    tokenizer: str | None = None
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "grad_accum"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(self.source != "local" or bool(self.paths), "paths", "source 'local' needs at least one path")


@dataclasses.dataclass
class OptimConfig:
    """Outer optimizer (AdamW) and learning-rate schedule."""

    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 100
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(all(0 <= b < 1 for b in self.betas), "betas", f"must be in [0, 1), got {self.betas}")
        check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        check(
            self.grad_clip is None or self.grad_clip > 0,
            "grad_clip",
            f"must be > 0 or null, got {self.grad_clip}",
        )


@dataclasses.dataclass
class TrainerConfig:
    """Loop length, logging cadence and distribution (Lightning Fabric arguments)."""

    max_steps: int = 300
    log_every: int = 10
    eval_every: int = 100
    save_every: int = 100
    devices: int = 1
    accelerator: str = "auto"
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    precision: str = "32-true"
    loggers: list[Literal["csv", "tensorboard", "wandb"]] = dataclasses.field(default_factory=lambda: ["csv"])
    wandb_project: str = "picomaml"
    wandb_offline: bool = True

    def __post_init__(self) -> None:
        for name in ("max_steps", "log_every", "eval_every", "save_every", "devices"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass
class EvalConfig:
    """Evaluation during training: held-out perplexity and few-shot episode accuracy."""

    rows: int = 64
    batch_size: int = 8
    fewshot_episodes: int = 100
    fewshot_settings: list[tuple[int, int]] = dataclasses.field(default_factory=lambda: [(5, 4)])

    def __post_init__(self) -> None:
        check(self.rows >= 1, "rows", f"must be >= 1, got {self.rows}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.fewshot_episodes >= 0, "fewshot_episodes", f"must be >= 0, got {self.fewshot_episodes}")


@dataclasses.dataclass
class CheckpointConfig:
    """What a checkpoint holds beside the training state."""

    keep_last: int = 3
    hf_export: bool = False
    learning_dynamics: bool = False
    dynamics_layers: list[str] = dataclasses.field(
        default_factory=lambda: ["attention.o_proj", "mlp.down_proj"]
    )
    dynamics_seq_idx: int = -1
    dynamics_batch_size: int = 4

    def __post_init__(self) -> None:
        check(self.keep_last >= 1, "keep_last", f"must be >= 1, got {self.keep_last}")


def _model_config_type() -> Any:
    from picomaml.model.decoder import PicoDecoderConfig

    return PicoDecoderConfig


@dataclasses.dataclass
class ExperimentConfig:
    """Everything a training run needs; the YAML files in ``examples/configs`` fill it."""

    seed: int = 0
    model: Any = None  # PicoDecoderConfig; typed lazily to keep this module import-light
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    head: HeadConfig = dataclasses.field(default_factory=HeadConfig)
    inner_loop: InnerLoopConfig = dataclasses.field(default_factory=InnerLoopConfig)
    meta: MetaConfig = dataclasses.field(default_factory=MetaConfig)
    hybrid: HybridConfig = dataclasses.field(default_factory=HybridConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        model_cls = _model_config_type()
        if self.model is None:
            self.model = model_cls.preset("tiny", vocab_size=8192, max_seq_len=self.data.seq_len)
        elif isinstance(self.model, Mapping):
            self.model = _convert(self.model, model_cls, "model")
        elif not isinstance(self.model, model_cls):
            raise ConfigError(
                f"model: expected a mapping or PicoDecoderConfig, got {type(self.model).__name__}"
            )
        check(
            self.data.seq_len <= self.model.max_seq_len,
            "data.seq_len",
            f"{self.data.seq_len} exceeds model.max_seq_len {self.model.max_seq_len}",
        )
        check(
            self.sampler.window_len <= self.data.seq_len,
            "sampler.window_len",
            f"{self.sampler.window_len} exceeds data.seq_len {self.data.seq_len} (windows are cut from rows)",
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ExperimentConfig:
        """Strictly build from a nested mapping (see :func:`from_dict`)."""
        return from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (round-trips through :meth:`from_dict`)."""
        return to_dict(self)

    def to_yaml(self) -> str:
        """The resolved config as YAML text."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load an :class:`ExperimentConfig` from YAML, apply dotted overrides, validate strictly.

    Args:
        path: YAML file; ``None`` starts from the defaults.
        overrides: ``["model.d_model=128", "hybrid.ratio=0.25", ...]``.

    Raises:
        ConfigError: unknown key (with the valid keys), wrong type, or out-of-range value.
        FileNotFoundError: ``path`` does not exist.
    """
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text(encoding="utf-8")
        loaded = yaml.safe_load(text)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
        data = loaded or {}
    apply_overrides(data, overrides)
    return ExperimentConfig.from_dict(data)


def dump_config(config: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (what :func:`load_config` reads back to an equal config)."""
    Path(path).write_text(config.to_yaml(), encoding="utf-8")
