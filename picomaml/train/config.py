"""The experiment schema: one YAML file -> an [`ExperimentConfig`][picomaml.train.config.ExperimentConfig]
composed of the components' configs.

Each section is the config its component declares (``model``:
[`PicoDecoderConfig`][picomaml.model.config.PicoDecoderConfig], ``sampler``:
[`SamplerConfig`][picomaml.meta.sampler.SamplerConfig], ``head``:
[`HeadConfig`][picomaml.meta.head.HeadConfig], ...), so a hyperparameter has one name, default, range and
meaning, whether it is passed to a constructor, written in YAML or set with ``--set``. This module adds only
the sections that belong to the reference trainer (``trainer``, ``checkpoint``) and the rules between
sections. The strict loader itself is generic ([`picomaml.params`][picomaml.params],
[`picomaml.train.strict_yaml`][picomaml.train.strict_yaml]).

Keys renamed since earlier releases raise an error naming the new key; a run directory written by an
earlier release is read through [`upgrade_config_dict`][picomaml.train.config.upgrade_config_dict], which
renames them and says so.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from picomaml.data.pipeline import DataConfig
from picomaml.eval.during_training import EvalConfig
from picomaml.meta.head import HeadConfig
from picomaml.meta.hybrid import HybridConfig
from picomaml.meta.inner_loop import InnerLoopConfig
from picomaml.meta.objectives import MetaConfig
from picomaml.meta.sampler import SamplerConfig
from picomaml.meta.task_lora import target_shapes
from picomaml.model.config import PicoDecoderConfig
from picomaml.params import ConfigError, Params, check, field_docs, from_dict, hparam, to_dict
from picomaml.train.dynamics import DynamicsConfig
from picomaml.train.optim import OptimConfig
from picomaml.train.strict_yaml import apply_overrides, load_yaml_file

__all__ = [
    "TrainerConfig",
    "CheckpointConfig",
    "ExperimentConfig",
    "SECTIONS",
    "load_config",
    "dump_config",
    "upgrade_config_dict",
    "reference_markdown",
    "REFERENCE_START",
    "REFERENCE_END",
]

log = logging.getLogger(__name__)

Precision = Literal["32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true"]
Accelerator = Literal["auto", "cpu", "cuda", "gpu", "mps"]


@dataclasses.dataclass
class TrainerConfig(Params):
    """Loop length, cadence and distribution of the reference trainer (Lightning Fabric arguments)."""

    max_steps: int = hparam(300, ge=1, doc="optimizer steps of the run")
    log_every: int = hparam(10, ge=1, doc="steps between metric rows (means over the window)")
    eval_every: int = hparam(100, ge=1, doc="steps between evaluations (each writes a metric row)")
    save_every: int = hparam(100, ge=1, doc="steps between checkpoints (one is always written at the end)")
    max_nonfinite_skips: int = hparam(
        20, ge=1, doc="non-finite steps in a row (each skipped) that stop the run with an error"
    )
    devices: int = hparam(1, ge=1, doc="processes (data parallel)")
    accelerator: Accelerator = hparam("auto", doc="Fabric accelerator")
    # no fsdp: checkpoints gather full states on rank 0, which FSDP shards
    strategy: Literal["auto", "ddp"] = hparam(
        "auto", doc="Fabric strategy: auto (ddp on several devices) or ddp"
    )
    precision: Precision = hparam("32-true", doc="Fabric precision")
    loggers: tuple[Literal["csv", "tensorboard", "wandb"], ...] = hparam(("csv",), doc="metric sinks")
    wandb_project: str = hparam("picomaml", doc="Weights & Biases project")
    wandb_offline: bool = hparam(True, doc="Weights & Biases offline mode (sync later)")
    meta_noop: bool = hparam(
        False,
        doc="the schedule control: the meta part of every step is skipped (a meta-only step draws its batches, "
        "advances the LR schedule and updates nothing), so a run keeps another run's step indices, data "
        "order and LR schedule without its meta steps",
    )
    compile: bool = hparam(
        False,
        doc="torch.compile the backbone for AR steps and the meta steps' backbone forward (inner loop and "
        "adapted blocks stay eager: no double backward through compiled graphs)",
    )


@dataclasses.dataclass
class CheckpointConfig(Params):
    """What the reference trainer writes into each checkpoint beside the training state."""

    keep_last: int = hparam(3, ge=1, doc="checkpoints kept (older ones are deleted)")
    hf_export: bool = hparam(False, doc="also save a transformers Llama export (hf/)")
    learning_dynamics: bool = hparam(False, doc="also save activations, weights and gradients of some layers")
    dynamics: DynamicsConfig = hparam(default_factory=DynamicsConfig, doc="what the learning dynamics hold")
    hub_repo: str | None = hparam(
        None, doc="Hugging Face Hub repo (user/name; created private if missing) each checkpoint is pushed to"
    )
    hub_branch: str | None = hparam(None, doc="branch of hub_repo to push to; null: the run directory's name")


# section name -> its config class, in YAML order
SECTIONS: dict[str, type] = {
    "model": PicoDecoderConfig,
    "data": DataConfig,
    "sampler": SamplerConfig,
    "head": HeadConfig,
    "inner_loop": InnerLoopConfig,
    "meta": MetaConfig,
    "hybrid": HybridConfig,
    "optim": OptimConfig,
    "trainer": TrainerConfig,
    "eval": EvalConfig,
    "checkpoint": CheckpointConfig,
}


def _default_model() -> PicoDecoderConfig:
    return PicoDecoderConfig.preset("tiny", vocab_size=8192)


@dataclasses.dataclass
class ExperimentConfig(Params):
    """Everything a training run needs; the shipped YAML files (``picomaml/train/configs``, ``picomaml cp NAME DEST``) fill it."""

    seed: int = hparam(
        0, ge=0, le=2**63 - 1, doc="seed of every random choice (init, data, episodes, schedule)"
    )
    model: PicoDecoderConfig = hparam(default_factory=_default_model, doc="the decoder")
    data: DataConfig = hparam(default_factory=DataConfig, doc="token rows")
    sampler: SamplerConfig = hparam(default_factory=SamplerConfig, doc="SMLMT episodes")
    head: HeadConfig = hparam(default_factory=HeadConfig, doc="the meta head")
    inner_loop: InnerLoopConfig = hparam(default_factory=InnerLoopConfig, doc="adaptation of the head")
    meta: MetaConfig = hparam(default_factory=MetaConfig, doc="episode -> meta loss")
    hybrid: HybridConfig = hparam(default_factory=HybridConfig, doc="AR vs meta per step")
    optim: OptimConfig = hparam(default_factory=OptimConfig, doc="outer optimizer and LR schedule")
    trainer: TrainerConfig = hparam(default_factory=TrainerConfig, doc="the reference trainer")
    eval: EvalConfig = hparam(default_factory=EvalConfig, doc="evaluation during training")
    checkpoint: CheckpointConfig = hparam(default_factory=CheckpointConfig, doc="checkpoint contents")

    def validate(self) -> None:
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
        check(
            not (self.trainer.compile and self.meta.grad_surgery == "pcgrad"),
            "meta.grad_surgery",
            "pcgrad differentiates each loss twice (retained graphs), which compiled graphs refuse; "
            "set trainer.compile=false or meta.grad_surgery=none",
        )
        for key, on in (("optim.meta_grad_norm", self.optim.meta_grad_norm is not None),
                        ("optim.meta_moments", self.optim.meta_moments == "separate")):  # fmt: skip
            check(
                not on or self.hybrid.mode != "weighted",
                key,
                "needs steps that are either AR or meta (hybrid.mode bernoulli or interleave): a weighted step's "
                "gradient mixes both objectives",
            )
        check(
            self.optim.meta_grad_norm is None or self.trainer.precision != "16-mixed",
            "optim.meta_grad_norm",
            "is not supported with trainer.precision=16-mixed (its gradients carry the loss scale); use bf16-mixed or 32-true",
        )
        if self.meta.lora_rank:
            for key, clash in (("meta.adapt_layers", self.meta.adapt_layers > 0), ("trainer.compile", self.trainer.compile),
                               ("inner_loop.learn_lr", self.inner_loop.learn_lr is not None),
                               ("meta.grad_blocks", self.meta.grad_blocks is not None)):  # fmt: skip
                check(not clash, "meta.lora_rank", f"per-task LoRA factors do not combine with {key} yet; unset one")
            for pattern in self.meta.lora_targets:
                check(
                    bool(target_shapes(self.model, [pattern])),
                    "meta.lora_targets",
                    f"{pattern!r} matches no linear layer of a block (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                    "down_proj)",
                )
        check(
            self.meta.adapt_layers <= self.model.n_layers,
            "meta.adapt_layers",
            f"must be in [0, {self.model.n_layers}] (model.n_layers), got {self.meta.adapt_layers}",
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ExperimentConfig:
        """Strictly build from a nested mapping (see
        [`picomaml.params.from_dict`][picomaml.params.from_dict])."""
        return from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (round-trips through
        [`from_dict`][picomaml.train.config.ExperimentConfig.from_dict])."""
        return to_dict(self)

    def to_yaml(self) -> str:
        """The resolved config as YAML text."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# dotted old key -> dotted new key, for configs saved by earlier releases
_UPGRADES = {
    "meta.head_lr": "optim.meta_lr",
    "eval.fewshot_episodes": "eval.episodes",
    "eval.fewshot_settings": "eval.settings",
    "checkpoint.dynamics_layers": "checkpoint.dynamics.layers",
    "checkpoint.dynamics_seq_idx": "checkpoint.dynamics.seq_idx",
    "checkpoint.dynamics_batch_size": "checkpoint.dynamics.batch_size",
}


def _renamed_keys() -> None:
    """Give every section with renamed keys its ``RENAMED`` table (so a user's YAML gets the new name)."""
    for old, new in _UPGRADES.items():
        section, key = old.split(".", 1)
        cls = SECTIONS[section]
        if "RENAMED" not in cls.__dict__:
            cls.RENAMED = {}  # type: ignore[attr-defined]
        cls.RENAMED.setdefault(key, new)  # type: ignore[attr-defined]


_renamed_keys()


def upgrade_config_dict(data: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Rename the keys of a config saved by an earlier release to today's spelling.

    Args:
        data: A nested config mapping (e.g. a run's ``config.yaml``).

    Returns:
        ``(upgraded copy, notes)``: one note ``"old -> new"`` per renamed key.
    """
    out: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    notes = []
    for old, new in _UPGRADES.items():
        section, key = old.split(".", 1)
        node = out.get(section)
        if isinstance(node, dict) and key in node:
            value = node.pop(key)
            target: dict[str, Any] = out
            *parents, leaf = new.split(".")
            for part in parents:
                target = target.setdefault(part, {})
            target[leaf] = value
            notes.append(f"{old} -> {new}")
    return out, notes


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load an [`ExperimentConfig`][picomaml.train.config.ExperimentConfig] from YAML, apply dotted overrides,
    validate strictly.

    Args:
        path: YAML file, or the name of a shipped config (``"tiny-cpu"``, ``"pico-maml-small"``, ...: see
            [`config_names`][picomaml.train.catalog.config_names]); ``None`` starts from the defaults.
        overrides: ``["model.d_model=128", "hybrid.ratio=0.25", ...]``.

    Raises:
        ConfigError: a missing or unreadable file, invalid YAML, an unknown or renamed key (with the valid
            keys or the new name), a wrong type or an out-of-range value; the message names the file or the
            override and the key.
    """
    if path is not None:
        from picomaml.train.catalog import resolve_config  # a shipped config's name works as a path

        path = resolve_config(path)
    data = load_yaml_file(path) if path is not None else {}
    apply_overrides(data, overrides)
    try:
        return ExperimentConfig.from_dict(data)
    except ConfigError as exc:
        if path is not None and overrides:
            raise ConfigError(f"{path} with --set {' '.join(overrides)[:200]}: {exc}") from None
        if path is not None:
            raise ConfigError(f"{path}: {exc}") from None
        raise


def dump_config(config: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (what [`load_config`][picomaml.train.config.load_config] reads back
    to an equal config)."""
    Path(path).write_text(config.to_yaml(), encoding="utf-8")


REFERENCE_START = "<!-- config-reference:start (generated by `picomaml config --reference`) -->"
REFERENCE_END = "<!-- config-reference:end -->"


def _cell(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    return f"`{text}`".replace("|", "\\|")


def reference_markdown() -> str:
    """Every config field with its type, default and meaning, as Markdown tables (one per section),
    generated from the declarations (``docs/pages/configuration.md`` embeds it between markers)."""
    out = [REFERENCE_START, "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    seed = next(r for r in field_docs(ExperimentConfig) if r[0] == "seed")
    out.append(f"| `seed` | {seed[1]} | {_cell(seed[2])} | {seed[3]} |")
    for section, cls in SECTIONS.items():
        out += ["", f"**`{section}`** ({cls.__name__})", ""]
        if section == "model":
            out += [
                "Without a `model` section an experiment uses `{preset: tiny, vocab_size: 8192}`; the defaults",
                "below are those of a bare `PicoDecoderConfig()`.",
                "",
            ]
        out += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        rows = field_docs(cls)
        for name, tp, default, doc in rows:
            if name == "dynamics":  # a nested section: list its own fields under a dotted key
                for sub, sub_tp, sub_default, sub_doc in field_docs(DynamicsConfig):
                    out.append(
                        f"| `{section}.dynamics.{sub}` | {sub_tp.replace('|', '&#124;')} | {_cell(sub_default)} | {sub_doc} |"
                    )
                continue
            out.append(f"| `{section}.{name}` | {tp.replace('|', '&#124;')} | {_cell(default)} | {doc} |")
    if any(getattr(cls, "RENAMED", None) for cls in SECTIONS.values()):
        out += [
            "",
            "Renamed keys (an old key is an error that names the new one; saved runs are upgraded):",
            "",
        ]
        out += [f"- `{old}` → `{new}`" for old, new in _UPGRADES.items()]
    out += ["", REFERENCE_END]
    return "\n".join(out)
