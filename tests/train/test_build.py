"""The builder wires each config section unchanged into its component, the same way every time."""

from __future__ import annotations

import dataclasses

import torch

from picomaml.train.build import (
    build_run,
    eval_class_split,
    eval_episode_kwargs,
    head_from_config,
    hybrid_from_config,
    sampler_from_config,
)
from picomaml.train.config import ExperimentConfig

MODEL = {"vocab_size": 64, "d_model": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 64, "max_seq_len": 32}


def _cfg(**sections) -> ExperimentConfig:
    base = {"seed": 7, "model": MODEL, "data": {"seq_len": 32}, "sampler": {"window_len": 8, "n_way": 3}}
    return ExperimentConfig.from_dict(base | sections)


def test_components_follow_their_sections():
    cfg = _cfg(
        head={"hidden_dims": [16], "activation": "gelu", "init": "kaiming"},
        inner_loop={"steps": 3, "lr": 0.05, "learn_lr": "per_step", "backend": "torch"},
        meta={"pooling": "before_mask", "feature_norm": "center"},
        hybrid={"ratio": 0.3, "mode": "interleave", "schedule": "linear"},
        optim={"lr": 1e-3, "meta_lr": 5e-3, "warmup_steps": 2},
        trainer={"max_steps": 50},
    )
    run = build_run(cfg, mask_token_id=2, special_ids=(0, 1))
    assert (run.head.in_dim, run.head.n_way, run.head.hidden_dims) == (32, 3, (16,))
    assert (run.head.activation, run.head.init, run.head.seed) == ("gelu", "kaiming", 7)
    assert (run.inner_loop.steps, run.inner_loop.lr, run.inner_loop.lrs.shape) == (3, 0.05, (3, 4))
    assert (run.learner.pooling, run.learner.feature_norm) == ("before_mask", "center")
    assert run.hybrid.total_steps == 50 and run.hybrid.mode == "interleave"  # schedule ends at max_steps
    assert run.sampler.exclude_token_ids == (0, 1) and run.sampler.mask_token_id == 2 and run.sampler.seed == 7
    lrs = {g["name"]: g["initial_lr"] for g in run.optimizer.param_groups}
    assert lrs["model/decay"] == 1e-3 and lrs["head/decay"] == 5e-3 and lrs["inner_loop/no_decay"] == 5e-3
    assert run.lr_scheduler.get_last_lr()[0] == 1e-3 / 2  # first warm-up step
    assert set(run.stateful()) == {"model", "head", "inner_loop", "optimizer", "lr_scheduler", "sampler", "hybrid"}


def test_building_twice_gives_identical_weights_without_touching_the_global_rng():
    cfg = _cfg()
    state = torch.random.get_rng_state()
    a, b = build_run(cfg, mask_token_id=2), build_run(cfg, mask_token_id=2)
    assert torch.equal(state, torch.random.get_rng_state())
    for (name, x), (_, y) in zip(a.learner.state_dict().items(), b.learner.state_dict().items(), strict=True):
        if isinstance(x, dict):  # the head's generator state
            x, y = x["generator"], y["generator"]
        assert torch.equal(x, y), name
    other = build_run(_cfg(seed=8), mask_token_id=2)
    assert not torch.equal(a.model.embed_tokens.weight, other.model.embed_tokens.weight)


def test_sampler_overrides_and_a_bare_section():
    cfg = _cfg()
    s = sampler_from_config(cfg, 2, (0,), seed=3, n_way=5, class_split="train")
    assert (s.n_way, s.seed, s.exclude_token_ids) == (5, 3, (0,))
    bare = sampler_from_config(cfg.sampler, 2)
    assert bare.seed == 0 and bare.n_way == 3


def test_hybrid_own_total_steps_wins():
    cfg = _cfg(hybrid={"schedule": "cosine", "total_steps": 20}, trainer={"max_steps": 99})
    assert hybrid_from_config(cfg).total_steps == 20
    assert hybrid_from_config(_cfg(hybrid={"schedule": "cosine"}), max_steps=12).total_steps == 12


def test_eval_arguments_follow_the_run():
    cfg = _cfg(sampler={"window_len": 8, "n_way": 3, "holdout_fraction": 0.2, "exclude_token_ids": [5]},
               meta={"pooling": "last"})  # fmt: skip
    kw = eval_episode_kwargs(cfg, mask_token_id=2, special_ids=(0, 1))
    assert kw["mask_token_id"] == 2 and kw["exclude_token_ids"] == (5, 0, 1) and kw["pooling"] == "last"
    assert kw["sampler_kwargs"] == {"holdout_fraction": 0.2, "holdout_seed": 0, "class_split": "heldout"}
    assert "mask_token_id" not in eval_episode_kwargs(cfg)
    assert eval_class_split(_cfg().sampler) == {}
    assert head_from_config(cfg).n_way == 3


def test_trainer_compile_compiles_the_backbone_lazily_and_evaluation_stays_eager():
    from picomaml.train.compile import is_compiled

    cfg = dataclasses.replace(_cfg(), trainer=dataclasses.replace(_cfg().trainer, compile=True))
    assert is_compiled(build_run(cfg, mask_token_id=2, optimizer=False).model)  # nothing compiled until a call
    assert not is_compiled(build_run(cfg, mask_token_id=2, optimizer=False, compile=False).model)
