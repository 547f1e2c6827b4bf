"""Battery: bad input to the library's functions is a short error that names the argument, raised before
any work (issue 13, item 11).

Each case is one call with one bad argument; it must raise the given exception type (``ConfigError`` and
the sampler's errors are ``ValueError`` subclasses) with a message under 400 characters that names the
argument. Cases marked ``before_forward`` also check that the backbone never ran.
"""

from __future__ import annotations

import re

import pytest
import torch

import picomaml as pm
from picomaml.eval.perplexity import perplexity
from picomaml.eval.probe import linear_probe_accuracy
from picomaml.meta.episode import EpisodeError
from picomaml.meta.learner import HybridLearner
from picomaml.meta.smlmt import SamplingError, TokensTypeError
from picomaml.params import ConfigError
from picomaml.train.training import NonFiniteGuard

V, D, N, K, Q, W, MASK = 64, 16, 3, 2, 2, 8, 1


def model() -> pm.PicoDecoder:
    cfg = pm.PicoDecoderConfig(vocab_size=V, d_model=D, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32,
                               max_seq_len=32)  # fmt: skip
    return pm.PicoDecoder(cfg, generator=torch.Generator().manual_seed(0))


def head(in_dim: int = D, **kw) -> pm.MetaHead:
    return pm.MetaHead(in_dim, N, **kw)


def loop() -> pm.InnerLoop:
    return pm.InnerLoop(steps=1, lr=0.1)


def episode(**change) -> pm.Episode:
    g = torch.Generator().manual_seed(0)

    def part(per: int):
        ids = torch.randint(13, V, (N * per, W), generator=g)  # no class token (10..12), no mask
        mask = torch.zeros(N * per, W, dtype=torch.bool)
        mask[:, 2] = True
        ids[mask] = MASK
        return ids, torch.arange(N).repeat_interleave(per), mask

    ep = pm.Episode(*part(K), *part(Q), torch.arange(10, 10 + N))
    for name, value in change.items():
        setattr(ep, name, value)
    return ep


def feats(n: int = N * K, d: int = D, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(1)).to(dtype)


def labels(per: int = K) -> torch.Tensor:
    return torch.arange(N).repeat_interleave(per)


def tokens(rows: int = 2, length: int = 9, high: int = V) -> torch.Tensor:
    return torch.randint(0, high, (rows, length), generator=torch.Generator().manual_seed(2))


def last_target(value: int) -> torch.Tensor:
    t = tokens()
    t[1, -1] = value  # a target only: the model never embeds it
    return t


def sampler(**kw) -> pm.SMLMTSampler:
    return pm.SMLMTSampler(**({"n_way": 2, "k_shot": 1, "n_query": 1, "mask_token_id": 63, "window_len": 8} | kw))


def rows_with(value: int, at=(0, 0)) -> torch.Tensor:
    t = torch.randint(0, 20, (8, 64), generator=torch.Generator().manual_seed(3))  # 64 windows of 8
    t[at] = value
    return t


class Wide(torch.nn.Module):
    """Embeds 100 ids but scores only 50: the vocabulary is the logits' last dim."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.out = torch.nn.Embedding(100, 8), torch.nn.Linear(8, 50)

    def forward(self, ids):
        return self.out(self.emb(ids))


# (id, call, exception type, argument the message names, whether the backbone must not have run)
CASES = [
    # lm_loss
    ("lm_loss target >= vocab", lambda m: pm.lm_loss(m, last_target(V)), ValueError, "tokens", False),
    ("lm_loss target >= logits dim", lambda m: pm.lm_loss(Wide(), tokens(high=50).index_put_(
        (torch.tensor([0]), torch.tensor([8])), torch.tensor(70))), ValueError, "tokens", False),
    ("lm_loss negative target", lambda m: pm.lm_loss(m, last_target(-5)), ValueError, "tokens", False),
    ("lm_loss float tokens", lambda m: pm.lm_loss(m, tokens().float()), TypeError, "tokens", True),
    ("lm_loss list tokens", lambda m: pm.lm_loss(m, [[1, 2, 3]]), TypeError, "tokens", True),
    ("lm_loss empty batch", lambda m: pm.lm_loss(m, tokens(rows=0)), ValueError, "tokens", True),
    ("lm_loss one column", lambda m: pm.lm_loss(m, tokens(length=1)), ValueError, "tokens", True),
    # PicoDecoder
    ("decoder empty batch", lambda m: m(tokens(rows=0)), ValueError, "input_ids", True),
    ("decoder id >= vocab", lambda m: m(tokens().add_(V)), ValueError, "input_ids", True),
    ("decoder float ids", lambda m: m(tokens().float()), TypeError, "input_ids", True),
    # MetaHead
    ("head in_dim=32.5", lambda m: pm.MetaHead(in_dim=32.5, n_way=N), ConfigError, "in_dim", True),
    ("head in_dim=0", lambda m: pm.MetaHead(in_dim=0, n_way=N), ConfigError, "in_dim", True),
    ("head n_way=1", lambda m: pm.MetaHead(in_dim=D, n_way=1), ConfigError, "n_way", True),
    ("head forward width", lambda m: head()(feats(d=D + 1)), ValueError, "in_dim", True),
    ("head forward dtype", lambda m: head()(feats(dtype=torch.float64)), ValueError, "x", True),
    ("head forward not a tensor", lambda m: head()([[0.0] * D]), TypeError, "x", True),
    # InnerLoop
    ("loop feature width", lambda m: loop()(head(), feats(d=D - 1), labels(), feats(N * Q), labels(Q)),
     ValueError, "in_dim", True),
    ("loop feature dtype", lambda m: loop()(head(), feats(dtype=torch.float64), labels(), feats(N * Q), labels(Q)),
     ValueError, "support_feats", True),
    ("loop query dtype", lambda m: loop()(head(), feats(), labels(), feats(N * Q, dtype=torch.half), labels(Q)),
     ValueError, "query_feats", True),
    ("loop support None", lambda m: loop()(head(), None, labels(), feats(N * Q), labels(Q)),
     TypeError, "support_feats", True),
    ("loop query None", lambda m: loop()(head(), feats(), labels(), None, labels(Q)), TypeError, "query_feats", True),
    ("loop label >= n_way", lambda m: loop()(head(), feats(), labels() + N, feats(N * Q), labels(Q)),
     ValueError, "support_labels", True),
    ("loop adapt numpy feats", lambda m: loop().adapt(head(), feats().numpy(), labels()), TypeError,
     "support_feats", True),
    ("loop steps=-1", lambda m: pm.InnerLoop(steps=-1), ConfigError, "steps", True),
    # meta_loss / HybridLearner
    ("meta_loss hidden size != in_dim", lambda m: pm.meta_loss(m, head(D + 8), loop(), episode()),
     ValueError, "head.in_dim", True),
    ("meta_loss features width", lambda m: pm.meta_loss(None, head(), loop(), episode(),
     features=lambda ids: torch.zeros(*ids.shape, D // 2)), ValueError, "head.in_dim", False),
    ("meta_loss episode=None", lambda m: pm.meta_loss(m, head(), loop(), None), TypeError, "episode", True),
    ("meta_loss episode dict", lambda m: pm.meta_loss(m, head(), loop(), {"support_ids": tokens()}),
     TypeError, "episode", True),
    ("meta_loss float ids", lambda m: pm.meta_loss(m, head(), loop(), episode(support_ids=episode().support_ids
     .float())), TypeError, "episode", True),
    ("meta_loss nonfinite=skip", lambda m: pm.meta_loss(m, head(), loop(), episode(), nonfinite="skip"),
     ValueError, "nonfinite", True),
    ("learner episode str", lambda m: HybridLearner(m, head(), loop())(episode="ep"), TypeError, "episode", True),
    ("learner nonfinite=ignore", lambda m: HybridLearner(m, head(), loop(), nonfinite="ignore"),
     ValueError, "nonfinite", True),
    ("learner rows float", lambda m: HybridLearner(m, head(), loop())(rows=tokens().float()), TypeError, "tokens",
     True),
    # Episode.validate
    ("validate mask id unmasked", lambda m: episode(support_ids=episode().support_ids.index_put_(
        (torch.tensor([0]), torch.tensor([5])), torch.tensor(MASK))).validate(MASK), EpisodeError,
     "mask_token_id", True),
    # SMLMTSampler
    ("sampler mask id frequent", lambda m: sampler(mask_token_id=5).sample(rows_with(5)), SamplingError,
     "mask_token_id", True),
    ("sampler id >= 2**57 (64 windows)", lambda m: sampler().sample(rows_with(2**57)), ValueError, "tokens",
     True),
    ("sampler id 2**63-1", lambda m: sampler().index(rows_with(2**63 - 1)), ValueError, "tokens", True),
    ("sampler negative id", lambda m: sampler().sample(rows_with(-1)), ValueError, "tokens", True),
    ("sampler float tokens", lambda m: sampler().sample(rows_with(1).float()), TokensTypeError, "tokens", True),
    ("sampler mask_token_id=-1", lambda m: sampler(mask_token_id=-1), ConfigError, "mask_token_id", True),
    ("sampler n_tasks=0", lambda m: sampler().sample(rows_with(1), n_tasks=0), ConfigError, "n_tasks", True),
    # evaluation and trainer pieces
    ("perplexity target >= vocab", lambda m: perplexity(Wide(), tokens(high=50).index_put_(
        (torch.tensor([1]), torch.tensor([8])), torch.tensor(60))), ValueError, "ids", False),
    ("probe label >= n_way", lambda m: linear_probe_accuracy(feats()[None], labels()[None] + N, feats(N * Q)[None],
     labels(Q)[None], N), ValueError, "ys", True),
    ("guard max_consecutive=0", lambda m: NonFiniteGuard(0), ConfigError, "max_consecutive", True),
    ("guard step=0", lambda m: NonFiniteGuard(3).record(False, step=0), ConfigError, "step", True),
]  # fmt: skip


@pytest.mark.parametrize(("call", "exc", "argument", "before_forward"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_bad_library_input_is_a_short_error_naming_the_argument(call, exc, argument, before_forward):
    m = model()
    forwards: list[int] = []
    m.embed_tokens.register_forward_hook(lambda *_: forwards.append(1))
    with pytest.raises(exc) as info:
        call(m)
    message = str(info.value)
    assert re.search(rf"(?<![\w.]){re.escape(argument)}\b", message), message
    assert len(message) < 400 and "\n" not in message, message
    if before_forward:
        assert forwards == [], "the error came after the backbone ran"


def test_the_battery_counts():
    """The figures quoted in the change notes: cases, and the distinct functions they reach."""
    assert len(CASES) == 45
    assert len({c[0] for c in CASES}) == len(CASES)
