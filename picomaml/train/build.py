"""The one builder: from an [`ExperimentConfig`][picomaml.train.config.ExperimentConfig] to the components of
a run.

The reference trainer, checkpoint loading for evaluation and the tests all build through these
functions, so a checkpoint is always rebuilt exactly as training built it (same head seed, same inner-loop
backend, same learned-LR layout). Each ``*_from_config`` passes a config section to its component
unchanged; only the values a section cannot know come from elsewhere (``in_dim`` from the model,
``n_way`` from the sampler, the mask id and special tokens from the tokenizer, seeds from the experiment).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from picomaml.meta.head import MetaHead
from picomaml.meta.hybrid import HybridScheduler
from picomaml.meta.inner_loop import InnerLoop
from picomaml.meta.learner import HybridLearner
from picomaml.meta.sampler import SamplerConfig, SMLMTSampler
from picomaml.model.decoder import PicoDecoder
from picomaml.train.config import ExperimentConfig
from picomaml.train.meta_update import MetaGradScale
from picomaml.train.optim import build_lr_scheduler, build_optimizer

__all__ = [
    "RunComponents",
    "build_run",
    "model_from_config",
    "head_from_config",
    "inner_loop_from_config",
    "learner_from_config",
    "sampler_from_config",
    "hybrid_from_config",
    "optimizer_from_config",
    "lr_scheduler_from_config",
    "eval_class_split",
    "eval_episode_kwargs",
]


def _fields(section: Any) -> dict[str, Any]:
    """A config section as keyword arguments (shallow: nested values stay as they are)."""
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.init}


def model_from_config(cfg: ExperimentConfig) -> PicoDecoder:
    """The backbone, initialised from its own generator seeded with ``cfg.seed`` (identical on every rank)."""
    return PicoDecoder(cfg.model, generator=torch.Generator().manual_seed(cfg.seed))


def head_from_config(cfg: ExperimentConfig) -> MetaHead:
    """The meta head: ``in_dim`` = ``model.d_model``, ``n_way`` = ``sampler.n_way``, seed = ``cfg.seed``."""
    return MetaHead(in_dim=cfg.model.d_model, n_way=cfg.sampler.n_way, **_fields(cfg.head), seed=cfg.seed)


def inner_loop_from_config(cfg: ExperimentConfig, head: nn.Module, model: nn.Module | None = None) -> InnerLoop:
    """The inner loop, bound to ``head`` and, with ``meta.adapt_layers``, to ``model``'s top blocks (the
    layout of learned inner LRs, when ``learn_lr`` is set)."""
    loop = InnerLoop(**_fields(cfg.inner_loop))
    k = cfg.meta.adapt_layers if model is not None else 0
    return loop.bind(head, model, adapt_layers=k)


def learner_from_config(
    cfg: ExperimentConfig, model: nn.Module, head: nn.Module, loop: nn.Module
) -> HybridLearner:
    """Backbone, head and inner loop in one module, with the ``meta`` section's pooling and normalisation."""
    m = cfg.meta
    return HybridLearner(
        model, head, loop, pooling=m.pooling, feature_norm=m.feature_norm, nonfinite=m.nonfinite,
        adapt_layers=m.adapt_layers, grad_surgery=m.grad_surgery, grad_blocks=m.grad_blocks,
        lora_rank=m.lora_rank, lora_targets=tuple(m.lora_targets), seed=cfg.seed,
    )  # fmt: skip


def sampler_from_config(
    cfg: ExperimentConfig | SamplerConfig,
    mask_token_id: int,
    special_ids: Sequence[int] = (),
    seed: int | None = None,
    **overrides: Any,
) -> SMLMTSampler:
    """An SMLMT sampler from the ``sampler`` section (or a
    [`SamplerConfig`][picomaml.meta.sampler.SamplerConfig] itself).

    Args:
        cfg: The experiment config, or just its sampler section.
        mask_token_id: The tokenizer's mask id.
        special_ids: Token ids never used as classes, besides the section's ``exclude_token_ids``.
        seed: The sampler's seed (default: the experiment seed, or 0 for a bare section).
        overrides: Sampler keyword arguments that replace the section's (e.g. ``n_way=`` for evaluation).
    """
    section = cfg.sampler if isinstance(cfg, ExperimentConfig) else cfg
    if seed is None:
        seed = cfg.seed if isinstance(cfg, ExperimentConfig) else 0
    kwargs = _fields(section) | overrides
    kwargs["exclude_token_ids"] = tuple(kwargs["exclude_token_ids"]) + tuple(special_ids)
    return SMLMTSampler(**kwargs, mask_token_id=mask_token_id, seed=seed)


def hybrid_from_config(cfg: ExperimentConfig, max_steps: int | None = None) -> HybridScheduler:
    """The hybrid scheduler; a ratio schedule without ``hybrid.total_steps`` ends at the run's last step.

    Args:
        cfg: The experiment config.
        max_steps: The run's length (default ``trainer.max_steps``).
    """
    end = cfg.hybrid.total_steps or (max_steps if max_steps is not None else cfg.trainer.max_steps)
    return HybridScheduler(**(_fields(cfg.hybrid) | {"total_steps": end}), seed=cfg.seed)


def optimizer_from_config(
    cfg: ExperimentConfig, model: nn.Module, head: nn.Module, loop: nn.Module
) -> torch.optim.AdamW:
    """AdamW over the model, head and inner loop; the head and learned inner LRs use ``optim.meta_lr``."""
    o = cfg.optim
    return build_optimizer(
        {"model": model, "head": head, "inner_loop": loop}, o.lr, o.weight_decay, o.betas, o.eps,
        lr_overrides={"head": o.meta_lr, "inner_loop": o.meta_lr},
    )  # fmt: skip


def lr_scheduler_from_config(cfg: ExperimentConfig, optimizer: torch.optim.Optimizer) -> Any:
    """Warm-up and decay over ``trainer.max_steps`` (see
    [`picomaml.train.optim.build_lr_scheduler`][picomaml.train.optim.build_lr_scheduler])."""
    o = cfg.optim
    return build_lr_scheduler(optimizer, o.warmup_steps, cfg.trainer.max_steps, o.decay, o.min_lr_ratio)


@dataclasses.dataclass
class RunComponents:
    """What [`build_run`][picomaml.train.build.build_run] builds: every trainable and stateful piece of a run.

    Attributes:
        model: The backbone.
        head: The meta head.
        inner_loop: The inner loop (its parameters are the learned inner LRs, if any).
        learner: ``model``, ``head`` and ``inner_loop`` in one module (wrap it for DDP).
        sampler: The training sampler (``sampler.class_split`` of the config).
        hybrid: The hybrid scheduler.
        optimizer: AdamW over the three modules (``None`` when not asked for).
        lr_scheduler: Its LR schedule (``None`` when not asked for).
        meta_optimizer: The meta steps' own AdamW (``optim.meta_moments=separate``; its LRs follow
            ``optimizer``'s), else ``None``.
        meta_scale: The running AR gradient norm that meta gradients are rescaled to
            (``optim.meta_grad_norm``), else ``None``.
    """

    model: PicoDecoder
    head: MetaHead
    inner_loop: InnerLoop
    learner: HybridLearner
    sampler: SMLMTSampler
    hybrid: HybridScheduler
    optimizer: torch.optim.Optimizer | None = None
    lr_scheduler: Any = None
    meta_optimizer: torch.optim.Optimizer | None = None
    meta_scale: MetaGradScale | None = None

    def stateful(self) -> dict[str, Any]:
        """``name -> component`` for
        [`picomaml.save_checkpoint`][picomaml.train.checkpoint.save.save_checkpoint] (those with a
        ``state_dict``)."""
        parts = {
            "model": self.model, "head": self.head, "inner_loop": self.inner_loop, "optimizer": self.optimizer,
            "lr_scheduler": self.lr_scheduler, "sampler": self.sampler, "hybrid": self.hybrid,
            "meta_optimizer": self.meta_optimizer, "meta_grad_scale": self.meta_scale,
        }  # fmt: skip
        return {k: v for k, v in parts.items() if v is not None}


def build_run(
    cfg: ExperimentConfig,
    *,
    mask_token_id: int,
    special_ids: Sequence[int] = (),
    sampler_seed: int | None = None,
    optimizer: bool = True,
    compile: bool | None = None,
) -> RunComponents:
    """Every component of a run, built from ``cfg`` as the reference trainer builds them.

    Args:
        cfg: The experiment config.
        mask_token_id: The tokenizer's mask id.
        special_ids: The tokenizer's special ids (never classes).
        sampler_seed: The training sampler's seed (default ``cfg.seed``; a rank with its own data shard
            passes ``cfg.seed + rank``).
        optimizer: Also build the optimizer and LR schedule.
        compile: ``torch.compile`` the backbone
            ([`picomaml.train.compile.compile_backbone`][picomaml.train.compile.compile_backbone]: AR steps
            and the meta steps' backbone forward; the inner loop and adapted blocks stay eager); ``None``:
            ``trainer.compile``.
    """
    model = model_from_config(cfg)
    if cfg.trainer.compile if compile is None else compile:
        from picomaml.train.compile import compile_backbone

        compile_backbone(model)
    head = head_from_config(cfg)
    loop = inner_loop_from_config(cfg, head, model)
    run = RunComponents(
        model=model, head=head, inner_loop=loop, learner=learner_from_config(cfg, model, head, loop),
        sampler=sampler_from_config(cfg, mask_token_id, special_ids, seed=sampler_seed),
        hybrid=hybrid_from_config(cfg),
    )  # fmt: skip
    if optimizer:
        run.optimizer = optimizer_from_config(cfg, model, head, loop)
        run.lr_scheduler = lr_scheduler_from_config(cfg, run.optimizer)
        if cfg.optim.meta_moments == "separate":
            run.meta_optimizer = optimizer_from_config(cfg, model, head, loop)
    if cfg.optim.meta_grad_norm is not None:
        run.meta_scale = MetaGradScale(cfg.optim.meta_grad_norm, cfg.optim.meta_grad_decay)
    return run


def eval_class_split(sampler: SamplerConfig) -> dict[str, Any]:
    """Sampler keyword arguments that make evaluation episodes use only the run's held-out token types.

    Empty when the run holds none out (``holdout_fraction == 0``): then evaluation classes may also have
    been training classes (on other documents).
    """
    if sampler.holdout_fraction == 0:
        return {}
    return {
        "holdout_fraction": sampler.holdout_fraction,
        "holdout_seed": sampler.holdout_seed,
        "class_split": "heldout",
    }


def eval_episode_kwargs(
    cfg: ExperimentConfig, mask_token_id: int | None = None, special_ids: Sequence[int] = ()
) -> dict[str, Any]:
    """Keyword arguments of [`fewshot_eval`][picomaml.eval.fewshot.fewshot_eval] and
    [`run_suite`][picomaml.eval.suite.run_suite] that follow a run's config, so evaluation episodes look like
    training episodes: the episode shape, window length, frequency band, pooling, feature normalisation,
    adapted blocks, seed, excluded ids (the config's plus ``special_ids``) and the held-out class split.

    Args:
        cfg: The experiment config.
        mask_token_id: The tokenizer's mask id (left out when ``None``, e.g. for ``run_suite``).
        special_ids: The tokenizer's special ids.
    """
    s = cfg.sampler
    out = {
        "n_query": s.n_query, "window_len": s.window_len, "pooling": cfg.meta.pooling,
        "feature_norm": cfg.meta.feature_norm, "adapt_layers": cfg.meta.adapt_layers, "seed": cfg.seed, "min_freq": s.min_freq, "max_freq": s.max_freq,
        "exclude_token_ids": tuple(s.exclude_token_ids) + tuple(special_ids), "sampler_kwargs": eval_class_split(s),
    }  # fmt: skip
    if mask_token_id is not None:
        out["mask_token_id"] = mask_token_id
    return out
