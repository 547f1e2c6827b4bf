"""The AR-vs-meta gradient diagnostic and PCGrad surgery, checked against gradients computed by hand."""

from __future__ import annotations

import pytest
import torch

import picomaml as pm
from picomaml.meta.grad_conflict import gradient_conflict, pcgrad_term, shared_parameters


def parts(tie: bool = False):
    cfg = pm.PicoDecoderConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32,
                               max_seq_len=16, tie_embeddings=tie)  # fmt: skip
    model = pm.PicoDecoder(cfg, generator=torch.Generator().manual_seed(0)).double()
    rows = torch.randint(3, 64, (64, 128), generator=torch.Generator().manual_seed(1))
    ep = pm.SMLMTSampler(n_way=3, k_shot=2, n_query=2, mask_token_id=2, window_len=12, seed=0).sample(rows)
    return model, pm.MetaHead(16, 3).double(), pm.InnerLoop(steps=2, lr=0.5), rows[:4, :13], ep


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def test_shared_parameters_leave_out_the_untied_lm_head_only():
    model = parts()[0]
    assert "lm_head.weight" not in shared_parameters(model) and "embed_tokens.weight" in shared_parameters(model)
    tied = parts(tie=True)[0]
    assert "embed_tokens.weight" in shared_parameters(tied)  # the tied projection is the input embedding


def test_cosine_and_ratio_match_a_direct_computation():
    model, head, loop, rows, ep = parts()
    params = shared_parameters(model)
    ar, meta = pm.lm_loss(model, rows), pm.meta_loss(model, head, loop, ep).loss
    out = gradient_conflict(ar, meta, params)
    g_ar = flat(torch.autograd.grad(ar, list(params.values()), retain_graph=True, allow_unused=True) or [])
    g_meta = [g if g is not None else torch.zeros_like(p) for g, p in
              zip(torch.autograd.grad(meta, list(params.values()), retain_graph=True, allow_unused=True), params.values(), strict=True)]  # fmt: skip
    g_meta = flat(g_meta)
    assert out["grad_cos"] == pytest.approx(float(g_ar @ g_meta / (g_ar.norm() * g_meta.norm())), rel=1e-9)
    assert out["grad_norm_ratio"] == pytest.approx(float(g_meta.norm() / g_ar.norm()), rel=1e-9)
    assert {"grad_cos/layers.0", "grad_cos/layers.1", "grad_cos/other"} <= set(out)
    opposite = gradient_conflict(ar, -ar, params)
    assert opposite["grad_cos"] == pytest.approx(-1.0) and opposite["grad_cos/layers.1"] == pytest.approx(-1.0)
    assert all(p.grad is None for p in model.parameters())  # a diagnostic writes no .grad


@pytest.mark.parametrize("flip", [False, True])
def test_pcgrad_term_projects_the_meta_gradient_only_when_they_conflict(flip):
    model, head, loop, rows, ep = parts()
    params = list(shared_parameters(model).values())
    ar, meta = pm.lm_loss(model, rows), pm.meta_loss(model, head, loop, ep).loss
    meta = -ar * 0.3 + 0 * meta if flip else meta  # flip: a meta loss that surely conflicts
    g_ar = flat(torch.autograd.grad(ar, params, retain_graph=True))
    g_meta = flat([g if g is not None else torch.zeros_like(p)
                   for g, p in zip(torch.autograd.grad(meta, params, retain_graph=True, allow_unused=True), params, strict=True)])  # fmt: skip
    term, cosine = pcgrad_term(ar, meta, params)
    w_ar, w_meta = 0.7, 0.3
    total = w_ar * ar + w_meta * (meta + term)
    got = flat(torch.autograd.grad(total, params, retain_graph=True))
    dot = float(g_ar @ g_meta)
    expected_meta = g_meta - min(0.0, dot) / float(g_ar @ g_ar) * g_ar
    torch.testing.assert_close(got, w_ar * g_ar + w_meta * expected_meta)
    assert (cosine < 0) == (dot < 0) and (float(term) == 0.0) == (dot >= 0)
    lm_ar = torch.autograd.grad(ar, [model.lm_head.weight], retain_graph=True)[0]
    lm = torch.autograd.grad(total, [model.lm_head.weight])[0]  # outside params: untouched
    torch.testing.assert_close(lm, (w_ar - (0.3 * w_meta if flip else 0.0)) * lm_ar)  # the term adds nothing


def test_hybrid_learner_pcgrad_in_weighted_mode_reports_the_cosine():
    model, head, loop, rows, ep = parts()
    out = pm.HybridLearner(model, head, loop, grad_surgery="pcgrad")(rows=rows, episode=ep, w_ar=0.7, w_meta=0.3)
    out.loss.backward()
    assert -1.0 <= out.meta.metrics["grad_cos"] <= 1.0 and model.embed_tokens.weight.grad is not None
    with pytest.raises(ValueError, match="grad_surgery"):
        pm.HybridLearner(model, head, loop, grad_surgery="cagrad")
