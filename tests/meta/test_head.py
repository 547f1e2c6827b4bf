"""MetaHead: layout, inits, functional use, prototype layer, dropout determinism."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from picomaml.meta.head import MetaHead, prototype_layer


def test_pico_maml_setting_is_a_one_liner() -> None:
    head = MetaHead(96, 32, hidden_dims=(128, 128, 128), init="xavier")
    shapes = [tuple(p.shape) for p in head.parameters()]
    assert shapes == [(128, 96), (128,), (128, 128), (128,), (128, 128), (128,), (32, 128), (32,)]
    assert head.adapted_names == (
        "hidden.0.weight", "hidden.0.bias", "hidden.1.weight", "hidden.1.bias",
        "hidden.2.weight", "hidden.2.bias", "out.weight", "out.bias",
    )  # fmt: skip
    assert head(torch.randn(5, 96)).shape == (5, 32)


@pytest.mark.parametrize("init", ["xavier", "kaiming", "normal", "zeros"])
def test_inits(init: str) -> None:
    head = MetaHead(40, 10, hidden_dims=(30,), init=init, seed=3)
    w = head.hidden[0].weight
    assert torch.equal(head.hidden[0].bias, torch.zeros(30))
    if init == "zeros":  # a zero output layer over xavier hidden layers (zero hidden layers never move)
        assert torch.equal(head.out.weight, torch.zeros_like(head.out.weight))
        assert w.abs().max() <= math.sqrt(6 / 70) and w.abs().max() > 0.8 * math.sqrt(6 / 70)
    elif init == "xavier":
        assert w.abs().max() <= math.sqrt(6 / 70) and w.abs().max() > 0.8 * math.sqrt(6 / 70)
    elif init == "kaiming":
        assert w.abs().max() <= math.sqrt(6 / 40) and w.abs().max() > 0.8 * math.sqrt(6 / 40)
    else:
        assert abs(w.std().item() - 0.02) < 0.003
    # seeded: same seed same weights, other seed other weights
    again = MetaHead(40, 10, hidden_dims=(30,), init=init, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(head.parameters(), again.parameters(), strict=True))
    other = MetaHead(40, 10, hidden_dims=(30,), init=init, seed=4)
    assert not torch.equal(other.hidden[0].weight, w)


def test_functional_matches_forward_and_functional_call() -> None:
    head = MetaHead(12, 4, hidden_dims=(8, 6), activation="gelu")
    x = torch.randn(7, 12)
    params = dict(head.named_parameters())
    ref = head(x)
    torch.testing.assert_close(head.functional(head.initial_params(), x), ref, rtol=0, atol=0)
    torch.testing.assert_close(functional_call(head, params, (x,)), ref, rtol=0, atol=0)
    # new values through functional_call
    shifted = {k: v + 0.1 for k, v in params.items()}
    torch.testing.assert_close(functional_call(head, shifted, (x,)), head.functional(shifted, x))


def test_task_batched_params_equal_per_task() -> None:
    head = MetaHead(6, 3, hidden_dims=(5,))
    params = {k: torch.stack([v, v * 0.5]) for k, v in head.named_parameters()}
    x = torch.randn(2, 4, 6)
    out = head.functional(params, x)
    for t in range(2):
        one = {k: v[t] for k, v in params.items()}
        torch.testing.assert_close(out[t], head.functional(one, x[t]))


def test_prototype_layer_is_class_means_and_differentiable() -> None:
    torch.manual_seed(0)
    head = MetaHead(5, 3, hidden_dims=(4,), init="prototype")
    assert head.out is None and "out.weight" in head.adapted_names
    x = torch.randn(1, 9, 5, requires_grad=True)
    y = torch.tensor([[0, 1, 2, 0, 1, 2, 0, 1, 2]])
    params = head.initial_params(x, y)
    h = head.features(params, x)[0]
    for k in range(3):
        c = h[y[0] == k].mean(0)
        torch.testing.assert_close(params["out.weight"][0, k], 2 * c)
        torch.testing.assert_close(params["out.bias"][0, k], -(c * c).sum())
    # the meta-gradient flows through the means into features and hidden layers
    params["out.weight"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert head.hidden[0].weight.grad.abs().sum() > 0


def test_prototype_logits_are_negative_squared_distance_up_to_a_row_constant() -> None:
    feats = torch.randn(2, 6, 4, dtype=torch.float64)
    labels = torch.tensor([[0, 0, 1, 1, 2, 2], [2, 1, 0, 2, 1, 0]])
    w, b = prototype_layer(feats, labels, 3)
    logits = torch.baddbmm(b.unsqueeze(1), feats, w.transpose(1, 2))
    means = torch.stack([torch.stack([feats[t][labels[t] == k].mean(0) for k in range(3)]) for t in range(2)])
    dist = -((feats.unsqueeze(2) - means.unsqueeze(1)) ** 2).sum(-1)  # (T, n, N)
    diff = logits - dist  # = ||x||^2, constant across classes
    torch.testing.assert_close(diff - diff[..., :1], torch.zeros_like(diff))


def test_dropout_uses_own_generator_and_state_dict() -> None:
    head = MetaHead(6, 3, hidden_dims=(50,), dropout=0.5, init="xavier", seed=1)
    x = torch.randn(4, 6)
    state = head.state_dict()
    torch.manual_seed(0)
    a = head(x)
    torch.manual_seed(0)
    b = head(x)
    assert not torch.equal(a, b)  # the head's generator advanced, the global seed is irrelevant
    head.load_state_dict(state)
    torch.testing.assert_close(head(x), a, rtol=0, atol=0)  # generator state restored
    head.eval()
    torch.testing.assert_close(head(x), head(x), rtol=0, atol=0)
    masks = head.train().dropout_masks((4, 6), torch.device("cpu"), torch.float32)
    assert set(masks[0].unique().tolist()) <= {0.0, 2.0}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_dim": 0}, "in_dim"),
        ({"n_way": 1}, "n_way"),
        ({"hidden_dims": (4, 0)}, "hidden_dims"),
        ({"activation": "swish"}, "activation"),
        ({"dropout": 1.0}, "dropout"),
        ({"init": "orthogonal"}, "init"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"in_dim": 4, "n_way": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        MetaHead(**args)


def test_prototype_forward_needs_support() -> None:
    head = MetaHead(4, 2, init="prototype")
    with pytest.raises(ValueError, match="prototype"):
        head(torch.randn(3, 4))
    out = head(torch.randn(3, 4), torch.randn(4, 4), torch.tensor([0, 1, 0, 1]))
    assert out.shape == (3, 2)
