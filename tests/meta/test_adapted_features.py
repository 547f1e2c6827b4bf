"""Backbone tensors adapt with the head (adapt_layers, adapt=): exact meta-gradients, every layout, never a silent
difference."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from backbones import V, W, hf_model  # noqa: F401

import picomaml as pm
from picomaml.meta.top_blocks import TopBlocks

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
    with pytest.raises(ValueError, match="adapt: pass adapt_layers=k or adapt"):
        pm.meta_loss(model, head, loop, ep, adapt_layers=1, adapt=["norm.weight"])
    with pytest.raises(ValueError, match="adapt: 'nope.*' matches no parameter of PicoDecoder"):
        pm.meta_loss(model, head, loop, ep, adapt=["nope.*"])
    with pytest.raises(ValueError, match=r"adapt_layers: must be in \[0, 2\]"):
        pm.HybridLearner(model, head, loop, adapt_layers=5)
    with pytest.raises(ValueError, match="head.in_dim"):
        pm.meta_loss(model, pm.MetaHead(8, N).double(), loop, ep, adapt_layers=1)
    assert calls == []
    bound = pm.InnerLoop(steps=1, learn_lr="per_tensor", head=head)  # bound to the head only
    with pytest.raises(ValueError, match=r"loop.bind\(head, model, adapt_layers=k\)"):
        pm.meta_loss(model, head, bound, ep, adapt_layers=1)


def test_hybrid_learner_binds_learned_lrs_to_the_adapted_blocks():
    model, head = pico(), pm.MetaHead(16, N).double()
    loop = pm.InnerLoop(steps=2, lr=0.3, learn_lr="per_tensor").double()
    learner = pm.HybridLearner(model, head, loop, adapt_layers=1)
    assert loop.lrs.shape == (2 + 10,)  # out.weight, out.bias, 9 tensors of the top block, the final norm
    out = learner(episode=episode())
    out.loss.backward()
    assert loop.lrs.grad is not None and loop.lrs.grad[2:].abs().sum() > 0


class Block(torch.nn.Module):
    """A residual block that applies its own residual, as nanoGPT's does."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


class NanoStack(torch.nn.Module):
    """A user's nanoGPT-style module: blocks in transformer.h, a final ln_f, and (optionally) a projection
    after it, which a re-run of blocks + final norm does not reproduce."""

    def __init__(self, project: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.transformer = torch.nn.ModuleDict(
            {"wte": torch.nn.Embedding(V, 16), "h": torch.nn.ModuleList(Block() for _ in range(2)),
             "ln_f": torch.nn.LayerNorm(16)}  # fmt: skip
        )
        self.proj = torch.nn.Linear(16, 16) if project else None

    def hidden_states(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.transformer.wte(ids)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        return self.proj(x) if self.proj is not None else x


def layout_model(family: str) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    small = dict(vocab_size=V, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    if family == "pico":
        return pico()
    if family == "nanogpt":
        return NanoStack().double()
    if family in ("llama", "gpt2"):
        return hf_model(family).double()
    if family == "opt":
        cfg = transformers.OPTConfig(hidden_size=16, ffn_dim=32, word_embed_proj_dim=16, **small)
        return transformers.OPTForCausalLM(cfg).eval().double()
    if family == "neox":
        cfg = transformers.GPTNeoXConfig(hidden_size=16, intermediate_size=32, **small)
        return transformers.GPTNeoXForCausalLM(cfg).eval().double()
    if family == "modernbert":  # alternating local/global attention, a final_norm
        ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=1, cls_token_id=1, sep_token_id=1)
        cfg = transformers.ModernBertConfig(hidden_size=16, intermediate_size=32, global_attn_every_n_layers=2,
                                            local_attention=4, **ids, **small)  # fmt: skip
        return transformers.ModernBertModel(cfg).eval().double()
    cfg = transformers.BertConfig(hidden_size=16, intermediate_size=32, **small)  # an encoder, as its base model
    return transformers.BertModel(cfg).eval().double()


def meta_grads(model, head, loop, ep, **kw):
    out, grads = grads_of(model, head, loop, ep, **kw)
    return out.loss.detach(), grads


@pytest.mark.parametrize("family", ["pico", "nanogpt", "llama", "gpt2", "opt", "neox", "bert", "modernbert"])
def test_every_layout_adapts_its_top_block_split_and_full_alike(family, monkeypatch, caplog):
    model, head, ep = layout_model(family), pm.MetaHead(16, N, init="xavier").double(), episode()
    zero = pm.InnerLoop(steps=0)
    torch.testing.assert_close(
        pm.meta_loss(model, head, zero, ep, adapt_layers=1).loss, pm.meta_loss(model, head, zero, ep).loss
    )
    loop = pm.InnerLoop(steps=2, lr=0.3)
    with caplog.at_level("INFO", logger="picomaml.meta.adapted_features"):
        split = meta_grads(model, head, loop, ep, adapt_layers=1)
    assert "whole backbone" not in caplog.text  # each of these layouts splits
    monkeypatch.setattr(TopBlocks, "reproduces", lambda self, ids: False)
    full = meta_grads(model, head, loop, ep, adapt_layers=1)
    # transformers computes rotary tables in float32 even for a float64 model, so kernels that differ
    # between the two paths (SDPA under vmap) round differently there
    tol = 1e-5 if family in ("llama", "neox", "modernbert") else 1e-9
    torch.testing.assert_close(split[0], full[0], rtol=tol, atol=tol)
    assert split[1].keys() == full[1].keys() and len(split[1]) > 4
    for name in split[1]:
        torch.testing.assert_close(split[1][name], full[1][name], rtol=tol, atol=tol, msg=name)
    assert not torch.allclose(split[0], pm.meta_loss(model, head, loop, ep).loss)  # the block did adapt
    monkeypatch.undo()
    # the independent reference: central differences of the loss through the split path, in float64 (with a
    # looser tolerance where float32 rotary tables put rounding noise into the loss)
    params = dict(model.named_parameters())
    names = [n for n in split[1] if n in params]
    lowest, top = names[0], [n for n in names if n.endswith("weight")][-1]  # a lower block's tensor, an adapted one
    fd_tol, fd_eps = (5e-3, 1e-4) if family in ("llama", "neox", "modernbert") else (1e-6, 1e-6)
    finite_difference_check(lambda: pm.meta_loss(model, head, loop, ep, adapt_layers=1).loss,
                            {n: params[n] for n in {lowest, top}}, split[1], picks=1, tol=fd_tol, eps=fd_eps)  # fmt: skip


def test_a_module_whose_features_do_not_end_at_the_final_norm_reruns_whole(caplog):
    model, head, ep = NanoStack(project=True).double(), pm.MetaHead(16, N, init="xavier").double(), episode()
    zero = pm.InnerLoop(steps=0)
    with caplog.at_level("INFO", logger="picomaml.meta.adapted_features"):
        adapted = pm.meta_loss(model, head, zero, ep, adapt_layers=1).loss
    torch.testing.assert_close(adapted, pm.meta_loss(model, head, zero, ep).loss)  # was 2.646 against 1.706
    assert "the whole backbone re-runs" in caplog.text


def test_blocks_that_need_other_arguments_than_the_first_adapted_one_rerun_whole(caplog):
    """ModernBERT alternates local and global attention: the top two blocks take different masks, which the
    capture of the first one does not hold. The check finds it; the whole backbone re-runs; nothing differs."""
    model, head, ep, zero = layout_model("modernbert"), pm.MetaHead(16, N).double(), episode(), pm.InnerLoop(steps=0)
    with caplog.at_level("INFO", logger="picomaml.meta.adapted_features"):
        adapted = pm.meta_loss(model, head, zero, ep, adapt_layers=2).loss
    torch.testing.assert_close(adapted, pm.meta_loss(model, head, zero, ep).loss)
    assert "re-running the top 2 blocks of ModernBertModel does not reproduce" in caplog.text


def test_a_sliding_window_model_checked_at_a_short_window_is_rechecked_at_a_longer_one():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Gemma2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=4,
                                    max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(cfg).eval().double()
    head, zero = pm.MetaHead(16, N, init="xavier").double(), pm.InnerLoop(steps=0)
    rows = torch.randint(3, V, (64, 128), generator=torch.Generator().manual_seed(1))
    for window in (4, 12):
        sampler = pm.SMLMTSampler(n_way=N, k_shot=2, n_query=2, mask_token_id=2, window_len=window, seed=0)
        ep = sampler.sample(rows)
        torch.testing.assert_close(
            pm.meta_loss(model, head, zero, ep, adapt_layers=2).loss, pm.meta_loss(model, head, zero, ep).loss
        )


def finite_difference_check(
    loss_fn, named: dict, grads: dict, picks: int = 2, tol: float = 1e-6, eps: float = 1e-6
) -> None:
    for name, p in named.items():
        g = grads[name].flatten()
        for i in torch.topk(g.abs(), picks).indices.tolist():
            flat = p.data.view(-1)
            old = flat[i].item()
            with torch.no_grad():
                flat[i] = old + eps
                hi = loss_fn().item()
                flat[i] = old - eps
                lo = loss_fn().item()
                flat[i] = old
            fd = (hi - lo) / (2 * eps)
            assert abs(g[i].item() - fd) <= tol * max(abs(fd), 1e-3), (name, i, g[i].item(), fd)


def test_lora_matrices_of_a_peft_model_adapt_with_exact_meta_gradients():
    peft = pytest.importorskip("peft")
    # GPT-2 computes in float64 throughout (Llama's rotary tables stay float32), so differences are exact
    lm = hf_model("gpt2").double()
    cfg = peft.LoraConfig(r=2, target_modules=["c_attn", "c_fc"], lora_dropout=0.0, fan_in_fan_out=True)
    model = peft.get_peft_model(lm, cfg)
    with torch.no_grad():  # lora_B starts at zero; give the adapters a value so every path carries gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(n)))
    head, ep = pm.MetaHead(16, N, init="xavier").double(), episode()
    loop = pm.InnerLoop(steps=2, lr=0.5, learn_lr="per_tensor")
    adapt = ["*lora_A*", "base_model.model.transformer.h.1.mlp.c_fc.lora_B.default.weight"]  # a wrapper's name too
    loop.bind(head, model, adapt=adapt).double()
    out = pm.meta_loss(model, head, loop, ep, adapt=adapt)
    adapted = {k for k in out.params if not k.startswith("out.")}
    expected = {f"transformer.h.{i}.{m}.lora_A.default.weight" for i in (0, 1) for m in ("attn.c_attn", "mlp.c_fc")}
    assert adapted == expected | {"transformer.h.1.mlp.c_fc.lora_B.default.weight"}
    out.loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora" not in n)  # frozen base weights
    named = {n: p for n, p in model.named_parameters() if ".0.attn.c_attn.lora" in n or ".1.mlp.c_fc.lora_B" in n}
    named.update({"head.out.weight": head.out.weight, "loop.lrs": loop.lrs})
    grads = {n: p.grad.clone() for n, p in named.items()}
    finite_difference_check(lambda: pm.meta_loss(model, head, loop, ep, adapt=adapt).loss, named, grads)


def test_a_selection_outside_the_blocks_reruns_the_whole_backbone_with_exact_meta_gradients(caplog):
    model, head, ep = pico(), pm.MetaHead(16, N, hidden_dims=(8,), init="xavier").double(), episode(n_tasks=2)
    loop = pm.InnerLoop(steps=2, lr=0.5)
    adapt = ["embed_tokens.weight", "layers.1.mlp.down_proj.weight"]
    out, grads = grads_of(model, head, loop, ep, adapt=adapt, feature_norm="center")
    assert set(adapt) <= set(out.params) and out.params["embed_tokens.weight"].shape[0] == 2  # a task dim
    named = {n: p for n, p in model.named_parameters() if n in ("embed_tokens.weight", "layers.0.attention.q_proj.weight",
                                                              "layers.1.mlp.down_proj.weight")}  # fmt: skip
    finite_difference_check(
        lambda: pm.meta_loss(model, head, loop, ep, adapt=adapt, feature_norm="center").loss, named, grads
    )


def test_wrapped_models_work_as_they_are_held():
    peft = pytest.importorskip("peft")
    model, head, ep, loop = pico(), pm.MetaHead(16, N).double(), episode(), pm.InnerLoop(steps=1, lr=0.3)
    ref = pm.meta_loss(model, head, loop, ep, adapt_layers=1).loss
    torch.testing.assert_close(pm.meta_loss(torch.compile(model), head, loop, ep, adapt_layers=1).loss, ref)
    torch.testing.assert_close(pm.meta_loss(torch.compile(model), head, loop, ep).loss,
                               pm.meta_loss(model, head, loop, ep).loss)  # fmt: skip
    lm = hf_model("gpt2").double()
    wrapped = peft.get_peft_model(lm, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    learner = pm.HybridLearner(wrapped, head, pm.InnerLoop(steps=1, lr=0.3, learn_lr="per_tensor"), adapt="*lora_*")
    out = learner(rows=torch.randint(0, V, (2, 9)), episode=ep)
    out.loss.backward()
    assert learner.loop.lrs.shape == (2 + 4,) and learner.loop.lrs.grad is not None


def test_a_ddp_wrapped_backbone_all_reduces_its_meta_gradient(tmp_path):
    """meta_loss on DDP(model) runs the wrapped module's methods, never DDP's forward: it frames the step as
    that forward does, so the backward reaches DDP's all-reduce (counted by a communication hook)."""
    import gc
    import time

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    ddp = None
    try:
        model, head, ep = pico(), pm.MetaHead(16, N).double(), episode()
        ddp = DDP(model, find_unused_parameters=True)  # a meta step leaves the LM head unused, as in the trainer
        buckets = []

        def hook(state, bucket):
            buckets.append(bucket.index())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        ddp.register_comm_hook(None, hook)
        for kw in ({}, {"adapt_layers": 1}):
            buckets.clear()
            out = pm.meta_loss(ddp, head, pm.InnerLoop(steps=2, lr=0.3), ep, **kw)
            out.loss.backward()
            assert buckets, kw  # the gradients went through DDP's reducer
            assert model.embed_tokens.weight.grad is not None
            ddp.zero_grad(set_to_none=True)
        with torch.no_grad():  # evaluation: no reducer round
            buckets.clear()
            pm.meta_loss(ddp, head, pm.InnerLoop(steps=2, lr=0.3), ep)
        assert not buckets
    finally:
        time.sleep(0.2)  # see tests/meta/test_inner_loop.py::test_ddp_one_backward
        ddp = None
        gc.collect()
        dist.destroy_process_group()


def test_a_prototype_head_with_adapted_blocks_takes_the_same_inner_steps_in_both_orders():
    """The inner gradient with respect to the blocks is the partial one (the prototype layer held fixed), so
    second and first order adapt to the same tensors; the second-order meta-gradient matches float64 finite
    differences."""
    model, ep = pico(), episode()
    head = pm.MetaHead(16, N, hidden_dims=(8,), init="prototype").double()
    so, fo = (pm.meta_loss(model, head, pm.InnerLoop(steps=2, lr=0.5, first_order=f), ep, adapt_layers=1)
              for f in (False, True))  # fmt: skip
    for k in so.params:
        torch.testing.assert_close(so.params[k], fo.params[k], rtol=1e-10, atol=1e-12, msg=k)
    loop = pm.InnerLoop(steps=2, lr=0.5)
    out, grads = grads_of(model, head, loop, ep, adapt_layers=1)
    named = {n: p for n, p in model.named_parameters() if n in ("layers.0.mlp.up_proj.weight", "layers.1.attention.o_proj.weight")}
    named["head.hidden.0.weight"] = head.hidden[0].weight
    finite_difference_check(lambda: pm.meta_loss(model, head, loop, ep, adapt_layers=1).loss, named, grads)


def test_a_features_callable_is_checked_at_every_call():
    """A split that reproduced the model without features= says nothing about another featuriser."""
    model, head, ep, zero = pico(), pm.MetaHead(16, N).double(), episode(), pm.InnerLoop(steps=0)
    pm.meta_loss(model, head, zero, ep, adapt_layers=1)  # checked (and passed) without features=
    doubled = lambda ids: 2.0 * model.hidden_states(ids)  # noqa: E731
    torch.testing.assert_close(
        pm.meta_loss(model, head, zero, ep, adapt_layers=1, features=doubled).loss,
        pm.meta_loss(model, head, zero, ep, features=doubled).loss,
    )


def test_labels_outside_the_head_are_named_on_the_adapted_path_too():
    model, ep = pico(), episode()
    with pytest.raises(ValueError, match=r"head: a 2-way head cannot score a 3-way episode"):
        pm.meta_loss(model, pm.MetaHead(16, 2).double(), pm.InnerLoop(steps=1), ep, adapt_layers=1)
    bad = dataclasses.replace(ep, support_labels=ep.support_labels + N)  # the head fits, the labels do not
    with pytest.raises(ValueError, match=rf"support_labels must be in \[0, {N}\)"):
        pm.meta_loss(model, pm.MetaHead(16, N).double(), pm.InnerLoop(steps=1), bad, adapt_layers=1)
