"""The shipped recipe and configs: found by name, copied for editing, never confused with a local file."""

from __future__ import annotations

import pytest

import picomaml as pm
from picomaml.train.catalog import CONFIG_DIR, RECIPE_FILE, config_names, copy_item, items, resolve_config

SHIPPED = ["lm-only", "meta-only", "pico-maml-large", "pico-maml-medium", "pico-maml-small", "pico-maml-tiny", "tiny-cpu"]


def test_every_shipped_config_loads_by_name():
    assert config_names() == SHIPPED
    for name in SHIPPED:
        assert resolve_config(name) == resolve_config(f"{name}.yaml") == CONFIG_DIR / f"{name}.yaml"
        assert pm.load_config(name) == pm.load_config(CONFIG_DIR / f"{name}.yaml")


def test_a_local_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-cpu.yaml").write_text("seed: 7\n")
    assert resolve_config("tiny-cpu.yaml").resolve() == (tmp_path / "tiny-cpu.yaml").resolve()
    assert pm.load_config("tiny-cpu.yaml").seed == 7
    assert resolve_config("tiny-cpu") == CONFIG_DIR / "tiny-cpu.yaml"  # a bare name: the shipped one


def test_an_unknown_config_lists_the_shipped_ones(tmp_path):
    with pytest.raises(pm.ConfigError, match="tiny-cpuu.*no such file.*shipped: lm-only, .*tiny-cpu"):
        pm.load_config("tiny-cpuu")
    with pytest.raises(pm.ConfigError, match="is a directory, not a YAML config file"):
        resolve_config(tmp_path)
    with pytest.raises(pm.ConfigError, match="no such file"):  # a path with folders is never a shipped name
        resolve_config(tmp_path / "tiny-cpu")


def test_copy_into_a_folder_a_file_and_a_new_folder(tmp_path):
    assert copy_item("recipe", tmp_path) == tmp_path / RECIPE_FILE
    assert (tmp_path / RECIPE_FILE).read_bytes() == items()["recipe"].read_bytes()
    assert copy_item("tiny-cpu", tmp_path) == tmp_path / "tiny-cpu.yaml"
    assert pm.load_config(tmp_path / "tiny-cpu.yaml") == pm.load_config("tiny-cpu")
    assert copy_item("lm-only", tmp_path / "mine.yaml") == tmp_path / "mine.yaml"
    assert copy_item("recipe", f"{tmp_path / 'new'}/") == tmp_path / "new" / RECIPE_FILE
    assert copy_item("recipe", tmp_path / "my_run") == tmp_path / "my_run" / RECIPE_FILE  # no suffix: a folder


def test_copy_never_overwrites_without_force(tmp_path):
    target = tmp_path / "tiny-cpu.yaml"
    target.write_text("seed: 1\n")
    with pytest.raises(pm.ConfigError, match="exists.*--force"):
        copy_item("tiny-cpu", tmp_path)
    assert target.read_text() == "seed: 1\n"
    copy_item("tiny-cpu", tmp_path, overwrite=True)
    assert target.read_bytes() == (CONFIG_DIR / "tiny-cpu.yaml").read_bytes()
    with pytest.raises(pm.ConfigError, match="unknown; choose one of recipe, lm-only"):
        copy_item("nope", tmp_path)
