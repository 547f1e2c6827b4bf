"""PicoDecoder: config validation, presets, shapes, causality, init, KV cache and generation."""

from __future__ import annotations

import math

import pytest
import torch

import picomaml as pm
from picomaml.model.layers import apply_rope, rope_tables
from picomaml.params import ConfigError, from_dict

V = 97


def small_cfg(**kw):
    base = dict(
        vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, max_seq_len=128,
        tie_embeddings=False,
    )  # fmt: skip
    base.update(kw)
    return pm.PicoDecoderConfig(**base)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return pm.PicoDecoder(small_cfg()).eval()


# ---------------------------------------------------------------------------------------- config


def test_default_config_builds():
    cfg = pm.PicoDecoderConfig(vocab_size=V)
    assert cfg.vocab_size == V and cfg.head_dim == cfg.d_model // cfg.n_heads
    pm.PicoDecoder(cfg)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(d_model=66, n_heads=4), "d_model"),  # not divisible by n_heads
        (dict(n_heads=4, n_kv_heads=3), "n_heads"),  # not divisible by n_kv_heads
        (dict(d_model=60, n_heads=4, n_kv_heads=2), "d_model"),  # head_dim 15 is odd
        (dict(vocab_size=0), "vocab_size"),
        (dict(d_model=0), "d_model"),
        (dict(n_layers=0), "n_layers"),
        (dict(n_heads=-4), "n_heads"),
        (dict(n_kv_heads=0), "n_kv_heads"),
        (dict(ffn_dim=0), "ffn_dim"),
        (dict(max_seq_len=0), "max_seq_len"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(init_std=-0.1), "init_std"),
        (dict(rope_theta=0.0), "rope_theta"),
    ],
)
def test_config_validation_names_field(kw, field):
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        small_cfg(**kw)


@pytest.mark.parametrize("name, d", [("tiny", 96), ("small", 384), ("medium", 768), ("large", 1536)])
def test_presets(name, d):
    cfg = pm.PicoDecoderConfig.preset(name)
    assert (cfg.d_model, cfg.ffn_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads) == (d, 4 * d, 12, 12, 4)
    assert cfg.vocab_size == 50304 and cfg.max_seq_len == 2048
    assert pm.PicoDecoderConfig.preset(name, vocab_size=V, max_seq_len=64).vocab_size == V


def test_preset_errors():
    with pytest.raises(ValueError, match="tiny, small, medium, large"):
        pm.PicoDecoderConfig.preset("huge")
    with pytest.raises(ConfigError, match="d_modl"):
        pm.PicoDecoderConfig.preset("tiny", d_modl=3)


@pytest.mark.parametrize(
    "name, millions", [("tiny", 11.3), ("small", 64.6), ("medium", 181.2), ("large", 570.2)]
)
def test_preset_parameter_counts(name, millions):
    cfg = pm.PicoDecoderConfig.preset(name)
    assert cfg.num_parameters() / 1e6 == pytest.approx(millions, rel=0.01)


@pytest.mark.parametrize("tie", [False, True])
def test_num_parameters_matches_module(tie):
    cfg = small_cfg(tie_embeddings=tie, n_layers=3)
    assert cfg.num_parameters() == sum(p.numel() for p in pm.PicoDecoder(cfg).parameters())


def test_config_from_dict_with_preset():
    cfg = from_dict(pm.PicoDecoderConfig, {"preset": "tiny", "vocab_size": 512, "max_seq_len": 256})
    assert (cfg.d_model, cfg.vocab_size, cfg.max_seq_len) == (96, 512, 256)
    with pytest.raises(ConfigError, match="n_heads"):
        from_dict(pm.PicoDecoderConfig, {"d_model": 64, "n_heads": 5})


# ---------------------------------------------------------------------------------------- forward


def test_shapes_and_return_hidden(model):
    x = torch.randint(0, V, (3, 11))
    logits = model(x)
    assert logits.shape == (3, 11, V) and logits.dtype == torch.float32
    logits2, hidden = model(x, return_hidden=True)
    assert hidden.shape == (3, 11, 64)
    torch.testing.assert_close(logits2, logits)
    # hidden is exactly what the LM head consumes
    torch.testing.assert_close(logits, hidden @ model.lm_head.weight.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.hidden_states(x), hidden)


def test_causality(model):
    x = torch.randint(0, V, (2, 20))
    y = x.clone()
    y[:, 12:] = (y[:, 12:] + 5) % V
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=1e-6, rtol=0)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3


def test_position_matters(model):
    # without positions, attention of the last token is invariant to permuting the earlier ones
    a = model(torch.tensor([[3, 7, 11]]))[0, -1]
    b = model(torch.tensor([[7, 3, 11]]))[0, -1]
    assert (a - b).abs().max() > 1e-4


def test_rope_matches_complex_rotation():
    # independent reference: rotate pairs (i, i + D/2) by angle pos * theta^(-2i/D) as complex numbers
    d, n, theta = 8, 5, 100.0
    cos, sin = rope_tables(d, n, theta)
    x = torch.randn(1, n, 2, d, dtype=torch.float64)
    out = apply_rope(x, cos.double(), sin.double())
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * freqs[None]
    z = (
        torch.complex(x[..., : d // 2], x[..., d // 2 :])
        * torch.polar(torch.ones_like(angles), angles)[:, None]
    )
    ref = torch.cat([z.real, z.imag], dim=-1)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_gradients_flow_everywhere():
    torch.manual_seed(1)
    m = pm.PicoDecoder(small_cfg(n_layers=1))
    x = torch.randint(0, V, (2, 9))
    m(x).logsumexp(-1).mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_inputs(model):
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="input_ids"):
        model(torch.zeros(2, 5))
    with pytest.raises(TypeError, match="input_ids"):
        model([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        model(torch.tensor([[1, V]]))
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="max_seq_len 128"):
        model(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^input_ids: the batch is empty \(shape \(0, 4\)\)"):
        model(torch.zeros(0, 4, dtype=torch.long))  # torch's min() of an empty tensor before
    with pytest.raises(ValueError, match="input_ids: the batch is empty"):
        model.hidden_states(torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="config"):
        pm.PicoDecoder({"vocab_size": V})


# ---------------------------------------------------------------------------------------- init


def test_init_std_and_residual_scaling():
    torch.manual_seed(0)
    cfg = small_cfg(
        d_model=256, n_heads=4, n_kv_heads=4, ffn_dim=512, n_layers=8, vocab_size=2000, init_std=0.05
    )
    m = pm.PicoDecoder(cfg)
    scaled = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    for name, p in m.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.all(p == 1), name
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            assert p.std().item() == pytest.approx(scaled, rel=0.05), name
        else:
            assert p.std().item() == pytest.approx(cfg.init_std, rel=0.05), name
            assert abs(p.mean().item()) < 0.1 * cfg.init_std, name


def test_tied_embeddings_share_storage():
    m = pm.PicoDecoder(small_cfg(tie_embeddings=True))
    assert m.lm_head.weight is m.embed_tokens.weight
    assert m.lm_head.weight.data_ptr() == m.embed_tokens.weight.data_ptr()
    assert m.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.1)
    untied = pm.PicoDecoder(small_cfg())
    assert untied.lm_head.weight.data_ptr() != untied.embed_tokens.weight.data_ptr()


def test_no_rope_tables_in_state_dict(model):
    assert not any("rope" in k for k in model.state_dict())


# ---------------------------------------------------------------------------------------- cache


@pytest.mark.parametrize("chunks", [(10, 1, 1, 1, 1), (4, 3, 1, 5), (1, 1, 1, 1)])
def test_kv_cache_matches_full_recompute(model, chunks):
    x = torch.randint(0, V, (2, sum(chunks)))
    full = model(x)
    cache = model.new_cache(2)
    parts, start = [], 0
    for n in chunks:
        parts.append(model(x[:, start : start + n], kv_cache=cache))
        start += n
    assert cache.length == x.shape[1]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_kv_cache_errors(model):
    cache = model.new_cache(2, max_len=8)
    model(torch.zeros(2, 6, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="batch size"):
        model(torch.zeros(3, 1, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="max_len 8"):
        model(torch.zeros(2, 3, dtype=torch.long), kv_cache=cache)
    full = model.new_cache(1)
    model(torch.zeros(1, 128, dtype=torch.long), kv_cache=full)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=full)


def naive_greedy(model, x, n):
    for _ in range(n):
        nxt = model(x)[:, -1].argmax(-1, keepdim=True)
        x = torch.cat([x, nxt], dim=1)
    return x


def test_greedy_generate_equals_naive_loop(model):
    x = torch.randint(0, V, (3, 5))
    out = model.generate(x, max_new_tokens=12)
    assert out.shape == (3, 17)
    assert torch.equal(out[:, :5], x)
    assert torch.equal(out, naive_greedy(model, x, 12))


def test_sampling_is_reproducible_and_respects_top_k(model):
    x = torch.randint(0, V, (4, 3))
    a = model.generate(x, 10, do_sample=True, temperature=1.5, generator=torch.Generator().manual_seed(3))
    b = model.generate(x, 10, do_sample=True, temperature=1.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # top_k=1 sampling is greedy decoding
    g = model.generate(x, 10, do_sample=True, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(g, model.generate(x, 10))
    # with a flat temperature the samples differ from greedy somewhere
    hot = model.generate(x, 10, do_sample=True, temperature=5.0, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(hot, g)


def test_top_k_samples_only_top_tokens():
    from picomaml.model.generate import next_token

    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0, 4.5]]).repeat(200, 1)
    picks = next_token(
        logits, temperature=10.0, top_k=3, do_sample=True, generator=torch.Generator().manual_seed(0)
    )
    assert set(picks.tolist()) == {1, 2, 4}


def test_generate_eos_stops_and_pads(model):
    x = torch.randint(0, V, (2, 4))
    greedy = model.generate(x, 6)
    eos = int(greedy[0, 5])  # the second token row 0 generates
    out = model.generate(x, 6, eos_token_id=eos)
    row0 = out[0, 4:]
    first = int((row0 == eos).nonzero()[0])
    assert torch.all(row0[first:] == eos)
    assert torch.equal(out[:, : 4 + first + 1][1], greedy[1, : 4 + first + 1])


def test_generate_errors(model):
    x = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(x, 125)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(x, -1)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(x, 2, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(x, 2, do_sample=True, top_k=0)
    assert torch.equal(model.generate(x, 0), x)


# ---------------------------------------------------------------------------------------- kernels


def test_rope_heads_equals_reference_rotation():
    from picomaml.model.layers import rope_heads

    d, n, heads = 8, 7, 3
    cos, sin = rope_tables(d, n, 10000.0)
    x = torch.randn(2, n, heads * d)
    ref = apply_rope(x.view(2, n, heads, d), cos, sin).reshape(2, n, heads * d)
    sin_signed = torch.cat((-sin[:, : d // 2], sin[:, d // 2 :]), dim=-1)
    out = rope_heads(x, cos.repeat(1, heads), sin_signed.repeat(1, heads), d)
    assert torch.equal(out, ref)  # same products, same sums: bit for bit


def test_rms_norm_matches_reference_and_gradchecks():
    from picomaml.model.layers import rms_norm

    x = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    w = (1 + torch.randn(6, dtype=torch.float64)).requires_grad_()
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(rms_norm(x, w, 1e-6), ref)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x, w))
    assert torch.autograd.gradgradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x, w))


def test_torch_func_grad_through_model():
    from torch.func import functional_call, grad

    torch.manual_seed(0)
    m = pm.PicoDecoder(small_cfg(n_layers=1))
    params = {k: v.detach() for k, v in m.named_parameters()}
    x = torch.randint(0, V, (2, 6))
    g = grad(lambda p: functional_call(m, (p,), (x,)).square().mean())(params)
    m(x).square().mean().backward()
    for k, p in m.named_parameters():
        torch.testing.assert_close(g[k], p.grad, atol=1e-7, rtol=1e-5)


def test_bfloat16_forward_and_cache():
    torch.manual_seed(0)
    m = pm.PicoDecoder(small_cfg()).to(torch.bfloat16).eval()
    x = torch.randint(0, V, (2, 9))
    logits = m(x)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    out = m.generate(x, 3)
    assert out.shape == (2, 12)


def test_init_generator_is_reproducible():
    a = pm.PicoDecoder(small_cfg(), generator=torch.Generator().manual_seed(5))
    b = pm.PicoDecoder(small_cfg(), generator=torch.Generator().manual_seed(5))
    c = pm.PicoDecoder(small_cfg(), generator=torch.Generator().manual_seed(6))
    for (k, va), vb, vc in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True
    ):
        assert torch.equal(va, vb), k
        if not k.endswith("norm.weight"):
            assert not torch.equal(va, vc), k
