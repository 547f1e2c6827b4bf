"""The audited figures of docs/pages/study.md recompute from the studies' JSON (benchmarks/study_audit.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def audit(*args: str) -> str:
    """``benchmarks/study_audit.py``'s printout (it must succeed)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "study_audit.py"), *args],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_study_page_states_what_its_json_gives():
    out, page = audit("--no-count"), (ROOT / "docs" / "pages" / "study.md").read_text()
    # each figure as the script prints it, and as the page states it
    for printed, stated in [
        ("7 of 52 intervals include zero", "7 of the 52 intervals"),
        ("negative cosines, all 10 arms: 89 of 365", "89 of 365"),
        ("negative cosines, 7 main arms: 68 of 283", "68 of 283"),
        ("ar better in 156 of 156", "156 of 156"),
    ]:
        assert printed in out, printed
        assert stated in page, stated


def test_the_study_page_states_every_round3_figure():
    """Each ``R3`` line of the audit is a figure of round 3 (a table row or a number) that the page states."""
    page = (ROOT / "docs" / "pages" / "study.md").read_text()
    figures = [line.split(": ", 1)[1] for line in audit("--round3-only").splitlines() if line.startswith("R3 ")]
    assert len(figures) >= 45  # runs, commits, FLOPs, 9 arms, 33 tests, counts, 3 update rows
    missing = [f for f in figures if f not in page]
    assert not missing, missing
