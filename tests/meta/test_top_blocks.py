"""TopBlocks: the lower blocks once, the top k re-run functionally, equal to the model's own forward."""

from __future__ import annotations

import pytest
import torch

import picomaml as pm
from picomaml.meta.top_blocks import TopBlocks, check_adapt_layers, math_attention

transformers = pytest.importorskip("transformers")
from backbones import FAMILIES, NanoGPT, V, hf_model  # noqa: E402


def pico(n_layers: int = 3) -> pm.PicoDecoder:
    cfg = pm.PicoDecoderConfig(vocab_size=V, d_model=16, n_layers=n_layers, n_heads=2, n_kv_heads=1, ffn_dim=32,
                               max_seq_len=16)  # fmt: skip
    return pm.PicoDecoder(cfg, generator=torch.Generator().manual_seed(0))


def final_hidden(model, ids):
    if isinstance(model, pm.PicoDecoder):
        return model.hidden_states(ids)
    return model.base_model(input_ids=ids).last_hidden_state


@pytest.mark.parametrize("family", ["pico", *FAMILIES])
@pytest.mark.parametrize("k", [1, 2])
def test_run_under_the_models_own_tensors_reproduces_its_hidden_states(family, k):
    model = pico() if family == "pico" else hf_model(family)
    ids = torch.randint(0, V, (4, 10))
    top = TopBlocks(model, k)
    n = len(top.layout.blocks)
    calls = [0] * n
    for i, block in enumerate(top.layout.blocks):
        block.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))  # after a finished forward
    inp = top.capture(ids)
    assert calls == [1] * (n - k) + [0] * k  # the capture stops before the adapted blocks
    out = top.run(top.params(), inp)
    assert calls == [1] * n  # run() runs only the adapted blocks
    torch.testing.assert_close(out, final_hidden(model, ids), rtol=1e-5, atol=1e-6)
    assert len(top.names) == len(top.params()) and all(name in dict(model.named_parameters()) for name in top.names)
    top.verify(ids)  # silent for a model it reproduces


def test_run_uses_the_given_tensors_not_the_modules():
    model = pico()
    top = TopBlocks(model, 1)
    ids = torch.randint(0, V, (2, 8))
    inp = top.capture(ids)
    params = {k: v * 0.5 for k, v in top.params().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = top.run(params, inp)
    assert not torch.allclose(out, model.hidden_states(ids))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # never mutated


def test_verify_refuses_a_model_whose_blocks_do_not_compose():
    model = hf_model("llama")
    model.base_model.register_forward_hook(
        lambda m, i, o: type(o)(last_hidden_state=o.last_hidden_state * 2.0)
    )  # the base model does more than blocks + final norm
    top = TopBlocks(model, 1)
    with pytest.raises(RuntimeError, match="does not reproduce its hidden states"):
        top.verify(torch.randint(0, V, (2, 8)))
    assert not top.reproduces(torch.randint(0, V, (2, 8)))


def test_reproduction_is_checked_per_window_length_not_once_per_model():
    model = pico()
    top = TopBlocks(model, 1)
    assert top.reproduces(torch.randint(0, V, (2, 8)))
    own = model.hidden_states
    # a model that does something else at longer windows (as sliding-window attention does)
    model.hidden_states = lambda ids: own(ids) * (2.0 if ids.shape[1] == 12 else 1.0)
    assert top.reproduces(torch.randint(0, V, (2, 8)))  # the same shape: remembered
    assert not top.reproduces(torch.randint(0, V, (2, 12)))  # a new shape: checked again, and caught


def test_bad_adapt_layers_are_named_with_the_allowed_values():
    model = pico(3)
    with pytest.raises(ValueError, match=r"adapt_layers: must be in \[0, 3\]"):
        TopBlocks(model, 4)
    with pytest.raises(ValueError, match="adapt_layers"):
        TopBlocks(model, -1)
    with pytest.raises(ValueError, match="adapt_layers"):
        check_adapt_layers(True)
    with pytest.raises(TypeError, match="adapt_layers: cannot find the blocks of NanoGPT: it holds no nn.ModuleList"):
        TopBlocks(NanoGPT(), 1)


def test_math_attention_allows_double_backward_through_attention():
    model = pico(1).double()
    top = TopBlocks(model, 1)
    inp = top.capture(torch.randint(0, V, (2, 8)))
    params = {k: v.detach().requires_grad_() for k, v in top.params().items()}
    with math_attention():
        loss = top.run(params, inp).pow(2).sum()
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    sum(g.pow(2).sum() for g in grads).backward()
    assert all(p.grad is not None for p in params.values())
