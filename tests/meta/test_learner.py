"""HybridLearner: AR, meta and weighted losses through one module, with gradients to every trainable part."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import picomaml as pm
from picomaml.meta.learner import HybridLearner
from picomaml.meta.objectives import lm_loss, meta_loss
from picomaml.train import training

V, W, N, K, Q, MASK = 64, 10, 3, 2, 2, 1


def parts(learn_lr: str | None = "per_tensor"):
    torch.manual_seed(0)
    cfg = pm.PicoDecoderConfig(
        vocab_size=V, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32
    )
    model = pm.PicoDecoder(cfg)
    head = pm.MetaHead(in_dim=32, n_way=N, hidden_dims=(16,))
    loop = pm.InnerLoop(steps=2, lr=0.1, learn_lr=learn_lr, head=head)
    return model, head, loop


def episode(seed: int = 0) -> pm.Episode:
    g = torch.Generator().manual_seed(seed)

    def windows(rows: int, per: int):
        ids = torch.randint(3, V, (rows, W), generator=g)
        mask = torch.rand(rows, W, generator=g) < 0.2
        mask[:, 4] = True  # every window needs a masked position for "mask" pooling
        ids[mask] = MASK
        return ids, torch.arange(N).repeat_interleave(per), mask

    return pm.Episode(*windows(N * K, K), *windows(N * Q, Q), torch.arange(10, 10 + N))


def rows(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (4, 17), generator=torch.Generator().manual_seed(seed))


def grads(loss: torch.Tensor, modules) -> list[torch.Tensor]:
    """Gradients of ``loss`` for every parameter of ``modules`` (zeros where it does not depend on one)."""
    params = [p for m in modules for p in m.parameters()]
    got = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, got, strict=True)]


def test_bundles_every_trainable_part():
    model, head, loop = parts()
    learner = HybridLearner(model, head, loop)
    expected = {id(p) for m in (model, head, loop) for p in m.parameters()}
    assert {id(p) for p in learner.parameters()} == expected
    assert id(loop.lrs) in expected  # learned inner LRs are trained through the same wrapped module


def test_ar_only_is_lm_loss_and_never_touches_the_head():
    model, head, loop = parts()
    out = HybridLearner(model, head, loop)(rows=rows(), w_ar=0.7)
    expected = lm_loss(model, rows())
    torch.testing.assert_close(out.lm_loss, expected.detach())
    torch.testing.assert_close(out.loss, 0.7 * expected)
    assert out.meta is None and not out.lm_loss.requires_grad
    out.loss.backward()
    assert all(p.grad is None for p in (*head.parameters(), *loop.parameters()))
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("pooling", ["mask", "before_mask", "last", "mean"])
def test_meta_only_is_meta_loss_with_the_learners_pooling(pooling):
    model, head, loop = parts()
    ep = episode()
    out = HybridLearner(model, head, loop, pooling=pooling, feature_norm="center")(episode=ep, w_meta=2.0)
    direct = meta_loss(model, head, loop, ep, pooling=pooling, feature_norm="center")
    torch.testing.assert_close(out.meta.loss, direct.loss)
    torch.testing.assert_close(out.loss, 2.0 * direct.loss)
    assert out.lm_loss is None
    assert out.meta.metrics.keys() == direct.metrics.keys()


def test_pooling_and_feature_norm_are_passed_through():
    model, head, loop = parts()
    ep = episode()
    losses = {
        (pooling, norm): HybridLearner(model, head, loop, pooling, norm)(episode=ep).loss.item()
        for pooling in ("mask", "last")
        for norm in ("none", "standardize")
    }
    assert len(set(losses.values())) == 4  # each setting changes the loss, so none is ignored


def test_meta_only_gradients_reach_backbone_head_and_learned_lrs_but_not_the_lm_head():
    model, head, loop = parts()
    out = HybridLearner(model, head, loop)(episode=episode())
    out.loss.backward()
    for name, p in (*head.named_parameters(), ("loop.lrs", loop.lrs), ("embed", model.embed_tokens.weight)):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.lm_head.weight.grad is None  # a meta step never computes the vocabulary projection


@pytest.mark.parametrize(("w_ar", "w_meta"), [(1.0, 1.0), (0.25, 0.75), (0.0, 1.0)])
def test_weighted_loss_and_gradients_equal_the_direct_sum(w_ar, w_meta):
    model, head, loop = parts()
    ep, x = episode(), rows()
    out = HybridLearner(model, head, loop)(rows=x, episode=ep, w_ar=w_ar, w_meta=w_meta)
    ar, meta = lm_loss(model, x), meta_loss(model, head, loop, ep).loss
    direct = w_ar * ar + w_meta * meta
    torch.testing.assert_close(out.loss, direct)
    torch.testing.assert_close(out.lm_loss, ar.detach())
    torch.testing.assert_close(out.meta.loss, meta)
    for got, want in zip(
        grads(out.loss, (model, head, loop)), grads(direct, (model, head, loop)), strict=True
    ):
        torch.testing.assert_close(got, want)


def test_weighted_gradients_reach_model_head_and_lm_head():
    model, head, loop = parts(learn_lr=None)
    out = HybridLearner(model, head, loop)(rows=rows(), episode=episode(), w_ar=0.5, w_meta=0.5)
    out.loss.backward()
    for name, p in (*model.named_parameters(), *head.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_needs_rows_or_an_episode():
    model, head, loop = parts()
    with pytest.raises(ValueError, match="needs rows \\(AR\\), an episode \\(meta\\), or both"):
        HybridLearner(model, head, loop)()


def test_unknown_pooling_names_the_allowed_values():
    model, head, loop = parts()
    with pytest.raises(ValueError, match=r"pooling must be one of \['mask', 'before_mask', 'last', 'mean'\]"):
        HybridLearner(model, head, loop, pooling="max")


# ---------------------------------------------------------------------- non-finite values skip the step


def _inf_features(model, head, loop):
    def hook(module, inputs, output):
        output = output.clone()
        output[0, 4, 0] = float("inf")  # the masked position of the first window: reaches the features
        return output

    model.norm.register_forward_hook(hook)


def _nan_backbone_weight(model, head, loop):
    with torch.no_grad():
        model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")


def _nan_lm_head(model, head, loop):  # the AR loss alone is NaN
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")


def _nan_head(model, head, loop):  # the meta loss alone is NaN
    with torch.no_grad():
        head.out.weight[0, 0] = float("nan")


def _inf_gradient(model, head, loop):  # finite losses, an Inf in one gradient
    model.embed_tokens.weight.register_hook(lambda g: g + float("inf"))


INJECTIONS = {
    "inf_features": (_inf_features, ("meta", "both")),
    "nan_backbone_weight": (_nan_backbone_weight, ("ar", "meta", "both")),
    "nan_lm_head": (_nan_lm_head, ("ar", "both")),
    "nan_head": (_nan_head, ("meta", "both")),
    "inf_gradient": (_inf_gradient, ("ar", "meta", "both")),
}
CASES = [(name, objective) for name, (_, objectives) in INJECTIONS.items() for objective in objectives]


def learner_step(inject=None, objective="both"):
    """One trainer-like step: forward, backward, the finite flag over the losses and the gradient norm."""
    model, head, loop = parts()
    if inject is not None:
        inject(model, head, loop)
    learner = HybridLearner(model, head, loop)
    kwargs = {"rows": rows()} if objective in ("ar", "both") else {}
    if objective in ("meta", "both"):
        kwargs["episode"] = episode()
    out = learner(**kwargs, w_ar=0.5, w_meta=0.5)
    out.loss.backward()
    losses = [out.lm_loss] if out.lm_loss is not None else []
    losses += [out.meta.loss.detach()] if out.meta is not None else []
    grad_norm = training.global_grad_norm(learner.parameters())
    finite = math.isfinite(grad_norm) and all(bool(torch.isfinite(x)) for x in losses)
    return finite, sorted(n for n, p in learner.named_parameters() if p.grad is not None), out


@pytest.mark.parametrize(("injection", "objective"), CASES)
def test_nonfinite_injection_gives_a_nonfinite_step_that_nothing_raises_on(injection, objective):
    clean_finite, clean_with_grad, _ = learner_step(None, objective)
    assert clean_finite  # the control
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the injections may warn (e.g. overflow)
        finite, with_grad, out = learner_step(INJECTIONS[injection][0], objective)
    assert not finite  # the trainer's all-reduced flag: the optimizer step is skipped on every rank
    assert with_grad == clean_with_grad  # the same gradients exist as in a finite step: DDP cannot hang
    if injection == "inf_features":
        assert out.meta.metrics["nonfinite_features"] == 1.0
    guard = training.NonFiniteGuard(max_consecutive=2)
    with pytest.warns(training.NonFiniteStepWarning, match="step 7: non-finite"):
        assert guard.record(finite, step=7) is False
    assert guard.state_dict() == {"nonfinite_skipped": 1, "nonfinite_consecutive": 1}


def test_under_ddp_an_inf_feature_step_backpropagates_and_the_next_step_is_normal(tmp_path):
    """The trainer's setting (DDP, find_unused_parameters): the NaN step's backward completes the
    reducer's round, so the next, finite step runs as usual (a raise before backward would leave the
    other ranks waiting in their all-reduce)."""
    import gc
    import time

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, head, loop = parts()
    handle = model.norm.register_forward_hook(lambda m, i, o: o.index_fill(2, torch.tensor([0]), float("inf")))
    ddp = None
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DDP(HybridLearner(model, head, loop), find_unused_parameters=True)
        out = ddp(rows=rows(), episode=episode(), w_ar=0.5, w_meta=0.5)
        out.loss.backward()
        assert torch.isnan(out.loss) and not math.isfinite(training.global_grad_norm(ddp.parameters()))
        assert out.meta.metrics["nonfinite_features"] == 1.0
        ddp.zero_grad(set_to_none=True)
        handle.remove()
        out = ddp(rows=rows(), episode=episode(), w_ar=0.5, w_meta=0.5)
        out.loss.backward()  # DDP raises here if the previous round had not finished
        assert math.isfinite(out.loss.item()) and math.isfinite(training.global_grad_norm(ddp.parameters()))
        assert out.meta.metrics["nonfinite_features"] == 0.0
    finally:
        time.sleep(0.2)  # see tests/meta/test_inner_loop.py::test_ddp_one_backward
        ddp = None
        gc.collect()
        dist.destroy_process_group()


def _ddp_rank(rank: int, world: int, store: str, out_dir: str) -> None:
    """One process of the 2-rank test: a transformers backbone, a head seeded by rank, hybrid steps."""
    import torch.distributed as dist
    from backbones import N, V, W, hf_model
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = hf_model("llama")  # same config; seeded equal, but DDP would broadcast it anyway
        head = pm.MetaHead(model.config.hidden_size, N, init="xavier", seed=100 + rank)  # differs per rank
        loop = pm.InnerLoop(steps=2, lr=0.3, learn_lr="per_tensor", head=head)
        ddp = DDP(HybridLearner(model, head, loop), find_unused_parameters=True)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
        data = torch.randint(3, V, (64, 128), generator=torch.Generator().manual_seed(rank))  # rank's own data
        sampler = pm.SMLMTSampler(n_way=N, k_shot=2, n_query=2, mask_token_id=2, window_len=W, seed=rank)
        for step in range(3):
            weights = [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)][step]
            out = ddp(rows=data[:4, :17], episode=sampler.sample(data), w_ar=weights[0], w_meta=weights[1])
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.save({k: v.detach().clone() for k, v in ddp.module.state_dict().items() if torch.is_tensor(v)},
                   f"{out_dir}/rank{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_with_a_transformers_backbone_keep_every_parameter_equal(tmp_path):
    """The documented way (HybridLearner inside DDP): heads built from other seeds start equal (DDP's
    broadcast) and stay equal, and so do the backbone and the learned inner LRs."""
    pytest.importorskip("transformers")
    import torch.multiprocessing as mp

    mp.spawn(_ddp_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert a.keys() == b.keys() and any(k.startswith("head.") for k in a) and "loop.lrs" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    fresh = pm.MetaHead(16, 3, init="xavier", seed=100)
    assert not torch.equal(a["head.out.weight"], fresh.out.weight)  # the head did train
