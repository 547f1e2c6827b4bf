"""The step-FLOP formulas that set equal-compute budgets against torch's FlopCounterMode on a real step."""

from __future__ import annotations

import pytest

import picomaml as pm
from picomaml.train.budget import experiment_step_flops
from picomaml.train.flop_count import measure_step_flops, synthetic_episode

SMALL = ["model.d_model=32", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=64",
         "model.vocab_size=512", "model.max_seq_len=64", "data.seq_len=32", "data.batch_size=4", "meta.n_tasks=2",
         "sampler.window_len=16", "head.hidden_dims=[16]"]  # fmt: skip


@pytest.mark.parametrize(
    ("recipe", "objectives"),
    [
        ([], {"ar"}),
        ([], {"meta"}),
        (["inner_loop.first_order=true"], {"meta"}),
        (["meta.adapt_layers=2"], {"meta"}),
        (["meta.grad_blocks=1"], {"meta"}),
        (["meta.grad_blocks=0"], {"meta"}),
        (["meta.lora_rank=4"], {"meta"}),
        (["meta.lora_rank=4", "sampler.n_query=2", "sampler.k_shot=3"], {"meta"}),
        (["meta.lora_rank=2", "meta.lora_targets=[v_proj, down_proj]", "inner_loop.first_order=true"], {"meta"}),
        (["hybrid.mode=weighted", "hybrid.ratio=0.3"], {"ar", "meta"}),
        (["hybrid.mode=weighted", "hybrid.ratio=0.3", "meta.grad_surgery=pcgrad"], {"ar", "meta"}),
        (["hybrid.mode=weighted", "hybrid.ratio=0.3", "meta.grad_surgery=pcgrad", "model.tie_embeddings=true"], {"ar", "meta"}),
        (["hybrid.mode=weighted", "hybrid.ratio=0.3", "meta.grad_surgery=pcgrad", "data.grad_accum=2"], {"ar", "meta"}),
    ],
    ids=["ar", "meta", "fomaml", "adapt2", "grad-blocks-1", "grad-blocks-0", "lora", "lora-k3-q2", "lora-fo", "weighted", "pcgrad", "pcgrad-tied", "pcgrad-accum"],
)
def test_formula_matches_flop_counter(recipe, objectives):
    cfg = pm.load_config("tiny-cpu", SMALL + recipe)
    counted, modelled = measure_step_flops(cfg, objectives), experiment_step_flops(cfg, objectives)
    assert abs(modelled / counted - 1) < 0.03, (modelled, counted)


def test_pcgrad_costs_what_its_extra_backwards_cost():
    """The surgery's extra work, counted, is what the formula adds (it used to add a full 2/3 of both steps)."""
    plain = pm.load_config("tiny-cpu", SMALL + ["hybrid.mode=weighted", "hybrid.ratio=0.3"])
    surgery = pm.load_config("tiny-cpu", SMALL + ["hybrid.mode=weighted", "hybrid.ratio=0.3", "meta.grad_surgery=pcgrad"])
    counted = measure_step_flops(surgery, {"ar", "meta"}) - measure_step_flops(plain, {"ar", "meta"})
    modelled = experiment_step_flops(surgery, {"ar", "meta"}) - experiment_step_flops(plain, {"ar", "meta"})
    assert abs(modelled / counted - 1) < 0.05, (modelled, counted)


def test_synthetic_episode_is_a_valid_episode():
    import torch

    ep = synthetic_episode(2, 3, 2, 1, 8, vocab_size=50, mask_token_id=49, generator=torch.Generator().manual_seed(0))
    assert ep.support_ids.shape == (2, 6, 8) and ep.query_ids.shape == (2, 3, 8)
    ep.validate(mask_token_id=49)


def test_objectives_are_checked():
    with pytest.raises(ValueError, match="objectives"):
        measure_step_flops(pm.load_config("tiny-cpu", SMALL), {"lm"})


def test_counted_run_flops_follows_the_schedule():
    from picomaml.train.budget import run_flops
    from picomaml.train.flop_count import counted_run_flops

    cfg = pm.load_config("tiny-cpu", SMALL + ["hybrid.ratio=0.5", "trainer.max_steps=6"])
    counted, modelled = counted_run_flops(cfg), run_flops(cfg)[-1]
    assert abs(modelled / counted - 1) < 0.03
    ar = pm.load_config("tiny-cpu", SMALL + ["hybrid.ratio=0.0", "trainer.max_steps=6"])
    assert counted_run_flops(ar) == 6 * measure_step_flops(ar, {"ar"})


def test_no_op_steps_of_the_schedule_control_cost_nothing():
    from picomaml.train.budget import run_flops, step_objectives
    from picomaml.train.build import hybrid_from_config
    from picomaml.train.flop_count import counted_run_flops

    cfg = pm.load_config("tiny-cpu", SMALL + ["hybrid.ratio=0.5", "trainer.max_steps=8", "trainer.meta_noop=true"])
    kinds = [step_objectives(cfg, hybrid_from_config(cfg), s) for s in range(8)]
    assert set(kinds) == {(), ("ar",)}
    ar_step = measure_step_flops(cfg, {"ar"})
    assert counted_run_flops(cfg) == kinds.count(("ar",)) * ar_step
    assert run_flops(cfg)[-1] == kinds.count(("ar",)) * experiment_step_flops(cfg, {"ar"})
