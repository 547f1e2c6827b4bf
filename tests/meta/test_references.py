"""The engine against its independent references, higher and learn2learn (float64): general form, head form,
Meta-SGD. Tests that need a reference skip, saying which, when it is not installed."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from meta_tasks import T, cnn, images, mlp, sinusoid

import picomaml as pm
from picomaml._optional import L2L_INSTALL, MissingDependencyError, load_learn2learn

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "references.py"
_spec = importlib.util.spec_from_file_location("picomaml_references", _SCRIPT)
refs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(refs)

def need(name: str) -> None:
    """Skip only when the reference's package is absent (and say so)."""
    if name == "higher" and importlib.util.find_spec("higher") is None:
        pytest.skip("higher is not installed: pip install 'picomaml[higher]'")
    if name == "learn2learn":
        try:
            importlib.metadata.distribution("learn2learn")
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"learn2learn is not installed: {L2L_INSTALL}")


def grads(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros(()) if g is None else g for g in torch.autograd.grad(loss, tensors, allow_unused=True, retain_graph=True)]


def assert_all_close(a: list[torch.Tensor], b: list[torch.Tensor], tol: float = 1e-10) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("case", ["sinusoid-mlp", "cnn-batchnorm"])
def test_general_form_equals_learn2learn_maml(case: str, first_order: bool) -> None:
    need("learn2learn")
    model, (support, query), loss = (
        (mlp(), sinusoid(), F.mse_loss) if case == "sinusoid-mlp" else (cnn(), images(), F.cross_entropy)
    )
    running = [b.clone() for b in model.buffers()]
    ours = pm.InnerLoop(steps=2, lr=0.01 if case == "sinusoid-mlp" else 0.3, first_order=first_order)
    out = ours(model, support, query, loss=loss)
    assert all(torch.equal(a, b) for a, b in zip(running, model.buffers(), strict=True))  # never mutated
    ref = refs.learn2learn_maml(model, support, query, loss, 2, ours.lr, first_order)  # (it updates running stats)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    assert_all_close(grads(out.loss, list(model.parameters())), grads(ref, list(model.parameters())))


def test_general_form_equals_higher_with_per_tensor_lrs_and_clipping() -> None:
    need("higher")
    model, (support, query) = mlp(), sinusoid(1)
    loop = pm.InnerLoop(steps=3, lr=0.01, learn_lr="per_tensor", grad_clip=0.5).bind(model).double()
    with torch.no_grad():
        loop.lrs.mul_(torch.linspace(0.5, 1.5, loop.lrs.numel(), dtype=torch.float64))
    out = loop(model, support, query, loss=F.mse_loss)
    ref = refs.higher_maml(model, support, query, F.mse_loss, 3, list(loop.lrs), grad_clip=0.5)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    tensors = [*model.parameters(), loop.lrs]
    assert_all_close(grads(out.loss, tensors), grads(ref, tensors))


@pytest.mark.parametrize("first_order", [False, True])
def test_per_element_lrs_equal_learn2learn_meta_sgd(first_order: bool) -> None:
    need("learn2learn")
    model, (support, query) = mlp(), sinusoid(2)
    loop = pm.InnerLoop(steps=1, lr=0.01, learn_lr="per_element", first_order=first_order).bind(model).double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # distinct LRs per element, exactly representable in float64
        for p in loop.element_lrs:
            p.copy_(0.005 + 0.01 * torch.rand(p.shape, generator=g, dtype=torch.float64))
    out = loop(model, support, query, loss=F.mse_loss)
    ref, ref_lrs = refs.learn2learn_meta_sgd(model, support, query, F.mse_loss, list(loop.element_lrs), first_order)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    params = list(model.parameters())
    assert_all_close(grads(out.loss, [*params, *loop.element_lrs]), grads(ref, [*params, *ref_lrs]))


HEADS = [
    pytest.param({"hidden_dims": ()}, id="linear"),
    pytest.param({"hidden_dims": (6, 6), "activation": "tanh"}, id="mlp"),
    pytest.param({"hidden_dims": (6,), "activation": "gelu", "init": "normal"}, id="gelu"),
]


def head_episode(d: int = 5, n: int = 4, k: int = 2, q: int = 3):
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(T, n * k, d, generator=g, dtype=torch.float64, requires_grad=True)
    xq = torch.randn(T, n * q, d, generator=g, dtype=torch.float64, requires_grad=True)
    ys = torch.stack([torch.randperm(n, generator=g).repeat_interleave(k) for _ in range(T)])
    yq = torch.stack([torch.randperm(n, generator=g).repeat_interleave(q) for _ in range(T)])
    return xs, ys, xq, yq


@pytest.mark.parametrize("reference", ["higher", "learn2learn"])
@pytest.mark.parametrize("head_kw", HEADS)
def test_head_form_equals_the_references(reference: str, head_kw: dict) -> None:
    need(reference)
    head = pm.MetaHead(5, 4, seed=2, **head_kw).double()
    xs, ys, xq, yq = head_episode()
    out = pm.InnerLoop(steps=3, lr=0.6)(head, xs, ys, xq, yq)
    shell = refs.head_as_sequential(head)
    if reference == "higher":
        ref = refs.higher_maml(shell, (xs, ys), (xq, yq), F.cross_entropy, 3, 0.6)
    else:
        ref = refs.learn2learn_maml(shell, (xs, ys), (xq, yq), F.cross_entropy, 3, 0.6)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    tensors = [*head.parameters(), xs, xq]
    assert_all_close(grads(out.loss, tensors), grads(ref, tensors))
    # the general form on the same head (as a plain module) gives the same numbers
    general = pm.InnerLoop(steps=3, lr=0.6)(shell, (xs, ys), (xq, yq))
    torch.testing.assert_close(general.loss, out.loss, rtol=1e-12, atol=1e-12)
    assert_all_close(grads(general.loss, tensors), grads(out.loss, tensors))


def test_learn2learn_loads_without_its_package_init() -> None:
    need("learn2learn")
    before = {k for k in sys.modules if k.startswith("learn2learn")}
    assert hasattr(load_learn2learn("maml"), "MAML") and hasattr(load_learn2learn("meta_sgd"), "MetaSGD")
    assert {k for k in sys.modules if k.startswith("learn2learn")} <= before | {
        "learn2learn.algorithms.maml",
        "learn2learn.algorithms.meta_sgd",
        "learn2learn.algorithms.base_learner",
        "learn2learn.utils",
    }
    assert "learn2learn" not in sys.modules or hasattr(sys.modules["learn2learn"], "__file__")  # no stand-in left


def test_a_missing_learn2learn_names_its_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import picomaml._optional as optional

    def missing(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(optional, "_L2L", {})
    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(MissingDependencyError, match="learn2learn==0.2.0"):
        load_learn2learn("maml")


def test_the_removed_backends_name_what_replaces_them() -> None:
    for name in ("higher", "learn2learn"):
        with pytest.raises(ValueError, match=r"backend: .* test suite's independent references.*backend='torch'"):
            pm.InnerLoop(steps=1, backend=name)
