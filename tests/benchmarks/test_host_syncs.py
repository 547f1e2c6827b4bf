"""The host-sync benchmark runs (``--quick``) and finds none in lm_loss / meta_loss after the first call."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "host_syncs.py"


def load():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("host_syncs_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_host_sync_after_the_first_call(tmp_path):
    result = load().main(["--quick", "--calls", "2", "--out", str(tmp_path)])
    counts = result["counts"]
    assert set(counts) == {"lm_loss", "meta_loss (head)", "meta_loss (adapt_layers=1)"}
    assert all(c["later_max"] == 0 for c in counts.values()), counts
    assert json.loads((tmp_path / "host_syncs_quick.json").read_text())["counts"] == counts
