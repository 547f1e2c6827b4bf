"""Outer optimisation: AdamW parameter groups and the warm-up + decay learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import picomaml as pm
from picomaml.train.optim import build_lr_scheduler, build_optimizer, lr_multiplier, param_groups


def tiny_decoder(tie: bool = False) -> pm.PicoDecoder:
    torch.manual_seed(0)
    cfg = pm.PicoDecoderConfig(
        vocab_size=64,
        d_model=32,
        n_layers=1,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=64,
        max_seq_len=32,
        tie_embeddings=tie,
    )
    return pm.PicoDecoder(cfg)


def by_name(groups: list[dict]) -> dict[str, list[torch.Tensor]]:
    return {g["name"]: g["params"] for g in groups}


def ids(params) -> set[int]:
    return {id(p) for p in params}


# -- parameter groups --------------------------------------------------------------------------------


def test_decoder_decays_exactly_the_linear_matrices():
    model = tiny_decoder()
    groups = by_name(param_groups({"model": model}, weight_decay=0.1, lr=1e-3))
    assert set(groups) == {"model/decay", "model/no_decay"}
    named = dict(model.named_parameters())
    linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    expected_decay = {f"{n}.weight" for n in linear}
    assert "lm_head.weight" in expected_decay and "embed_tokens.weight" not in expected_decay
    assert ids(groups["model/decay"]) == ids(named[n] for n in expected_decay)
    # the rest (token embedding, RMSNorm weights) is not decayed
    assert ids(groups["model/no_decay"]) == ids(p for n, p in named.items() if n not in expected_decay)
    assert ids(groups["model/no_decay"]) >= {id(model.embed_tokens.weight), id(model.norm.weight)}


def test_group_weight_decay_and_lr_values():
    groups = param_groups({"model": tiny_decoder()}, weight_decay=0.3, lr=2e-3)
    for g in groups:
        assert g["lr"] == 2e-3
        assert g["weight_decay"] == (0.3 if g["name"].endswith("/decay") else 0.0)


def test_biases_and_1d_parameters_are_not_decayed():
    head = pm.MetaHead(in_dim=32, n_way=3, hidden_dims=(16,))
    groups = by_name(param_groups({"head": head}, weight_decay=0.1, lr=1e-3))
    assert ids(groups["head/decay"]) == {id(p) for p in head.parameters() if p.ndim == 2}
    assert ids(groups["head/no_decay"]) == {id(p) for p in head.parameters() if p.ndim == 1}
    assert groups["head/no_decay"]  # the head has biases, so the assertion above is not vacuous


def test_tied_embedding_is_placed_once_and_not_decayed():
    model = tiny_decoder(tie=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    groups = param_groups({"model": model}, weight_decay=0.1, lr=1e-3)
    placed = [id(p) for g in groups for p in g["params"]]
    assert len(placed) == len(set(placed)) == len(list(model.parameters()))
    assert id(model.embed_tokens.weight) in ids(by_name(groups)["model/no_decay"])


def test_tied_embedding_without_embed_in_its_name_is_not_decayed():
    # GPT-2 style: the embedding is called "wte" and the Linear that shares it is visited after it
    class Gpt2Like(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = nn.Embedding(10, 4)
            self.proj = nn.Linear(4, 4)
            self.lm_head = nn.Linear(4, 10, bias=False)
            self.lm_head.weight = self.wte.weight

    m = Gpt2Like()
    groups = by_name(param_groups({"model": m}, weight_decay=0.1, lr=1e-3))
    assert ids(groups["model/decay"]) == {id(m.proj.weight)}
    assert id(m.wte.weight) in ids(groups["model/no_decay"])


def test_parameter_shared_by_two_modules_goes_to_the_first():
    model = tiny_decoder()
    head = nn.Linear(32, 64, bias=False)
    head.weight = model.lm_head.weight  # e.g. a head initialised from and tied to the LM head
    groups = by_name(param_groups({"model": model, "head": head}, weight_decay=0.1, lr=1e-3))
    assert id(model.lm_head.weight) in ids(groups["model/decay"])
    assert "head/decay" not in groups and "head/no_decay" not in groups  # its only tensor is placed


@pytest.mark.parametrize("learn_lr", ["per_tensor", "per_step"])
def test_learned_inner_lrs_are_not_decayed(learn_lr):
    head = pm.MetaHead(in_dim=32, n_way=3, hidden_dims=())
    loop = pm.InnerLoop(steps=3, lr=0.1, learn_lr=learn_lr, head=head)
    assert loop.lrs is not None and loop.lrs.ndim == (1 if learn_lr == "per_tensor" else 2)
    groups = by_name(param_groups({"head": head, "inner_loop": loop}, weight_decay=0.1, lr=1e-3))
    assert "inner_loop/decay" not in groups
    assert ids(groups["inner_loop/no_decay"]) == {id(loop.lrs)}


def test_inner_loop_without_learned_lrs_adds_no_empty_group():
    head = pm.MetaHead(in_dim=32, n_way=3)
    loop = pm.InnerLoop(steps=1, lr=0.1)
    groups = param_groups({"head": head, "inner_loop": loop}, weight_decay=0.1, lr=1e-3)
    assert all(g["params"] for g in groups)
    assert not any(g["name"].startswith("inner_loop/") for g in groups)


def test_frozen_parameters_are_left_out():
    model = tiny_decoder()
    model.embed_tokens.weight.requires_grad_(False)
    placed = {id(p) for g in param_groups({"model": model}, 0.1, 1e-3) for p in g["params"]}
    assert id(model.embed_tokens.weight) not in placed
    assert id(model.norm.weight) in placed


def test_per_module_lr_overrides():
    model, head = tiny_decoder(), pm.MetaHead(in_dim=32, n_way=3)
    loop = pm.InnerLoop(steps=2, lr=0.1, learn_lr="per_tensor", head=head)
    modules = {"model": model, "head": head, "inner_loop": loop}
    groups = param_groups(modules, 0.1, 1e-3, lr_overrides={"head": 5e-2, "inner_loop": None})
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == {
        "model/decay": 1e-3,
        "model/no_decay": 1e-3,
        "head/decay": 5e-2,
        "head/no_decay": 5e-2,
        "inner_loop/no_decay": 1e-3,  # None keeps the base LR
    }


def test_zero_lr_override_is_kept():
    head = pm.MetaHead(in_dim=32, n_way=3)
    groups = param_groups({"model": tiny_decoder(), "head": head}, 0.1, 1e-3, lr_overrides={"head": 0.0})
    assert {g["name"]: g["lr"] for g in groups if g["name"].startswith("head/")} == {
        "head/decay": 0.0,
        "head/no_decay": 0.0,
    }


def test_build_optimizer_is_adamw_over_the_groups():
    model = tiny_decoder()
    opt = build_optimizer({"model": model}, lr=1e-3, weight_decay=0.2, betas=(0.8, 0.9), eps=1e-6)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["name"] for g in opt.param_groups] == ["model/decay", "model/no_decay"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
    assert all(g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6 for g in opt.param_groups)
    # one step changes the parameters: the groups are live references, not copies
    before = model.lm_head.weight.detach().clone()
    pm.lm_loss(model, torch.randint(0, 64, (2, 9))).backward()
    opt.step()
    assert not torch.equal(before, model.lm_head.weight)


# -- learning-rate schedule --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "decay", "expected"),
    [
        (0, "cosine", 0.25),  # warm-up: (step + 1) / warmup_steps
        (2, "cosine", 0.75),
        (3, "cosine", 1.0),  # last warm-up step
        (4, "cosine", 1.0),  # decay starts at progress 0
        (8, "cosine", 0.1 + 0.9 * 0.5),  # half-way: cos(pi / 2) = 0
        (6, "cosine", 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))),
        (12, "cosine", 0.1),  # total_steps: min_lr_ratio
        (50, "cosine", 0.1),  # held after total_steps
        (0, "linear", 0.25),
        (6, "linear", 0.1 + 0.9 * 0.75),
        (12, "linear", 0.1),
        (99, "linear", 0.1),
        (1, "constant", 0.5),
        (4, "constant", 1.0),
        (99, "constant", 1.0),
    ],
)
def test_lr_multiplier_matches_hand_computed_values(step, decay, expected):
    got = lr_multiplier(step, warmup_steps=4, total_steps=12, decay=decay, min_lr_ratio=0.1)
    assert got == pytest.approx(expected, abs=1e-12)


def test_lr_multiplier_without_warmup_and_other_floor():
    assert lr_multiplier(0, 0, 10, "cosine", min_lr_ratio=0.0) == pytest.approx(1.0)
    assert lr_multiplier(5, 0, 10, "linear", min_lr_ratio=0.0) == pytest.approx(0.5)
    assert lr_multiplier(10, 0, 10, "cosine", min_lr_ratio=0.3) == pytest.approx(0.3)


def test_lr_multiplier_rejects_unknown_decay():
    with pytest.raises(ValueError, match="decay must be 'cosine', 'linear' or 'constant', got 'step'"):
        lr_multiplier(0, 1, 10, decay="step")


def test_scheduler_steps_every_group_from_its_own_base_lr():
    model, head = tiny_decoder(), pm.MetaHead(in_dim=32, n_way=3)
    opt = build_optimizer({"model": model, "head": head}, 1e-3, 0.1, lr_overrides={"head": 4e-2})
    base = [g["lr"] for g in opt.param_groups]
    assert sorted(set(base)) == [1e-3, 4e-2]
    sched = build_lr_scheduler(opt, warmup_steps=3, total_steps=10, decay="cosine", min_lr_ratio=0.2)
    for step in range(13):
        mult = lr_multiplier(step, 3, 10, "cosine", min_lr_ratio=0.2)
        for g, b in zip(opt.param_groups, base, strict=True):
            assert g["lr"] == pytest.approx(b * mult, rel=1e-12), (step, g["name"])
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(base[0] * 0.2)


def test_scheduler_state_dict_resumes_the_schedule():
    opt = build_optimizer({"model": tiny_decoder()}, 1e-3, 0.1)
    sched = build_lr_scheduler(opt, 2, 8, "linear", min_lr_ratio=0.0)
    for _ in range(5):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = build_optimizer({"model": tiny_decoder()}, 1e-3, 0.1)
    sched2 = build_lr_scheduler(opt2, 2, 8, "linear", min_lr_ratio=0.0)
    sched2.load_state_dict(state)
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_multiplier(6, 2, 8, "linear", 0.0))
