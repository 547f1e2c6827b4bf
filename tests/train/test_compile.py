"""torch.compile of the backbone: no graph breaks, and compiled results equal eager ones (a tiny model).

A handful of inductor compiles (the loss of a PicoDecoder and of a wrapped one, forward with
``return_hidden``, ``hidden_states``, the meta step), all on a 2-layer, 16-wide decoder; the graph-break
checks only trace (``torch._dynamo.explain``).
"""

from __future__ import annotations

import logging

import pytest
import torch

import picomaml as pm
from picomaml.meta.episode import Episode
from picomaml.train.compile import (
    compile_backbone,
    compiled_loss,
    eager_forward,
    eager_hidden_states,
    eager_mode,
    is_compiled,
)

V, W, N, K, Q, MASK = 64, 10, 3, 2, 2, 1
TOL = dict(rtol=1e-4, atol=1e-5)


def tiny_model(seed: int = 0) -> pm.PicoDecoder:
    torch.manual_seed(seed)
    cfg = pm.PicoDecoderConfig(
        vocab_size=V, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=32
    )
    return pm.PicoDecoder(cfg)


def random_episode(seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)

    def part(rows: int, per: int):
        ids = torch.randint(2, V, (rows, W), generator=g)
        mask = torch.rand(rows, W, generator=g) < 0.2
        mask[:, 3] = True
        ids[mask] = MASK
        return ids, torch.arange(N).repeat_interleave(per), mask

    return Episode(*part(N * K, K), *part(N * Q, Q), torch.arange(10, 10 + N))


@pytest.fixture(scope="module", autouse=True)
def fresh_dynamo():
    """No cached graphs or recompile counts from other test modules in, none of ours out (nor the
    process-wide donated-buffer setting compile_backbone makes)."""
    import torch._functorch.config as functorch_config

    donated = functorch_config.donated_buffer
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    functorch_config.donated_buffer = donated


@pytest.fixture(scope="module", autouse=True)
def chunked_loss():
    """The compiled loss runs over chunks of 8 rows (6 chunks of the 45 rows here, the last ragged) as a
    large-vocabulary model does, checked against the eager loss of the whole logits."""
    from picomaml.meta import backbone

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backbone, "_LOSS_CHUNK_BYTES", 4 * V * 8)
        yield


@pytest.fixture(scope="module")
def pair():
    """An eager decoder and a compiled one with the same weights."""
    eager = tiny_model()
    compiled = tiny_model()
    compiled.load_state_dict(eager.state_dict())
    return eager, compile_backbone(compiled)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_grads(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_zero_graph_breaks():
    model = tiny_model()
    ids = torch.randint(0, V, (2, 12))
    calls = {
        "forward": model,
        "return_hidden": lambda x: model(x, return_hidden=True),
        "hidden_states": model.hidden_states,
    }
    for name, fn in calls.items():
        torch._dynamo.reset()
        explained = torch._dynamo.explain(fn)(ids)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), (name, explained.break_reasons)
    torch._dynamo.reset()


def test_compiled_forward_and_gradients_match_eager(pair, caplog):
    eager, compiled = pair
    ids = torch.randint(0, V, (3, 16), generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.INFO, logger="picomaml.train.compile"):
        pm.lm_loss(compiled, ids).backward()  # compiles forward + cross-entropy and its backward
    assert any("PicoDecoder forward + cross-entropy first call in" in r.getMessage() for r in caplog.records)
    got = grads(compiled)
    pm.lm_loss(eager, ids).backward()
    assert_same_grads(grads(eager), got)
    loss = pm.lm_loss(compiled, ids)  # two gradients of one graph (PCGrad, gradient-conflict metrics)
    kept = torch.autograd.grad(loss, list(compiled.parameters()), retain_graph=True)
    loss.backward()
    for g, p in zip(kept, compiled.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g)
    compiled.zero_grad(set_to_none=True)
    # why the inner loop never differentiates through a compiled graph: PyTorch refuses (not silently wrong)
    first = torch.autograd.grad(pm.lm_loss(compiled, ids), list(compiled.parameters()), create_graph=True)
    with pytest.raises(RuntimeError, match="does not currently support double backward"):
        sum(g.square().sum() for g in first).backward()
    compiled.zero_grad(set_to_none=True)

    logits, hidden = compiled(ids, return_hidden=True)  # a second graph (return_hidden is a constant)
    ref_logits, ref_hidden = eager(ids, return_hidden=True)
    torch.testing.assert_close(logits, ref_logits, **TOL)
    torch.testing.assert_close(hidden, ref_hidden, **TOL)
    (logits.square().mean() + hidden.sum()).backward()
    got = grads(compiled)
    (ref_logits.square().mean() + ref_hidden.sum()).backward()
    assert_same_grads(grads(eager), got)

    # the eager originals stay reachable, and eager paths keep their checks and messages
    assert is_compiled(compiled) and not is_compiled(eager)
    torch.testing.assert_close(eager_forward(compiled)(ids), ref_logits.detach(), **TOL)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 64\), got min 64 and max 64"):
        compiled(torch.full((1, 4), V))  # checked before the compiled graph runs
    targets = torch.full((1, 4), 3)
    targets[0, 2] = V  # a target outside the vocabulary: lm_loss's ValueError before the fused graph runs
    with pytest.raises(ValueError, match=r"tokens: target ids must lie in \[0, 64\)"):
        pm.lm_loss(compiled, targets)
    assert compiled_loss(compiled) is not None and compiled_loss(eager) is None
    with eager_mode(compiled):
        assert "forward" not in vars(compiled) and compiled_loss(compiled) is None  # lm_loss runs eagerly
        torch.testing.assert_close(pm.lm_loss(compiled, ids), pm.lm_loss(eager, ids), **TOL)
    assert "forward" in vars(compiled) and compiled_loss(compiled) is not None
    assert compile_backbone(compiled) is compiled  # compiling twice is a no-op


def test_compiled_cross_entropy_ignores_targets_as_eager(pair):
    """The compiled loss's cross-entropy (logsumexp - picked logit) leaves out padded / ignored targets
    exactly as F.cross_entropy does, values and gradients; all ignored is NaN in both."""
    eager, compiled = pair
    ids = torch.randint(0, V, (3, 16), generator=torch.Generator().manual_seed(2))  # the shape compiled above
    ids[:, 5:9] = 7
    from picomaml.meta.backbone import _loss_chunk_rows

    assert _loss_chunk_rows(compiled, ids[:, :-1]) == 8  # the compiled loss runs in chunks (chunked_loss)
    pm.lm_loss(compiled, ids, pad_id=7).backward()
    got = grads(compiled)
    pm.lm_loss(eager, ids, pad_id=7).backward()
    assert_same_grads(grads(eager), got)
    with torch.no_grad():
        torch.testing.assert_close(pm.lm_loss(compiled, ids, pad_id=7), pm.lm_loss(eager, ids, pad_id=7), **TOL)
        assert not torch.isclose(pm.lm_loss(compiled, ids), pm.lm_loss(compiled, ids, pad_id=7))
        flat = torch.full((3, 16), 7)
        assert pm.lm_loss(compiled, flat, pad_id=7).isnan() and pm.lm_loss(eager, flat, pad_id=7).isnan()


def test_compiled_loss_of_another_model_takes_the_whole_logits(pair):
    """A model that is not a PicoDecoder (here one wrapping it, with a config that gives vocab_size) gets
    the compiled loss over its whole logits (next_token_ce under compile): eager values and gradients."""
    eager, _ = pair

    class Wrapped(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.inner(ids)

    inner = tiny_model()
    inner.load_state_dict(eager.state_dict())
    wrapped = compile_backbone(Wrapped(inner))
    assert compiled_loss(wrapped) is not None
    ids = torch.randint(0, V, (3, 16), generator=torch.Generator().manual_seed(3))
    ids[:, 2:5] = 7
    loss = pm.lm_loss(wrapped, ids, pad_id=7)
    loss.backward()
    got = {name.removeprefix("inner."): g for name, g in grads(wrapped).items()}
    ref = pm.lm_loss(eager, ids, pad_id=7)
    ref.backward()
    torch.testing.assert_close(loss, ref, **TOL)
    assert_same_grads(grads(eager), got)


def test_generation_with_a_kv_cache_runs_eagerly(pair):
    eager, compiled = pair
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    prompt = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(
        compiled.generate(prompt, max_new_tokens=3), eager.generate(prompt, max_new_tokens=3)
    )
    assert counters["stats"]["unique_graphs"] == before


@pytest.mark.parametrize("adapt_layers", [0, 1])
def test_meta_loss_through_a_compiled_backbone_matches_eager(pair, adapt_layers):
    """Head second order (features from the compiled ``hidden_states``), and ``adapt_layers=1`` (the eager
    ``hidden_states`` captures the block inputs; no graph is compiled for it)."""
    from torch._dynamo.utils import counters

    eager, compiled = pair
    episode = Episode.stack([random_episode(0), random_episode(1)])
    results = []
    for model in (eager, compiled):
        torch.manual_seed(3)
        head = pm.MetaHead(16, N, hidden_dims=(8,))
        loop = pm.InnerLoop(steps=2, lr=0.3)
        before = counters["stats"]["unique_graphs"]
        out = pm.meta_loss(model, head, loop, episode, adapt_layers=adapt_layers)
        out.loss.backward()
        if model is compiled and adapt_layers:
            assert counters["stats"]["unique_graphs"] == before  # block capture ran eagerly
        results.append((out.loss.detach(), grads(model), grads(head)))
    (loss_e, backbone_e, head_e), (loss_c, backbone_c, head_c) = results
    torch.testing.assert_close(loss_c, loss_e, **TOL)
    assert_same_grads(backbone_e, backbone_c)
    assert_same_grads(head_e, head_c)
    assert eager_hidden_states(compiled) is not compiled.hidden_states
