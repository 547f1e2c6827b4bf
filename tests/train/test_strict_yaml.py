"""Strict YAML: YAML 1.2 floats, no duplicate keys, no unsafe tags, errors that name file and line."""

from __future__ import annotations

import pytest

from picomaml.params import ConfigError
from picomaml.train.config import load_config, upgrade_config_dict
from picomaml.train.strict_yaml import apply_overrides, load_yaml, load_yaml_file


def test_floats_in_every_spelling():
    data = load_yaml("a: 1e-3\nb: 2.0e-3\nc: 3.\nd: -.5\ne: 10\nf: x1e3\ng: 1_000", "t")
    assert data == {"a": 0.001, "b": 0.002, "c": 3.0, "d": -0.5, "e": 10, "f": "x1e3", "g": 1000}
    assert isinstance(data["e"], int)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a: 1\na: 2\n", r"f\.yaml: invalid YAML \(line 2.*duplicate key 'a'"),
        ("a: [1\n", r"f\.yaml: invalid YAML \(line"),
        ("a: !!python/object/apply:os.system [ls]\n", r"f\.yaml: invalid YAML.*python/object"),
    ],
)
def test_bad_yaml_is_one_clear_error(text, match):
    with pytest.raises(ConfigError, match=match):
        load_yaml(text, "f.yaml")


def test_files_and_overrides_name_their_source(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_yaml_file(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_yaml_file(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"a: \xff\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_yaml_file(bad)
    with pytest.raises(ConfigError, match=r"override 'hybrid.ratio=\[1'"):
        apply_overrides({}, ["hybrid.ratio=[1"])
    assert apply_overrides({}, ["optim.lr=1e-3"]) == {"optim": {"lr": 0.001}}


def test_config_errors_name_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: optim\.lr: must be a finite number"):
        load_config(path)


def test_renamed_keys_name_the_new_key_and_old_runs_upgrade():
    from picomaml.train.config import ExperimentConfig

    with pytest.raises(ConfigError, match="'eval.fewshot_episodes' was renamed: write 'eval.episodes'"):
        ExperimentConfig.from_dict({"eval": {"fewshot_episodes": 3}})
    with pytest.raises(ConfigError, match="'meta.head_lr' was renamed: write 'optim.meta_lr'"):
        ExperimentConfig.from_dict({"meta": {"head_lr": 1e-3}})
    old = {"meta": {"head_lr": 0.01, "pooling": "last"}, "eval": {"fewshot_settings": [[3, 2]]},
           "checkpoint": {"dynamics_layers": ["mlp.down_proj"], "keep_last": 1}}  # fmt: skip
    new, notes = upgrade_config_dict(old)
    cfg = ExperimentConfig.from_dict(new)
    assert cfg.optim.meta_lr == 0.01 and cfg.eval.settings == ((3, 2),)
    assert cfg.checkpoint.dynamics.layers == ("mlp.down_proj",) and cfg.meta.pooling == "last"
    assert len(notes) == 3 and "meta.head_lr -> optim.meta_lr" in notes
    assert old["meta"]["head_lr"] == 0.01  # the input is not changed


def test_an_alias_bomb_gives_a_short_message_quickly(tmp_path):
    """Nine levels of nine aliases expand to 9**9 items; the message is built without walking them."""
    import time

    levels = ['&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = "[" + ", ".join(levels) + "]"  # the anchors live inside the value itself
    for key in ("hybrid:\n  ratio", "inner_loop:\n  learn_lr", "data:\n  tokenizer", "seed", "sampler:\n  class_split"):
        path = tmp_path / "bomb.yaml"
        path.write_text(f"{key}: {bomb}\n")
        start = time.perf_counter()
        with pytest.raises(ConfigError) as err:
            load_config(path)
        assert time.perf_counter() - start < 2.0, key
        assert len(str(err.value)) < 400, key
        assert key.split(":")[0] in str(err.value)
