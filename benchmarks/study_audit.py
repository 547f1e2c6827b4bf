#!/usr/bin/env python
"""Recompute the audited numbers of ``docs/pages/study.md`` from the studies' JSON files.

    python benchmarks/study_audit.py             # every figure, 10-30 s on 2 CPU cores
    python benchmarks/study_audit.py --no-count  # without torch's FLOP count (JSON and formulas only)

Reads ``benchmarks/results/{study,study_ratio02,study_round2,study_round2_confirm,study_round3}/study.json`` and trains
nothing. Each run's schedules come from its overrides in the JSON, through the library's public functions
(``picomaml.load_config``, ``hybrid_from_config``, ``lr_multiplier``). The count runs one forward and
backward of each kind of step of each arm under ``FlopCounterMode`` (``measure_step_flops``; no optimizer
step, no training). Intervals are ``picomaml.eval.mean_ci`` (Student t over seeds), as in the study; p-values are the
two-sided t-test that matches them, Holm-adjusted over the 13 metrics of one comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import warnings
from collections import Counter
from pathlib import Path

warnings.filterwarnings("ignore", category=FutureWarning)

from picomaml import load_config  # noqa: E402
from picomaml.eval import holm, mean_ci  # noqa: E402
from picomaml.eval import t_test_p as p_value  # noqa: E402
from picomaml.train.budget import experiment_step_flops, run_flops, steps_for_flops  # noqa: E402
from picomaml.train.build import hybrid_from_config  # noqa: E402
from picomaml.train.optim import lr_multiplier  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MAIN = ["ar", "weighted-0.1", "weighted-0.3", "pcgrad-0.3", "fomaml-0.2", "adapt2-0.2", "late-0.5"]
METRICS = ["perplexity"] + [
    f"{task}_5w{k}s_{scorer}" for task in ("smlmt", "downstream") for k in (1, 4) for scorer in ("ncm", "probe", "after")
]  # fmt: skip


def load(name: str) -> list[dict]:
    """The runs of one study, less the equal-FLOPs copies of the AR runs (the same runs listed twice)."""
    runs = json.loads((RESULTS / name / "study.json").read_text())["runs"]
    return [r for r in runs if not (r["arm"] == "ar" and r["budget"] == "flops")]


def val(run: dict, metric: str) -> float:
    final = run["final"]  # round 1 calls the nearest-class-mean scorer "before"
    return final[metric] if metric in final else final[metric.replace("_ncm", "_before")]


def diffs(runs: list[dict], arm: str, metric: str, budget: str = "flops", ref: str = "ar") -> list[float]:
    """Per seed: the arm's final metric minus the reference arm's of the same seed."""
    base = {r["seed"]: r for r in runs if r["arm"] == ref}
    mine = [r for r in runs if r["arm"] == arm and r["budget"] == budget]
    return [val(r, metric) - val(base[r["seed"]], metric) for r in mine]


def fmt(values: list[float], digits: int = 3) -> str:
    mean, half = mean_ci(values)
    return f"{mean:+.{digits}f} ± {half:.{digits}f}"


def schedule(run: dict) -> tuple[int, int, float]:
    """AR steps, meta steps and the LR multiplier summed over the AR steps, from the run's config."""
    cfg = load_config("tiny-cpu", run["overrides"])
    steps, o = cfg.trainer.max_steps, cfg.optim
    hybrid = hybrid_from_config(cfg, max_steps=steps)
    kinds = [hybrid.objectives(step) for step in range(steps)]
    lr = sum(lr_multiplier(s, o.warmup_steps, steps, o.decay, o.min_lr_ratio) for s, k in enumerate(kinds) if "ar" in k)  # fmt: skip
    return sum("ar" in k for k in kinds), sum("meta" in k for k in kinds), lr


def round1(r1: list[dict], r02: list[dict]) -> None:
    print("== 1. Round 1: paired differences to ar, 3 seeds, 13 metrics, both budgets ==")
    for runs, arms in ((r1, ["hybrid-0.5", "hybrid-sched"]), (r02, ["hybrid-0.2"])):
        cells = [(a, b, m, diffs(runs, a, m, b)) for a in arms for b in ("steps", "flops") for m in METRICS]
        zero = [c for c in cells if abs(mean_ci(c[3])[0]) <= mean_ci(c[3])[1]]
        better = [(x > 0) == (m == "perplexity") for _, _, m, d in cells for x in d]
        print(f"{' + '.join(arms)}: {len(zero)} of {len(cells)} intervals include zero; "
              f"ar better in {sum(better)} of {len(better)} per-seed comparisons")  # fmt: skip
        for a, b, m, d in zero:
            print(f"  includes zero: {a}, equal {b}, {m} {fmt(d)}")
        for task in ("smlmt", "downstream"):
            means = [mean_ci(d)[0] for _, _, m, d in cells if m.startswith(task)]
            print(f"  {task} accuracy, every scorer and shot: {min(means):+.3f} to {max(means):+.3f}")


def diagnostic(r2: list[dict]) -> None:
    print("\n== 2. Round 2 gradient diagnostic (measured before clipping, on the shared backbone) ==")
    rows = {a: [d for r in r2 if r["arm"] == a for d in r["diagnostic"]] for a in dict.fromkeys(r["arm"] for r in r2)}  # fmt: skip
    for label, arms in (("all 10 arms", list(rows)), ("7 main arms", MAIN), ("pcgrad-0.3", ["pcgrad-0.3"])):
        cos = [d["diag/grad_cos"] for a in arms for d in rows[a]]
        print(f"negative cosines, {label}: {sum(c < 0 for c in cos)} of {len(cos)}")
    late = [d for a in MAIN for d in rows[a] if d["step"] > 40]
    g_meta, g_ar = [d["diag/grad_norm_meta"] for d in late], [d["diag/grad_norm_ar"] for d in late]
    capped = [min(1, m) / min(1, a) for m, a in zip(g_meta, g_ar, strict=True)]

    def q(xs: list[float], every: int) -> list[float]:
        return [round(x, 2) for x in statistics.quantiles(xs, n=20)[::every]]

    print(f"7 main arms after step 40 ({len(late)} measurements): |g_meta| {min(g_meta):.2f} to {max(g_meta):.2f}, "
          f"above the clip (1.0) in {sum(g > 1 for g in g_meta)}; 5/50/95 % {q(g_meta, 9)}")  # fmt: skip
    print(f"  |g_ar| {min(g_ar):.2f} to {max(g_ar):.2f}; 5/25/50/75/95 % {q(g_ar, 4)}")
    print(f"  min(1,|g_meta|) / min(1,|g_ar|), an estimate (post-clip norms were not logged): 5/50/95 % {q(capped, 9)}")  # fmt: skip
    for a, ds in rows.items():
        ratio = [d["diag/grad_norm_ratio"] for d in ds]
        geo = math.exp(statistics.fmean(math.log(x) for x in ratio))
        print(f"  {a:14s} |g_meta|/|g_ar| geometric mean {geo:5.2f}, median {statistics.median(ratio):5.2f}, max {max(ratio):6.1f}")  # fmt: skip
    top = max((d["diag/grad_norm_ratio"], r["name"], d) for r in r2 for d in r["diagnostic"])
    print(f"largest ratio {top[0]:.0f}: {top[1]}, step {top[2]['step']:.0f}, "
          f"|g_meta| {top[2]['diag/grad_norm_meta']:.1f}, |g_ar| {top[2]['diag/grad_norm_ar']:.2f}")  # fmt: skip


def late_meta(r2: list[dict], conf: list[dict]) -> None:
    print("\n== 3. late-0.5: the 5-seed confirmation and the LR schedule ==")
    old = {r["name"]: r["final"] for r in r2}
    reused = sorted({r["seed"] for r in conf if old.get(r["name"]) == r["final"]})
    print(f"confirmation runs identical to round-2 runs (same names, same numbers): seeds {reused}")
    gain = diffs(conf, "late-0.5", "perplexity")
    ar_mean = statistics.fmean(val(r, "perplexity") for r in conf if r["arm"] == "ar")
    print(f"perplexity, late-0.5 minus ar, per seed {[round(g, 2) for g in gain]}: 5 seeds {fmt(gain, 2)} "
          f"({100 * statistics.fmean(gain) / ar_mean:+.1f} % of ar's {ar_mean:.1f}); round 2 (3 seeds) {fmt(diffs(r2, 'late-0.5', 'perplexity'), 2)}")  # fmt: skip
    ar_lr = schedule(next(r for r in conf if r["arm"] == "ar"))[2]
    stats = [schedule(r) for r in conf if r["arm"] == "late-0.5"]
    print(f"ar: 300 AR steps, LR multiplier summed over them {ar_lr:.2f}")
    for (n_ar, n_meta, lr), g in zip(stats, gain, strict=True):
        print(f"  late-0.5: {n_ar} AR + {n_meta} meta steps, summed {lr:.2f} ({100 * (lr / ar_lr - 1):+.1f} %), gain {g:+.2f}")  # fmt: skip
    corr = statistics.correlation
    print(f"  r(gain, summed LR) {corr(gain, [s[2] for s in stats]):+.2f}; "
          f"r(gain, meta steps) {corr(gain, [float(s[1]) for s in stats]):+.2f}; "
          f"r(summed LR, meta steps) {corr([s[2] for s in stats], [float(s[1]) for s in stats]):+.2f}")  # fmt: skip
    for label, runs, arm, ref in (("late-0.5 - ar, 5 seeds", conf, "late-0.5", "ar"),
                                  ("deep-late-0.5 - deep-ar, 3 seeds", r2, "deep-late-0.5", "deep-ar")):  # fmt: skip
        cells = [diffs(runs, arm, m, ref=ref) for m in METRICS]
        adjusted = holm([p_value(d) for d in cells])
        for m, d, p in zip(METRICS[1:], cells[1:], adjusted[1:], strict=True):
            if mean_ci(d)[0] > mean_ci(d)[1]:
                print(f"  {label}: {m} {fmt(d)}, {sum(x > 0 for x in d)}/{len(d)} seeds positive, "
                      f"p {p_value(d):.3f}, Holm over 13 metrics {p:.2f}")  # fmt: skip
        print(f"  {label}: perplexity {fmt(cells[0], 2)}, Holm-adjusted p {adjusted[0]:.4f}")


def between_rounds(r1: list[dict], r2: list[dict]) -> None:
    print("\n== 4. ar, same seeds and config: round 2 (2026-12-02) minus round 1 (2026-11-28) ==")
    first = {r["seed"]: val(r, "perplexity") for r in r1 if r["arm"] == "ar"}
    print("perplexity:", [round(val(r, "perplexity") - first[r["seed"]], 2) for r in r2 if r["arm"] == "ar"])


def flops(r2: list[dict], count: bool) -> None:
    print("\n== 5. FLOPs: recorded in round 2 (the formula then), the formula now, torch's count ==")
    budget = next(r["flops"] for r in r2 if r["arm"] == "ar")
    for a in dict.fromkeys(r["arm"] for r in r2):
        mine = [r for r in r2 if r["arm"] == a]
        now = [run_flops(load_config("tiny-cpu", r["overrides"]))[-1] / budget for r in mine]
        print(f"  {a:14s} steps {[r['steps'] for r in mine]}, recorded / ar {[round(r['flops'] / budget, 4) for r in mine]}, "
              f"formula now / ar {[round(x, 4) for x in now]}")  # fmt: skip
    pc = next(r for r in r2 if r["arm"] == "pcgrad-0.3")
    cfg = load_config("tiny-cpu", pc["overrides"])
    ar_step, pc_old, pc_now = budget / 300, pc["flops"] / pc["steps"], experiment_step_flops(cfg, ("ar", "meta"))  # fmt: skip
    print(f"per step, charged in round 2: ar {ar_step:.4g}, pcgrad {pc_old:.4g}; pcgrad now {pc_now:.4g}")
    print(f"pcgrad-0.3 steps for ar's budget by the formula now: {steps_for_flops(cfg, int(budget))} (round 2: {pc['steps']})")  # fmt: skip
    if count:
        from picomaml.train.flop_count import measure_step_flops

        ar_n, pc_n = measure_step_flops(cfg, ("ar",)), measure_step_flops(cfg, ("ar", "meta"))
        print(f"FlopCounterMode: ar step {ar_n:.4g} = {ar_n / ar_step:.3f} x its charge; pcgrad step {pc_n:.4g} = "
              f"{pc_n / pc_old:.3f} x its round-2 charge (formula now {pc_now / pc_n:.3f} x the count)")  # fmt: skip
        print("counted compute per run / ar's counted 300 steps, and count / formula now per kind of step:")
        for a in dict.fromkeys(r["arm"] for r in r2):
            runs = [(load_config("tiny-cpu", r["overrides"]), r["steps"]) for r in r2 if r["arm"] == a]
            taken = [Counter(tuple(sorted(hybrid_from_config(c).objectives(i))) for i in range(n)) for c, n in runs]  # fmt: skip
            cost = {k: measure_step_flops(runs[0][0], k) for k in set().union(*taken)}
            total = [sum(cost[k] * n for k, n in t.items()) / (300 * ar_n) for t in taken]
            ratio = {"+".join(k): round(n / experiment_step_flops(runs[0][0], k), 3) for k, n in cost.items()}
            print(f"  {a:14s} {[round(t, 3) for t in total]}  {ratio}")


#: round 3's (arm, reference) comparisons: the pre-registered family (against ar) and the planned contrasts
R3_PRIMARY = ("perplexity", "ud_upos_acc", "rt_8shot_acc")
R3_REFERENCES = ("ar", "ar-neworder")
R3_CONTRASTS = (("late-0.5", "schedule-control"), ("late-0.5-neworder", "ar-neworder"), ("norm-late-0.5", "late-0.5"),
                ("lora-late-0.5", "late-0.5"))  # fmt: skip
R3_SECONDARY = ("ud_upos_f1", *METRICS[1:])


def family(runs: list[dict], pairs: list[tuple[str, str]], metrics: tuple[str, ...]) -> list[tuple]:
    """``(arm, ref, metric, per-seed differences, p, Holm p)`` over one family of paired tests."""
    cells = [(a, b, m, diffs(runs, a, m, ref=b)) for a, b in pairs for m in metrics]
    ps = [p_value(d) for *_, d in cells]
    return [(*c, p, q) for c, p, q in zip(cells, ps, holm(ps), strict=True)]


def round3(path: Path) -> None:
    """Round 3: every figure ``docs/pages/study.md`` states about it, one ``R3`` line each (the test checks the
    page holds each figure after the colon)."""
    print("\n== 6. Round 3 (each R3 line: a figure the page states) ==")
    if not path.exists():
        print(f"no {path}: round 3 has not been written there")
        return
    report = json.loads(path.read_text())
    runs = [r for r in report["runs"] if not r.get("alias")]
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    seeds = sorted({r["seed"] for r in runs})
    print(f"R3 runs: {len(runs)} runs, {len(arms)} arms, seeds {seeds[0]}–{seeds[-1]}")
    print(f"R3 commits: {', '.join(c[:7] for c in report.get('run_commits', [report.get('commit', '?')]))}")
    equal = [r for r in runs if r["budget"] == "flops" and r["arm"] != "schedule-control"]
    ar = {r["seed"]: r for r in runs if r["arm"] == "ar"}
    formula = [r["flops"] / ar[r["seed"]]["flops"] for r in equal if r["seed"] in ar]
    counted = [r["flops_counted_vs_ar"] for r in equal]
    if formula and counted:
        print(f"R3 FLOPs by the formula: {min(formula):.3f}–{max(formula):.3f}")
        print(f"R3 FLOPs by FlopCounterMode: {min(counted):.3f}–{max(counted):.3f}")
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        steps = sorted({r["steps"] for r in mine})
        cells = [fmt([val(r, m) for r in mine], 1 if m == "perplexity" else 3).lstrip("+") for m in ("perplexity", "ud_upos_acc", "rt_8shot_acc")]
        print(f"R3 arm {arm}: | {arm} | {'–'.join(map(str, (steps[0], steps[-1]))) if len(steps) > 1 else steps[0]} | {' | '.join(cells)} |")
    primary = family(runs, [(a, "ar") for a in arms if a not in R3_REFERENCES], R3_PRIMARY)
    contrasts = family(runs, [c for c in R3_CONTRASTS if c[0] in arms and c[1] in arms], R3_PRIMARY)
    def pfmt(x: float) -> str:
        return "< 0.001" if x < 0.001 else f"{x:.3f}"

    for name, tests in (("primary", primary), ("contrast", contrasts)):
        for a, b, m, d, p, q in tests:
            print(f"R3 {name} {a} - {b} {m}: | {m} | {fmt(d, 1 if m == 'perplexity' else 3)} | {pfmt(p)} | {pfmt(q)} |")
    print(f"R3 significant after Holm: {sum(t[-1] < 0.05 for t in primary)} of {len(primary)} primary, "
          f"{sum(t[-1] < 0.05 for t in contrasts)} of {len(contrasts)} contrasts")
    secondary = [(a, m, diffs(runs, a, m)) for a in arms if a not in R3_REFERENCES for m in R3_SECONDARY]
    above = [(a, m) for a, m, d in secondary if mean_ci(d)[0] - mean_ci(d)[1] > 0 and m != "perplexity"]
    below = [(a, m) for a, m, d in secondary if mean_ci(d)[0] + mean_ci(d)[1] < 0]
    print(f"R3 secondary intervals above zero: {len(above)} of {len(secondary)}")
    print(f"R3 secondary intervals below zero: {len(below)} of {len(secondary)}")
    for a, m in above:
        print(f"   above zero: {a} {m} {fmt(diffs(runs, a, m))}")
    keys = ("update_norm_ar_early", "update_norm_ar_late", "update_norm_meta_late", "clipped_grad_norm_ar_late",
            "clipped_grad_norm_meta_late", "grad_norm_raw_late")  # fmt: skip
    print(f"   update-norm columns: {', '.join(keys)}")
    for arm, cell in (report.get("updates") or {}).items():
        print(f"R3 updates {arm}: | {arm} | " + " | ".join(f"{cell[k][0]:.4f}" if k in cell else "—" for k in keys) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-count", action="store_true", help="skip torch's FLOP count of the steps")
    parser.add_argument("--round3-only", action="store_true", help="only round 3's figures")
    parser.add_argument("--round3", type=Path, default=RESULTS / "study_round3" / "study.json", help="round 3's study.json")
    args = parser.parse_args()
    if not args.round3_only:
        r1, r02, r2, conf = (load(n) for n in ("study", "study_ratio02", "study_round2", "study_round2_confirm"))
        round1(r1, r02)
        diagnostic(r2)
        late_meta(r2, conf)
        between_rounds(r1, r2)
        flops(r2, count=not args.no_count)
    round3(args.round3)


if __name__ == "__main__":
    main()
