"""adapt_layers: the top blocks adapt with the head; exact meta-gradients, checked independently."""

from __future__ import annotations

import pytest
import torch
from backbones import V, W, hf_model

import picomaml as pm

N = 3


def pico(n_layers: int = 2, std: float = 0.2) -> pm.PicoDecoder:
    cfg = pm.PicoDecoderConfig(vocab_size=V, d_model=16, n_layers=n_layers, n_heads=2, n_kv_heads=1, ffn_dim=32,
                               max_seq_len=W, init_std=std)  # fmt: skip
    return pm.PicoDecoder(cfg, generator=torch.Generator().manual_seed(0)).double()


def episode(n_tasks: int = 1):
    rows = torch.randint(3, V, (64, 128), generator=torch.Generator().manual_seed(1))
    sampler = pm.SMLMTSampler(n_way=N, k_shot=2, n_query=2, mask_token_id=2, window_len=W, seed=0)
    return sampler.sample(rows, n_tasks=n_tasks) if n_tasks > 1 else sampler.sample(rows)


def grads_of(model, head, loop, ep, **kw):
    for m in (model, head, loop):
        m.zero_grad(set_to_none=True)
    out = pm.meta_loss(model, head, loop, ep, **kw)
    out.loss.backward()
    named = [*model.named_parameters(), *(("head." + n, p) for n, p in head.named_parameters()),
             *(("loop." + n, p) for n, p in loop.named_parameters())]  # fmt: skip
    return out, {n: p.grad.clone() for n, p in named if p.grad is not None}


@pytest.mark.parametrize("learn_lr", [None, "per_step"])
def test_second_order_meta_gradient_matches_float64_finite_differences(learn_lr):
    model = pico()
    head = pm.MetaHead(16, N, hidden_dims=(8,), init="xavier").double()
    loop = pm.InnerLoop(steps=2, lr=0.5, learn_lr=learn_lr)
    loop.bind(head, model, adapt_layers=1).double()  # float64 learned LRs too
    ep = episode()
    kw = dict(adapt_layers=1, feature_norm="center")
    out, grads = grads_of(model, head, loop, ep, **kw)
    checked = {"embed_tokens.weight": 0, "layers.0.attention.q_proj.weight": 0, "layers.1.attention.k_proj.weight": 0,
               "layers.1.mlp.down_proj.weight": 0, "norm.weight": 0, "head.hidden.0.weight": 0}  # fmt: skip
    if learn_lr:
        checked["loop.lrs"] = 0
    params = {**dict(model.named_parameters()), **{"head." + n: p for n, p in head.named_parameters()},
              **{"loop." + n: p for n, p in loop.named_parameters()}}  # fmt: skip
    for name in checked:
        p, g = params[name], grads[name].flatten()
        for i in torch.topk(g.abs(), 2).indices.tolist():
            eps, flat = 1e-6, p.data.view(-1)
            old = flat[i].item()
            with torch.no_grad():
                flat[i] = old + eps
                hi = pm.meta_loss(model, head, loop, ep, **kw).loss.item()
                flat[i] = old - eps
                lo = pm.meta_loss(model, head, loop, ep, **kw).loss.item()
                flat[i] = old
            fd = (hi - lo) / (2 * eps)
            assert abs(g[i].item() - fd) <= 1e-6 * max(abs(fd), 1e-3), (name, i, g[i].item(), fd)
    assert set(out.params) >= {"layers.1.attention.q_proj.weight", "norm.weight", "out.weight"}


@pytest.mark.parametrize(
    "opts",
    [
        dict(first_order=False),
        dict(first_order=True),
        dict(first_order=False, learn_lr="per_tensor", grad_clip=0.5),
        dict(first_order=True, learn_lr="per_step"),
    ],
)
def test_torch_and_higher_backends_agree_adapting_the_same_blocks(opts):
    pytest.importorskip("higher")
    model, ep = pico(), episode(n_tasks=2)
    results = []
    for backend in ("torch", "higher"):
        head = pm.MetaHead(16, N, hidden_dims=(8,), init="xavier").double()
        loop = pm.InnerLoop(steps=3, lr=0.3, backend=backend, **opts)
        loop.bind(head, model, adapt_layers=2).double()
        results.append(grads_of(model, head, loop, ep, adapt_layers=2))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=1e-10)
    assert ga.keys() == gb.keys() and "layers.0.attention.q_proj.weight" in ga
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=0, atol=1e-10, msg=name)
    for k in ("support_acc_after", "query_acc", "inner_grad_norm"):
        assert a.metrics[k] == pytest.approx(b.metrics[k], rel=1e-6)  # metrics are float32


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_transformers_decoders_adapt_their_blocks_with_both_backends(family):
    pytest.importorskip("higher")
    model = hf_model(family).double()
    head = pm.MetaHead(16, N).double()
    ep = episode()
    (a, ga), (b, gb) = (
        grads_of(model, head, pm.InnerLoop(steps=2, lr=0.3, backend=be), ep, adapt_layers=1)
        for be in ("torch", "higher")
    )
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=1e-10)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=0, atol=1e-10, msg=name)
    assert model.get_output_embeddings().weight.grad is None or family == "gpt2"  # gpt2 ties it to the input
    head_only = pm.meta_loss(model, head, pm.InnerLoop(steps=2, lr=0.3), ep).loss
    assert not torch.allclose(a.loss, head_only)  # the blocks did adapt


def test_the_model_is_never_mutated_and_no_grad_is_written():
    model, head = pico(), pm.MetaHead(16, N).double()
    loop = pm.InnerLoop(steps=3, lr=0.3, learn_lr="per_tensor").double()
    loop.bind(head, model, adapt_layers=2)
    tensors = lambda: {k: v for k, v in [*model.state_dict().items(), *head.state_dict().items()] if torch.is_tensor(v)}  # noqa: E731
    before = {k: v.clone() for k, v in tensors().items()}
    out = pm.meta_loss(model, head, loop, episode(), adapt_layers=2)
    after = tensors()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in [*model.parameters(), *head.parameters(), *loop.parameters()])
    assert out.loss.requires_grad and out.metrics["support_acc_after"] >= out.metrics["support_acc_before"]
    assert "inner_lr/layers.1.attention.q_proj.weight" in out.metrics


def test_zero_steps_equal_the_head_only_loss_and_tasks_average():
    model, head = pico(), pm.MetaHead(16, N).double()
    ep = episode()
    zero = pm.InnerLoop(steps=0)
    torch.testing.assert_close(
        pm.meta_loss(model, head, zero, ep, adapt_layers=2).loss, pm.meta_loss(model, head, zero, ep).loss
    )
    loop, two = pm.InnerLoop(steps=2, lr=0.3), episode(n_tasks=2)
    both = pm.meta_loss(model, head, loop, two, adapt_layers=1).loss
    singles = []
    for t in range(2):
        one = type(two)(**{f: getattr(two, f)[t] for f in ("support_ids", "support_labels", "support_mask",
                                                          "query_ids", "query_labels", "query_mask", "class_token_ids")})  # fmt: skip
        singles.append(pm.meta_loss(model, head, loop, one, adapt_layers=1).loss)
    torch.testing.assert_close(both, torch.stack(singles).mean())


def test_multi_step_loss_and_first_order_run_and_differ():
    model, head, ep = pico(), pm.MetaHead(16, N).double(), episode()
    losses = {
        (fo, msl): pm.meta_loss(model, head, pm.InnerLoop(steps=3, lr=0.3, first_order=fo, multi_step_loss=msl), ep,
                                adapt_layers=1).loss.item()  # fmt: skip
        for fo in (False, True)
        for msl in (False, True)
    }
    assert losses[(False, False)] == pytest.approx(losses[(True, False)])  # same forward, other gradient
    assert losses[(False, True)] != pytest.approx(losses[(False, False)])


def test_bad_adapt_layers_fail_before_any_forward():
    model, head, ep = pico(2), pm.MetaHead(16, N).double(), episode()
    calls = []
    model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    loop = pm.InnerLoop(steps=1)
    with pytest.raises(ValueError, match=r"adapt_layers: must be in \[0, 2\]"):
        pm.meta_loss(model, head, loop, ep, adapt_layers=3)
    with pytest.raises(ValueError, match="adapt_layers"):
        pm.meta_loss(model, head, loop, ep, adapt_layers=-1)
    with pytest.raises(ValueError, match="adapt_layers: a features= callable cannot be split"):
        pm.meta_loss(model, head, loop, ep, adapt_layers=1, features=model.hidden_states)
    with pytest.raises(ValueError, match=r"adapt_layers: must be in \[0, 2\]"):
        pm.HybridLearner(model, head, loop, adapt_layers=5)
    with pytest.raises(ValueError, match="head.in_dim"):
        pm.meta_loss(model, pm.MetaHead(8, N).double(), loop, ep, adapt_layers=1)
    assert calls == []
    bound = pm.InnerLoop(steps=1, learn_lr="per_tensor", head=head)  # bound to the head only
    with pytest.raises(ValueError, match=r"loop.bind\(head, model, adapt_layers=k\)"):
        pm.meta_loss(model, head, bound, ep, adapt_layers=1)
    with pytest.raises(NotImplementedError, match="backend='torch' or 'higher'"):
        pytest.importorskip("picomaml.meta.backends").load_learn2learn_maml()
        pm.meta_loss(model, head, pm.InnerLoop(steps=1, backend="learn2learn"), ep, adapt_layers=1)


def test_hybrid_learner_binds_learned_lrs_to_the_adapted_blocks():
    model, head = pico(), pm.MetaHead(16, N).double()
    loop = pm.InnerLoop(steps=2, lr=0.3, learn_lr="per_tensor").double()
    learner = pm.HybridLearner(model, head, loop, adapt_layers=1)
    assert loop.lrs.shape == (2 + 10,)  # out.weight, out.bias, 9 tensors of the top block, the final norm
    out = learner(episode=episode())
    out.loss.backward()
    assert loop.lrs.grad is not None and loop.lrs.grad[2:].abs().sum() > 0
