"""Strict configuration: unknown keys, wrong types and bad ranges are rejected with the field named."""

from __future__ import annotations

import pytest
import yaml

from picomaml.meta.hybrid import HybridConfig
from picomaml.meta.sampler import SamplerConfig
from picomaml.params import ConfigError, from_dict
from picomaml.train.config import ExperimentConfig, dump_config, load_config
from picomaml.train.strict_yaml import apply_overrides


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = load_config()
    path = tmp_path / "c.yaml"
    dump_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert yaml.safe_load(path.read_text())["model"]["d_model"] == cfg.model.d_model


def test_unknown_key_names_key_path_and_valid_keys():
    with pytest.raises(ConfigError) as err:
        ExperimentConfig.from_dict({"sampler": {"n_wya": 4}})
    msg = str(err.value)
    assert "n_wya" in msg and "sampler.n_wya" in msg and "n_way" in msg and "k_shot" in msg


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match="unknown key 'optimiser'.*valid keys:.*optim"):
        ExperimentConfig.from_dict({"optimiser": {}})


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"sampler": {"n_way": "eight"}}, "sampler.n_way"),
        ({"sampler": {"n_way": 4.5}}, "sampler.n_way"),
        ({"inner_loop": {"first_order": "yes"}}, "inner_loop.first_order"),
        ({"hybrid": {"mode": "coin"}}, "hybrid.mode"),
        ({"head": {"hidden_dims": 128}}, "head.hidden_dims"),
        ({"model": {"d_model": "big"}}, "model.d_model"),
    ],
)
def test_wrong_type_names_field(data, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ExperimentConfig.from_dict(data)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"hybrid": {"ratio": 1.5}}, "hybrid.ratio"),
        ({"hybrid": {"ratio": -0.1}}, "hybrid.ratio"),
        ({"sampler": {"n_way": 1}}, "sampler.n_way"),
        ({"inner_loop": {"lr": 0}}, "inner_loop.lr"),
        ({"optim": {"betas": [0.9, 1.0]}}, "optim.betas"),
        ({"data": {"batch_size": 0}}, "data.batch_size"),
        ({"trainer": {"max_steps": 0}}, "trainer.max_steps"),
    ],
)
def test_out_of_range_names_field(data, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ExperimentConfig.from_dict(data)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="sampler.window_len"):
        ExperimentConfig.from_dict({"data": {"seq_len": 32}, "sampler": {"window_len": 64}})
    with pytest.raises(ConfigError, match="data.seq_len"):
        ExperimentConfig.from_dict(
            {"model": {"vocab_size": 100, "max_seq_len": 64}, "data": {"seq_len": 128}}
        )


def test_model_preset_with_overrides():
    cfg = ExperimentConfig.from_dict({"model": {"preset": "small", "vocab_size": 1000, "n_layers": 2}})
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.vocab_size) == (384, 2, 1000)
    with pytest.raises(ConfigError, match="preset"):
        ExperimentConfig.from_dict({"model": {"preset": "gigantic"}})


def test_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("hybrid:\n  ratio: 0.5\n")
    cfg = load_config(
        path, ["hybrid.ratio=0.25", "head.hidden_dims=[64, 64]", "inner_loop.learn_lr=per_step"]
    )
    assert cfg.hybrid.ratio == 0.25
    assert cfg.head.hidden_dims == (64, 64)
    assert cfg.inner_loop.learn_lr == "per_step"
    with pytest.raises(ConfigError, match="hybrid.ratoi"):
        load_config(path, ["hybrid.ratoi=0.3"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(path, ["hybrid.ratio"])


def test_apply_overrides_creates_sections_and_rejects_value_as_section():
    data = apply_overrides({}, ["a.b.c=3"])
    assert data == {"a": {"b": {"c": 3}}}
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_int_accepted_for_float_but_not_bool():
    assert from_dict(HybridConfig, {"ratio": 1}).ratio == 1.0
    with pytest.raises(ConfigError, match="ratio"):
        from_dict(HybridConfig, {"ratio": True})


def test_tuple_field_from_list():
    assert from_dict(SamplerConfig, {"exclude_token_ids": [1, 2]}).exclude_token_ids == (1, 2)


def test_top_level_must_be_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_configuration_page_embeds_the_current_reference():
    """docs/pages/configuration.md carries the generated field reference; regenerate it with
    ``picomaml config --reference`` when a declaration changes."""
    from pathlib import Path

    from picomaml.train.config import REFERENCE_END, REFERENCE_START, reference_markdown

    page = (Path(__file__).resolve().parents[2] / "docs" / "pages" / "configuration.md").read_text()
    start, end = page.index(REFERENCE_START), page.index(REFERENCE_END) + len(REFERENCE_END)
    assert page[start:end] == reference_markdown()
    for section in ("sampler", "head", "inner_loop", "optim", "checkpoint"):
        assert f"`{section}." in page


def test_config_command_prints_yaml_and_reference(capsys, tmp_path):
    from picomaml.cli import main

    assert main(["config", "--set", "hybrid.ratio=0.25"]) == 0
    assert load_config(None, ["hybrid.ratio=0.25"]) == ExperimentConfig.from_dict(yaml.safe_load(capsys.readouterr().out))
    assert main(["config", "--reference"]) == 0
    assert "`inner_loop.steps`" in capsys.readouterr().out
    assert main(["config", "--set", "hybrid.ratio=2"]) == 2
    assert "hybrid.ratio" in capsys.readouterr().err


def test_pcgrad_with_a_compiled_backbone_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="meta.grad_surgery: pcgrad differentiates each loss twice"):
        ExperimentConfig.from_dict({"trainer": {"compile": True}, "meta": {"grad_surgery": "pcgrad"}})


@pytest.mark.parametrize(("overrides", "message"), [
    (["hybrid.mode=weighted", "optim.meta_grad_norm=0.5"], "optim.meta_grad_norm: needs steps that are either AR or meta"),
    (["hybrid.mode=weighted", "optim.meta_moments=separate"], "optim.meta_moments: needs steps that are either AR"),
    (["meta.lora_rank=2", "meta.adapt_layers=1"], "meta.lora_rank: .* with meta.adapt_layers"),
    (["meta.lora_rank=2", "trainer.compile=true"], "meta.lora_rank: .* with trainer.compile"),
    (["meta.lora_rank=2", "inner_loop.learn_lr=per_tensor"], "meta.lora_rank: .* with inner_loop.learn_lr"),
    (["meta.lora_rank=2", "meta.grad_blocks=1"], "meta.lora_rank: .* with meta.grad_blocks"),
    (["meta.lora_rank=2", "meta.lora_targets=[qproj]"], "meta.lora_targets: 'qproj' matches no linear layer of a block"),
    (["optim.meta_grad_norm=0.5", "trainer.precision=16-mixed"], "optim.meta_grad_norm: is not supported with trainer.precision=16-mixed"),
    (["optim.meta_moments=both"], "optim.meta_moments"),
    (["optim.meta_grad_decay=1.0"], "optim.meta_grad_decay"),
])  # fmt: skip
def test_meta_update_and_lora_options_that_do_not_combine_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny-cpu", overrides)


def test_meta_update_and_lora_options_load_together():
    cfg = load_config("tiny-cpu", ["optim.meta_grad_norm=0.5", "optim.meta_moments=separate", "meta.lora_rank=2",
                                   "meta.lora_targets=[q_proj, down_proj]", "eval.update_norms=true"])  # fmt: skip
    assert (cfg.optim.meta_grad_norm, cfg.optim.meta_moments, cfg.meta.lora_rank) == (0.5, "separate", 2)
    assert cfg.meta.lora_targets == ("q_proj", "down_proj") and cfg.eval.update_norms is True
