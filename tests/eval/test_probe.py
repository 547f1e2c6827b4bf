"""The linear probe: perfect on separable data, converged (autograd float64 reference), batch-independent."""

from __future__ import annotations

import math

import pytest
import torch

from picomaml.eval.probe import fit_linear_probe, linear_probe_accuracy, linear_probe_predict


def _tasks(t: int = 6, n: int = 5, k: int = 4, q: int = 4, d: int = 24, sep: float = 1.0, seed: int = 0):
    """Gaussian classes around random means, features shifted and scaled like a backbone's."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(t, n, d, generator=g) * sep
    ys = torch.arange(n).repeat_interleave(k).expand(t, -1).clone()
    yq = torch.arange(n).repeat_interleave(q).expand(t, -1).clone()
    xs = means.gather(1, ys[..., None].expand(-1, -1, d)) + 0.3 * torch.randn(t, n * k, d, generator=g)
    xq = means.gather(1, yq[..., None].expand(-1, -1, d)) + 0.3 * torch.randn(t, n * q, d, generator=g)
    return 5.0 * xs + 3.0, ys, 5.0 * xq + 3.0, yq


def _objective64(xs, ys, w, b, n_way: int, l2: float):
    """The probe's objective in float64 at raw-feature (w, b), via the standardised coordinates."""
    x = xs.double()
    mu, sd = x.mean(1, keepdim=True), x.std(1, keepdim=True, unbiased=False)
    ws = (w.double() * sd.transpose(1, 2)).requires_grad_()
    bs = (b.double() + (mu @ w.double()).squeeze(1)).requires_grad_()
    logits = (x - mu) / sd @ ws + bs[:, None]
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ys.flatten(), reduction="none")
    loss = ce.view(xs.shape[0], -1).mean(1) + 0.5 * l2 * (ws.pow(2).sum((1, 2)) + bs.pow(2).sum(1))
    gw, gb = torch.autograd.grad(loss.sum(), [ws, bs])
    return loss.detach(), (gw.flatten(1).pow(2).sum(1) + gb.pow(2).sum(1)).sqrt()


def test_separable_data_is_classified_perfectly():
    xs, ys, xq, yq = _tasks(sep=2.0)
    w, b = fit_linear_probe(xs, ys, 5)
    assert w.shape == (6, 24, 5) and b.shape == (6, 5) and w.dtype == torch.float32
    assert torch.equal(linear_probe_predict(w, b, xs), ys)  # 100 % on the support
    assert linear_probe_accuracy(xs, ys, xq, yq, 5) == [1.0] * 6


def test_converges_to_the_optimum():
    for d, k in ((24, 4), (8, 6)):  # S < D (reduced coordinates) and S > D
        xs, ys, _, _ = _tasks(k=k, d=d, sep=0.3)
        zeros = (torch.zeros(6, d, 5), torch.zeros(6, 5))
        loss0, grad0 = _objective64(xs, ys, *zeros, 5, 1e-3)
        w, b = fit_linear_probe(xs, ys, 5, l2=1e-3)
        loss, grad = _objective64(xs, ys, w, b, 5, 1e-3)
        assert bool((loss < 0.5 * loss0).all())
        assert float(grad.max()) < 1e-4 < 1e-2 * float(grad0.min())  # gradient norm at the end is tiny
        fewer, _ = _objective64(xs, ys, *fit_linear_probe(xs, ys, 5, steps=2), 5, 1e-3)
        assert bool((loss <= fewer + 1e-6).all()) and bool((fewer < loss0).all())  # the loss decreases
        g = torch.Generator().manual_seed(1)
        nudged, _ = _objective64(xs, ys, w + 1e-2 * torch.randn(w.shape, generator=g), b, 5, 1e-3)
        assert bool((loss <= nudged).all())


def test_vectorised_fit_equals_separate_fits_and_is_deterministic():
    xs, ys, xq, yq = _tasks(sep=0.5)
    w, b = fit_linear_probe(xs, ys, 5)
    for i in range(xs.shape[0]):
        wi, bi = fit_linear_probe(xs[i : i + 1], ys[i : i + 1], 5)
        torch.testing.assert_close(wi[0], w[i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(bi[0], b[i], atol=1e-4, rtol=1e-4)
    w2, b2 = fit_linear_probe(xs, ys, 5)
    assert torch.equal(w, w2) and torch.equal(b, b2)
    assert linear_probe_accuracy(xs, ys, xq, yq, 5) == linear_probe_accuracy(xs, ys, xq, yq, 5)


def test_works_under_no_grad_and_leaves_inputs_alone():
    xs, ys, xq, yq = _tasks()
    xs = xs.double().requires_grad_()
    with torch.no_grad():
        accs = linear_probe_accuracy(xs, ys, xq, yq, 5)
    assert len(accs) == 6 and all(0.0 <= a <= 1.0 for a in accs)
    assert xs.grad is None
    # a dimension constant on the support gets zero weight, whatever the query holds there
    xs2, ys2, _, _ = _tasks()
    xs2[:, :, 0] = 7.0
    w, _ = fit_linear_probe(xs2, ys2, 5)
    assert torch.isfinite(w).all() and float(w[:, 0].abs().max()) < 1e-5  # zero up to rounding


def test_bad_arguments_name_the_argument():
    xs, ys, xq, yq = _tasks()
    with pytest.raises(ValueError, match="n_way"):
        fit_linear_probe(xs, ys, 1)
    with pytest.raises(ValueError, match="ys"):
        fit_linear_probe(xs, ys[:, :-1], 5)
    with pytest.raises(ValueError, match="ys"):
        fit_linear_probe(xs, ys, 3)  # labels 3 and 4 are out of range
    with pytest.raises(ValueError, match="xs"):
        fit_linear_probe(xs[0], ys[0], 5)
    with pytest.raises(ValueError, match="xq"):
        linear_probe_accuracy(xs, ys, xq[:, :, :-1], yq, 5)
    with pytest.raises(ValueError, match="yq"):
        linear_probe_accuracy(xs, ys, xq, yq[:-1], 5)
    with pytest.raises(ValueError, match="l2"):
        fit_linear_probe(xs, ys, 5, l2=0.0)
    with pytest.raises(ValueError, match="steps"):
        fit_linear_probe(xs, ys, 5, steps=0)


def test_line_search_path_reaches_the_same_optimum(monkeypatch):
    import picomaml.eval.probe as probe

    xs, ys, _, _ = _tasks(t=3, sep=0.3)
    loss_newton, _ = _objective64(xs, ys, *fit_linear_probe(xs, ys, 5), 5, 1e-3)
    # a demanding sufficient-decrease constant rejects the full Newton step: the backtracking branch runs
    monkeypatch.setattr(probe, "_ARMIJO", 0.6)  # near the optimum only steps <= 0.8 pass
    calls = []
    real = probe._objective
    monkeypatch.setattr(
        probe, "_objective", lambda f, o, th, l2: calls.append(th.dim()) or real(f, o, th, l2)
    )
    w, b = fit_linear_probe(xs, ys, 5, steps=60)
    assert 4 in calls  # the (step sizes, T, r+1, N) trial evaluation happened
    loss, grad = _objective64(xs, ys, w, b, 5, 1e-3)
    assert float(grad.max()) < 1e-4
    torch.testing.assert_close(loss, loss_newton, atol=1e-5, rtol=0)


def test_nonfinite_features_give_nan_for_their_tasks_only_with_a_warning():
    xs, ys, xq, yq = _tasks()
    clean = linear_probe_accuracy(xs, ys, xq, yq, 5)
    xs_bad, xq_bad = xs.clone(), xq.clone()
    xs_bad[1, 0, 0] = float("nan")  # NaN weights give NaN features: svd refused them before
    xs_bad[2, 3, 5] = float("inf")
    xq_bad[4, 0, 0] = float("nan")  # a query row only
    with pytest.warns(RuntimeWarning, match="linear probe: the support features of 2 of 6 tasks hold NaN"):
        w, b = fit_linear_probe(xs_bad, ys, 5)
    assert torch.isnan(w[[1, 2]]).all() and torch.isnan(b[[1, 2]]).all() and torch.isfinite(w[[0, 3, 4, 5]]).all()
    with pytest.warns(RuntimeWarning) as caught:
        acc = linear_probe_accuracy(xs_bad, ys, xq_bad, yq, 5)
    assert any("query features of 1 of 6 tasks" in str(c.message) for c in caught)
    assert [i for i, a in enumerate(acc) if a != a] == [1, 2, 4]
    assert [acc[i] for i in (0, 3, 5)] == [clean[i] for i in (0, 3, 5)]  # the other tasks are unchanged
    with pytest.warns(RuntimeWarning, match="overflow float32"):  # finite, but too large to standardise
        assert all(math.isnan(a) for a in linear_probe_accuracy(xs * 1e37, ys, xq, yq, 5))
