"""Hyperparameter declarations: each declared once, checked by one set of rules with one error type."""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest

import picomaml as pm
from picomaml.meta.head import HeadConfig
from picomaml.meta.hybrid import HybridConfig
from picomaml.meta.inner_loop import InnerLoopConfig
from picomaml.meta.learner import HybridLearner
from picomaml.meta.objectives import MetaConfig
from picomaml.meta.sampler import SamplerConfig
from picomaml.params import (
    ConfigError,
    Params,
    check_int,
    check_number,
    choices,
    field_docs,
    hparam,
    short_repr,
)
from picomaml.train.build import optimizer_from_config
from picomaml.train.config import SECTIONS, ExperimentConfig
from picomaml.train.dynamics import DynamicsConfig, capture_learning_dynamics
from picomaml.train.optim import OptimConfig, build_lr_scheduler, build_optimizer, lr_multiplier

_META_STEP = {"meta_grad_norm", "meta_grad_decay", "meta_moments"}  # the trainer's update, not a builder's
# component -> (its config, the config fields it does not take, its arguments the config does not hold)
DECLARATIONS = [
    (pm.MetaHead, HeadConfig, set(), {"in_dim", "n_way", "seed"}),
    (pm.InnerLoop, InnerLoopConfig, set(), {"head"}),
    (pm.SMLMTSampler, SamplerConfig, set(), {"mask_token_id", "seed", "pad_token_id"}),  # ids of the tokenizer
    (pm.HybridScheduler, HybridConfig, set(), {"seed"}),
    # adapt takes names, globs or a predicate of the Python API (the YAML config has adapt_layers)
    (pm.meta_loss, MetaConfig, {"n_tasks", "grad_surgery", "grad_blocks", "lora_rank", "lora_targets"},
     {"model", "head", "loop", "episode", "features", "adapt"}),
    (HybridLearner, MetaConfig, {"n_tasks"}, {"model", "head", "loop", "features", "adapt", "seed"}),
    (build_optimizer, OptimConfig, {"warmup_steps", "decay", "min_lr_ratio", "grad_clip", "meta_lr", *_META_STEP},
     {"modules", "lr_overrides"}),
    (build_lr_scheduler, OptimConfig, {"lr", "weight_decay", "betas", "eps", "grad_clip", "meta_lr", *_META_STEP},
     {"optimizer", "total_steps"}),
    (lr_multiplier, OptimConfig, {"lr", "weight_decay", "betas", "eps", "grad_clip", "meta_lr", *_META_STEP},
     {"step", "total_steps"}),
    (capture_learning_dynamics, DynamicsConfig, {"batch_size", "save_data"}, {"model", "batch", "loss_fn", "eval_mode"}),
]  # fmt: skip


def _defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        out[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return out


@pytest.mark.parametrize(("component", "config", "not_taken", "derived"), DECLARATIONS)
def test_config_fields_are_the_keyword_arguments_with_the_same_defaults(component, config, not_taken, derived):
    params = inspect.signature(component).parameters
    args = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    fields = set(_defaults(config)) - not_taken
    assert args - set(derived) == fields, f"{component.__name__}: arguments and {config.__name__} fields differ"
    for name, default in _defaults(config).items():
        if name in fields and params[name].default is not inspect.Parameter.empty:
            assert params[name].default == default, f"{component.__name__}({name}=) vs {config.__name__}.{name}"


def test_every_experiment_section_is_a_params_dataclass():
    for name, cls in SECTIONS.items():
        assert issubclass(cls, Params), name
        assert {f.name for f in dataclasses.fields(ExperimentConfig)} >= {name}
    assert ExperimentConfig.__dataclass_fields__["model"].type in ("PicoDecoderConfig", pm.PicoDecoderConfig)


def test_every_field_is_documented():
    for cls in [*SECTIONS.values(), DynamicsConfig, ExperimentConfig]:
        for name, _, _, doc in field_docs(cls):
            assert doc, f"{cls.__name__}.{name} has no doc"


def test_constructor_and_config_raise_the_same_error():
    with pytest.raises(ConfigError, match=r"^dropout: must be a number >= 0.0 and < 1.0, got 1.5$"):
        HeadConfig(dropout=1.5)
    with pytest.raises(ConfigError, match=r"^dropout: must be a number >= 0.0 and < 1.0, got 1.5$"):
        pm.MetaHead(4, 2, dropout=1.5)
    with pytest.raises(ConfigError, match=r"activation: 'swish' is not allowed; choose one of \['relu'"):
        pm.MetaHead(4, 2, activation="swish")
    with pytest.raises(ConfigError, match="^in_dim: must be an integer >= 1, got 32.5$"):
        pm.MetaHead(in_dim=32.5, n_way=2)
    assert isinstance(ConfigError("x"), ValueError)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_numbers_are_refused(value):
    with pytest.raises(ConfigError, match="lr: must be a finite number"):
        InnerLoopConfig(lr=value)
    with pytest.raises(ConfigError, match="optim.grad_clip: must be a finite number"):
        ExperimentConfig.from_dict({"optim": {"grad_clip": value}})


def test_ranges_apply_to_every_item_of_a_sequence():
    with pytest.raises(ConfigError, match=r"hidden_dims\[1\]: must be an integer >= 1 and <= 262144, got 0"):
        HeadConfig(hidden_dims=(4, 0))
    assert HeadConfig(hidden_dims=[8, 8]).hidden_dims == (8, 8)  # lists become the declared tuple


def test_check_int_and_check_number():
    assert check_int("n", 3, ge=1) == 3
    for bad in (True, 2.0, "3", 0):
        with pytest.raises(ConfigError, match="^n: must be an integer >= 1"):
            check_int("n", bad, ge=1)
    assert check_number("x", 1, gt=0) == 1.0
    with pytest.raises(ConfigError, match=r"^x: must be a finite number > 0 and <= 1, got 2"):
        check_number("x", 2, gt=0, le=1)


def test_choices_of_a_literal():
    from typing import Literal

    assert choices(Literal["a", "b"]) == ("a", "b")
    assert choices(Literal["a"] | None) == ("a", None)
    with pytest.raises(TypeError):
        choices(int)


def test_messages_are_bounded():
    huge = list(range(100_000))
    with pytest.raises(ConfigError) as err:
        HeadConfig(activation=huge)  # type: ignore[arg-type]
    assert len(str(err.value)) < 300
    assert len(short_repr("x" * 10_000)) <= 80


def test_cross_field_rule_runs_after_the_field_checks():
    @dataclasses.dataclass
    class Pair(Params):
        low: int = hparam(0, ge=0, doc="low")
        high: int = hparam(1, ge=0, doc="high")

        def validate(self) -> None:
            if self.high < self.low:
                raise ConfigError("high: must be >= low")

    with pytest.raises(ConfigError, match="^high: must be >= low"):
        Pair(low=3, high=2)
    with pytest.raises(ConfigError, match="^low: must be an integer >= 0"):
        Pair(low=-1)


def test_optimizer_from_config_uses_the_declared_defaults():
    cfg = ExperimentConfig.from_dict({"model": {"vocab_size": 64, "d_model": 32, "n_layers": 1, "n_heads": 4,
                                                "n_kv_heads": 2, "ffn_dim": 64, "max_seq_len": 32},
                                     "data": {"seq_len": 32}, "sampler": {"window_len": 8}})  # fmt: skip
    from picomaml.train.build import build_run

    run = build_run(cfg, mask_token_id=2, optimizer=False)
    opt = optimizer_from_config(cfg, run.model, run.head, run.inner_loop)
    assert opt.defaults["betas"] == OptimConfig.betas and opt.defaults["eps"] == OptimConfig.eps
