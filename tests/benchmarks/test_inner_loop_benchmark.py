"""The inner-loop benchmark runs end to end against both references (``--quick``) and reports every variant."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "inner_loop.py"


def test_quick_run_times_every_variant(tmp_path):
    pytest.importorskip("higher")
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("inner_loop_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--quick", "--no-meta", "--no-plot", "--repeats", "1", "--warmup", "0", "--steps", "2",
                          "--tasks", "2", "--out", str(tmp_path)])  # fmt: skip
    variants = {r["variant"] for r in result["rows"]}
    assert {"torch", "torch-autograd", "general", "higher"} <= variants
    assert all(r["inner_ms"] > 0 and r["graph_mb"] > 0 for r in result["rows"])
    assert json.loads((tmp_path / "inner_loop_quick.json").read_text())["rows"] == result["rows"]
