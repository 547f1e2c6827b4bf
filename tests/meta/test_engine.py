"""The engine's general form: any module, any loss, any subset; exact meta-gradients (float64 finite
differences), learned LRs of every kind, buffers, purity and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from meta_tasks import T, cnn, images, sinusoid
from meta_tasks import mlp as paper_mlp
from torch import nn

import picomaml as pm
from picomaml.meta import engine


def regression(seed: int = 0):
    return sinusoid(seed, k=8)


def mlp() -> nn.Module:
    """Small, with a LayerNorm: the layer whose second derivative vmap(grad) gets wrong."""
    return paper_mlp(hidden=12, norm=True)


def check_finite_differences(fn, tensors: list[torch.Tensor], directions: int = 2, tol: float = 1e-6) -> None:
    """Directional derivatives of ``fn()`` along random directions against its autograd gradient."""
    grads = torch.autograd.grad(fn(), tensors, allow_unused=True)
    g = torch.Generator().manual_seed(5)
    for tensor, grad in zip(tensors, grads, strict=True):
        grad = torch.zeros_like(tensor) if grad is None else grad
        for _ in range(directions):
            v = torch.randn(tensor.shape, generator=g, dtype=tensor.dtype)
            eps = 1e-6
            with torch.no_grad():
                tensor.add_(eps * v)
                up = fn().item()
                tensor.sub_(2 * eps * v)
                down = fn().item()
                tensor.add_(eps * v)
            fd, an = (up - down) / (2 * eps), (grad * v).sum().item()
            # a floor for the differences' own rounding (about 1e-16 / eps), for a zero gradient (a conv bias
            # before BatchNorm)
            assert abs(fd - an) <= tol * max(abs(an), 1e-4) + 1e-9, (tuple(tensor.shape), fd, an)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"learn_lr": "per_tensor", "grad_clip": 0.7},
        {"learn_lr": "per_step", "multi_step_loss": True},
        {"learn_lr": "per_element"},
    ],
    ids=["plain", "per-tensor-clip", "per-step-msl", "per-element"],
)
def test_mlp_regression_meta_gradient_matches_finite_differences(kw) -> None:
    model, (support, query) = mlp(), regression()
    loop = pm.InnerLoop(steps=3, lr=0.05, **kw).bind(model).double()
    with torch.no_grad():  # distinct learned LRs, so each one matters differently
        for i, p in enumerate(loop.parameters()):
            p.mul_(1.0 + 0.1 * torch.rand(p.shape, generator=torch.Generator().manual_seed(i), dtype=p.dtype))
    tensors = [*model.parameters(), *loop.parameters()]
    check_finite_differences(lambda: loop(model, support, query, loss=F.mse_loss).loss, tensors)


def test_cnn_classifier_adapting_all_layers_batchnorm_in_training_mode() -> None:
    model, (support, query) = cnn(), images()
    before = {k: v.clone() for k, v in model.named_buffers()}
    loop = pm.InnerLoop(steps=2, lr=0.2)
    check_finite_differences(lambda: loop(model, support, query).loss, list(model.parameters()))
    assert all(torch.equal(before[k], v) for k, v in model.named_buffers())  # running stats untouched
    out = loop(model, support, query)
    assert set(out.params) == {n for n, _ in model.named_parameters()}
    assert all(v.shape[0] == T for v in out.params.values())
    # each task normalises by its own batch statistics: task t alone gives the same adapted tensors
    one = loop(model, tuple(x[:1] for x in support), tuple(x[:1] for x in query))
    for k, v in one.params.items():
        torch.testing.assert_close(v[0], out.params[k][0], rtol=1e-12, atol=1e-14)


def test_a_parameter_subset_adapts_and_the_rest_gets_the_plain_gradient() -> None:
    model, (support, query) = mlp(), regression(1)
    loop = pm.InnerLoop(steps=2, lr=0.1)
    out = loop(model, support, query, loss=F.mse_loss, adapt=["4.*", "3.weight"])
    assert list(out.params) == ["3.weight", "4.weight", "4.bias"]
    check_finite_differences(
        lambda: loop(model, support, query, loss=F.mse_loss, adapt=["4.*", "3.weight"]).loss, list(model.parameters())
    )
    by_predicate = loop(model, support, query, loss=F.mse_loss, adapt=lambda n, p: n.startswith(("3.w", "4.")))
    torch.testing.assert_close(by_predicate.loss, out.loss, rtol=1e-14, atol=0)


def test_tasks_at_once_equal_tasks_one_by_one_and_zero_steps_score_the_initial_module() -> None:
    model, (support, query) = mlp(), regression(2)
    loop = pm.InnerLoop(steps=2, lr=0.1)
    out = loop(model, support, query, loss=F.mse_loss)
    singles = [loop(model, tuple(x[t : t + 1] for x in support), tuple(x[t : t + 1] for x in query),
                    loss=F.mse_loss).loss for t in range(T)]  # fmt: skip
    torch.testing.assert_close(out.loss, torch.stack(singles).mean(), rtol=1e-13, atol=0)
    zero = pm.InnerLoop(steps=0)(model, support, query, loss=F.mse_loss)
    torch.testing.assert_close(zero.loss, torch.stack([F.mse_loss(model(query[0][t]), query[1][t]) for t in range(T)]).mean())
    assert out.metrics["query_loss_before"] == zero.loss.detach()
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in out.metrics.values())  # no host sync


def test_first_order_is_the_query_gradient_at_the_adapted_tensors() -> None:
    model, (support, query) = mlp(), regression(3)
    loop = pm.InnerLoop(steps=2, lr=0.1, first_order=True)
    out = loop(model, support, query, loss=F.mse_loss)
    meta = torch.autograd.grad(out.loss, list(model.parameters()))
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for t in range(T):
        adapted = {k: v[t].detach().requires_grad_() for k, v in out.params.items()}
        q = F.mse_loss(torch.func.functional_call(model, adapted, (query[0][t],)), query[1][t])
        for i, g in enumerate(torch.autograd.grad(q, list(adapted.values()))):
            expected[i] += g / T
    for a, b in zip(meta, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_adapt_under_no_grad_still_adapts_and_accuracy_is_reported_for_labels() -> None:
    model, (support, query) = cnn().eval(), images(1)
    loop = pm.InnerLoop(steps=3, lr=0.5)
    with torch.no_grad():
        params = loop.adapt(model, support)
        out = loop(model, support, query)
    assert all(not v.requires_grad for v in params.values())
    assert not torch.equal(params["4.weight"][0], model[4].weight)
    assert 0.0 <= float(out.metrics["query_acc"]) <= 1.0 and "query_acc_before" in out.metrics
    assert out.metrics["support_loss_before"] > 0


def test_select_names_and_bad_input_name_the_argument() -> None:
    model, (support, query) = mlp(), regression()
    assert engine.select_names(model, None) == tuple(n for n, _ in model.named_parameters())
    model[0].requires_grad_(False)
    assert "0.weight" not in engine.select_names(model, None)  # default: the trainable tensors
    assert engine.select_names(model, "0.*") == ("0.weight", "0.bias")  # named: frozen ones too
    loop = pm.InnerLoop(steps=1, lr=0.1)
    with pytest.raises(ValueError, match=r"adapt: 'lora\*' matches no parameter of Sequential"):
        loop(model, support, query, adapt=["lora*"])
    with pytest.raises(TypeError, match="adapt: expected None, a name or glob"):
        loop(model, support, query, adapt=3)
    with pytest.raises(ValueError, match="adapt: selects no tensor"):
        loop(model, support, query, adapt=lambda n, p: False)
    with pytest.raises(ValueError, match="loss: must return a scalar tensor per task"):
        loop(model, support, query, loss=lambda out, y: (out - y).pow(2))
    with pytest.raises(ValueError, match="support: every input and target needs the same leading task dim"):
        loop(model, (support[0], support[1][:2]), query, loss=F.mse_loss)
    with pytest.raises(ValueError, match="query: has 2 tasks, support has 3"):
        loop(model, support, tuple(x[:2] for x in query), loss=F.mse_loss)
    with pytest.raises(TypeError, match="loss/adapt: the head form"):
        loop(pm.MetaHead(4, 2), torch.randn(4, 4), torch.zeros(4).long(), torch.randn(4, 4), torch.zeros(4).long(),
             adapt=["out.*"])  # fmt: skip
    bound = pm.InnerLoop(steps=1, learn_lr="per_element").bind(model, adapt=["4.*"])
    with pytest.raises(ValueError, match="InnerLoop is bound to 2 adapted tensors"):
        bound(model, support, query, loss=F.mse_loss, adapt=["3.*"])
    with pytest.raises(RuntimeError, match=r"loop.bind\(module, adapt=...\)"):
        pm.InnerLoop(steps=1, learn_lr="per_tensor")(model, support, query, loss=F.mse_loss)


def test_a_module_vmap_cannot_batch_runs_task_by_task_with_the_same_numbers() -> None:
    class ItemNet(nn.Module):  # data-dependent control flow: vmap refuses .item()
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(1, 1).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * (2.0 if x.sum().item() > 0 else 1.0)

    model, (support, query) = ItemNet(), regression(4)
    out = pm.InnerLoop(steps=2, lr=0.1)(model, support, query, loss=F.mse_loss)
    singles = [pm.InnerLoop(steps=2, lr=0.1)(model, tuple(x[t : t + 1] for x in support), tuple(x[t : t + 1] for x in query),
                                             loss=F.mse_loss).loss for t in range(T)]  # fmt: skip
    torch.testing.assert_close(out.loss, torch.stack(singles).mean(), rtol=1e-13, atol=0)


def test_a_duck_typed_head_needs_only_the_documented_protocol() -> None:
    """No dropout_masks, a functional(params, x) of two arguments: the head form runs and equals MetaHead's."""

    class Cosine(nn.Module):
        adapted_names = ("out.weight", "out.bias")

        def __init__(self) -> None:
            super().__init__()
            self.in_dim, self.n_way = 5, 3
            self.out = nn.Linear(5, 3).double()

        def initial_params(self, xs, ys):
            return {"out.weight": self.out.weight, "out.bias": self.out.bias}

        def functional(self, params, x):
            return torch.baddbmm(params["out.bias"].unsqueeze(1), x, params["out.weight"].transpose(1, 2))

    duck = Cosine()
    head = pm.MetaHead(5, 3, init="xavier").double()
    with torch.no_grad():
        head.out.weight.copy_(duck.out.weight)
        head.out.bias.copy_(duck.out.bias)
    g = torch.Generator().manual_seed(0)
    xs, xq = (torch.randn(2, 6, 5, generator=g, dtype=torch.float64) for _ in range(2))
    ys, yq = (torch.randint(0, 3, (2, 6), generator=g) for _ in range(2))
    loop = pm.InnerLoop(steps=2, lr=0.5, closed_form=False)
    torch.testing.assert_close(loop(duck, xs, ys, xq, yq).loss, loop(head, xs, ys, xq, yq).loss)


def test_per_element_lrs_keep_a_bfloat16_module_in_bfloat16() -> None:
    model, (support, query) = mlp().bfloat16(), regression()
    support, query = (tuple(x.bfloat16() for x in part) for part in (support, query))
    loop = pm.InnerLoop(steps=2, lr=0.05, learn_lr="per_element").bind(model)
    out = loop(model, support, query, loss=F.mse_loss)
    assert all(v.dtype == torch.bfloat16 for v in out.params.values())
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in loop.element_lrs)
