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


def test_the_wheel_ships_the_recipe_and_configs_and_trains_from_an_empty_folder(tmp_path):
    """``pip install picomaml`` (a wheel, no clone): ``picomaml train --config tiny-cpu`` finds everything."""
    import os
    import shutil
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    source, wheels = tmp_path / "source", tmp_path / "wheels"  # built from a copy: no build/ in the checkout
    shutil.copytree(root / "picomaml", source / "picomaml", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(source)],
        capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("picomaml-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {n.rsplit("/", 1)[1] for n in names if n.startswith("picomaml/train/configs/")}
    assert configs == {p.name for p in (root / "picomaml" / "train" / "configs").glob("*.yaml")} and configs
    assert {"picomaml/train/recipe.py", "picomaml/py.typed"} <= names
    assert not any(n.startswith(("examples/", "tests/", "benchmarks/")) for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "picomaml = picomaml.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()

    # the installed wheel alone (the repository off the path), run from an empty folder
    target, empty = tmp_path / "site", tmp_path / "empty"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    empty.mkdir()
    tiny = [
        "model.d_model=32", "model.n_layers=1", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=64",
        "eval.episodes=2", "eval.rows=16",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "2", "PICOMAML_CACHE": str(tmp_path / "cache")}
    code = "import sys, picomaml.cli; print(picomaml.__file__, file=sys.stderr); sys.exit(picomaml.cli.main())"
    proc = subprocess.run(
        [sys.executable, "-c", code, "train", "--config", "tiny-cpu", "--max-steps", "2", "--eval-every", "2",
         *(a for kv in tiny for a in ("--set", kv))],
        capture_output=True, text=True, timeout=250, env=env, cwd=empty,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(line.startswith(str(target)) for line in proc.stderr.splitlines())  # the wheel, not the checkout
    run = empty / "runs" / "tiny-cpu"
    assert (run / "checkpoints" / "step_2").is_dir() and (run / "config.yaml").is_file()
    assert "eval/perplexity" in (run / "metrics.csv").read_text().splitlines()[0]
