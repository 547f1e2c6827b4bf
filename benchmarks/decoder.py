"""Training throughput of PicoDecoder vs transformers' LlamaForCausalLM with identical weights.

What is timed, per step and identically for both models: forward over a (batch, seq) batch of random
token ids, next-token cross-entropy on the logits (the same ``F.cross_entropy`` call for both), backward,
and zeroing the gradients (``set_to_none``). No optimizer step (it would cost the same for both). The
Llama model is built by ``PicoDecoder.to_hf()`` (so weights are equal), uses the ``sdpa`` attention
implementation and is called with ``use_cache=False``. Repeats alternate between the two models and the
median step time is reported. Threads are pinned to 2 (``--threads``).

Usage::

    python benchmarks/decoder.py              # tiny preset + 2-layer small-width config, vocab 50304
    python benchmarks/decoder.py --quick      # seconds: short sequences, few repeats
    python benchmarks/decoder.py --vocab 8192 --batch 8 --seq 256 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import picomaml as pm

RESULTS = Path(__file__).resolve().parent / "results"


def configs(vocab: int, seq: int) -> dict[str, pm.PicoDecoderConfig]:
    """The benchmarked architectures: the tiny preset and a 2-layer model of small-preset width."""
    return {
        "tiny (12L, d96)": pm.PicoDecoderConfig.preset("tiny", vocab_size=vocab, max_seq_len=seq),
        "small-width (2L, d384)": pm.PicoDecoderConfig.preset(
            "small", vocab_size=vocab, max_seq_len=seq, n_layers=2
        ),
    }


def train_step(call, ids: torch.Tensor, params: list[torch.nn.Parameter]) -> None:
    """Forward, next-token cross-entropy, backward, zero grads."""
    logits = call(ids)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    for p in params:
        p.grad = None


def bench_config(cfg: pm.PicoDecoderConfig, batch: int, seq: int, repeats: int, warmup: int) -> dict:
    torch.manual_seed(0)
    pico = pm.PicoDecoder(cfg).train()
    hf = pico.to_hf().train()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # same weights, same function: check before timing
        diff = (pico(ids) - hf(ids, use_cache=False).logits).abs().max().item()
    runners = {
        "picomaml": (lambda x: pico(x), list(pico.parameters())),
        "hf_llama": (lambda x: hf(x, use_cache=False).logits, list(hf.parameters())),
    }
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(warmup):
        for call, params in runners.values():
            train_step(call, ids, params)
    for _ in range(repeats):  # interleaved so drift in machine load hits both alike
        for name, (call, params) in runners.items():
            t0 = time.perf_counter()
            train_step(call, ids, params)
            times[name].append(time.perf_counter() - t0)
    tokens = batch * seq
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "params": cfg.num_parameters(),
        "max_abs_logit_diff": diff,
        "step_s": med,
        "step_s_all": times,
        "tokens_per_s": {name: tokens / t for name, t in med.items()},
        "ratio": med["hf_llama"] / med["picomaml"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=50304, help="vocabulary size (default: pico's 50304)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="batch 2 x seq 64, 3 repeats, 1 warm-up")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for decoder.{json,md}")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.seq, args.repeats, args.warmup = 2, 64, 3, 1
    torch.set_num_threads(args.threads)

    rows = {}
    for name, cfg in configs(args.vocab, args.seq).items():
        rows[name] = bench_config(cfg, args.batch, args.seq, args.repeats, args.warmup)

    header = (
        f"PicoDecoder vs LlamaForCausalLM (sdpa), forward + cross-entropy + backward, "
        f"batch {args.batch} x seq {args.seq}, vocab {args.vocab}, {args.threads} threads, "
        f"median of {args.repeats} interleaved repeats, torch {torch.__version__}"
    )
    lines = [
        header,
        "",
        "| config | params | picomaml tok/s | HF Llama tok/s | ratio (pico / HF) | max logit diff |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        tps = r["tokens_per_s"]
        lines.append(
            f"| {name} | {r['params'] / 1e6:.1f}M | {tps['picomaml']:,.0f} | {tps['hf_llama']:,.0f} | "
            f"{r['ratio']:.2f}x | {r['max_abs_logit_diff']:.1e} |"
        )
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decoder.md").write_text(table + "\n", encoding="utf-8")
    meta = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "timed": "forward + F.cross_entropy + backward + grad zeroing; no optimizer step",
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "results": rows,
    }
    (args.out / "decoder.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
