"""Token-weighted perplexity against a naive per-token computation; not a mean of per-row perplexities."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from picomaml.eval.perplexity import perplexity
from picomaml.model.config import PicoDecoderConfig
from picomaml.model.decoder import PicoDecoder

V = 40


def _decoder():
    torch.manual_seed(0)
    cfg = PicoDecoderConfig(
        vocab_size=V, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=32
    )
    return PicoDecoder(cfg)


class Bigram(nn.Module):
    """logits[t] = table[ids[t]]: a model whose per-token losses are easy to control."""

    def __init__(self) -> None:
        super().__init__()
        table = torch.zeros(V, V)
        table[1, 1] = 20.0  # after 1, predict 1 almost surely
        self.table = nn.Parameter(table)

    def forward(self, ids):
        return self.table[ids]


def _naive(model, rows, ignore=None):
    nll, n = 0.0, 0
    with torch.no_grad():
        for r in rows:
            logp = torch.log_softmax(model(r[None])[0].double(), -1)
            for t in range(len(r) - 1):
                if ignore is not None and int(r[t + 1]) == ignore:
                    continue
                nll -= float(logp[t, r[t + 1]])
                n += 1
    return math.exp(nll / n), n


def test_equals_naive_token_weighted_value_with_ragged_rows():
    model = _decoder()
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, V, (n,), generator=g) for n in (5, 17, 9, 2, 30, 11)]
    expected, n = _naive(model, rows)
    for bs in (1, 4, 6):
        out = perplexity(model, rows, batch_size=bs)
        assert out["tokens"] == n == sum(len(r) - 1 for r in rows)
        assert out["perplexity"] == pytest.approx(expected, rel=1e-5)
        assert out["loss"] == pytest.approx(math.log(expected), rel=1e-5)


def test_tensor_rows_and_ignore_index():
    model = _decoder()
    rows = torch.randint(1, V, (5, 12), generator=torch.Generator().manual_seed(1))
    rows[:, 8:] = 0  # padding inside the rows
    expected, n = _naive(model, list(rows), ignore=0)
    out = perplexity(model, rows, batch_size=2, ignore_index=0)
    assert out["tokens"] == n == 5 * 7
    assert out["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_differs_from_mean_of_per_row_perplexities():
    model = Bigram()
    easy = torch.ones(41, dtype=torch.long)  # 40 nearly free predictions
    hard = torch.tensor([2, 3, 4, 5, 6])  # 4 predictions at uniform odds: ppl = V
    out = perplexity(model, [easy, hard])
    per_row = [perplexity(model, [r])["perplexity"] for r in (easy, hard)]
    assert per_row[1] == pytest.approx(V, rel=1e-6) and per_row[0] == pytest.approx(1.0, abs=1e-6)
    expected = math.exp((40 * math.log(per_row[0]) + 4 * math.log(V)) / 44)
    assert out["perplexity"] == pytest.approx(expected, rel=1e-6)  # ~ 40 ** (4 / 44) = 1.40
    assert sum(per_row) / 2 > 10 * out["perplexity"]  # the mean of per-row values (~20.5) is far off


def test_restores_mode_and_leaves_no_grad():
    model = _decoder()
    model.train()
    perplexity(model, torch.randint(0, V, (3, 8)))
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    perplexity(model, torch.randint(0, V, (3, 8)))
    assert not model.training


def test_bad_input():
    model = _decoder()
    with pytest.raises(ValueError, match="rows"):
        perplexity(model, torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(model, torch.zeros(2, 8, dtype=torch.long), batch_size=0)
    with pytest.raises(ValueError, match="no predicted tokens"):
        perplexity(model, [torch.tensor([3])])


def test_a_nan_or_diverged_model_reports_nan_or_inf_instead_of_raising():
    model, rows = _decoder(), torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="perplexity: the mean loss is nan"):
        out = perplexity(model, rows)
    assert math.isnan(out["perplexity"]) and math.isnan(out["loss"]) and out["tokens"] == 33
    huge = Bigram()
    with torch.no_grad():
        huge.table.copy_(torch.randn(V, V, generator=torch.Generator().manual_seed(1)) * 1e4)
    out = perplexity(huge, rows)  # a finite loss of thousands of nats: exp overflows a float
    assert out["loss"] > 710 and math.isfinite(out["loss"]) and out["perplexity"] == math.inf


def test_target_ids_outside_the_vocabulary_are_a_clear_error():
    rows = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(0))
    rows[1, -1] = V + 3  # only a target: the model never embeds it
    with pytest.raises(ValueError, match=rf"^ids: target ids must lie in \[0, {V}\).*got max {V + 3}"):
        perplexity(Bigram(), rows)
