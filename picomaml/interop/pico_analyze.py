"""The run description pico-analyze reads: ``RUN/training_config.yaml`` in pico-train's key names.

pico-analyze (github.com/pico-lm/pico-analyze) reads a run directory written by pico-train:
``training_config.yaml`` at its root (the OV-circuit component reads ``model.d_model``,
``model.attention_n_heads`` and ``model.attention_n_kv_heads``; an analysis without a name is named after
``checkpointing.run_name``) and ``checkpoints/step_{N}/learning_dynamics/{split}_{kind}.pt``. picomaml's
own strict ``config.yaml`` stays the source of truth;
[`training_config`][picomaml.interop.pico_analyze.training_config] derives the pico-train view of it, and the
run directory writes both at every start
([`picomaml.train.run_dir.commit_start`][picomaml.train.run_dir.commit_start]).

A picomaml decoder's module names are ``layers.{i}.attention.{q,k,v,o}_proj`` and
``layers.{i}.mlp.{gate,up,down}_proj`` (pico-train's ``swiglu.w_2`` is ``mlp.down_proj``); an analysis
config names them in ``layer_suffixes``.
"""

from __future__ import annotations

from typing import Any

import yaml

from picomaml._version import __version__

__all__ = ["TRAINING_CONFIG", "training_config", "training_config_yaml"]

TRAINING_CONFIG = "training_config.yaml"


def training_config(config: Any, run_name: str) -> dict[str, Any]:
    """The pico-train-style description of a run (the keys pico-analyze and pico-train's tools read).

    Args:
        config: The run's [`ExperimentConfig`][picomaml.train.config.ExperimentConfig].
        run_name: The run's name (its directory's name).

    Returns:
        A nested dict: ``model`` (pico-train's architecture keys), ``checkpointing`` (run name, save
        interval, learning-dynamics layers and rows, Hub repo), ``training`` (steps, optimizer, devices) and
        ``picomaml`` (version, and that ``config.yaml`` is the full config).
    """
    m, d, t, o, c = config.model, config.data, config.trainer, config.optim, config.checkpoint
    dyn = c.dynamics
    return {
        "model": {
            "model_type": "pico_decoder",
            "d_model": m.d_model,
            "n_layers": m.n_layers,
            "vocab_size": m.vocab_size,
            "batch_size": d.batch_size,
            "max_seq_len": m.max_seq_len,
            "attention_n_heads": m.n_heads,
            "attention_n_kv_heads": m.n_kv_heads,
            "activation_hidden_dim": m.ffn_dim,
            "norm_eps": m.norm_eps,
            "position_emb_theta": m.rope_theta,
        },
        "checkpointing": {
            "run_name": run_name,
            "save_every_n_steps": t.save_every,
            "save_to_hf": c.hub_repo is not None,
            "hf_checkpoint": {"repo_id": c.hub_repo or ""},
            "learning_dynamics": {
                "layer_suffixes": list(dyn.layers) if c.learning_dynamics else [],
                "sequence_idx": dyn.seq_idx,
                "batch_size": dyn.batch_size,
            },
        },
        "training": {
            "max_steps": t.max_steps,
            "optimization": {
                "optimizer": "adamw",
                "lr": o.lr,
                "lr_warmup_steps": o.warmup_steps,
                "gradient_accumulation_steps": d.grad_accum,
            },
            "fabric": {"num_devices": t.devices, "precision": t.precision, "accelerator": t.accelerator},
        },
        "picomaml": {"version": __version__, "config": "config.yaml", "seed": config.seed},
    }


def training_config_yaml(config: Any, run_name: str) -> str:
    """[`training_config`][picomaml.interop.pico_analyze.training_config] as YAML text (the contents of
    ``RUN/training_config.yaml``)."""
    header = "# written by picomaml for pico-analyze; the run's full config is config.yaml\n"
    return header + yaml.safe_dump(training_config(config, run_name), sort_keys=False)
