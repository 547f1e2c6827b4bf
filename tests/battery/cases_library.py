"""Library calls with bad arguments: each raises a ``ValueError``/``TypeError``/``KeyError`` naming the
argument and what is allowed, before any work; nothing runs without end."""

from __future__ import annotations

import torch
from harness import Outcome, area, raises

case = area("library", "public library calls")


def pm():
    import picomaml

    return picomaml


def tiny_model():
    p = pm()
    return p.PicoDecoder(p.PicoDecoderConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=32))


def episode(n_way: int = 3):
    """A real N-way episode from a tiny synthetic corpus with repeated tokens."""
    p = pm()
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(5, 60, (64, 33), generator=g)
    sampler = p.SMLMTSampler(n_way=n_way, k_shot=2, n_query=2, mask_token_id=1, window_len=8, min_freq=4, max_freq=0.9)
    return sampler.sample(rows, n_tasks=1)


@case("head-5-way-on-a-3-way-episode")
def _(tmp):
    p = pm()
    return raises(lambda: p.meta_loss(tiny_model(), p.MetaHead(16, 5), p.InnerLoop(steps=1), episode(3)), "n_way")


@case("sampler-window-len-1")
def _(tmp):
    return raises(lambda: pm().SMLMTSampler(n_way=3, k_shot=1, n_query=1, mask_token_id=1, window_len=1), "window_len")


@case("sampler-n-way-1")
def _(tmp):
    return raises(lambda: pm().SMLMTSampler(n_way=1, k_shot=1, n_query=1, mask_token_id=1, window_len=8), "n_way")


@case("sampler-negative-mask-id")
def _(tmp):
    return raises(lambda: pm().SMLMTSampler(n_way=3, k_shot=1, n_query=1, mask_token_id=-1, window_len=8), "mask_token_id")


@case("sampler-min-freq-above-max")
def _(tmp):
    s = lambda: pm().SMLMTSampler(n_way=3, k_shot=1, n_query=1, mask_token_id=1, window_len=8, min_freq=50, max_freq=10)  # noqa: E731
    return raises(lambda: s().sample(torch.randint(5, 20, (16, 33)), n_tasks=1), "min_freq")


@case("episode-class-token-ids-wrong-length")
def _(tmp):
    import dataclasses

    p = pm()
    ep = episode(3)
    bad = dataclasses.replace(ep, class_token_ids=ep.class_token_ids[..., :2])
    return raises(lambda: p.meta_loss(tiny_model(), p.MetaHead(16, 3), p.InnerLoop(steps=1), bad), "class_token_ids")


@case("sampler-rows-1d")
def _(tmp):
    p = pm()
    sampler = p.SMLMTSampler(n_way=3, k_shot=2, n_query=2, mask_token_id=1, window_len=8)
    return raises(lambda: sampler.sample(torch.arange(100), n_tasks=1), "tokens")


@case("sampler-float-rows")
def _(tmp):
    p = pm()
    sampler = p.SMLMTSampler(n_way=3, k_shot=2, n_query=2, mask_token_id=1, window_len=8)
    return raises(lambda: sampler.sample(torch.rand(16, 33), n_tasks=1), "tokens")


@case("sampler-n-tasks-zero")
def _(tmp):
    p = pm()
    sampler = p.SMLMTSampler(n_way=3, k_shot=2, n_query=2, mask_token_id=1, window_len=8, min_freq=4, max_freq=0.9)
    return raises(lambda: sampler.sample(torch.randint(5, 60, (64, 33)), n_tasks=0), "n_tasks")


@case("sampler-load-state-garbage")
def _(tmp):
    p = pm()
    sampler = p.SMLMTSampler(n_way=3, k_shot=2, n_query=2, mask_token_id=1, window_len=8)
    return raises(lambda: sampler.load_state_dict({"generator": torch.zeros(3), "seed": 0, "episodes_sampled": 0}), "generator")


@case("inner-loop-lr-1e30")
def _(tmp):
    return raises(lambda: pm().InnerLoop(lr=1e30), "lr")


@case("inner-loop-steps-1e9")
def _(tmp):
    return raises(lambda: pm().InnerLoop(steps=10**9), "steps")


@case("inner-loop-steps-negative")
def _(tmp):
    return raises(lambda: pm().InnerLoop(steps=-1), "steps")


@case("inner-loop-lr-nan")
def _(tmp):
    return raises(lambda: pm().InnerLoop(lr=float("nan")), "lr")


@case("inner-loop-removed-backend")
def _(tmp):
    return raises(lambda: pm().InnerLoop(backend="higher"), "backend")


@case("meta-head-zero-way")
def _(tmp):
    return raises(lambda: pm().MetaHead(16, 0), "n_way")


@case("meta-head-unknown-activation")
def _(tmp):
    return raises(lambda: pm().MetaHead(16, 3, activation="swishy"), "activation")


@case("meta-head-dropout-2")
def _(tmp):
    return raises(lambda: pm().MetaHead(16, 3, dropout=2.0), "dropout")


@case("lm-loss-on-meta-device")
def _(tmp):
    return raises(lambda: pm().lm_loss(tiny_model(), torch.zeros(2, 9, dtype=torch.long, device="meta")), "tokens")


@case("lm-loss-window-length-0")
def _(tmp):
    return raises(lambda: pm().lm_loss(tiny_model(), torch.zeros(2, 0, dtype=torch.long)), "tokens")


@case("lm-loss-float-tokens")
def _(tmp):
    return raises(lambda: pm().lm_loss(tiny_model(), torch.rand(2, 9)), "tokens")


@case("lm-loss-ids-beyond-vocab")
def _(tmp):
    return raises(lambda: pm().lm_loss(tiny_model(), torch.full((2, 9), 64)), "[0, 64)")


@case("lm-loss-longer-than-max-seq-len")
def _(tmp):
    return raises(lambda: pm().lm_loss(tiny_model(), torch.zeros(2, 40, dtype=torch.long)), "max_seq_len")


@case("lm-loss-int32-ids-match-int64")
def _(tmp):
    p, model = pm(), tiny_model()
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    try:
        a, b = p.lm_loss(model, tokens), p.lm_loss(model, tokens.int())
    except Exception as exc:  # noqa: BLE001
        return Outcome("traceback", f"{type(exc).__name__}: {exc}"[:300])
    return Outcome("clean") if torch.equal(a, b) else Outcome("silent", f"{a} != {b}")


@case("decoder-config-heads-not-dividing")
def _(tmp):
    p = pm()
    return raises(lambda: p.PicoDecoderConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=3, n_kv_heads=1, ffn_dim=32, max_seq_len=32), "n_heads")


@case("decoder-config-kv-heads-not-dividing")
def _(tmp):
    p = pm()
    return raises(lambda: p.PicoDecoderConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=4, n_kv_heads=3, ffn_dim=32, max_seq_len=32), "n_kv_heads")


@case("decoder-config-n-layers-1e5")
def _(tmp):
    p = pm()
    return raises(lambda: p.PicoDecoderConfig(vocab_size=64, d_model=16, n_layers=100_000, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=32), "n_layers")


@case("hybrid-scheduler-ratio-2")
def _(tmp):
    return raises(lambda: pm().HybridScheduler(ratio=2.0), "ratio")


@case("hybrid-scheduler-negative-step")
def _(tmp):
    return raises(lambda: pm().HybridScheduler(ratio=0.5).plan(-1), "step")


@case("fewshot-eval-episodes-zero")
def _(tmp):
    p = pm()
    rows = torch.randint(5, 60, (64, 33), generator=torch.Generator().manual_seed(0))
    return raises(lambda: p.fewshot_eval(tiny_model(), rows, n_way=3, k_shot=2, n_query=2, mask_token_id=1, window_len=8, episodes=0), "episodes")


@case("fewshot-eval-episodes-per-batch-zero")
def _(tmp):
    p = pm()
    rows = torch.randint(5, 60, (64, 33), generator=torch.Generator().manual_seed(0))
    return raises(lambda: p.fewshot_eval(tiny_model(), rows, n_way=3, k_shot=2, n_query=2, mask_token_id=1, window_len=8, episodes=2, episodes_per_batch=0), "episodes_per_batch")


@case("load-config-unknown-shipped-name")
def _(tmp):
    return raises(lambda: pm().load_config("tiny-gpu-please"), "tiny-gpu-please")


@case("load-config-bad-override")
def _(tmp):
    return raises(lambda: pm().load_config(None, ["model.n_layers=-3"]), "model.n_layers")


@case("save-checkpoint-negative-step")
def _(tmp):
    return raises(lambda: pm().save_checkpoint(tmp / "ck", -1, {"model": tiny_model()}), "step")


@case("load-checkpoint-missing")
def _(tmp):
    return raises(lambda: pm().load_checkpoint(tmp / "none"), "none")


@case("load-tokenizer-missing-file")
def _(tmp):
    return raises(lambda: pm().load_tokenizer(str(tmp / "tok.json")), "tok.json")


@case("perplexity-empty-rows")
def _(tmp):
    return raises(lambda: pm().perplexity(tiny_model(), torch.zeros(0, 9, dtype=torch.long)), "rows")
