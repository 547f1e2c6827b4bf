"""The compute of a run: per-step FLOPs of an experiment and the cumulative FLOPs its schedule implies."""

from __future__ import annotations

import dataclasses

import pytest

import picomaml as pm
from picomaml.eval.flops import ar_step_flops, meta_step_flops
from picomaml.train.budget import experiment_step_flops, run_flops, steps_for_flops
from picomaml.train.catalog import resolve_config
from picomaml.train.config import ExperimentConfig


def test_experiment_step_flops():
    cfg = ExperimentConfig.from_dict(
        {
            "model": {"vocab_size": 512, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                      "ffn_dim": 64, "max_seq_len": 64},
            "data": {"seq_len": 64, "batch_size": 4, "grad_accum": 2},
            "sampler": {"n_way": 3, "k_shot": 2, "n_query": 2, "window_len": 16},
            "meta": {"n_tasks": 2},
            "inner_loop": {"steps": 3},
        }
    )  # fmt: skip
    ar = 2 * ar_step_flops(cfg.model, 4, 64)
    meta = 2 * meta_step_flops(cfg.model, 3, 2, 2, 16, 2, (), 3, False)
    assert experiment_step_flops(cfg, {"ar"}) == ar
    assert experiment_step_flops(cfg, ["meta"]) == meta
    assert experiment_step_flops(cfg, ("ar", "meta")) == ar + meta
    with pytest.raises(ValueError, match="objectives"):
        experiment_step_flops(cfg, {"lm"})
    adapted = dataclasses.replace(cfg, meta=dataclasses.replace(cfg.meta, adapt_layers=1))
    expected = 2 * meta_step_flops(cfg.model, 3, 2, 2, 16, 2, (), 3, False, adapt_layers=1)
    assert experiment_step_flops(adapted, ["meta"]) == expected > meta  # equal-FLOP arms count the blocks
    surgery = dataclasses.replace(cfg, meta=dataclasses.replace(cfg.meta, grad_surgery="pcgrad"))
    per = experiment_step_flops(cfg, ("ar", "meta")) // 2
    lm_head_dw = 2 * 4 * 64 * 32 * 512  # the surgery's AR backward stops short of the LM head's weight gradient
    assert experiment_step_flops(surgery, ("ar", "meta")) == 2 * (per + 2 * per // 3 - lm_head_dw)
    assert experiment_step_flops(surgery, ("meta",)) == meta  # surgery needs both losses


TINY_CPU = resolve_config("tiny-cpu")


def _experiment(**hybrid) -> ExperimentConfig:
    return pm.load_config(TINY_CPU, [f"hybrid.{k}={v}" for k, v in hybrid.items()])


def test_run_flops_follows_the_scheduler():
    ar_cfg, meta_cfg = _experiment(ratio=0.0), _experiment(ratio=1.0)
    ar, meta = experiment_step_flops(ar_cfg, {"ar"}), experiment_step_flops(meta_cfg, {"meta"})
    assert run_flops(ar_cfg, 5) == [ar * (i + 1) for i in range(5)]
    assert run_flops(meta_cfg, 3) == [meta, 2 * meta, 3 * meta]
    cfg = _experiment(ratio=0.5, schedule="linear", final_ratio=0.1)
    sched = pm.HybridScheduler(ratio=0.5, schedule="linear", final_ratio=0.1, total_steps=40, seed=cfg.seed)
    expected = sum(ar if sched.choose(s) == "ar" else meta for s in range(40))
    assert run_flops(cfg, 40)[-1] == expected  # the schedule stretches over the run's own length
    weighted = _experiment(ratio=0.5, mode="weighted")
    assert run_flops(weighted, 2) == [ar + meta, 2 * (ar + meta)]
    with pytest.raises(ValueError, match="steps"):
        run_flops(cfg, 0)


def test_steps_for_flops_is_the_first_length_that_reaches_the_budget():
    budget = run_flops(_experiment(ratio=0.0), 50)[-1]
    for cfg in (_experiment(ratio=0.5), _experiment(ratio=0.8, schedule="linear", final_ratio=0.2)):
        n = steps_for_flops(cfg, budget)
        assert run_flops(cfg, n)[-1] >= budget > run_flops(cfg, n - 1)[-1]
        assert n > 50  # meta steps are cheaper than AR steps
    assert steps_for_flops(_experiment(ratio=0.0), budget) == 50
    # PCGrad in weighted mode: a step costs more than its two losses apart, so the bracket must start lower
    surgery = pm.load_config(TINY_CPU, ["hybrid.mode=weighted", "hybrid.ratio=0.3", "meta.grad_surgery=pcgrad"])
    n = steps_for_flops(surgery, budget)
    assert run_flops(surgery, n)[-1] >= budget > run_flops(surgery, n - 1)[-1]
    assert n < steps_for_flops(_experiment(ratio=0.3, mode="weighted"), budget)
    with pytest.raises(ValueError, match="max_steps"):
        steps_for_flops(_experiment(ratio=0.5), budget, max_steps=10)
    with pytest.raises(ValueError, match="budget"):
        steps_for_flops(_experiment(ratio=0.5), 0)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.vocab_size=16000000", "vocab_size"),
        ("model.d_model=24576", "d_model"),
        ("meta.n_tasks=1000000", "meta.n_tasks"),
        ("data.batch_size=100000", "data.batch_size"),
    ],
)
def test_a_config_that_cannot_fit_is_refused_naming_the_key(override, key):
    from picomaml.train.budget import check_memory

    cfg = pm.load_config("tiny-cpu", [override])
    with pytest.raises(pm.ConfigError, match=rf"{key}.*training needs about .* GiB.*a device has 24.0 GiB"):
        check_memory(cfg, 24 * 2**30)


def test_every_shipped_config_fits_where_it_is_meant_to_run():
    from picomaml.train.budget import check_memory, memory_estimate

    for name in ("tiny-cpu", "lm-only", "meta-only"):  # two CPU cores, 24 GiB
        check_memory(pm.load_config(name), 24 * 2**30)
    for name in ("pico-maml-tiny", "pico-maml-small", "pico-maml-medium", "pico-maml-large"):  # 8 x 80 GiB
        check_memory(pm.load_config(name), 80 * 2**30, devices=8)
    tiny, large = memory_estimate(pm.load_config("pico-maml-tiny")), memory_estimate(pm.load_config("pico-maml-large"))
    assert large["state"] > 40 * tiny["state"] and large["meta"] > tiny["meta"]  # grows with the model
