"""What the wheel ships for training: the reference recipe and its configs, found by name or path.

``picomaml train --config tiny-cpu`` and ``picomaml cp recipe my_run/`` read from here, so a
``pip install picomaml[all]`` trains without a clone of the repository. The configs are package data
(``picomaml/train/configs/*.yaml``); the recipe is the module [`picomaml.train.recipe`][picomaml.train.recipe],
a script that imports only the installed package, so a copy of it runs from anywhere:

    picomaml cp recipe my_run/            # my_run/train_smlmt.py, edit the loop
    picomaml cp pico-maml-tiny my_run/    # my_run/pico-maml-tiny.yaml, edit the settings
    python my_run/train_smlmt.py --config my_run/pico-maml-tiny.yaml --run-dir runs/mine
"""

from __future__ import annotations

import shutil
from pathlib import Path

from picomaml.params import ConfigError

__all__ = ["CONFIG_DIR", "RECIPE", "RECIPE_FILE", "config_names", "resolve_config", "copy_item", "items"]

#: the shipped YAML configs, one per file (name = file stem)
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
#: the name ``picomaml cp`` gives the reference recipe, and the file name of its copy
RECIPE = "recipe"
RECIPE_FILE = "train_smlmt.py"


def config_names() -> list[str]:
    """Names of the shipped configs (``tiny-cpu``, ``pico-maml-tiny``, ...), sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def items() -> dict[str, Path]:
    """Everything ``picomaml cp`` can copy: ``recipe`` and every shipped config, name -> source file."""
    return {RECIPE: Path(__file__).resolve().parent / "recipe.py"} | {
        name: CONFIG_DIR / f"{name}.yaml" for name in config_names()
    }


def resolve_config(name_or_path: str | Path) -> Path:
    """The YAML file ``--config`` means: an existing path as given, else a shipped config by name.

    A shipped name may carry its ``.yaml`` suffix (``tiny-cpu`` and ``tiny-cpu.yaml`` are the same). A path
    that exists always wins, so a local ``tiny-cpu.yaml`` you edited is the one used.

    Raises:
        ConfigError: Neither a file nor a shipped config; the message lists the shipped names.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    stem = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    if path.parent == Path(".") and stem in config_names():
        return CONFIG_DIR / f"{stem}.yaml"
    if path.exists():
        raise ConfigError(f"config {str(name_or_path)!r}: is a directory, not a YAML config file")
    raise ConfigError(
        f"config {str(name_or_path)!r}: no such file and no shipped config of that name "
        f"(shipped: {', '.join(config_names())})"
    )


def copy_item(name: str, dest: str | Path, *, overwrite: bool = False) -> Path:
    """Copy the recipe or a shipped config to ``dest`` for editing, as torchtune's ``tune cp`` does.

    Args:
        name: ``"recipe"`` or a config name from [`config_names`][picomaml.train.catalog.config_names].
        dest: A directory (existing, or new: ending in ``/`` or without a file suffix) or a file path
            (``mine.yaml``). Into a directory the recipe is written as ``train_smlmt.py`` and a config as
            ``<name>.yaml``.
        overwrite: Replace an existing file; without it an existing file is an error.

    Returns:
        The path written.

    Raises:
        ConfigError: An unknown name (the known ones are listed) or an existing destination file.
    """
    sources = items()
    if name not in sources:
        raise ConfigError(f"picomaml cp {name!r}: unknown; choose one of {', '.join(sources)}")
    source, as_dir = sources[name], str(dest).endswith(("/", "\\"))  # Path() drops a trailing slash
    dest = Path(dest)
    as_dir = as_dir or (not dest.exists() and not dest.suffix)  # `cp recipe my_run`: a new folder, not a file
    if dest.is_dir() or as_dir:
        dest = dest / (RECIPE_FILE if name == RECIPE else source.name)
    if dest.exists() and not overwrite:
        raise ConfigError(f"{dest} exists (pass --force to replace it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)
    return dest
