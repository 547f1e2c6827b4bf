"""pico-analyze (the real one, from ../shared/clients) runs unchanged on a picomaml run directory.

A short trainer run with learning dynamics writes ``training_config.yaml`` and ``checkpoints/step_{N}``
(step 0 included, pruned steps keeping their dynamics); pico-analyze's own script then computes every
metric it has (norm, PER, Gini, Hoyer, condition number on weights and gradients; CKA and PWCCA on
activations) on simple and OV-circuit components named with picomaml's module names.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from picomaml.train import recipe
from picomaml.train.dynamics import load_learning_dynamics

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = ROOT.parent / "shared" / "clients"
ARCHIVES = sorted(CLIENTS.glob("pico-analyze-*.tar.gz")) if CLIENTS.is_dir() else []
pytestmark = pytest.mark.skipif(not ARCHIVES, reason=f"pico-analyze's snapshot is not in {CLIENTS}")

OV = {"output_layer": "attention.o_proj", "value_layer": "attention.v_proj"}
STEPS = (0, 2, 4)


def component(name: str, data_type: str, suffixes) -> dict:
    return {"component_name": name, "data_type": data_type, "layer_suffixes": suffixes, "layers": [0, 1]}


ANALYSIS = {
    "analysis_name": "picomaml-run",
    "steps": {"start": 0, "end": 4, "step": 2},
    "monitoring": {"output_dir": "OUT", "save_to_wandb": False},
    "metrics": [
        {"metric_name": "cka", "target_checkpoint": 4, "data_split": "val",
         "components": [component("ov_circuit", "activations", OV), component("simple", "activations", "mlp.down_proj")]},
        {"metric_name": "pwcca", "target_checkpoint": 4, "data_split": "train",
         "components": [component("simple", "activations", "mlp.down_proj"),  # PWCCA needs more rows than
                        component("simple", "activations", "attention.v_proj")]},  # features: OV has n_heads x d
        {"metric_name": "norm", "norm_type": "frobenius", "data_split": "val",
         "components": [component("ov_circuit", "weights", OV), component("simple", "gradients", "mlp.down_proj")]},
        {"metric_name": "per", "data_split": "train",
         "components": [component("simple", "weights", "mlp.down_proj"), component("ov_circuit", "gradients", OV)]},
        {"metric_name": "gini", "data_split": "val",
         "components": [component("simple", "weights", "attention.v_proj"), component("simple", "gradients", "mlp.down_proj")]},
        {"metric_name": "hoyer", "data_split": "train",
         "components": [component("simple", "gradients", "mlp.down_proj"), component("simple", "weights", "attention.o_proj")]},
        {"metric_name": "condition_number", "data_split": "val",
         "components": [component("simple", "weights", "attention.v_proj"), component("ov_circuit", "weights", OV)]},
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def analysed(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("pico-analyze")
    with tarfile.open(ARCHIVES[-1]) as tar:
        tar.extractall(base, filter="data")
    tool = next(p.parent.parent for p in base.glob("*/scripts/analyze.py"))
    config = {
        "seed": 3,
        "model": {"vocab_size": 8192, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 64,
                  "max_seq_len": 32},
        "data": {"source": "embedded", "seq_len": 32, "batch_size": 8, "cache_dir": str(base / "corpus")},
        "sampler": {"n_way": 3, "k_shot": 2, "n_query": 2, "window_len": 8, "min_freq": 3, "max_freq": 0.5},
        "inner_loop": {"steps": 2, "lr": 0.1},
        "trainer": {"max_steps": 4, "log_every": 2, "eval_every": 100, "save_every": 2, "accelerator": "cpu"},
        "eval": {"rows": 8, "batch_size": 8, "episodes": 2, "settings": [[3, 2]]},
        "checkpoint": {"keep_last": 2, "learning_dynamics": True, "dynamics": {"save_data": True}},
    }  # fmt: skip
    (base / "config.yaml").write_text(yaml.safe_dump(config))
    run_dir = base / "run"
    assert recipe.main(["--config", str(base / "config.yaml"), "--run-dir", str(run_dir)]) == 0
    analysis = dict(ANALYSIS, monitoring={"output_dir": str(base / "out"), "save_to_wandb": False})
    (base / "analysis.yaml").write_text(yaml.safe_dump(analysis))
    env = {**os.environ, "PYTHONPATH": str(tool), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "scripts.analyze", "--config_path", str(base / "analysis.yaml"), "--run_path", str(run_dir)]
    proc = subprocess.run(cmd, cwd=tool, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Skipping step" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    return run_dir, base / "out" / "picomaml-run"


def test_the_run_directory_has_what_pico_analyze_reads(analysed):
    run_dir, _ = analysed
    training = yaml.safe_load((run_dir / "training_config.yaml").read_text())
    assert training["model"]["d_model"] == 32 and training["model"]["attention_n_heads"] == 4
    assert training["model"]["attention_n_kv_heads"] == 2 and training["checkpointing"]["run_name"] == "run"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir()) == ["step_0", "step_2", "step_4"]
    pruned = run_dir / "checkpoints" / "step_0"  # keep_last=2 pruned it; its dynamics stay
    assert (pruned / "PRUNED").exists() and not (pruned / "model.pt").exists()
    dyn = load_learning_dynamics(pruned, "val")
    assert dyn["activations"]["layers.0.attention.v_proj"].shape == (64, 16)  # 2 x d_model rows, kv width


def test_every_metric_is_finite_at_every_step(analysed):
    _, out = analysed
    for step in STEPS:
        for metric in ANALYSIS["metrics"]:
            path = out / f"step_{step}" / f"{metric['metric_name']}_{metric['data_split']}.json"
            values = json.loads(path.read_text())
            kinds = {c["component_name"] for c in metric["components"]}
            assert any("ov_circuit" in k for k in values) == ("ov_circuit" in kinds), (path, list(values))
            assert len(values) >= 4 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values.values()), (
                path, values,
            )
