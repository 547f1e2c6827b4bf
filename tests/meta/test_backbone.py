"""Any backbone as it is: PicoDecoder, transformers causal LMs of several families, and plain modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import picomaml as pm
from picomaml.meta.backbone import (
    backbone_hidden,
    decoder_layout,
    hidden_size,
    is_transformers_model,
    lm_logits,
)

transformers = pytest.importorskip("transformers")

from backbones import FAMILIES, D, N, NanoGPT, V, W, episode, hf_model  # noqa: E402


@pytest.mark.parametrize("family", FAMILIES)
def test_lm_loss_of_a_transformers_model_is_the_cross_entropy_of_its_logits(family):
    model = hf_model(family)
    rows = torch.randint(0, V, (3, 10))
    expected = F.cross_entropy(model(rows[:, :-1]).logits.reshape(-1, V), rows[:, 1:].reshape(-1))
    torch.testing.assert_close(pm.lm_loss(model, rows), expected)
    assert is_transformers_model(model) and hidden_size(model) == D


@pytest.mark.parametrize("family", FAMILIES)
def test_meta_loss_of_a_transformers_model_runs_the_base_model_never_the_lm_head(family):
    model = hf_model(family)
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    head = pm.MetaHead(D, N)
    ep = episode()
    out = pm.meta_loss(model, head, pm.InnerLoop(steps=2, lr=0.5), ep)
    out.loss.backward()
    assert calls == []  # the vocabulary projection is never computed in a meta step
    grads = [p.grad for n, p in model.named_parameters() if "embed" in n or "wte" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    # the features are the base model's last hidden states, pooled before the mask
    ids = ep.support_ids[:2]
    hidden = model.base_model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(backbone_hidden(model, ids), hidden)


def test_lm_loss_accepts_tuple_and_tensor_outputs_and_names_bad_logits():
    rows = torch.randint(0, V, (2, 9))
    emb, lin = nn.Embedding(V, D), nn.Linear(D, V)

    class Tup(nn.Module):
        def forward(self, ids):
            return lin(emb(ids)), "anything"

    class Plain(nn.Module):
        def forward(self, ids):
            return lin(emb(ids))

    torch.testing.assert_close(pm.lm_loss(Tup(), rows), pm.lm_loss(Plain(), rows))
    with pytest.raises(ValueError, match=r"model: logits of shape \(2, 1, 64\)"):
        pm.lm_loss(NanoGPT(), rows)  # inference-mode nanoGPT gives the last position only

    class NoLogits(nn.Module):
        def forward(self, ids):
            return {"h": ids}

    with pytest.raises(TypeError, match="lm_loss needs logits"):
        pm.lm_loss(NoLogits(), rows)
    assert lm_logits(Plain(), rows).shape == (2, 9, V)


def test_a_module_without_hidden_states_is_told_about_features_and_works_with_them():
    model, head, loop, ep = NanoGPT(), pm.MetaHead(D, N), pm.InnerLoop(steps=2, lr=0.5), episode()
    with pytest.raises(TypeError, match=r"features=: a callable ids \(B, L\) long -> hidden \(B, L, D\)"):
        pm.meta_loss(model, head, loop, ep)
    out = pm.meta_loss(model, head, loop, ep, features=model.trunk)
    out.loss.backward()
    assert model.wte.weight.grad is not None and model.lm_head.weight.grad is None
    learner = pm.HybridLearner(model, head, loop, features=model.trunk)
    assert torch.isfinite(learner(episode=ep).loss)


def test_width_mismatch_is_named_before_the_forward():
    model = hf_model("llama")
    calls = []
    model.base_model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="head.in_dim: the head takes 8-dim features but the backbone's hidden size"):
        pm.meta_loss(model, pm.MetaHead(8, N), pm.InnerLoop(steps=1), episode())
    with pytest.raises(ValueError, match="head.in_dim"):
        pm.HybridLearner(model, pm.MetaHead(8, N), pm.InnerLoop(steps=1))
    assert calls == []


def test_decoder_layout_finds_blocks_of_each_family_and_names_adapt_layers_otherwise():
    pico = pm.PicoDecoder(pm.PicoDecoderConfig(vocab_size=V, d_model=D, n_layers=2, n_heads=2, n_kv_heads=1,
                                               ffn_dim=32, max_seq_len=W))  # fmt: skip
    expected = {"llama": ("model.layers", "model.norm"), "qwen2": ("model.layers", "model.norm"),
                "gpt2": ("transformer.h", "transformer.ln_f")}  # fmt: skip
    for family, (blocks, norm) in expected.items():
        layout = decoder_layout(hf_model(family))
        assert (layout.prefix, layout.norm_prefix, len(layout.blocks)) == (blocks, norm, 2)
    layout = decoder_layout(pico)
    assert (layout.prefix, layout.norm_prefix, layout.base) == ("layers", "norm", pico)
    with pytest.raises(TypeError, match="adapt_layers: cannot find the blocks of NanoGPT"):
        decoder_layout(NanoGPT())


def test_next_token_loss_in_row_chunks_equals_one_cross_entropy(monkeypatch):
    """A PicoDecoder's loss over chunks of rows (on CPU) is the loss and gradient of the whole logits."""
    from picomaml.meta import backbone

    torch.manual_seed(0)
    cfg = pm.PicoDecoderConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32)
    model = pm.PicoDecoder(cfg).double()
    ids = torch.randint(0, V, (3, 11))
    targets = torch.randint(0, V, (3, 11))
    targets[1, 2:6] = -100

    def loss_and_grads():
        loss = backbone.next_token_loss(model, ids, targets)
        return loss, torch.autograd.grad(loss, list(model.parameters()))

    assert backbone._loss_chunk_rows(model, ids) is None  # 33 rows of V logits: one chunk
    whole, whole_grads = loss_and_grads()
    torch.testing.assert_close(whole, F.cross_entropy(lm_logits(model, ids).flatten(0, 1), targets.flatten()))
    monkeypatch.setattr(backbone, "_LOSS_CHUNK_BYTES", 4 * V * 5)  # 5 rows a chunk: 7 chunks, the last ragged
    assert backbone._loss_chunk_rows(model, ids) == 5
    chunked, chunked_grads = loss_and_grads()
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=0)
    for got, want in zip(chunked_grads, whole_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    monkeypatch.setattr(backbone, "_LOSS_MAX_CHUNKS", 2)  # the chunk count is capped
    assert backbone._loss_chunk_rows(model, ids) == 17
