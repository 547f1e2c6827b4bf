import math

import pytest
import torch
from torch import nn

from picomaml.train.meta_update import MetaGradScale, ema, grad_norm, rescale_grads_, step_kind, update_norm


def _params_with_grads(*grads):
    params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    return params


def test_ema_starts_at_the_first_value_then_decays():
    assert ema(None, 2.0, 0.9) == 2.0
    assert ema(2.0, 1.0, 0.9) == pytest.approx(1.9)
    assert ema(2.0, 1.0, 0.0) == 1.0


def test_rescale_sets_the_global_norm_and_keeps_directions():
    params = _params_with_grads(torch.tensor([3.0, 0.0]), torch.tensor([[4.0]]))
    params.append(nn.Parameter(torch.ones(2)))  # no gradient: left alone
    before = rescale_grads_(params, 0.5)
    assert before == pytest.approx(5.0)
    assert grad_norm(params) == pytest.approx(0.5)
    assert torch.allclose(params[0].grad, torch.tensor([0.3, 0.0])) and params[2].grad is None


@pytest.mark.parametrize("bad", [0.0, float("nan")])
def test_rescale_leaves_zero_and_nonfinite_gradients_unchanged(bad):
    grad = torch.tensor([bad, 0.0])
    params = _params_with_grads(grad)
    norm = rescale_grads_(params, 1.0)
    assert norm == 0.0 or math.isnan(norm)
    torch.testing.assert_close(params[0].grad, grad, rtol=0, atol=0, equal_nan=True)


def test_update_norm_is_the_norm_of_the_change_over_all_tensors():
    a, b = torch.zeros(3), torch.zeros(2, 2)
    before = [a.clone(), b.clone()]
    a[0], b[1, 1] = 3.0, 4.0
    assert update_norm([a, b], before) == pytest.approx(5.0)
    assert update_norm([], []) == 0.0
    with pytest.raises(ValueError, match="2 tensors after the update, 1 before"):
        update_norm([a, b], before[:1])


def test_step_kind():
    assert step_kind(("ar",)) == "ar" and step_kind(("meta",)) == "meta" and step_kind(("ar", "meta")) == "mixed"


def test_meta_grad_scale_rescales_to_a_fraction_of_the_running_ar_norm():
    scale = MetaGradScale(0.5, decay=0.5)
    params = _params_with_grads(torch.tensor([6.0, 8.0]))
    assert scale.rescale_(params) is None and grad_norm(params) == pytest.approx(10.0)  # no AR step yet
    scale.observe_ar(1.0)
    scale.observe_ar(float("inf"))  # ignored
    scale.observe_ar(0.6)
    assert scale.ar_norm == pytest.approx(0.8) and scale.ar_seen == 2
    assert scale.rescale_(params) == pytest.approx(10.0)
    assert grad_norm(params) == pytest.approx(0.4)
    logging_only = MetaGradScale(None)
    logging_only.observe_ar(1.0)
    assert logging_only.target is None and logging_only.rescale_(params) is None


def test_meta_grad_scale_state_round_trips_and_bad_states_are_named():
    scale = MetaGradScale(0.5)
    scale.observe_ar(0.7)
    other = MetaGradScale(0.5)
    other.load_state_dict(scale.state_dict())
    assert other.state_dict() == {"ar_norm": 0.7, "ar_seen": 1}
    for bad, key in [
        ({"ar_norm": 0.7}, "expected the keys"),
        ({"ar_norm": -1.0, "ar_seen": 1}, "'ar_norm'"),
        ({"ar_norm": float("nan"), "ar_seen": 1}, "'ar_norm'"),
        ({"ar_norm": 0.5, "ar_seen": 0}, "'ar_seen'"),
        ({"ar_norm": None, "ar_seen": 3}, "'ar_seen'"),
        ({"ar_norm": 0.5, "ar_seen": True}, "'ar_seen'"),
        ([], "expected the keys"),
    ]:
        with pytest.raises(ValueError, match=key):
            other.load_state_dict(bad)
    assert other.state_dict() == {"ar_norm": 0.7, "ar_seen": 1}  # a refused state changes nothing


@pytest.mark.parametrize(("kwargs", "name"), [({"fraction": 0.0}, "fraction"), ({"fraction": float("inf")}, "fraction"),
                                              ({"decay": 1.0}, "decay")])  # fmt: skip
def test_meta_grad_scale_refuses_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MetaGradScale(**kwargs)
