"""Few-shot evaluation: deterministic, accuracies in range, NCM perfect on a separable stand-in, CIs right."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import picomaml as pm
from picomaml.eval.fewshot import (
    FewShotResult,
    fewshot_eval,
    format_fewshot_table,
    head_for_n_way,
    nearest_class_mean,
)
from picomaml.eval.stats import mean_ci, t_quantile
from picomaml.meta.head import MetaHead
from picomaml.meta.inner_loop import InnerLoop
from picomaml.model.config import PicoDecoderConfig
from picomaml.model.decoder import PicoDecoder

MASK = 1
V = 48
NOISE = tuple(range(40, 48))


def _separable_rows() -> torch.Tensor:
    """18 groups of 2 rows; a row holds only its group's pair (a, b) plus noise, so the unmasked companion
    token identifies the class of every window."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(18):
        a, b = 2 + 2 * i, 3 + 2 * i
        for _ in range(2):
            row = torch.tensor([a, b, 0] * 22)[:64]
            noise = row == 0
            row[noise] = torch.randint(NOISE[0], NOISE[-1] + 1, (int(noise.sum()),), generator=g)
            rows.append(row)
    return torch.stack(rows)


class BagOfTokens(nn.Module):
    """A stand-in backbone: the hidden state at every position is the one-hot mean of the whole window."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def hidden_states(self, ids: torch.Tensor) -> torch.Tensor:
        bag = nn.functional.one_hot(ids, V).float().mean(1, keepdim=True)
        return bag.expand(-1, ids.shape[1], -1) + 0 * self.dummy


def _tiny_decoder() -> PicoDecoder:
    torch.manual_seed(0)
    return PicoDecoder(
        PicoDecoderConfig(
            vocab_size=V, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=64
        )
    )


COMMON = dict(n_way=5, k_shot=2, n_query=3, mask_token_id=MASK, window_len=8, exclude_token_ids=NOISE)


def test_nearest_class_mean_rule():
    xs = torch.tensor([[0.0, 0.0], [0.0, 2.0], [10.0, 0.0], [10.0, 2.0]])
    ys = torch.tensor([0, 0, 1, 1])
    xq = torch.tensor([[1.0, 1.0], [6.0, 1.0], [4.9, 100.0]])
    assert nearest_class_mean(xs, ys, xq, 2).tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="classes \\[2\\]"):
        nearest_class_mean(xs, ys, xq, 3)


def test_ncm_is_perfect_on_separable_stand_in():
    model = BagOfTokens()
    head = MetaHead(V, 5, init="prototype")
    loop = InnerLoop(steps=3, lr=0.1)
    res = fewshot_eval(
        model, _separable_rows(), episodes=20, head=head, inner_loop=loop, pooling="mean", seed=0, **COMMON
    )
    assert res.acc_ncm == 1.0 and res.acc_ncm_ci == 0.0
    assert res.acc_after is not None and res.acc_after >= 0.95
    assert res.chance == pytest.approx(0.2)


def test_deterministic_and_seed_dependent():
    model, rows = _tiny_decoder(), _separable_rows()
    head = MetaHead(16, 5, hidden_dims=(8,), init="xavier", seed=1)
    loop = InnerLoop(steps=2, lr=0.5)
    kwargs = dict(episodes=6, head=head, inner_loop=loop, **COMMON)
    a = fewshot_eval(model, rows, seed=3, **kwargs)
    b = fewshot_eval(model, rows, seed=3, **kwargs)
    c = fewshot_eval(model, rows, seed=4, **kwargs)
    assert a == b
    assert a.per_episode_ncm != c.per_episode_ncm or a.per_episode_after != c.per_episode_after
    for r in (a, c):
        assert all(0.0 <= x <= 1.0 for x in (*r.per_episode_ncm, *r.per_episode_after))
        assert 0.0 <= r.acc_ncm <= 1.0 and 0.0 <= r.acc_after <= 1.0
        assert len(r.per_episode_ncm) == len(r.per_episode_after) == 6


def test_results_do_not_depend_on_episodes_per_batch():
    model, rows = _tiny_decoder(), _separable_rows()
    head = MetaHead(16, 5, hidden_dims=(8,), init="prototype", seed=1)
    loop = InnerLoop(steps=2, lr=0.5)
    kwargs = dict(episodes=7, head=head, inner_loop=loop, seed=1, **COMMON)
    one = fewshot_eval(model, rows, episodes_per_batch=1, **kwargs)
    three = fewshot_eval(model, rows, episodes_per_batch=3, **kwargs)
    assert one.per_episode_ncm == three.per_episode_ncm
    assert one.per_episode_after == three.per_episode_after


def test_leaves_model_head_and_loop_untouched():
    model, rows = _tiny_decoder(), _separable_rows()
    head = MetaHead(16, 5, init="xavier")
    loop = InnerLoop(steps=2, lr=0.5)
    model.train(), head.train(), loop.train()
    before = {k: v.clone() for k, v in head.state_dict().items() if torch.is_tensor(v)}
    rng = torch.get_rng_state()
    fewshot_eval(model, rows, episodes=3, head=head, inner_loop=loop, **COMMON)
    assert model.training and head.training and loop.training
    assert all(p.grad is None for p in [*model.parameters(), *head.parameters()])
    for k, v in head.state_dict().items():
        if torch.is_tensor(v) and k in before:
            assert torch.equal(v, before[k])
    assert torch.equal(torch.get_rng_state(), rng)


def test_ci_half_width_is_student_t_over_episodes():
    res = fewshot_eval(_tiny_decoder(), _separable_rows(), episodes=8, seed=2, **COMMON)
    xs = res.per_episode_ncm
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    assert res.acc_ncm == pytest.approx(m)
    assert res.acc_ncm_ci == pytest.approx(t_quantile(0.975, 7) * s / math.sqrt(8))
    assert (res.acc_ncm, res.acc_ncm_ci) == pytest.approx(mean_ci(xs))
    assert res.acc_after is None and res.acc_after_ci is None  # no head given


def test_prototype_head_of_other_n_way_is_rebuilt_and_factories_work():
    trained = MetaHead(16, 8, hidden_dims=(12,), init="prototype", seed=5)
    five = head_for_n_way(trained, 5)
    assert five.n_way == 5 and torch.equal(five.hidden[0].weight, trained.hidden[0].weight)
    with pytest.raises(ValueError, match="cannot score"):
        head_for_n_way(MetaHead(16, 8, init="xavier"), 5)
    loop = InnerLoop(steps=1, lr=0.1)
    res = fewshot_eval(
        _tiny_decoder(),
        _separable_rows(),
        episodes=2,
        inner_loop=loop,
        head=lambda n: MetaHead(16, n, init="zeros"),
        **COMMON,
    )
    assert res.acc_after is not None


def test_bad_arguments():
    with pytest.raises(ValueError, match="episodes"):
        fewshot_eval(_tiny_decoder(), _separable_rows(), episodes=0, **COMMON)
    with pytest.raises(ValueError, match="episodes_per_batch"):
        fewshot_eval(_tiny_decoder(), _separable_rows(), episodes_per_batch=0, **COMMON)
    with pytest.raises(ValueError, match="inner_loop"):
        fewshot_eval(_tiny_decoder(), _separable_rows(), head=MetaHead(16, 5), **COMMON)


def test_table_shows_chance():
    r = FewShotResult(
        n_way=5,
        k_shot=4,
        n_query=4,
        episodes=100,
        acc_ncm=0.41234,
        acc_ncm_ci=0.0211,
        acc_after=None,
        acc_after_ci=None,
        chance=0.2,
    )
    table = format_fewshot_table([r])
    assert "| 5-way 4-shot (4 query) | 100 | 0.412 ± 0.021 | n/a | n/a | 0.200 |" in table
    header = table.splitlines()[0]
    assert "chance" in header
    assert header.index("NCM before") < header.index("linear probe") < header.index("after inner loop")
    assert r.metrics("eval/fewshot_5w4s")["eval/fewshot_5w4s_acc"] == pytest.approx(0.41234)
    assert "eval/fewshot_5w4s_acc_probe" not in r.metrics("eval/fewshot_5w4s")
    r.acc_probe, r.acc_probe_ci = 0.5, 0.03
    assert "| 0.412 ± 0.021 | 0.500 ± 0.030 | n/a | 0.200 |" in format_fewshot_table(r)
    metrics = r.metrics("eval/fewshot_5w4s")
    assert metrics["eval/fewshot_5w4s_acc_probe"] == 0.5 and metrics["eval/fewshot_5w4s_acc_probe_ci"] == 0.03


def test_probe_accuracy_is_reported_per_episode():
    res = fewshot_eval(BagOfTokens(), _separable_rows(), episodes=5, pooling="mean", seed=0, **COMMON)
    # far above chance (0.2); below NCM's 1.0: standardising gives the noise-token dims unit scale too
    assert len(res.per_episode_probe) == 5 and res.acc_probe > 0.5
    res = fewshot_eval(_tiny_decoder(), _separable_rows(), episodes=4, seed=1, **COMMON)
    assert len(res.per_episode_probe) == 4 and all(0.0 <= a <= 1.0 for a in res.per_episode_probe)
    assert res.acc_probe == pytest.approx(sum(res.per_episode_probe) / 4)


def test_a_model_with_nan_weights_scores_nan_with_a_warning_instead_of_raising():
    model, rows = _tiny_decoder(), _separable_rows()
    head, loop = MetaHead(16, 5, hidden_dims=(8,), seed=1), InnerLoop(steps=2, lr=0.5)
    with torch.no_grad():
        model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.warns(RuntimeWarning, match="few-shot evaluation: the features of 4 of 4 episodes hold NaN or Inf"):
        res = fewshot_eval(model, rows, episodes=4, head=head, inner_loop=loop, **COMMON)
    for value in (res.acc_ncm, res.acc_after, res.acc_probe, *res.per_episode_ncm, *res.per_episode_probe):
        assert math.isnan(value)
    assert res.episodes == 4 and res.chance == pytest.approx(0.2)


def test_a_nan_head_scores_nan_after_adaptation_and_the_backbone_baselines_stay():
    model, rows = _tiny_decoder(), _separable_rows()
    loop, kwargs = InnerLoop(steps=2, lr=0.5), dict(episodes=3, seed=2, **COMMON)
    good = fewshot_eval(model, rows, head=MetaHead(16, 5, seed=1), inner_loop=loop, **kwargs)
    head = MetaHead(16, 5, seed=1)
    with torch.no_grad():
        head.out.weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="the adapted head gives NaN or Inf logits on 3 of 3 episodes"):
        res = fewshot_eval(model, rows, head=head, inner_loop=loop, **kwargs)
    assert math.isnan(res.acc_after) and all(math.isnan(a) for a in res.per_episode_after)
    assert res.per_episode_ncm == good.per_episode_ncm and res.per_episode_probe == good.per_episode_probe


def test_adapt_layers_adapts_the_top_block_for_the_accuracy_after_adaptation():
    """With adapt_layers the accuracy after adaptation is that of meta_loss's adapted head and block; the
    nearest-class-mean and probe accuracies keep the frozen features."""
    import picomaml as pm
    from picomaml.eval.fewshot import score_episode_batch

    model = pm.PicoDecoder(pm.PicoDecoderConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1,
                                                ffn_dim=32, max_seq_len=16, init_std=0.2))  # fmt: skip
    rows = torch.randint(3, 64, (64, 128), generator=torch.Generator().manual_seed(0))
    ep = pm.SMLMTSampler(n_way=3, k_shot=2, n_query=2, mask_token_id=2, window_len=12, seed=0).sample(rows, n_tasks=3)
    head, loop = pm.MetaHead(16, 3), pm.InnerLoop(steps=3, lr=1.0)
    before0, after0, probe0 = score_episode_batch(model, ep, "before_mask", 3, head, loop)
    before1, after1, probe1 = score_episode_batch(model, ep, "before_mask", 3, head, loop, adapt_layers=1)
    assert before0 == before1 and probe0 == probe1
    logits = pm.meta_loss(model, head, loop, ep, adapt_layers=1).query_logits
    assert after1 == (logits.argmax(-1) == ep.query_labels).float().mean(-1).tolist()
    assert all(p.grad is None for p in model.parameters())


def test_fewshot_eval_takes_features_and_wrapped_models():
    """A module that gives no hidden states itself is evaluated through features=, as meta_loss takes it;
    a compiled model as it is held gives the plain model's numbers."""
    from backbones import NanoGPT, V

    rows = torch.randint(3, V, (32, 64), generator=torch.Generator().manual_seed(0))
    nano = NanoGPT()
    kw = dict(n_way=3, k_shot=2, n_query=2, mask_token_id=2, window_len=8, episodes=4, seed=0)
    head = pm.MetaHead(16, 3)
    loop = InnerLoop(steps=2, lr=0.5)
    a = pm.fewshot_eval(nano, rows, features=nano.trunk, head=head, inner_loop=loop, **kw)
    b = pm.fewshot_eval(None, rows, features=nano.trunk, head=head, inner_loop=loop, **kw)
    c = pm.fewshot_eval(nano, rows, features=nano.trunk, head=head, inner_loop=loop, adapt=["mix.*"], **kw)
    assert a.acc_ncm == b.acc_ncm and a.acc_after == b.acc_after and c.acc_ncm == a.acc_ncm
    with pytest.raises(ValueError, match="model: pass a backbone, or a features callable"):
        pm.fewshot_eval(None, rows, **kw)
    model = pm.PicoDecoder(pm.PicoDecoderConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                                                ffn_dim=32, max_seq_len=8))  # fmt: skip
    plain = pm.fewshot_eval(model, rows, head=head, inner_loop=loop, **kw)
    compiled = pm.fewshot_eval(torch.compile(model), rows, head=head, inner_loop=loop, **kw)
    assert plain.acc_ncm == compiled.acc_ncm and plain.acc_after == compiled.acc_after
