"""``benchmarks/gpu.py --quick --device cpu`` runs end to end: every row has finite numbers, the trainer run's
losses are finite and its resume continues where the first run stopped."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"
ROWS = ("AR eager", "AR compiled", "meta eager", "meta, compiled backbone", "AR eager, meta tokens")


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_cpu_run_reports_every_row_and_a_resumed_trainer_run(tmp_path):
    # a corpus cache the user already has is reused; otherwise it is built once here (seconds)
    cache = os.environ.get("PICOMAML_CACHE") or str(tmp_path / "cache")
    cmd = [
        sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--threads", "1", "--out", str(tmp_path),
        "--run-dir", str(tmp_path / "run"), "--cache-dir", cache,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_cpu_quick.json").read_text())
    table = (tmp_path / "gpu_cpu_quick.md").read_text()
    assert result["device_type"] == "cpu" and result["dtype"] == "fp32"
    assert _finite_positive(result["peak_tflops"]) and _finite_positive(result["matmul_tflops"])
    assert "measured" in result["peak_source"]  # no data-sheet peak for a CPU: says which was used

    assert set(result["rows"]) == set(ROWS)
    for name, row in result["rows"].items():
        assert row["error"] is None, (name, row["error"])
        for key in ("ms", "tokens_per_s", "tflops", "mfu", "flops", "tokens"):
            assert _finite_positive(row[key]), (name, key, row.get(key))
        if row["compiled"]:
            assert _finite_positive(row["first_step_s"])
        else:
            assert _finite_positive(row["saved_mib"])  # CPU: memory autograd saves for backward
        assert f"| {name} |" in table
    assert result["rows"]["AR compiled"]["graph_breaks"] is not None
    assert "pm.ar_step_flops" in table and "peak for MFU" in table
    for value in result["ratios"].values():
        assert _finite_positive(value)

    trainer = result["trainer"]
    assert "error" not in trainer, trainer.get("error")
    assert trainer["precision"] == "32-true"
    assert trainer["first_rc"] == 0 and trainer["resume_rc"] == 0
    assert trainer["losses_finite"] and trainer["lm_losses"] > 0 and trainer["meta_losses"] > 0
    steps, total = trainer["steps"], trainer["resume_steps"]
    assert trainer["logged_steps"] == list(range(1, total + 1))  # once each: continued, not restarted
    assert trainer["steps_counted"] == total and trainer["resume_log_says"]
    assert trainer["ok"] and f"resume continued from step {steps}: True" in table
    assert (tmp_path / "run" / "metrics.csv").is_file()


def test_a_failing_compile_is_reported_in_its_row_not_raised(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        result = module.main([
            "--quick", "--device", "cpu", "--threads", "1", "--no-trainer", "--compile-backend", "no_such_backend",
            "--repeats", "1", "--warmup", "0", "--out", str(tmp_path),
        ])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    rows = result["rows"]
    for name in ("AR compiled", "meta, compiled backbone"):
        assert "no_such_backend" in rows[name]["error"] and "ms" not in rows[name]
    for name in ("AR eager", "meta eager", "AR eager, meta tokens"):
        assert rows[name]["error"] is None and _finite_positive(rows[name]["ms"])
    assert result["ratios"]["meta / AR (same tokens, eager)"] > 0
    assert result["ratios"]["AR eager / AR compiled (speed-up)"] is None
    assert "no_such_backend" in (tmp_path / "gpu_cpu_quick.md").read_text()
    assert "trainer" not in result
