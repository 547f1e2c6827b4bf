"""The sampler benchmark runs end to end (``--quick``) and reports the fresh-batch headline, the cached-index
figures beside it, and the sampler's share of a meta step."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "sampler.py"


def load():
    spec = importlib.util.spec_from_file_location("sampler_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_reports_the_fresh_batch_headline_and_the_meta_step_share(tmp_path):
    module = load()
    (tmp_path / "meta_step.json").write_text(
        json.dumps({"ms": {"meta_SO": 3000.0}, "config": {"threads": 2}, "model": {"vocab_size": 8192}})
    )
    result = module.main(["--quick", "--rows", "16", "--out", str(tmp_path)])
    head = result["headline"]
    assert head["case"] == "fresh batch, 1 episode/call" and head["goal_ms"] == 3.0
    assert head["goal_met"] == (head["ms_per_episode"] <= 3.0)
    assert set(result["cases"]) == {
        "fresh batch, 1 episode/call",
        "fresh batch, index build only",
        "fresh batch, n_tasks=8/call",
        "cached index, 1 episode/call",
        "cached index, n_tasks=8/call",
    }
    assert all(
        math.isfinite(c["ms_per_episode"]) and c["ms_per_episode"] > 0 for c in result["cases"].values()
    )
    share = result["meta_step_share"]
    assert share["quick_model"] and 0 < share["share"] < 1 and share["meta_step_ms"] > 0
    recorded = result["meta_step_share_recorded"]
    assert math.isclose(recorded["share"], head["ms_per_episode"] / (head["ms_per_episode"] + 3000.0))
    saved = json.loads((tmp_path / "sampler_quick.json").read_text())
    assert saved["headline"] == head
    table = (tmp_path / "sampler_quick.md").read_text()
    assert "**Fresh batch (index build included):" in table and "| cached index, 1 episode/call |" in table
    assert "Share of a meta step" in table and "NOT the tiny preset" in table


def test_the_fresh_batches_always_miss_the_cache():
    module = load()
    buffers = [module.zipf_buffer(2, 64, 100, 1.1, seed) for seed in range(3)]
    fresh = module.Fresh(buffers)
    seen = [fresh() for _ in range(7)]
    assert all(
        a is not b for a, b in zip(seen, seen[1:], strict=False)
    )  # consecutive calls never hand out one tensor
