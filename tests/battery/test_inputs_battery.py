"""The bad-input battery (see ``harness.py``): every case must be clean. ``python tests/battery/tally.py``
prints the tally by area."""

from __future__ import annotations

import pytest
from harness import CASES
from tally import load_cases

load_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case_is_clean(case, tmp_path):
    outcome = case.fn(tmp_path)
    assert outcome.kind == "clean", f"{case.id}: {outcome.kind}: {outcome.detail}"
