"""The adapt_layers benchmark runs end to end (``--quick``) and reports a row per value it was given."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "adapt_layers.py"


def test_quick_run_reports_time_memory_and_flops_per_adapt_layers(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("adapt_layers_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--quick", "--adapt", "0,1,all", "--out", str(tmp_path)])
    assert set(result["ms"]) == {"ar", "adapt_0", "adapt_1", "adapt_2"}  # all = the 2 layers of --quick
    assert all(math.isfinite(v) and v > 0 for v in result["ratios"].values())
    assert result["flops"]["adapt_0"] < result["flops"]["adapt_1"] < result["flops"]["adapt_2"]
    assert result["saved_mb"]["adapt_0"] < result["saved_mb"]["adapt_2"]  # second order keeps the block graphs
    saved = json.loads((tmp_path / "adapt_layers_quick.json").read_text())
    assert saved["ratios"] == result["ratios"]
    assert "| adapt_2 |" in (tmp_path / "adapt_layers_quick.md").read_text()
