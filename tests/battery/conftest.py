"""The battery's corpus and trained run live in one folder per test session."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def battery_cache(tmp_path_factory):
    previous = os.environ.get("PICOMAML_BATTERY_CACHE")
    os.environ["PICOMAML_BATTERY_CACHE"] = str(tmp_path_factory.mktemp("battery-cache"))
    yield
    if previous is None:
        os.environ.pop("PICOMAML_BATTERY_CACHE", None)
    else:
        os.environ["PICOMAML_BATTERY_CACHE"] = previous
