"""The meta-step benchmark runs end to end (``--quick``) and reports every row and ratio it promises."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "meta_step.py"


def test_quick_run_reports_the_faithful_replaced_design(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("meta_step_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--quick", "--repeats", "1", "--out", str(tmp_path)])
    assert set(result["ms"]) == {"ar", "meta_SO", "meta_FO", "replaced", "replaced_anomaly"}
    assert {"replaced / meta_SO", "replaced_anomaly / meta_SO", "meta_SO / ar"} <= set(result["ratios"])
    assert all(math.isfinite(v) and v > 0 for v in result["ratios"].values())
    saved = json.loads((tmp_path / "meta_step_quick.json").read_text())
    assert saved["ratios"] == result["ratios"]
    assert "| replaced_anomaly |" in (tmp_path / "meta_step_quick.md").read_text()
