"""higher and learn2learn backends give the torch backend's numbers (float64); clear errors when absent."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys

import pytest
import torch

from picomaml._optional import MissingDependencyError
from picomaml.meta import backends
from picomaml.meta.head import MetaHead
from picomaml.meta.inner_loop import InnerLoop

N, K, Q, D, T = 4, 2, 3, 5, 2


def _has_l2l() -> bool:
    try:
        importlib.metadata.distribution("learn2learn")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def need(backend: str) -> None:
    """Skip only when the backend's package is absent (and say so)."""
    if backend == "higher" and importlib.util.find_spec("higher") is None:
        pytest.skip("higher is not installed: pip install 'picomaml[higher]'")
    if backend == "learn2learn" and not _has_l2l():
        pytest.skip(f"learn2learn is not installed: {backends.L2L_INSTALL}")


def run(backend: str, head: MetaHead, **kw):
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(T, N * K, D, generator=g, dtype=torch.float64, requires_grad=True)
    xq = torch.randn(T, N * Q, D, generator=g, dtype=torch.float64, requires_grad=True)
    ys = torch.stack([torch.randperm(N, generator=g).repeat_interleave(K) for _ in range(T)])
    yq = torch.stack([torch.randperm(N, generator=g).repeat_interleave(Q) for _ in range(T)])
    loop = InnerLoop(backend=backend, head=head, **{"steps": 3, "lr": 0.6, **kw}).double()
    out = loop(head, xs, ys, xq, yq)
    inputs = [*head.parameters(), *loop.parameters(), xs, xq]
    grads = torch.autograd.grad(out.loss, inputs, allow_unused=True)
    return out, [torch.zeros(()) if gr is None else gr for gr in grads]


def assert_same(a, b) -> None:
    (oa, ga), (ob, gb) = a, b
    torch.testing.assert_close(oa.loss, ob.loss, rtol=0, atol=1e-10)
    assert len(ga) == len(gb)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-10)
    for k in oa.params:
        torch.testing.assert_close(oa.params[k], ob.params[k], rtol=0, atol=1e-10)
    for k in ("support_acc_after", "query_acc", "query_acc_before", "support_loss_after"):
        assert oa.metrics[k] == pytest.approx(ob.metrics[k], abs=1e-6)


HEADS = [
    pytest.param({"hidden_dims": ()}, id="linear"),
    pytest.param({"hidden_dims": (6, 6), "activation": "tanh"}, id="mlp"),
    pytest.param({"hidden_dims": (6,), "init": "prototype"}, id="proto-mlp"),
    pytest.param({"init": "prototype"}, id="proto-linear"),
]


@pytest.mark.parametrize("backend", ["higher", "learn2learn"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("head_kw", HEADS)
def test_backends_agree(backend: str, first_order: bool, head_kw: dict) -> None:
    need(backend)
    head = MetaHead(D, N, seed=2, **head_kw).double()
    ref = run("torch", head, first_order=first_order, multi_step_loss=True)
    assert_same(run(backend, head, first_order=first_order, multi_step_loss=True), ref)
    # the general torch path too (the linear head uses the closed form by default)
    assert_same(run("torch", head, first_order=first_order, closed_form=False, multi_step_loss=True), ref)


@pytest.mark.parametrize("learn_lr", ["per_tensor", "per_step"])
@pytest.mark.parametrize("first_order", [False, True])
def test_higher_learned_lrs_and_clipping(learn_lr: str, first_order: bool) -> None:
    need("higher")
    head = MetaHead(D, N, hidden_dims=(6,), activation="gelu", seed=3).double()
    kw = {"first_order": first_order, "learn_lr": learn_lr, "grad_clip": 0.3}
    ref = run("torch", head, **kw)
    out = run("higher", head, **kw)
    assert_same(out, ref)
    assert out[1][len(list(head.parameters()))].abs().sum() > 0  # the learned LRs get a gradient
    assert out[0].metrics["inner_grad_norm"] == pytest.approx(ref[0].metrics["inner_grad_norm"], rel=1e-6)


def test_learn2learn_rejects_what_it_cannot_do() -> None:
    need("learn2learn")
    with pytest.raises(NotImplementedError, match="learn_lr"):
        InnerLoop(2, 0.1, backend="learn2learn", learn_lr="per_tensor")
    with pytest.raises(NotImplementedError, match="grad_clip"):
        InnerLoop(2, 0.1, backend="learn2learn", grad_clip=1.0)


def test_reference_backends_reject_dropout() -> None:
    need("higher")
    head = MetaHead(D, N, hidden_dims=(4,), dropout=0.1)
    x, y = torch.randn(N * K, D), torch.arange(N).repeat_interleave(K)
    with pytest.raises(NotImplementedError, match="dropout"):
        InnerLoop(1, 0.1, backend="higher")(head, x, y, x, y)
    head.eval()  # no dropout in eval mode: fine
    InnerLoop(1, 0.1, backend="higher")(head, x, y, x, y)


def test_learn2learn_loads_without_its_package_init() -> None:
    need("learn2learn")
    backends._L2L_MAML = None
    before = {k for k in sys.modules if k.startswith("learn2learn")}
    maml = backends.load_learn2learn_maml()
    assert hasattr(maml, "MAML")
    assert {k for k in sys.modules if k.startswith("learn2learn")} == before  # no stand-ins left behind


def test_missing_packages_name_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "higher", None)  # makes `import higher` fail
    with pytest.raises(MissingDependencyError, match=r"picomaml\[higher\]"):
        InnerLoop(2, 0.1, backend="higher")

    def missing(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(backends, "_L2L_MAML", None)
    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(MissingDependencyError, match="learn2learn==0.2.0"):
        InnerLoop(2, 0.1, backend="learn2learn")
