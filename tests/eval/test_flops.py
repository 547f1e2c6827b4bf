"""FLOP formulas against a brute-force count (torch's FlopCounterMode) of real forward + backward passes."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from picomaml.eval.flops import ar_step_flops, body_matmul_params, inner_loop_flops, meta_step_flops
from picomaml.meta.head import MetaHead
from picomaml.meta.inner_loop import InnerLoop
from picomaml.meta.objectives import lm_loss, meta_loss, pool_features
from picomaml.meta.sampler import SMLMTSampler
from picomaml.model.config import PicoDecoderConfig
from picomaml.model.decoder import PicoDecoder

CFG = PicoDecoderConfig(
    vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64
)


def _count(fn) -> int:
    # the math kernel spells attention out as matmuls, which the counter sees (fused CPU kernels it does not)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_body_params_match_the_linear_layers():
    model = PicoDecoder(CFG)
    linear = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head"
    )
    assert body_matmul_params(CFG) == linear


@pytest.mark.parametrize("batch,seq", [(3, 16), (2, 40)])
def test_ar_step_matches_flop_counter(batch, seq):
    torch.manual_seed(0)
    model = PicoDecoder(CFG)
    rows = torch.randint(0, CFG.vocab_size, (batch, seq + 1))  # lm_loss feeds seq tokens
    counted = _count(lambda: lm_loss(model, rows).backward())
    assert ar_step_flops(CFG, batch, seq) == pytest.approx(counted, rel=1e-9)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("hidden", [(), (16,), (24, 8)])
def test_inner_loop_matches_flop_counter(first_order, hidden):
    n, k, q, d = 4, 3, 2, 32
    head = MetaHead(d, n, hidden_dims=hidden, init="xavier")
    loop = InnerLoop(steps=3, lr=0.1, first_order=first_order, closed_form=False)
    xs = torch.randn(1, n * k, d, requires_grad=True)
    xq = torch.randn(1, n * q, d, requires_grad=True)
    ys, yq = torch.arange(n).repeat_interleave(k)[None], torch.arange(n).repeat_interleave(q)[None]

    def step():
        params = loop.adapt(head, xs, ys)
        torch.nn.functional.cross_entropy(head.functional(params, xq)[0], yq[0]).backward()

    assert inner_loop_flops(d, n, k, q, hidden, 3, first_order) == _count(step)


def test_second_order_costs_three_times_first_order_per_step():
    fo = inner_loop_flops(32, 5, 4, 4, (16,), 5, True) - inner_loop_flops(32, 5, 4, 4, (16,), 0, True)
    so = inner_loop_flops(32, 5, 4, 4, (16,), 5, False) - inner_loop_flops(32, 5, 4, 4, (16,), 0, False)
    assert so == 3 * fo


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_step_matches_flop_counter(first_order):
    torch.manual_seed(0)
    model = PicoDecoder(CFG)
    n, k, q, w, t, hidden = 3, 2, 2, 12, 2, (16,)
    head = MetaHead(CFG.d_model, n, hidden_dims=hidden, init="xavier")
    loop = InnerLoop(steps=2, lr=0.1, first_order=first_order)
    ids = torch.randint(0, CFG.vocab_size, (t * n * (k + q), w))
    ys, yq = (
        torch.arange(n).repeat_interleave(k).repeat(t, 1),
        torch.arange(n).repeat_interleave(q).repeat(t, 1),
    )

    def step():
        feats = pool_features(model.hidden_states(ids), None, "mean").view(t, n * (k + q), -1)
        xs, xq = feats[:, : n * k], feats[:, n * k :]
        logits = head.functional(loop.adapt(head, xs, ys), xq)
        torch.nn.functional.cross_entropy(logits.reshape(-1, n), yq.reshape(-1)).backward()

    formula = meta_step_flops(CFG, n, k, q, w, t, hidden, 2, first_order)
    assert formula == pytest.approx(_count(step), rel=0.01)  # exact up to the pooling mean


def test_meta_step_has_no_lm_head_and_scales_with_windows():
    one = meta_step_flops(CFG, 5, 4, 4, 32, 1, (), 0, True)
    two = meta_step_flops(CFG, 5, 4, 4, 32, 2, (), 0, True)
    assert two == 2 * one
    body = 6 * 40 * 32 * body_matmul_params(CFG) + 12 * CFG.n_layers * 32 * CFG.d_model * 40 * 32
    assert one - body == inner_loop_flops(CFG.d_model, 5, 4, 4, (), 0, True)


def test_formula_errors():
    with pytest.raises(ValueError, match="batch_size|n_sequences"):
        ar_step_flops(CFG, 0, 8)
    with pytest.raises(ValueError, match="n_way"):
        meta_step_flops(CFG, 1, 1, 1, 8)
    with pytest.raises(ValueError, match="model_config"):
        ar_step_flops(object(), 1, 8)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("adapt_layers", [1, 2])
def test_meta_step_with_adapted_blocks_matches_flop_counter(first_order, adapt_layers):
    torch.manual_seed(0)
    model = PicoDecoder(CFG)
    n, k, q, w, t, hidden = 3, 2, 2, 12, 2, (16,)
    rows = torch.randint(3, CFG.vocab_size, (64, 256), generator=torch.Generator().manual_seed(0))
    ep = SMLMTSampler(n_way=n, k_shot=k, n_query=q, mask_token_id=2, window_len=w, seed=0).sample(rows, n_tasks=t)
    head = MetaHead(CFG.d_model, n, hidden_dims=hidden, init="xavier")
    loop = InnerLoop(steps=2, lr=0.1, first_order=first_order)
    meta_loss(model, head, loop, ep, adapt_layers=adapt_layers)  # the split's one check at this window length
    counted = _count(lambda: meta_loss(model, head, loop, ep, adapt_layers=adapt_layers).loss.backward())
    formula = meta_step_flops(CFG, n, k, q, w, t, hidden, 2, first_order, adapt_layers=adapt_layers)
    assert formula == pytest.approx(counted, rel=0.01)  # the pooling and the head's metric forwards are left out
    assert formula > meta_step_flops(CFG, n, k, q, w, t, hidden, 2, first_order)  # adapting costs more
