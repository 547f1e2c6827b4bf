"""Benchmark SMLMTSampler: episodes per second from a Zipf-like token buffer.

Measures (a) sampling with the buffer's token->window index cached, (b) sampling including the index
build, (c) ``n_tasks=T`` episodes per call, and the index build alone. Medians over repeats; writes
``benchmarks/results/sampler.{json,md}`` and prints the table.

    python benchmarks/sampler.py            # 32-way 4-shot 4-query, W=64, 64 x 2048 tokens, V=50k
    python benchmarks/sampler.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import picomaml as pm

GOAL_MS = 5.0  # one 32-way episode on a 2-core machine


def zipf_buffer(rows: int, length: int, vocab: int, exponent: float, seed: int) -> torch.Tensor:
    """``(rows, length)`` token ids drawn i.i.d. with P(rank r) proportional to r ** -exponent."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.arange(1, vocab + 1, dtype=torch.float64).pow(-exponent)
    return torch.multinomial(probs, rows * length, replacement=True, generator=g).view(rows, length)


def timed(fn, repeats: int, before=None) -> list[float]:
    """Wall-clock milliseconds of ``fn()`` per repeat (``before()`` runs untimed first)."""
    out = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few repeats, finishes in seconds")
    ap.add_argument("--repeats", type=int, default=200, help="timed calls per case (build cases use 1/10)")
    ap.add_argument(
        "--threads", type=int, nargs="+", default=[2], help="torch.set_num_threads value(s) to run"
    )
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--row-len", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=50_000)
    ap.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the token distribution")
    ap.add_argument("--n-way", type=int, default=32)
    ap.add_argument("--k-shot", type=int, default=4)
    ap.add_argument("--n-query", type=int, default=4)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--tasks", type=int, default=8, help="T for the stacked case")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    repeats = 20 if args.quick else args.repeats
    build_repeats = max(3, repeats // 10)

    tokens = zipf_buffer(args.rows, args.row_len, args.vocab, args.zipf, args.seed)
    sampler = pm.SMLMTSampler(
        n_way=args.n_way,
        k_shot=args.k_shot,
        n_query=args.n_query,
        mask_token_id=args.vocab,
        window_len=args.window,
        seed=args.seed,
    )
    index = sampler.index(tokens)
    n_eligible = int(sampler.eligible(tokens).numel())
    sampler.sample(tokens).validate(mask_token_id=args.vocab)  # warm-up, and a correctness guard

    def invalidate() -> None:  # an in-place write bumps the tensor's version: the cache must rebuild
        tokens[0, 0] = tokens[0, 0]

    cases: dict[str, dict[str, float]] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        t = f"{threads} thr"
        cases[f"{t}: cached index, 1 episode/call"] = summary(timed(lambda: sampler.sample(tokens), repeats))
        cases[f"{t}: index build only"] = summary(
            timed(lambda: sampler.index(tokens), build_repeats, invalidate)
        )
        cases[f"{t}: incl. index build, 1 episode/call"] = summary(
            timed(lambda: sampler.sample(tokens), build_repeats, invalidate)
        )
        cases[f"{t}: cached index, n_tasks={args.tasks}/call"] = summary(
            timed(lambda: sampler.sample(tokens, n_tasks=args.tasks), max(3, repeats // 2)), per=args.tasks
        )
    cached = cases[f"{args.threads[0]} thr: cached index, 1 episode/call"]["ms_per_episode"]
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
        },
        "machine": {
            "torch": torch.__version__,
            "threads": args.threads,
            "cpu_count": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "platform": platform.platform(),
        },
        "quick": args.quick,
        "cases": cases,
        "goal_ms_per_episode": GOAL_MS,
        "goal_met": cached <= GOAL_MS,
    }
    lines = [
        f"SMLMTSampler: {args.n_way}-way {args.k_shot}-shot {args.n_query}-query, W={args.window}, buffer "
        f"{args.rows} x {args.row_len} Zipf({args.zipf}) tokens over V={args.vocab} ({index.n_windows} windows, "
        f"{n_eligible} eligible types); torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"load avg {result['machine']['load_avg_1m']:.2f}",
        "",
        "| case | median ms/call | p10-p90 ms | ms/episode | episodes/s | repeats |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, c in cases.items():
        lines.append(
            f"| {name} | {c['median_ms_per_call']:.2f} | {c['p10_ms']:.2f}-{c['p90_ms']:.2f} | "
            f"{c['ms_per_episode']:.2f} | {c['episodes_per_s']:.0f} | {c['repeats']} |"
        )
    lines += [
        "",
        f"Goal: <= {GOAL_MS} ms per cached episode with {args.threads[0]} threads: "
        f"{'met' if result['goal_met'] else 'NOT met'} ({cached:.2f} ms).",
    ]
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sampler.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (args.out / "sampler.md").write_text(table, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
