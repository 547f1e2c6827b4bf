"""Benchmark SMLMTSampler: an episode from a fresh batch (index build included), and with a cached index.

In training every meta step brings a new batch, so the headline is (a) one episode from a batch the sampler
has not seen (its token->window index is built inside the call); beside it (b) the index build alone,
(c) ``n_tasks=T`` episodes from a fresh batch, and with the index cached (d) one episode and (e) ``n_tasks=T``
per call. The fresh batches are distinct Zipf buffers, cycled, so every fresh call misses the cache. The
cases run round-robin (a few calls of each per round) so that load drifts on a shared machine hit all
alike; medians over all calls.

Then (f) the sampler's share of a meta step: one ``pm.meta_loss`` forward + backward at the tiny preset
(the model ``benchmarks/meta_step.py`` times: 12 layers, d_model 96, V=8192, a 128-unit 3-layer MLP head,
10 inner steps, second order) on the same N-way K-shot Q-query W setting, alternated with fresh-batch
episodes from 64 x 2048 buffers over that vocabulary. Share = sampler / (sampler + meta step).

Writes ``benchmarks/results/sampler.{json,md}`` (``sampler_quick.*`` with ``--quick``) and prints the table.

    python benchmarks/sampler.py            # 32-way 4-shot 4-query, W=64, 64 x 2048 tokens, V=50k, 2 threads
    python benchmarks/sampler.py --quick    # seconds (a 1-layer model, 1 inner step for the share)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import picomaml as pm

GOAL_FRESH_MS = 3.0  # one 32-way 4-shot 4-query episode from a fresh 64 x 2048 batch, 2 threads
GOAL_SHARE = 0.05  # the sampler's share of a meta step at the tiny preset


def zipf_buffer(rows: int, length: int, vocab: int, exponent: float, seed: int) -> torch.Tensor:
    """``(rows, length)`` token ids drawn i.i.d. with P(rank r) proportional to r ** -exponent."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.arange(1, vocab + 1, dtype=torch.float64).pow(-exponent)
    return torch.multinomial(probs, rows * length, replacement=True, generator=g).view(rows, length)


def summary(ms: list[float], per: int = 1) -> dict[str, float]:
    qs = statistics.quantiles(ms, n=10) if len(ms) >= 2 else [ms[0]] * 9
    med = statistics.median(ms)
    return {
        "median_ms_per_call": med,
        "p10_ms": qs[0],
        "p90_ms": qs[-1],
        "ms_per_episode": med / per,
        "episodes_per_s": 1e3 * per / med,
        "repeats": len(ms),
    }


def round_robin(cases: dict[str, Callable[[], object]], rounds: int, per_round: dict[str, int]) -> dict:
    """Milliseconds of every call of each case, the cases taking turns (``per_round[name]`` calls a turn)."""
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            for _ in range(per_round[name]):
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


class Fresh:
    """Hands out a different buffer on every call (cycling through ``buffers``), so the sampler's index
    cache, which holds the last buffer, always misses."""

    def __init__(self, buffers: list[torch.Tensor]) -> None:
        assert len(buffers) >= 2
        self.buffers, self.i = buffers, 0

    def __call__(self) -> torch.Tensor:
        self.i = (self.i + 1) % len(self.buffers)
        return self.buffers[self.i]


def meta_step_share(args: argparse.Namespace, rounds: int, sampler_calls: int) -> dict:
    """Time one ``pm.meta_loss`` + backward at the tiny preset against fresh-batch episodes (alternating)."""
    vocab = args.meta_vocab
    layers = 1 if args.quick else None
    steps = 1 if args.quick else args.meta_steps
    overrides = {"n_layers": layers} if layers else {}
    cfg = pm.PicoDecoderConfig.preset("tiny", vocab_size=vocab, max_seq_len=args.window + 1, **overrides)
    torch.manual_seed(0)
    model = pm.PicoDecoder(cfg)
    head = pm.MetaHead(cfg.d_model, args.n_way, hidden_dims=(128, 128, 128), init="xavier")
    loop = pm.InnerLoop(steps, 0.01)
    # the mask id is the model's last id; the buffers hold the others
    buffers = [
        zipf_buffer(args.rows, args.row_len, vocab - 1, args.zipf, args.seed + 100 + i) for i in range(4)
    ]
    fresh = Fresh(buffers)
    sampler = pm.SMLMTSampler(
        n_way=args.n_way, k_shot=args.k_shot, n_query=args.n_query, mask_token_id=vocab - 1,
        window_len=args.window, seed=args.seed,
    )  # fmt: skip
    episode = sampler.sample(fresh()).validate(mask_token_id=vocab - 1)

    def meta_step() -> None:
        pm.meta_loss(model, head, loop, episode).loss.backward()
        model.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        loop.zero_grad(set_to_none=True)

    meta_step()  # warm-up
    times = round_robin(
        {"sampler": lambda: sampler.sample(fresh()), "meta_step": meta_step},
        rounds,
        {"sampler": sampler_calls, "meta_step": 1},
    )
    sample_ms, meta_ms = statistics.median(times["sampler"]), statistics.median(times["meta_step"])
    return {
        "model": {"preset": "tiny", "n_layers": cfg.n_layers, "d_model": cfg.d_model, "vocab_size": vocab},
        "inner_steps": steps,
        "quick_model": bool(args.quick),
        "sampler_fresh_ms": sample_ms,
        "meta_step_ms": meta_ms,
        "meta_step_repeats": len(times["meta_step"]),
        "share": sample_ms / (sample_ms + meta_ms),
        "goal_share": GOAL_SHARE,
        "goal_met": sample_ms / (sample_ms + meta_ms) <= GOAL_SHARE,
    }


def recorded_meta_step(path: Path) -> dict | None:
    """The meta_SO figure of a saved ``benchmarks/meta_step.py`` run (the tiny preset), if there is one."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        return {
            "file": f"{path.parent.name}/{path.name}",
            "meta_SO_ms": float(saved["ms"]["meta_SO"]),
            "threads": saved["config"].get("threads"),
            "vocab": saved["model"]["vocab_size"],
        }
    except (OSError, ValueError, KeyError, TypeError):
        return None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few repeats and a 1-layer model: seconds")
    ap.add_argument("--rounds", type=int, default=40, help="round-robin rounds over the sampler cases")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads value")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--row-len", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=50_000)
    ap.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the token distribution")
    ap.add_argument("--n-way", type=int, default=32)
    ap.add_argument("--k-shot", type=int, default=4)
    ap.add_argument("--n-query", type=int, default=4)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--tasks", type=int, default=8, help="T for the n_tasks cases")
    ap.add_argument("--buffers", type=int, default=8, help="distinct fresh buffers to cycle through")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--meta-vocab", type=int, default=8192, help="vocabulary of the tiny-preset model")
    ap.add_argument("--meta-steps", type=int, default=10, help="inner steps of the meta step")
    ap.add_argument("--meta-repeats", type=int, default=3, help="meta steps timed (0: skip the share)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    rounds = 3 if args.quick else args.rounds
    torch.set_num_threads(args.threads)

    buffers = [
        zipf_buffer(args.rows, args.row_len, args.vocab, args.zipf, args.seed + i)
        for i in range(args.buffers)
    ]
    fresh = Fresh(buffers)
    tokens = buffers[0]
    sampler = pm.SMLMTSampler(
        n_way=args.n_way, k_shot=args.k_shot, n_query=args.n_query, mask_token_id=args.vocab,
        window_len=args.window, seed=args.seed,
    )  # fmt: skip
    index = sampler.index(tokens)
    n_eligible = int(sampler.eligible(tokens).numel())
    for _ in range(3):  # warm-up, and a correctness guard
        sampler.sample(fresh()).validate(mask_token_id=args.vocab)
    # a sampler of its own for the cached cases, so that the fresh cases never replace its cached index
    cached = pm.SMLMTSampler(
        n_way=args.n_way, k_shot=args.k_shot, n_query=args.n_query, mask_token_id=args.vocab,
        window_len=args.window, seed=args.seed,
    )  # fmt: skip
    cached.sample(tokens)

    t = args.tasks
    fresh_one, build, fresh_t = (
        "fresh batch, 1 episode/call",
        "fresh batch, index build only",
        f"fresh batch, n_tasks={t}/call",
    )
    cached_one, cached_t = "cached index, 1 episode/call", f"cached index, n_tasks={t}/call"
    cases = {
        fresh_one: lambda: sampler.sample(fresh()),
        build: lambda: sampler.index(fresh()),
        fresh_t: lambda: sampler.sample(fresh(), n_tasks=t),
        cached_one: lambda: cached.sample(tokens),
        cached_t: lambda: cached.sample(tokens, n_tasks=t),
    }
    per_round = {fresh_one: 5, build: 5, fresh_t: 1, cached_one: 5, cached_t: 1}
    times = round_robin(cases, rounds, per_round)
    table_cases = {
        name: summary(ms, per=t if name in (fresh_t, cached_t) else 1) for name, ms in times.items()
    }
    headline = table_cases[fresh_one]["ms_per_episode"]
    share = (
        meta_step_share(args, 1 if args.quick else args.meta_repeats, 5 if args.quick else 10)
        if args.meta_repeats > 0
        else None
    )
    recorded = recorded_meta_step(args.out / "meta_step.json")
    if recorded is not None:
        recorded["share"] = headline / (headline + recorded["meta_SO_ms"])
        recorded["goal_met"] = recorded["share"] <= GOAL_SHARE

    result = {
        "benchmark": "sampler",
        "setting": {
            "n_way": args.n_way,
            "k_shot": args.k_shot,
            "n_query": args.n_query,
            "window_len": args.window,
            "rows": args.rows,
            "row_len": args.row_len,
            "vocab": args.vocab,
            "zipf_exponent": args.zipf,
            "n_windows": index.n_windows,
            "eligible_types": n_eligible,
            "min_freq": sampler.min_freq,
            "max_freq": sampler.max_freq,
            "fresh_buffers": args.buffers,
            "rounds": rounds,
        },
        "machine": {
            "torch": torch.__version__,
            "threads": args.threads,
            "cpu_count": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "platform": platform.platform(),
        },
        "quick": args.quick,
        "headline": {
            "case": fresh_one,
            "ms_per_episode": headline,
            "goal_ms": GOAL_FRESH_MS,
            "goal_met": headline <= GOAL_FRESH_MS,
        },
        "cases": table_cases,
        "meta_step_share": share,
        "meta_step_share_recorded": recorded,
    }
    load = result["machine"]["load_avg_1m"]
    lines = [
        f"SMLMTSampler: {args.n_way}-way {args.k_shot}-shot {args.n_query}-query, W={args.window}, buffers of "
        f"{args.rows} x {args.row_len} Zipf({args.zipf}) tokens over V={args.vocab} ({index.n_windows} windows, "
        f"{n_eligible} eligible types in the first); torch {torch.__version__}, {args.threads} threads, "
        f"{os.cpu_count()} CPUs, load avg {load if load is None else f'{load:.2f}'}",
        "",
        f"**Fresh batch (index build included): {headline:.2f} ms per episode; goal <= {GOAL_FRESH_MS} ms: "
        f"{'met' if headline <= GOAL_FRESH_MS else 'NOT met'}.**",
        "",
        "| case | median ms/call | p10-p90 ms | ms/episode | episodes/s | calls |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, c in table_cases.items():
        lines.append(
            f"| {name} | {c['median_ms_per_call']:.2f} | {c['p10_ms']:.2f}-{c['p90_ms']:.2f} | "
            f"{c['ms_per_episode']:.2f} | {c['episodes_per_s']:.0f} | {c['repeats']} |"
        )
    if share is not None:
        model = share["model"]
        lines += [
            "",
            f"Share of a meta step: fresh-batch episode {share['sampler_fresh_ms']:.2f} ms vs one `pm.meta_loss` + "
            f"backward {share['meta_step_ms']:.0f} ms ({'quick: NOT the tiny preset' if share['quick_model'] else 'tiny preset'}: "
            f"{model['n_layers']} layers, d_model {model['d_model']}, V={model['vocab_size']}, "
            f"{share['inner_steps']} inner steps; median of {share['meta_step_repeats']}) = "
            f"{100 * share['share']:.3f} % of the step; goal <= {100 * GOAL_SHARE:.0f} %: "
            f"{'met' if share['goal_met'] else 'NOT met'}.",
        ]
    if recorded is not None:
        lines += [
            "",
            f"Against the recorded meta step (`{recorded['file']}`: meta_SO {recorded['meta_SO_ms']:.0f} ms, "
            f"{recorded['threads']} thread(s), tiny preset V={recorded['vocab']}): the headline episode is "
            f"{100 * recorded['share']:.3f} % of the step ({'met' if recorded['goal_met'] else 'NOT met'}).",
        ]
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    name = "sampler_quick" if args.quick else "sampler"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (args.out / f"{name}.md").write_text(table, encoding="utf-8")
    print(table)
    return result


if __name__ == "__main__":
    main()
