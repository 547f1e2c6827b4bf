"""lm_loss, pool_features, episode_features and meta_loss (one backbone forward per meta step)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from picomaml.meta.episode import Episode
from picomaml.meta.head import MetaHead
from picomaml.meta.inner_loop import InnerLoop
from picomaml.meta.objectives import (
    EpisodeFeatures,
    episode_features,
    lm_loss,
    meta_loss,
    normalize_task_features,
    pool_features,
)
from picomaml.model.config import PicoDecoderConfig
from picomaml.model.decoder import PicoDecoder

V, W, N, K, Q, MASK = 64, 10, 3, 2, 2, 1


def tiny_model(seed: int = 0) -> PicoDecoder:
    torch.manual_seed(seed)
    cfg = PicoDecoderConfig(
        vocab_size=V, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=32
    )
    return PicoDecoder(cfg)


def random_episode(seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)

    def part(rows: int, per: int):
        ids = torch.randint(2, V, (rows, W), generator=g)
        mask = torch.rand(rows, W, generator=g) < 0.2
        mask[:, 3] = True  # at least one masked position per window
        ids[mask] = MASK
        labels = torch.arange(N).repeat_interleave(per)
        return ids, labels, mask

    s_ids, s_lab, s_mask = part(N * K, K)
    q_ids, q_lab, q_mask = part(N * Q, Q)
    return Episode(s_ids, s_lab, s_mask, q_ids, q_lab, q_mask, torch.arange(10, 10 + N))


def test_lm_loss_is_next_token_cross_entropy() -> None:
    model = tiny_model()
    tokens = torch.randint(0, V, (3, 12))
    ref = F.cross_entropy(model(tokens[:, :-1]).reshape(-1, V), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(lm_loss(model, tokens), ref)
    tokens[:, 6:] = 0  # padding: ignored as targets
    logits = model(tokens[:, :-1])
    ref = F.cross_entropy(logits[:, :5].reshape(-1, V), tokens[:, 1:6].reshape(-1))
    torch.testing.assert_close(lm_loss(model, tokens, pad_id=0), ref)
    with pytest.raises(ValueError, match="tokens"):
        lm_loss(model, tokens[:, :1])


def test_lm_loss_full_sequence_and_model_outputs() -> None:
    model = tiny_model()
    tokens = torch.randint(0, V, (3, 12))
    # a causal model: feeding the last token too changes no logit that has a target
    torch.testing.assert_close(lm_loss(model, tokens, full_sequence=True), lm_loss(model, tokens))

    class TupleOut(torch.nn.Module):  # (logits, hidden), like PicoDecoder(return_hidden=True)
        def forward(self, ids):
            return model(ids, return_hidden=True)

    class ModelOutput(torch.nn.Module):  # an object with .logits, like transformers' ModelOutput
        def forward(self, ids):
            return type("Out", (), {"logits": model(ids)})()

    ref = lm_loss(model, tokens, pad_id=0)
    torch.testing.assert_close(lm_loss(TupleOut(), tokens, pad_id=0), ref)
    torch.testing.assert_close(lm_loss(ModelOutput(), tokens, pad_id=0), ref)
    full = model(tokens)[:, :-1]
    ref = F.cross_entropy(full.reshape(-1, V), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(lm_loss(TupleOut(), tokens, full_sequence=True), ref)


def test_pool_features() -> None:
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 0, 0, 1, 0], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    pooled = pool_features(hidden, mask, "mask")
    for b in range(3):
        torch.testing.assert_close(pooled[b], hidden[b][mask[b]].mean(0))
    torch.testing.assert_close(pool_features(hidden, None, "last"), hidden[:, -1])
    torch.testing.assert_close(pool_features(hidden, None, "mean"), hidden.mean(1))
    assert pool_features(hidden.bfloat16(), mask, "mask").dtype == torch.bfloat16
    mask[1] = False
    with pytest.raises(ValueError, match=r"rows \[1\] have no masked position"):
        pool_features(hidden, mask, "mask")
    with pytest.raises(ValueError, match="pooling"):
        pool_features(hidden, mask, "max")
    with pytest.raises(ValueError, match="mask"):
        pool_features(hidden, None, "mask")


def test_pool_features_over_valid_positions() -> None:
    hidden = torch.randn(3, 5, 4)
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    mean = pool_features(hidden, None, "mean", valid=valid)
    last = pool_features(hidden, None, "last", valid=valid)
    for b in range(3):
        torch.testing.assert_close(mean[b], hidden[b][valid[b]].mean(0))
        torch.testing.assert_close(last[b], hidden[b][valid[b]][-1])
    # every position valid: the same numbers as no valid mask (SMLMT windows)
    everything = torch.ones(3, 5, dtype=torch.bool)
    torch.testing.assert_close(pool_features(hidden, None, "mean", valid=everything), hidden.mean(1))
    assert torch.equal(pool_features(hidden, None, "last", valid=everything), hidden[:, -1])
    # "mask" pools masked positions, which are real tokens: valid does not change it
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[:, 0] = True
    assert torch.equal(pool_features(hidden, mask, "mask", valid=valid), pool_features(hidden, mask, "mask"))
    valid[2] = False
    with pytest.raises(ValueError, match=r"valid: rows \[2\] have no valid"):
        pool_features(hidden, None, "mean", valid=valid)
    with pytest.raises(ValueError, match="valid has shape"):
        pool_features(hidden, None, "last", valid=valid[:, :4])


def test_episode_features_is_one_forward_with_a_task_dim() -> None:
    model = tiny_model()
    calls = count_backbone_runs(model)
    eps = [random_episode(s) for s in range(3)]
    out = episode_features(model, Episode.stack(eps), "before_mask", "center")
    assert isinstance(out, EpisodeFeatures) and calls == [3 * N * (K + Q)]
    xs, ys, xq, yq = out
    assert xs.shape == (3, N * K, 16) and xq.shape == (3, N * Q, 16)
    assert ys.shape == (3, N * K) and yq.shape == (3, N * Q)
    for t, ep in enumerate(eps):  # the same as pooling and normalising each task by hand
        with torch.no_grad():
            hid = model(torch.cat([ep.support_ids, ep.query_ids]), return_hidden=True)[1]
            f = pool_features(hid, torch.cat([ep.support_mask, ep.query_mask]), "before_mask")
            ref_s, ref_q = normalize_task_features(f[: N * K], f[N * K :], "center")
        torch.testing.assert_close(xs[t].detach(), ref_s, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(xq[t].detach(), ref_q, rtol=1e-5, atol=1e-6)
        assert torch.equal(ys[t], ep.support_labels) and torch.equal(yq[t], ep.query_labels)
    one = episode_features(model, eps[0], "mean")  # a single task gets T = 1
    assert one.support_feats.shape == (1, N * K, 16) and one.query_labels.shape == (1, N * Q)


def test_episode_features_dtype_and_features_callable() -> None:
    model = tiny_model()
    ep = random_episode()
    ref = episode_features(model, ep, "mask")
    assert ref.support_feats.dtype == torch.float32
    assert episode_features(model, ep, "mask", dtype=torch.float64).query_feats.dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):  # low-precision features: float32 by default
        assert episode_features(model, ep, "mask").support_feats.dtype == torch.float32
    # features=: any ids -> (B, L, D) callable instead of the model's hidden states
    calls: list[int] = []

    def trunk(ids: torch.Tensor) -> torch.Tensor:
        calls.append(ids.shape[0])
        return model.hidden_states(ids)

    got = episode_features(None, ep, "mask", features=trunk)
    assert calls == [N * (K + Q)]
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)


def test_episode_features_errors() -> None:
    model, ep = tiny_model(), random_episode()
    with pytest.raises(ValueError, match="model"):
        episode_features(None, ep)
    with pytest.raises(ValueError, match="features: hidden states of shape"):
        episode_features(None, ep, "mean", features=lambda ids: torch.zeros(ids.shape[0], 4))
    bad = Episode(**{**vars(ep), "query_labels": ep.query_labels[:-1]})
    with pytest.raises(ValueError, match="query_labels"):
        episode_features(model, bad)
    bad = Episode(**{**vars(ep), "query_ids": ep.query_ids[0]})
    with pytest.raises(ValueError, match="episode: ids must be"):
        episode_features(model, bad)
    with pytest.raises(ValueError, match="pooling"):
        episode_features(model, ep, "max")


def count_backbone_runs(model: PicoDecoder) -> list[int]:
    calls: list[int] = []
    model.embed_tokens.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    return calls


@pytest.mark.parametrize("pooling", ["mask", "before_mask", "last", "mean"])
def test_meta_loss_runs_the_backbone_once(pooling: str) -> None:
    model = tiny_model()
    calls = count_backbone_runs(model)
    head = MetaHead(16, N, hidden_dims=(8,))
    loop = InnerLoop(steps=5, lr=0.3)
    ep = random_episode()
    out = meta_loss(model, head, loop, ep, pooling=pooling)
    out.loss.backward()
    assert calls == [N * (K + Q)]  # one forward over support and query windows together
    assert model.embed_tokens.weight.grad is not None and model.embed_tokens.weight.grad.abs().sum() > 0
    # same numbers as pooling by hand and calling the loop
    with torch.no_grad():
        hid = model(torch.cat([ep.support_ids, ep.query_ids]), return_hidden=True)[1]
        feats = pool_features(hid, torch.cat([ep.support_mask, ep.query_mask]), pooling)
        ref = loop(head, feats[: N * K], ep.support_labels, feats[N * K :], ep.query_labels)
    torch.testing.assert_close(out.loss.detach(), ref.loss, rtol=1e-5, atol=1e-6)


def test_meta_loss_stacked_tasks_one_forward_and_equal_to_separate() -> None:
    model = tiny_model()
    calls = count_backbone_runs(model)
    head = MetaHead(16, N, init="prototype")
    loop = InnerLoop(steps=3, lr=0.3)
    eps = [random_episode(s) for s in range(3)]
    out = meta_loss(model, head, loop, Episode.stack(eps))
    assert calls == [3 * N * (K + Q)]
    separate = torch.stack([meta_loss(model, head, loop, e).loss for e in eps]).mean()
    torch.testing.assert_close(out.loss, separate, rtol=1e-5, atol=1e-6)
    assert out.params["out.weight"].shape == (3, N, 16)


def test_meta_loss_under_autocast() -> None:
    model = tiny_model()
    head = MetaHead(16, N, hidden_dims=(8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = meta_loss(model, head, InnerLoop(steps=2, lr=0.3), random_episode())
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())


def test_meta_loss_with_a_stand_in_backbone_without_hidden_states() -> None:
    class Backbone(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(V, 8)
            self.calls = 0

        def forward(self, ids, return_hidden=False):
            self.calls += 1
            h = self.emb(ids)
            return h @ self.emb.weight.T, h

    model = Backbone()
    out = meta_loss(model, MetaHead(8, N), InnerLoop(steps=2, lr=0.5), random_episode(), pooling="mean")
    assert model.calls == 1 and torch.isfinite(out.loss)


# ---------------------------------------------------------------------- bad input and non-finite features


def test_lm_loss_refuses_a_target_outside_the_vocabulary_before_the_loss() -> None:
    model = tiny_model()
    tokens = torch.randint(0, V, (2, 9))
    tokens[1, -1] = V  # only a target: the model never sees it as an input
    with pytest.raises(ValueError, match=rf"^tokens: target ids must lie in \[0, {V}\).*got min \d+ and max {V}"):
        lm_loss(model, tokens)
    # a model whose embedding is larger than its output: the logits' last dim is the vocabulary
    wide = torch.nn.Sequential(torch.nn.Embedding(100, 8), torch.nn.Linear(8, 50))
    ok = torch.randint(0, 50, (2, 6))
    assert torch.isfinite(lm_loss(wide, ok))
    ok[0, 3] = 70
    with pytest.raises(ValueError, match=r"tokens: target ids must lie in \[0, 50\)"):
        lm_loss(wide, ok)
    ok[0, 3], ok[1, -1] = 7, -100  # ignore_index is not a target
    assert torch.isfinite(lm_loss(wide, ok))


def test_meta_loss_checks_the_feature_width_and_the_episode_before_the_forward() -> None:
    model = tiny_model()
    calls = count_backbone_runs(model)
    loop = InnerLoop(steps=1, lr=0.1)
    with pytest.raises(ValueError, match=r"head.in_dim: the head takes 24-dim features but the backbone's hidden size"
                       r" \(model.config\) is 16"):
        meta_loss(model, MetaHead(24, N), loop, random_episode())
    for bad in (None, {"support_ids": torch.zeros(2, 2)}, "episode"):
        with pytest.raises(TypeError, match="^episode: expected an Episode"):
            meta_loss(model, MetaHead(16, N), loop, bad)
    assert calls == []  # nothing ran
    # a features callable whose width only the forward reveals
    with pytest.raises(ValueError, match="head.in_dim: the head takes 16-dim features but the width of the"):
        meta_loss(None, MetaHead(16, N), loop, random_episode(), features=lambda ids: torch.zeros(*ids.shape, 12))


def inf_hook(module, inputs, output):  # one Inf in the backbone output of the first support window
    output = output.clone()
    output[0, 3, 0] = float("inf")
    return output


def test_meta_loss_propagates_nonfinite_features_as_a_nan_loss_that_backpropagates() -> None:
    model, head, loop = tiny_model(), MetaHead(16, N, hidden_dims=(8,)), InnerLoop(steps=2, lr=0.3)
    ep = random_episode()
    handle = model.norm.register_forward_hook(inf_hook)
    with pytest.raises(ValueError, match="support_feats contains NaN or Inf"):
        meta_loss(model, head, loop, ep, nonfinite="raise")  # the library's explicit error is kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = meta_loss(model, head, loop, ep)  # "propagate" is the default: nothing read, nothing said
    handle.remove()
    assert torch.isnan(out.loss) and out.loss.requires_grad
    assert out.metrics["nonfinite_features"] == 1.0 and out.metrics["query_loss"] != out.metrics["query_loss"]
    out.loss.backward()  # runs: every rank of a DDP run reaches its all-reduce
    finite_run = tiny_model()
    meta_loss(finite_run, head, loop, ep).loss.backward()
    with_grad = [n for n, p in finite_run.named_parameters() if p.grad is not None]
    # the same parameters as in a finite step get gradients (DDP's buckets match), and some are NaN
    assert [n for n, p in model.named_parameters() if p.grad is not None] == with_grad
    assert not all(torch.isfinite(p.grad).all() for n, p in model.named_parameters() if n in with_grad)
    assert all(torch.isnan(p.grad).any() for p in head.parameters())  # so the trainer skips the step


def test_meta_loss_finite_features_identical_in_both_modes() -> None:
    results = []
    for mode in ("raise", "propagate"):
        model, head = tiny_model(), MetaHead(16, N, hidden_dims=(8,))
        loop = InnerLoop(steps=2, lr=0.3, learn_lr="per_tensor", head=head)
        out = meta_loss(model, head, loop, Episode.stack([random_episode(0), random_episode(1)]), nonfinite=mode)
        out.loss.backward()
        grads = [p.grad for m in (model, head, loop) for p in m.parameters()]
        results.append((out.loss.detach(), out.metrics, grads))
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and metrics_a == metrics_b and metrics_a["nonfinite_features"] == 0.0
    assert [g is None for g in grads_a] == [g is None for g in grads_b]
    assert all(a is None or torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    with pytest.raises(ValueError, match="nonfinite: must be one of"):
        meta_loss(tiny_model(), MetaHead(16, N), InnerLoop(), random_episode(), nonfinite="skip")
