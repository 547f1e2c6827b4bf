"""The console script: `picomaml info`, `picomaml sample`, and `picomaml eval` on a real 2-step trainer run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

import picomaml as pm
from picomaml.cli import main


def test_info_lists_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("picomaml", "torch", "transformers", "lightning", "higher", "learn2learn"):
        assert name in out


def test_sample_prints_decoded_episodes(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PICOMAML_CACHE", str(tmp_path))
    assert main(["sample", "--n", "2", "--n-way", "3", "--k-shot", "2", "--n-query", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("=== episode") == 2
    assert out.count("label 0: class token") == 2 and "label 2: class token" in out
    assert out.count("  support |") == 2 * 3 * 2 and out.count("  query   |") == 2 * 3 * 1
    assert "[MASK]" in out


def _train_two_steps(tmp_path: Path) -> Path:
    """A real 2-step run of examples/train_smlmt.py in a subprocess (tiny model; saves at step 2)."""
    cache = tmp_path / "cache"
    pm.load_default_corpus(seq_len=33, cache_dir=cache)  # built here once, read by the trainer and eval
    cfg = {
        "seed": 3,
        "model": {
            "vocab_size": 8192, "d_model": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 64,
            "max_seq_len": 32,
        },
        "data": {"source": "embedded", "seq_len": 32, "batch_size": 8, "cache_dir": str(cache)},
        "sampler": {"n_way": 3, "k_shot": 2, "n_query": 2, "window_len": 8, "min_freq": 3, "max_freq": 0.5},
        "head": {"hidden_dims": [16], "init": "prototype"},
        "inner_loop": {"steps": 1, "lr": 0.1},
        "meta": {"pooling": "mask", "n_tasks": 2},
        "hybrid": {"ratio": 0.5, "mode": "bernoulli"},
        "trainer": {"max_steps": 2, "log_every": 1, "eval_every": 100, "save_every": 2, "accelerator": "cpu"},
        "eval": {"rows": 8, "batch_size": 8, "episodes": 2, "settings": [[3, 2]]},
    }  # fmt: skip
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PICOMAML_CACHE": str(cache)}
    proc = subprocess.run(
        [sys.executable, str(root / "examples" / "train_smlmt.py"), "--config", str(config), "--run-dir",
         str(run_dir), "--resume", "none"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_eval_on_a_real_two_step_trainer_run(tmp_path, capsys):
    run_dir = _train_two_steps(tmp_path)
    target = tmp_path / "eval.json"
    argv = ["eval", "--checkpoint", str(run_dir), "--episodes", "3", "--json", str(target), "--no-downstream"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| task |"))
    assert "chance" in header and "linear probe" in header and "(step 2)" in out
    data = json.loads(target.read_text())
    assert data["checkpoint"]["step"] == 2 and data["episodes"] == 3
    assert [r["setting"] for r in data["smlmt"]] == ["5w1s", "5w4s", "3w2s"]  # defaults + the training one
    for r in data["smlmt"]:
        assert r["episodes"] == 3 and r["chance"] == 1 / r["n_way"]
        for key in ("acc_ncm", "acc_probe", "acc_after"):  # a prototype head serves every n_way
            assert 0.0 <= r[key] <= 1.0, (key, r)
        assert len(r["per_episode_probe"]) == 3
    assert "downstream" not in data or not data["downstream"]


def test_eval_subcommand_errors_name_the_path(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    assert main(["eval", "--checkpoint", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    bare = tmp_path / "run-without-checkpoint"  # a run dir whose trainer never saved
    bare.mkdir()
    (bare / "metrics.csv").write_text("step\n1\n")
    assert main(["eval", "--checkpoint", str(bare)]) == 2
    err = capsys.readouterr().err
    assert "run-without-checkpoint" in err and "error" in err


def test_a_bad_sample_argument_is_one_line_not_a_traceback(capsys):
    from picomaml.cli import main

    assert main(["sample", "--n-way", "1"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["picomaml sample: n_way: must be an integer >= 2, got 1"]


def test_every_option_with_a_default_says_it_in_its_help():
    import argparse

    from picomaml.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, p in sub.choices.items():
        for action in p._actions:
            silent = action.default in (None, False, [], argparse.SUPPRESS) or isinstance(action, argparse._HelpAction)
            if not silent and "default" not in (action.help or ""):
                missing.append(f"{name} {action.option_strings[0]}")
    assert missing == []
