"""Hugging Face Llama export / import: equal logits, round trips, save_pretrained, rejected configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import picomaml as pm

transformers = pytest.importorskip("transformers")

V = 103


def make_model(tie: bool, **kw) -> pm.PicoDecoder:
    torch.manual_seed(0)
    base = dict(
        vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64,
        tie_embeddings=tie, rope_theta=500.0, norm_eps=1e-5,
    )  # fmt: skip
    base.update(kw)
    m = pm.PicoDecoder(pm.PicoDecoderConfig(**base)).eval()
    with torch.no_grad():  # norm gains away from 1 so a swapped or dropped norm shows up
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
            else:  # larger weights so attention is far from uniform
                p.mul_(5.0)
    return m


CASES = {
    "gqa": dict(tie=False),
    "tied": dict(tie=True),
    "mha": dict(tie=False, n_kv_heads=4),
    "mqa": dict(tie=True, n_kv_heads=1, n_heads=8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_llama(case):
    m = make_model(**CASES[case])
    hf = m.to_hf()
    assert isinstance(hf, transformers.LlamaForCausalLM)
    assert hf.config.num_key_value_heads == m.config.n_kv_heads
    x = torch.randint(0, V, (3, 40))
    with torch.no_grad():
        ours, theirs = m(x), hf(x).logits
    assert ours.abs().max() > 1.0  # not a degenerate comparison
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_config_fields():
    m = make_model(tie=True)
    c = m.to_hf().config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (64, 96, 2)
    assert (c.num_attention_heads, c.num_key_value_heads, c.max_position_embeddings) == (4, 2, 64)
    assert c.rope_parameters["rope_theta"] == 500.0 and c.rms_norm_eps == 1e-5
    assert c.tie_word_embeddings and not c.attention_bias and not c.mlp_bias and c.hidden_act == "silu"


def test_tied_export_shares_weight():
    hf = make_model(tie=True).to_hf()
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_identical_state(tie):
    m = make_model(tie)
    back = pm.PicoDecoder.from_hf(m.to_hf())
    assert back.config == m.config
    assert back.state_dict().keys() == m.state_dict().keys()
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    if tie:
        assert back.lm_head.weight is back.embed_tokens.weight


def test_save_pretrained_loads_with_auto_class(tmp_path):
    m = make_model(tie=False)
    m.to_hf().save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, V, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, m(x), atol=1e-5, rtol=1e-5)
    # and from the directory straight back into a PicoDecoder
    back = pm.PicoDecoder.from_hf(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), m(x), atol=0, rtol=0)


def test_generate_matches_hf_greedy():
    m = make_model(tie=False)
    hf = m.to_hf()
    x = torch.randint(0, V, (2, 5))
    ours = m.generate(x, max_new_tokens=8)
    theirs = hf.generate(x, max_new_tokens=8, do_sample=False, min_new_tokens=8, pad_token_id=0)
    assert torch.equal(ours, theirs)


def llama_config(**kw):
    base = dict(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    base.update(kw)
    return transformers.LlamaConfig(**base)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(attention_bias=True), "bias"),
        (dict(mlp_bias=True), "bias"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), "rope"),
        (dict(head_dim=16), "head_dim"),
    ],
)
def test_from_hf_rejects_unsupported(kw, match):
    hf = transformers.LlamaForCausalLM(llama_config(**kw))
    with pytest.raises(ValueError, match=match):
        pm.PicoDecoder.from_hf(hf)


def test_from_hf_rejects_other_models(tmp_path):
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        pm.PicoDecoder.from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(FileNotFoundError, match="model_or_path"):
        pm.PicoDecoder.from_hf(tmp_path / "missing")


def test_from_hf_keeps_plain_llama_weights():
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(
        llama_config(rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    )
    hf.eval()
    m = pm.PicoDecoder.from_hf(hf).eval()
    x = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(m(x), hf(x).logits, atol=1e-5, rtol=1e-5)


def test_export_carries_the_tokenizers_special_ids_so_generate_stops(tmp_path):
    import json

    from picomaml.model.hf import export_hf

    class Tok:  # the roles a tokenizer wrapper has; saving is the tokenizer's business
        bos_token_id, eos_token_id, pad_token_id = None, 0, 1

        def save_pretrained(self, path):
            (Path(path) / "tokenizer.json").write_text("{}")

    pytest.importorskip("transformers")
    model = pm.PicoDecoder(pm.PicoDecoderConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                                                ffn_dim=32, max_seq_len=16))  # fmt: skip
    out = export_hf(model, tmp_path / "hf", Tok())
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"], config.get("bos_token_id")) == (0, 1, None)
    assert generation["eos_token_id"] == 0
