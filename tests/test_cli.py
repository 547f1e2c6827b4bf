"""The console script: `info`, `sample`, `cp`, and `train`, `eval`, `finetune`, `export` on a real 2-step trainer
run."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import picomaml as pm
from picomaml.cli import build_eval_parser, eval_main, main


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


TINY = {
    "seed": 3,
    "model": {
        "vocab_size": 8192, "d_model": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 64,
        "max_seq_len": 32,
    },
    "data": {"source": "embedded", "seq_len": 32, "batch_size": 8},
    "sampler": {"n_way": 3, "k_shot": 2, "n_query": 2, "window_len": 8, "min_freq": 3, "max_freq": 0.5},
    "head": {"hidden_dims": [16], "init": "prototype"},
    "inner_loop": {"steps": 1, "lr": 0.1},
    "meta": {"pooling": "mask", "n_tasks": 2},
    "hybrid": {"ratio": 0.5, "mode": "bernoulli"},
    "trainer": {"max_steps": 2, "log_every": 1, "eval_every": 100, "save_every": 2, "accelerator": "cpu"},
    "eval": {"rows": 8, "batch_size": 8, "episodes": 2, "settings": [[3, 2]]},
}  # fmt: skip


def _tiny_config(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    cache = tmp_path / "cache"
    pm.load_default_corpus(seq_len=33, cache_dir=cache)  # built here once, read by the trainer and eval
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**TINY, "data": {**TINY["data"], "cache_dir": str(cache)}}))
    return config, {**os.environ, "OMP_NUM_THREADS": "2", "PICOMAML_CACHE": str(cache)}


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory) -> Path:
    """A real 2-step run of ``picomaml train`` in a subprocess (tiny model; saves at step 2)."""
    tmp_path = tmp_path_factory.mktemp("cli-run")
    config, env = _tiny_config(tmp_path)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "picomaml.cli", "train", "--config", str(config), "--run-dir", str(run_dir),
         "--resume", "none"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"evaluate: picomaml eval --checkpoint {run_dir}" in proc.stdout  # the summary's next steps
    return run_dir


def test_a_copied_recipe_runs_on_its_own_from_any_folder(tmp_path, capsys):
    """``picomaml cp recipe DIR`` gives a script that trains from the installed package alone."""
    assert main(["cp", "recipe", str(tmp_path / "mine")]) == 0
    assert main(["cp", "recipe", str(tmp_path / "mine")]) == 2  # never overwritten without --force
    assert "mine/train_smlmt.py exists (pass --force" in capsys.readouterr().err
    config, env = _tiny_config(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "mine" / "train_smlmt.py"), "--config", str(config), "--max-steps", "1"],
        capture_output=True, text=True, timeout=300, env=env, cwd=elsewhere,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # default run dir: runs/<the config's folder> for a config.yaml (a run's own config extends that run)
    assert (elsewhere / "runs" / tmp_path.name / "checkpoints" / "step_1").is_dir()


def test_eval_on_a_real_two_step_trainer_run(two_step_run, tmp_path, capsys):
    run_dir = two_step_run
    target = tmp_path / "eval.json"
    argv = ["eval", "--checkpoint", str(run_dir), "--episodes", "3", "--json", str(target), "--no-downstream"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    # progress on stderr (not a terminal: a line per tenth, with an estimate), the table on stdout
    assert "picomaml eval: 9/9 episodes (100%, smlmt 3w2s)" in err and "s left" in err
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


def test_export_writes_a_transformers_model_that_stops_at_eos(two_step_run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(two_step_run), "--out", str(out)]) == 0
    assert "step 2" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    tok = pm.load_default_corpus(seq_len=33, cache_dir=two_step_run.parent / "cache").tokenizer
    assert config["eos_token_id"] == tok.eos_token_id is not None
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 1


def test_eval_refuses_bad_batch_and_json_before_evaluating(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:  # argparse's own usage error, naming the option
        main(["eval", "--checkpoint", str(tmp_path), "--episodes-per-batch", "0"])
    assert stop.value.code == 2
    assert "argument --episodes-per-batch: expected an integer in [1, 4,096], got 0" in capsys.readouterr().err
    args = build_eval_parser().parse_args(["--checkpoint", str(tmp_path)])
    args.episodes = 10**9  # a Namespace from code skips argparse's types: eval_main checks the bounds too
    assert eval_main(args) == 2
    assert "--episodes must be in [1, 1,000,000], got 1000000000" in capsys.readouterr().err
    for flag in ("--tokenizer", "--episodes"):
        value = "/nonexistent" if flag == "--tokenizer" else "1000000000"
        with contextlib.suppress(SystemExit):
            assert main(["eval", "--checkpoint", str(tmp_path), flag, value]) == 2
        assert value in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path), "--json", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_eval_progress_lines_estimate_the_time_left():
    import io

    from picomaml.cli import EvalProgress

    clock = iter([0.0, 10.0, 20.0, 40.0])
    stream = io.StringIO()
    progress = EvalProgress(100, stream)
    progress._clock = lambda: next(clock)
    progress.start = progress._clock()
    progress(5, "smlmt 5w1s")  # under a tenth: silent
    progress(5, "smlmt 5w1s")
    progress(40, "downstream 5w1s")
    progress(50, "downstream 5w1s")
    lines = stream.getvalue().splitlines()
    assert lines == [
        "picomaml eval: 10/100 episodes (10%, smlmt 5w1s), 10 s spent, about 90 s left",
        "picomaml eval: 50/100 episodes (50%, downstream 5w1s), 20 s spent, about 20 s left",
        "picomaml eval: 100/100 episodes (100%, downstream 5w1s), 40 s spent, about 0 s left",
    ]


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

    with pytest.raises(SystemExit) as stop:
        main(["sample", "--n-way", "1"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].endswith("argument --n-way: expected an integer >= 2, got 1")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--n", "0"], "argument --n: expected an integer in [1, 10,000], got 0"),
        (["--show", "-1"], "argument --show: expected an integer >= 0, got -1"),
        (["--n", "1000000000"], "argument --n: expected an integer in [1, 10,000], got 1000000000"),
        (["--k-shot", "0"], "argument --k-shot: expected an integer >= 1, got 0"),
        (["--window-len", "1"], "argument --window-len: expected an integer >= 2, got 1"),
        (["--window-len", "100000"], "--window-len 100000 is longer than --seq-len 256"),
        (["--max-freq", "0"], "max_freq: must be a number > 0"),
    ],
)
def test_bad_sample_arguments_are_one_line_errors(args, message, capsys):
    try:
        code = main(["sample", *args])
    except SystemExit as exc:  # argparse's own usage error
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


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
    from picomaml.train.recipe import build_parser as recipe_parser

    for action in recipe_parser()._actions:  # picomaml train: every option, whatever its default
        if not isinstance(action, argparse._HelpAction) and "default" not in (action.help or ""):
            missing.append(f"train {action.option_strings[0]}")
    assert missing == []


def test_help_names_every_subcommand_and_train_shows_the_recipe_options(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in ("train", "cp", "eval", "finetune", "export", "sample", "config", "info"):
        assert f"    {name} " in out, name
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: picomaml train") and "--export-hf" in out and "(default: tiny-cpu)" in out


def _tagging_files(tmp_path: Path) -> tuple[Path, Path]:
    """A CoNLL file whose tag is learnable from the word: B-NUM for digits, O otherwise."""
    words = ["the", "cat", "sat", "on", "a", "mat", "one", "two", "3", "4", "5", "7"]
    lines = []
    for i in range(24):
        for j in range(6):
            w = words[(i * 5 + j * 7) % len(words)]
            lines.append(f"{w} {'B-NUM' if w.isdigit() else 'O'}")
        lines.append("")
    train, test = tmp_path / "train.conll", tmp_path / "test.conll"
    train.write_text("\n".join(lines[: 7 * 16]) + "\n")
    test.write_text("\n".join(lines[7 * 16 :]) + "\n")
    return train, test


def test_finetune_tags_and_classifies_with_a_real_run(two_step_run, tmp_path, capsys):
    train, test = _tagging_files(tmp_path)
    out_json = tmp_path / "out" / "tagging.json"
    argv = ["finetune", "--checkpoint", str(two_step_run), "--train", str(train), "--test", str(test),
            "--seeds", "0,1", "--epochs", "3", "--json", str(out_json)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "tagging (head), 2 seeds, 95% CI" in out and "entity_f1" in out
    data = json.loads(out_json.read_text())
    assert data["task"] == "tagging" and data["seeds"] == [0, 1] and data["n_train"] == 16 and data["step"] == 2
    assert [r["seed"] for r in data["runs"]] == [0, 1] and 0.0 <= data["metrics"]["token_accuracy"]["mean"] <= 1.0
    texts = tmp_path / "texts.csv"
    rows = [f"{'good fine great' if i % 2 else 'bad poor awful'} {i},{'pos' if i % 2 else 'neg'}" for i in range(20)]
    texts.write_text("text,label\n" + "\n".join(rows) + "\n")
    argv = ["finetune", "--checkpoint", str(two_step_run), "--train", str(texts), "--test", str(texts),
            "--seeds", "0", "--k-per-class", "4", "--epochs", "2"]  # fmt: skip
    assert main(argv) == 0
    assert "classification (head), 1 seeds" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--k-per-class", "2"], "--k-per-class: applies to classification files"),
        (["--test", "TEXTS"], "hold different kinds of labelled data"),
        (["--train", "notes.md"], "unknown suffix '.md'"),
        (["--column", "colour", "--train", "x.conllu"], "unknown CoNLL-U column 'colour'; allowed:"),
    ],
)
def test_finetune_bad_arguments_are_one_line(two_step_run, tmp_path, capsys, extra, message):
    train, test = _tagging_files(tmp_path)
    (tmp_path / "texts.csv").write_text("text,label\na,b\nc,d\n")
    (tmp_path / "notes.md").write_text("# notes\n")
    extra = [str(tmp_path / "texts.csv") if e == "TEXTS" else str(tmp_path / e) if e in ("notes.md", "x.conllu") else e for e in extra]
    argv = ["finetune", "--checkpoint", str(two_step_run), "--train", str(train), "--test", str(test), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("picomaml finetune: error:") and message in err and "\n" not in err, err
