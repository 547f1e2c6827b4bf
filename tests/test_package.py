"""The package installs, exposes its public names and imports with core dependencies only."""

from __future__ import annotations

import subprocess
import sys

import picomaml as pm

OPTIONAL = (
    "transformers",
    "lightning",
    "datasets",
    "tokenizers",
    "pyarrow",
    "higher",
    "learn2learn",
    "matplotlib",
    "tqdm",
    "wandb",
    "tensorboard",
)


def test_version_and_all():
    assert isinstance(pm.__version__, str) and pm.__version__
    assert "__version__" in pm.__all__
    for name in pm.__all__:
        assert hasattr(pm, name), name
    assert sorted(dir(pm)) == sorted(pm.__all__)


def test_unknown_attribute_raises_attribute_error():
    try:
        pm.NotAThing  # noqa: B018
    except AttributeError as exc:
        assert "NotAThing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_import_does_not_load_optional_dependencies():
    # A fresh interpreter: import picomaml and every public name, then check sys.modules.
    # torch itself may import some of these (torch.hub imports tqdm): only what picomaml adds counts.
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import picomaml as pm\n"
        "for n in pm.__all__: getattr(pm, n)\n"
        "import picomaml.train.config, picomaml.meta.objectives, picomaml.cli\n"
        f"bad = [m for m in {OPTIONAL!r} if m in set(sys.modules) - before]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
