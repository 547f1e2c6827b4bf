"""A checkpoint's states are checked against the built components before loading: shapes, dtypes, values,
optimizer moments, the LR schedule's step and the counters, each error naming the key."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from picomaml.train.state_check import (
    StateMismatchError,
    check_counters,
    check_module_state,
    check_optimizer_state,
    check_states,
)
from picomaml.train.training import COUNTERS


def trained() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for _ in range(2):
        model(torch.randn(2, 3)).sum().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def test_a_matching_state_passes_and_loads():
    model, opt, sched = trained()
    objects = {"model": model, "optimizer": opt, "lr_scheduler": sched}
    states = {k: v.state_dict() for k, v in objects.items()}
    check_states(objects, states, step=2)
    check_counters(dict.fromkeys(COUNTERS, 0) | {"ar_steps": 2}, COUNTERS, step=2)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.__setitem__("0.weight", s["0.weight"].long()), "'0.weight' is torch.int64 in the checkpoint"),
        (lambda s: s.__setitem__("0.weight", torch.zeros(5, 3)), "'0.weight' is (5, 3) in the checkpoint"),
        (lambda s: s["1.bias"].__setitem__(0, float("nan")), "'1.bias' holds 1 NaN or infinite value(s) of 4"),
        (lambda s: s.pop("1.weight"), "missing ['1.weight']"),
        (lambda s: s.__setitem__("2.weight", torch.zeros(1)), "unexpected ['2.weight']"),
        (lambda s: s.__setitem__("0.bias", [0.0] * 4), "'0.bias' is [0.0, 0.0, 0.0, 0.0] in the checkpoint, not a tensor"),
    ],
    ids=["int64", "shape", "nan", "missing", "unexpected", "not-a-tensor"],
)
def test_module_state_differences_name_the_key(edit, message):
    model, _, _ = trained()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    edit(state)
    with pytest.raises(StateMismatchError, match="^model: ") as err:
        check_module_state("model", model, state)
    assert message in str(err.value)


def test_optimizer_moments_of_the_wrong_shape_are_refused_before_any_step():
    model, opt, _ = trained()
    state = opt.state_dict()
    state["state"][0]["exp_avg"] = torch.zeros(7)
    with pytest.raises(StateMismatchError, match=r"optimizer: parameter 0 'exp_avg' is \(7,\) in the checkpoint, its parameter \(4, 3\) has \(4, 3\)"):
        check_optimizer_state("optimizer", opt, state)
    fresh = torch.optim.AdamW(model.parameters())  # before its first step: no moments to compare with
    with pytest.raises(StateMismatchError, match="parameter 0 'exp_avg'"):
        check_optimizer_state("optimizer", fresh, state)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s["state"].__setitem__(99, s["state"][0]), "state for parameter 99; the optimizer has parameters 0..3"),
        (lambda s: s["state"][1].__setitem__("step", torch.tensor(float("inf"))), "parameter 1 'step' is inf"),
        (lambda s: s["state"][1]["exp_avg_sq"].fill_(float("nan")), "parameter 1 'exp_avg_sq' holds 4 NaN"),
        (lambda s: s["param_groups"].append(dict(s["param_groups"][0])), "groups of sizes [4, 4] in the checkpoint"),
        (lambda s: s["param_groups"][0].__setitem__("lr", -1.0), "'lr' is -1.0"),
    ],
    ids=["index", "step", "nan", "groups", "lr"],
)
def test_optimizer_state_differences_are_named(edit, message):
    _, opt, _ = trained()
    state = opt.state_dict()
    state = {"state": {k: {n: t.clone() for n, t in v.items()} for k, v in state["state"].items()},
             "param_groups": [dict(g) for g in state["param_groups"]]}  # fmt: skip
    edit(state)
    with pytest.raises(StateMismatchError) as err:
        check_optimizer_state("optimizer", opt, state)
    assert message in str(err.value)


def test_a_schedule_at_another_step_is_refused():
    model, opt, sched = trained()
    state = sched.state_dict() | {"last_epoch": 10**9}
    with pytest.raises(StateMismatchError, match=r"lr_scheduler: 'last_epoch' is 1000000000, but the checkpoint is for step 2"):
        check_states({"lr_scheduler": sched}, {"lr_scheduler": state}, step=2)


@pytest.mark.parametrize(
    ("counters", "message"),
    [
        ({"tokens": -1}, "counter 'tokens' is -1"),
        ({"tokens": float("nan")}, "counter 'tokens' is nan"),
        ({"tokens": "many"}, "counter 'tokens' is 'many'"),
        ({"ar_steps": 9}, "counter 'ar_steps' is 9, more than the checkpoint's step 2"),
        ({"bogus": 1}, "unknown counter 'bogus'"),
    ],
)
def test_counters_are_checked(counters, message):
    with pytest.raises(StateMismatchError) as err:
        check_counters(counters, COUNTERS, step=2)
    assert message in str(err.value)
