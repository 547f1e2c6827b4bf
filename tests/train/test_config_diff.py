"""compare_configs: which config changes a checkpoint survives (recorded) and which break it (architecture)."""

from __future__ import annotations

from picomaml.train.config import ExperimentConfig, load_config
from picomaml.train.config_diff import ABSENT, compare_configs


def config(*overrides: str) -> ExperimentConfig:
    model = ["model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=32"]
    return load_config(None, [*model, "data.seq_len=32", "sampler.window_len=8", *overrides])


def test_compare_configs_tells_architecture_from_other_changes():
    old = config("inner_loop.learn_lr=per_tensor").to_dict()
    changes = {c.key: c for c in compare_configs(old, config("optim.lr=0.002", "hybrid.ratio=0.25").to_dict())}
    assert set(changes) == {"optim.lr", "hybrid.ratio", "inner_loop.learn_lr"}
    assert changes["optim.lr"].new == 0.002 and not changes["optim.lr"].architecture
    assert changes["inner_loop.learn_lr"].architecture  # learned LRs are parameters
    for key in ("model.d_model=64", "sampler.n_way=4", "head.hidden_dims=[16]", "head.init=prototype"):
        (change,) = compare_configs(config().to_dict(), config(key).to_dict())
        assert change.architecture, key
    steps = compare_configs(config().to_dict(), config("inner_loop.steps=3").to_dict())
    assert [c.architecture for c in steps] == [False]  # one shared LR: the number of steps has no shape
    per_step = config("inner_loop.learn_lr=per_step")
    steps = compare_configs(per_step.to_dict(), config("inner_loop.learn_lr=per_step", "inner_loop.steps=3").to_dict())
    assert [(c.key, c.architecture) for c in steps] == [("inner_loop.steps", True)]


def test_saved_config_of_an_earlier_release_is_upgraded_before_comparing():
    saved = config().to_dict()
    saved["checkpoint"]["dynamics_layers"] = saved["checkpoint"].pop("dynamics")["layers"]
    assert compare_configs(saved, config().to_dict()) == []


def test_a_key_one_side_lacks_is_a_change():
    saved = config().to_dict()
    saved["trainer"]["retired_option"] = 1  # an option of another release: today's schema refuses it
    (change,) = compare_configs(saved, config().to_dict())
    assert (change.key, change.old, change.new, change.architecture) == ("trainer.retired_option", 1, ABSENT, False)
