"""meta.grad_blocks: the meta loss's gradient reaches only the top blocks (and the head); values unchanged."""

from __future__ import annotations

import pytest
import torch

import picomaml as pm
from picomaml.meta.grad_blocks import check_grad_blocks, stop_gradient_below
from picomaml.meta.learner import HybridLearner
from picomaml.params import ConfigError

V, W, N, K, Q, MASK = 64, 10, 3, 2, 2, 1


def parts(n_layers: int = 3):
    torch.manual_seed(0)
    cfg = pm.PicoDecoderConfig(vocab_size=V, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)
    head = pm.MetaHead(in_dim=32, n_way=N, hidden_dims=(16,), init="xavier")
    return pm.PicoDecoder(cfg), head, pm.InnerLoop(steps=2, lr=0.1, head=head)


def episode() -> pm.Episode:
    g = torch.Generator().manual_seed(0)

    def windows(rows: int, per: int):
        ids = torch.randint(3, V, (rows, W), generator=g)
        mask = torch.zeros(rows, W, dtype=torch.bool)
        mask[:, 4] = True
        ids[mask] = MASK
        return ids, torch.arange(N).repeat_interleave(per), mask

    return pm.Episode(*windows(N * K, K), *windows(N * Q, Q), torch.arange(10, 10 + N))


def reached(learner: HybridLearner, ep: pm.Episode) -> tuple[float, set[str]]:
    """The meta loss and the backbone parameters its gradient reaches (non-zero)."""
    out = learner(episode=ep)
    out.loss.backward()
    hit = {n for n, p in learner.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.head.parameters())
    return float(out.loss), hit


@pytest.mark.parametrize("k", [0, 1, 2, 3, None])
def test_the_meta_gradient_reaches_the_top_k_blocks_only(k):
    ep = episode()
    full_loss, full = reached(HybridLearner(*parts()), ep)
    loss, hit = reached(HybridLearner(*parts(), grad_blocks=k), ep)
    assert loss == pytest.approx(full_loss, rel=1e-6)  # the forward is unchanged
    kept = {f"layers.{i}." for i in range(3 - (3 if k is None else k), 3)}
    expected = {n for n in full if any(n.startswith(p) for p in kept) or n.startswith("norm.")}
    if k is None or k == 3:
        expected = full  # the embedding too
    assert hit == expected, sorted(hit ^ expected)
    assert "embed_tokens.weight" in full


def test_the_ar_loss_still_trains_every_block():
    model, head, loop = parts()
    learner = HybridLearner(model, head, loop, grad_blocks=0)
    rows = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    learner(rows=rows, episode=episode(), w_ar=1.0, w_meta=1.0).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lm_head" not in n)


def test_hooks_are_removed_and_bad_values_are_named():
    model, _, _ = parts()
    with stop_gradient_below(model, 1):
        assert model.layers[2]._forward_pre_hooks
    assert not model.layers[2]._forward_pre_hooks
    with pytest.raises(ConfigError, match=r"meta.grad_blocks \(the model has 3 blocks\): must be an integer >= 0 and <= 3, got 4"):
        check_grad_blocks(model, 4)
    with pytest.raises(ConfigError, match="meta.grad_blocks"):
        HybridLearner(*parts(), grad_blocks=-1)


def test_a_transformers_llama_keeps_its_gradient_in_the_top_block():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    head = pm.MetaHead(in_dim=32, n_way=N, init="xavier")
    learner = HybridLearner(model, head, pm.InnerLoop(steps=1, lr=0.1, head=head), grad_blocks=1)
    learner(episode=episode()).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if ".layers.0." in n or "embed" in n)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".layers.1." in n)


@pytest.mark.parametrize(("adapt_layers", "k"), [(1, 2), (2, 1)])
def test_the_stop_holds_on_the_adapted_path_too(adapt_layers, k):
    """With top blocks adapting in the inner loop (the split path), the gradient still stops below block n - k."""
    model, head, loop = parts()
    learner = HybridLearner(model, head, loop, adapt_layers=adapt_layers, grad_blocks=k)
    learner(episode=episode()).loss.backward()
    lowest = 3 - k
    for name, p in model.named_parameters():
        block = int(name.split(".")[1]) if name.startswith("layers.") else None
        has = p.grad is not None and p.grad.abs().sum() > 0
        if block is not None and block < lowest or name.startswith("embed"):
            assert not has, name
        elif block is not None:
            assert has, name
