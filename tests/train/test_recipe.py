"""The reference trainer end to end on a tiny model: objectives, counters, resume, crash safety, DDP parity."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import picomaml as pm
from picomaml.train import recipe as trainer
from picomaml.train.budget import run_flops
from picomaml.train.run_dir import CONFIG_CHANGES, PREVIOUS, RunDirError
from picomaml.train.run_lock import LOCK_FILE
from picomaml.train.tracking import MetricsFileError

ROOT = Path(__file__).resolve().parents[2]
# the example script runs the packaged recipe: subprocess tests go through it, in-process ones call the module
SCRIPT = ROOT / "examples" / "train_smlmt.py"


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("corpus-cache")
    pm.load_default_corpus(seq_len=33, cache_dir=path)  # build once for every run below
    return str(path)


def tiny_config(tmp_path: Path, cache: str, **sections) -> Path:
    cfg = {
        "seed": 3,
        "model": {
            "vocab_size": 8192,
            "d_model": 32,
            "n_layers": 2,
            "n_heads": 4,
            "n_kv_heads": 2,
            "ffn_dim": 64,
            "max_seq_len": 32,
        },
        "data": {"source": "embedded", "seq_len": 32, "batch_size": 8, "cache_dir": cache},
        "sampler": {"n_way": 3, "k_shot": 2, "n_query": 2, "window_len": 8, "min_freq": 3, "max_freq": 0.5},
        "head": {"hidden_dims": [16], "init": "xavier"},
        "inner_loop": {"steps": 2, "lr": 0.1, "first_order": False},
        "meta": {"pooling": "mask", "n_tasks": 2},
        "hybrid": {"ratio": 0.5, "mode": "bernoulli"},
        "optim": {"lr": 1e-3, "warmup_steps": 0, "decay": "constant", "grad_clip": 1.0},
        "trainer": {
            "max_steps": 4,
            "log_every": 1,
            "eval_every": 100,
            "save_every": 100,
            "accelerator": "cpu",
        },
        "eval": {"rows": 8, "batch_size": 8, "episodes": 2, "settings": [[3, 2]]},
        "checkpoint": {"keep_last": 2},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def run(config: Path, run_dir: Path, *extra: str) -> list[dict[str, str]]:
    assert trainer.main(["--config", str(config), "--run-dir", str(run_dir), *extra]) == 0
    return read_csv(run_dir / "metrics.csv")


@pytest.mark.parametrize(
    ("ratio", "has_lm", "has_meta"), [(0.0, True, False), (1.0, False, True), (0.5, True, True)]
)
def test_objectives_log_their_metrics_and_count_steps(tmp_path, corpus_cache, ratio, has_lm, has_meta):
    config = tiny_config(tmp_path, corpus_cache, hybrid={"ratio": ratio})
    rows = run(config, tmp_path / "run")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    last = rows[-1]
    assert int(last["trainer/ar_steps"]) + int(last["trainer/meta_steps"]) == 4
    assert (int(last["trainer/ar_steps"]) > 0) == has_lm
    assert (int(last["trainer/meta_steps"]) > 0) == has_meta
    hs = pm.HybridScheduler(ratio=ratio, seed=3)
    assert int(last["trainer/meta_steps"]) == sum(hs.choose(s) == "meta" for s in range(4))
    columns = set(last)
    assert {
        "trainer/lr/model",
        "trainer/grad_norm",
        "trainer/tokens",
        "trainer/tokens_per_s",
        "trainer/nonfinite_skipped",
        "eval/perplexity",
        "eval/fewshot_acc",
        "eval/fewshot_acc_ci",
    } <= columns
    assert ("train/lm_loss" in columns) == has_lm
    if has_meta:
        assert {
            "train/meta_loss",
            "meta/support_acc_before",
            "meta/support_acc_after",
            "meta/query_acc",
            "meta/inner_grad_norm",
            "meta/inner_lr",
            "meta/head_weight_norm",
            "meta/head_grad_norm",
        } <= columns
    # tokens: AR steps see 8 rows of seq_len + 1 = 33 tokens; meta steps 2 tasks x 3 classes x (2 + 2)
    # windows x 8 tokens
    expected = int(last["trainer/ar_steps"]) * 8 * 33 + int(last["trainer/meta_steps"]) * 2 * 3 * 4 * 8
    assert int(last["trainer/tokens"]) == expected
    # the compute of the whole run is known before training, and the trainer counts exactly that
    cfg = pm.load_config(config)
    assert [int(r["trainer/flops"]) for r in rows] == run_flops(cfg)
    run_dir = tmp_path / "run"
    assert (run_dir / "curves.png").stat().st_size > 0
    assert pm.find_latest(run_dir / "checkpoints").name == "step_4"
    assert pm.load_config(run_dir / "config.yaml").hybrid.ratio == ratio


def test_resume_is_bit_identical(tmp_path, corpus_cache):
    config = tiny_config(
        tmp_path,
        corpus_cache,
        inner_loop={"learn_lr": "per_step"},
        hybrid={"ratio": 0.5, "mode": "interleave"},
        trainer={"max_steps": 6},
    )
    straight = run(config, tmp_path / "a")
    run(config, tmp_path / "b", "--max-steps", "3")
    resumed = run(config, tmp_path / "b", "--max-steps", "6", "--resume", "auto")
    for key in ("train/lm_loss", "train/meta_loss", "meta/query_acc", "trainer/grad_norm"):
        assert [r.get(key) for r in straight] == [r.get(key) for r in resumed], key
    a = pm.load_checkpoint(tmp_path / "a" / "checkpoints").states
    b = pm.load_checkpoint(tmp_path / "b" / "checkpoints").states
    for part in ("model", "head", "inner_loop", "optimizer", "sampler", "data"):
        assert_identical(b[part], a[part], part)


def assert_identical(x, y, where: str) -> None:
    """Exact equality of nested states (tensors bit for bit)."""
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and torch.equal(x, y), where
    elif isinstance(x, dict):
        assert isinstance(y, dict) and x.keys() == y.keys(), where
        for key in x:
            assert_identical(x[key], y[key], f"{where}.{key}")
    elif isinstance(x, (list, tuple)):
        assert isinstance(y, (list, tuple)) and len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y, strict=True)):
            assert_identical(u, v, f"{where}[{i}]")
    else:
        assert x == y, f"{where}: {x!r} != {y!r}"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sampler.n_wya=3", "unknown key 'n_wya'"),
        ("hybrid.ratio=1.5", "hybrid.ratio"),
        ("sampler.n_way=400", "eligible"),
        ("eval.settings=[[40, 4]]", "eval.settings: no 40-way 4-shot episode"),
        ("model.n_layers=100000", "model.n_layers: must be an integer >= 1 and <= 1024"),
        ("data.batch_size=1000000", "training needs about"),  # refused before anything is allocated
        ("eval.episodes=1000000000", "eval.episodes: must be an integer >= 0 and <= 1000000"),
        pytest.param(
            "trainer.accelerator=mps", "trainer.accelerator='mps'",
            marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS"),
        ),  # fmt: skip
    ],
)
def test_bad_config_stops_before_training(tmp_path, corpus_cache, override, message):
    config = tiny_config(tmp_path, corpus_cache)
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--config",
            str(config),
            "--run-dir",
            str(tmp_path / "run"),
            "--set",
            override,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "config error" in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sigkill_during_checkpoint_keeps_previous_and_resume_continues(tmp_path, corpus_cache):
    config = tiny_config(
        tmp_path,
        corpus_cache,
        trainer={"max_steps": 400, "save_every": 2, "log_every": 2},
        hybrid={"ratio": 0.0},
    )
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--config", str(config), "--run-dir", str(run_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    killed_mid_write = False
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            # wait until one checkpoint is complete and the next one is being written
            if (
                pm.find_latest(root) is not None
                and root.exists()
                and any(p.name.startswith(".tmp_step_") for p in root.iterdir())
            ):
                os.kill(proc.pid, signal.SIGKILL)
                killed_mid_write = True
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert killed_mid_write, "the trainer never started a second checkpoint"
    assert (run_dir / LOCK_FILE).exists()  # kill -9 leaves the lock: the resume below must take it over
    latest = pm.find_latest(root)
    assert latest is not None
    step = pm.load_checkpoint(latest).step
    rows = run(config, run_dir, "--max-steps", str(step + 2), "--resume", "auto")
    assert int(rows[-1]["step"]) == step + 2
    assert pm.load_checkpoint(root).step == step + 2
    assert not (run_dir / LOCK_FILE).exists()
    # and bit-identical to a run that was never killed
    straight = run(config, tmp_path / "straight", "--max-steps", str(step + 2))
    assert [r["train/lm_loss"] for r in straight] == [r["train/lm_loss"] for r in rows]
    a = pm.load_checkpoint(tmp_path / "straight" / "checkpoints").states
    b = pm.load_checkpoint(root).states
    for part in ("model", "head", "optimizer", "data"):
        assert_identical(b[part], a[part], part)


@pytest.mark.slow
def test_two_cpu_processes_match_one(tmp_path, corpus_cache):
    config = tiny_config(
        tmp_path, corpus_cache, hybrid={"ratio": 0.5, "mode": "interleave"}, trainer={"max_steps": 3}
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for devices in (1, 2):
        cmd = [
            sys.executable,
            str(SCRIPT),
            "--config",
            str(config),
            "--run-dir",
            str(tmp_path / f"d{devices}"),
            "--devices",
            str(devices),
            "--set",
            "eval.episodes=0",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    one = pm.load_checkpoint(tmp_path / "d1" / "checkpoints")
    two = pm.load_checkpoint(tmp_path / "d2" / "checkpoints")
    assert one.counters["meta_steps"] >= 1 and one.counters == two.counters
    for part in ("model", "head"):
        for name, value in one.states[part].items():
            torch.testing.assert_close(two.states[part][name], value, rtol=0, atol=1e-5, msg=f"{part}.{name}")


def test_checkpoint_extras_hf_export_and_learning_dynamics(tmp_path, corpus_cache):
    transformers = pytest.importorskip("transformers")
    config = tiny_config(
        tmp_path,
        corpus_cache,
        trainer={"max_steps": 2},
        checkpoint={"hf_export": True, "learning_dynamics": True, "dynamics": {"batch_size": 2}},
    )
    run(config, tmp_path / "run")
    step_dir = pm.find_latest(tmp_path / "run" / "checkpoints")
    for split in ("train", "val"):
        for kind in ("activations", "weights", "gradients"):
            data = torch.load(step_dir / "learning_dynamics" / f"{split}_{kind}.pt", weights_only=True)
            assert any(name.endswith("attention.o_proj") for name in data), (split, kind, list(data))
    hf_dir = step_dir / "hf"
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert tok.mask_token == "<|mask|>" and tok.eos_token_id == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    model = pm.PicoDecoder.from_hf(hf)
    model.load_state_dict(pm.load_checkpoint(step_dir).states["model"])
    ids = torch.tensor([tok.encode("Return the value of the signal handler.")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-5, atol=1e-5)


def test_nonfinite_loss_skips_the_step_and_the_run_continues(tmp_path, corpus_cache, monkeypatch):
    import picomaml.meta.learner

    real, calls = picomaml.meta.learner.lm_loss, []

    def poisoned(model, tokens):
        calls.append(1)
        loss = real(model, tokens)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(picomaml.meta.learner, "lm_loss", poisoned)
    config = tiny_config(tmp_path, corpus_cache, hybrid={"ratio": 0.0})
    with pytest.warns(UserWarning, match="step 2: non-finite"):  # the step of the row that counts it
        rows = run(config, tmp_path / "run")
    assert [int(r["trainer/nonfinite_skipped"]) for r in rows] == [0, 1, 1, 1]
    state = pm.load_checkpoint(tmp_path / "run" / "checkpoints").states["model"]
    assert all(torch.isfinite(t).all() for t in state.values())


def test_heldout_token_types_are_never_meta_training_classes(tmp_path, corpus_cache, monkeypatch):
    """With sampler.holdout_fraction the trainer's episodes use only the 'train' split and evaluation
    (during training and from the checkpoint) only the held-out one."""
    from picomaml.meta.sampler import SMLMTSampler
    from picomaml.meta.smlmt import heldout_token_mask

    seen: dict[str, set[int]] = {"train": set(), "heldout": set()}
    original = SMLMTSampler.sample

    def spy(self, tokens, n_tasks=None):
        episode = original(self, tokens, n_tasks)
        seen[self.class_split] |= set(episode.class_token_ids.reshape(-1).tolist())
        return episode

    monkeypatch.setattr(SMLMTSampler, "sample", spy)
    config = tiny_config(
        tmp_path,
        corpus_cache,
        sampler={"holdout_fraction": 0.3, "holdout_seed": 1},
        hybrid={"ratio": 1.0},
        eval={"rows": 48},
    )
    rows = run(config, tmp_path / "run", "--set", "trainer.eval_every=2")
    assert float(rows[-1]["eval/fewshot_acc"]) >= 0
    assert seen["train"] and seen["heldout"]
    held = heldout_token_mask(torch.tensor(sorted(seen["train"] | seen["heldout"])), 0.3, seed=1)
    ids = sorted(seen["train"] | seen["heldout"])
    assert {t for t, h in zip(ids, held.tolist(), strict=True) if h} == seen["heldout"]
    from picomaml.train.loading import load_for_eval

    bundle = load_for_eval(tmp_path / "run")
    assert bundle.suite_kwargs["sampler_kwargs"] == {
        "holdout_fraction": 0.3,
        "holdout_seed": 1,
        "class_split": "heldout",
    }


# ---- the run directory: one writer, nothing of an earlier run lost, resume checks ---------------------------


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def trainer_cmd(config: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--config", str(config), "--run-dir", str(run_dir), *extra]


def test_a_second_trainer_on_the_same_directory_is_refused(tmp_path, corpus_cache):
    """Two real trainers on one run directory: the second stops at once naming the first, whose run is intact."""
    config = tiny_config(tmp_path, corpus_cache, trainer={"max_steps": 10_000, "save_every": 1}, hybrid={"ratio": 0.0})
    run_dir = tmp_path / "run"
    first = subprocess.Popen(trainer_cmd(config, run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while first.poll() is None and time.monotonic() < deadline and pm.find_latest(run_dir / "checkpoints") is None:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()[-3000:]
        config_before = (run_dir / "config.yaml").read_bytes()
        second = subprocess.run(
            trainer_cmd(config, run_dir, "--resume", "fresh", "--set", "optim.lr=0.5"),
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert second.returncode == 2 and "Traceback" not in second.stderr
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and f"in use by another trainer: pid {first.pid} on host" in last
        assert (run_dir / "config.yaml").read_bytes() == config_before and not (run_dir / PREVIOUS).exists()
    finally:
        first.send_signal(signal.SIGINT)  # the first finishes its step, saves and ends normally
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-3000:]
    rows = read_csv(run_dir / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, len(rows) + 1))
    assert pm.load_checkpoint(run_dir / "checkpoints").step == len(rows)
    assert pm.load_checkpoint(run_dir / "checkpoints").config["optim"]["lr"] == 1e-3
    assert not (run_dir / LOCK_FILE).exists()  # released on the Ctrl-C path


@pytest.mark.parametrize("flag", ["fresh", "none"])
def test_fresh_start_keeps_the_earlier_run(tmp_path, corpus_cache, flag, caplog):
    config = tiny_config(tmp_path, corpus_cache, trainer={"max_steps": 2})
    run_dir = tmp_path / "run"
    run(config, run_dir)
    before = files(run_dir)
    with caplog.at_level(logging.WARNING):
        rows = run(config, run_dir, "--resume", flag, "--max-steps", "3")
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    (kept,) = (run_dir / PREVIOUS).iterdir()
    assert files(kept) == before and str(kept) in caplog.text
    assert pm.load_checkpoint(run_dir / "checkpoints").step == 3


def test_no_usable_checkpoint_is_an_error_listing_each_then_fresh_moves_them_aside(tmp_path, corpus_cache):
    config = tiny_config(tmp_path, corpus_cache, trainer={"max_steps": 2, "save_every": 1})
    run_dir = tmp_path / "run"
    run(config, run_dir)
    for step_dir in (run_dir / "checkpoints").glob("step_*"):
        (step_dir / "model.pt").write_bytes(b"\0" * 64)
    before = files(run_dir)
    with pytest.raises(RunDirError) as info:
        trainer.main(["--config", str(config), "--run-dir", str(run_dir)])
    message = str(info.value)
    assert "none usable" in message and "step_2: model.pt" in message and "step_1: model.pt" in message
    assert files(run_dir) == before  # metrics.csv is not cut, nothing restarts from step 0
    rows = run(config, run_dir, "--resume", "fresh")
    assert [int(r["step"]) for r in rows] == [1, 2]
    (kept,) = (run_dir / PREVIOUS).iterdir()
    assert files(kept) == before


def test_resume_refuses_another_architecture_and_records_other_changes(tmp_path, corpus_cache, caplog):
    config = tiny_config(tmp_path, corpus_cache, trainer={"max_steps": 2})
    run_dir = tmp_path / "run"
    run(config, run_dir)
    before = files(run_dir)
    for change, key in (("model.d_model=64", "model.d_model: 32 -> 64"), ("sampler.n_way=4", "sampler.n_way: 3 -> 4")):
        with pytest.raises(pm.ConfigError, match=f"changed since .* \\({key}\\); they change parameter shapes"):
            trainer.main(["--config", str(config), "--run-dir", str(run_dir), "--set", change, "--max-steps", "3"])
        assert files(run_dir) == before and not (run_dir / LOCK_FILE).exists()
    with caplog.at_level(logging.WARNING):
        rows = run(config, run_dir, "--set", "optim.lr=0.002", "--set", "seed=1", "--max-steps", "3")
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    (record,) = yaml.safe_load_all((run_dir / CONFIG_CHANGES).read_text())
    changes = {c["key"]: (c["old"], c["new"]) for c in record["changes"]}
    assert changes == {"seed": (3, 1), "optim.lr": (0.001, 0.002), "trainer.max_steps": (2, 3)}
    assert "optim.lr: 0.001 -> 0.002" in caplog.text
    assert pm.load_config(run_dir / "config.yaml").optim.lr == 0.002


def test_garbled_metrics_csv_stops_resume_naming_file_and_line(tmp_path, corpus_cache):
    config = tiny_config(tmp_path, corpus_cache, trainer={"max_steps": 2})
    run_dir = tmp_path / "run"
    run(config, run_dir)
    path = run_dir / "metrics.csv"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[1].replace(",", ",x", 1) + "".join(lines[2:]))
    before = files(run_dir)
    with pytest.raises(MetricsFileError, match=f"cannot continue {path} line 2, column .*'x.*' is not a number"):
        trainer.main(["--config", str(config), "--run-dir", str(run_dir), "--max-steps", "3"])
    assert files(run_dir) == before


def test_misspelt_dynamics_layer_fails_before_training(tmp_path, corpus_cache):
    config = tiny_config(tmp_path, corpus_cache, checkpoint={"learning_dynamics": True})
    args = ["--config", str(config), "--run-dir", str(tmp_path / "run"), "--set"]
    with pytest.raises(pm.ConfigError, match=r"checkpoint.dynamics.layers: layers \['mlp.dwn_proj'\] match no module"):
        trainer.main([*args, "checkpoint.dynamics.layers=[attention.o_proj, mlp.dwn_proj]"])
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("case", ["missing resume path", "locked"])
def test_run_directory_errors_are_one_line_without_traceback(tmp_path, corpus_cache, case):
    config = tiny_config(tmp_path, corpus_cache)
    run_dir = tmp_path / "run"
    extra = ["--resume", str(tmp_path / "nowhere")] if case == "missing resume path" else []
    if case == "locked":  # held by this (live) test process
        run_dir.mkdir()
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": "2025-01-01T00:00:00+00:00"}
        (run_dir / LOCK_FILE).write_text(json.dumps(holder))
    result = subprocess.run(trainer_cmd(config, run_dir, *extra), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    expected = "config error: --resume: " if case == "missing resume path" else f"error: {run_dir} is in use"
    assert last.startswith(expected) and len(last) <= 2000, last
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.csv").exists()
    assert (run_dir / LOCK_FILE).exists() == (case == "locked")  # the holder's lock is left alone


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path, corpus_cache, monkeypatch):
    import picomaml.meta.learner
    from picomaml.train.training import NonFiniteRunError

    real = picomaml.meta.learner.lm_loss
    monkeypatch.setattr(picomaml.meta.learner, "lm_loss", lambda model, tokens: real(model, tokens) * float("nan"))
    config = tiny_config(tmp_path, corpus_cache, hybrid={"ratio": 0.0}, trainer={"max_nonfinite_skips": 2})
    with pytest.warns(UserWarning, match="non-finite"), pytest.raises(NonFiniteRunError, match=r"2 optimizer steps in a row \(1-2\)"):
        run(config, tmp_path / "run")


def test_adapt_layers_trains_the_top_block_with_learned_lrs_and_counts_its_flops(tmp_path, corpus_cache):
    config = tiny_config(
        tmp_path, corpus_cache, meta={"adapt_layers": 1}, inner_loop={"learn_lr": "per_tensor"},
        hybrid={"ratio": 1.0}, trainer={"eval_every": 4},
    )  # fmt: skip
    rows = run(config, tmp_path / "run")
    last = rows[-1]
    assert int(last["trainer/meta_steps"]) == 4 and 0.0 <= float(last["eval/fewshot_acc"]) <= 1.0
    assert "meta/inner_lr/layers.1.attention.q_proj.weight" in last  # a learned LR per adapted block tensor
    cfg = pm.load_config(config)
    assert [int(r["trainer/flops"]) for r in rows] == run_flops(cfg)
    assert run_flops(cfg)[-1] > run_flops(dataclasses.replace(cfg, meta=dataclasses.replace(cfg.meta, adapt_layers=0)))[-1]


def test_hub_repo_pushes_every_checkpoint_of_the_run_to_its_branch(tmp_path, corpus_cache, monkeypatch):
    """The trainer hands each saved step to the uploader (at the API boundary: a recording HfApi); the
    step-0 learning dynamics and the end of the run are pushed too, and the run waits for them."""
    from fakes import RecordingApi

    import picomaml.train.run_checkpoint as run_checkpoint
    from picomaml.interop.hub_upload import uploader_from_config

    api = RecordingApi()
    monkeypatch.setattr(run_checkpoint, "uploader_from_config",
                        lambda c, d: uploader_from_config(c, d, api=api, backoff_s=0.0))  # fmt: skip
    config = tiny_config(tmp_path, corpus_cache, checkpoint={
        "hub_repo": "me/runs", "learning_dynamics": True, "dynamics": {"batch_size": 2}})  # fmt: skip
    run(config, tmp_path / "my run", "--set", "trainer.save_every=2")
    titles = [c["commit_message"] for c in api.commits]
    assert [c["revision"] for c in api.commits] == ["my-run"] * 3 and len(api.repos) == 1
    assert [int(t.rsplit("Step ", 1)[1]) for t in titles] == [0, 2, 4]
    assert all("learning_dynamics/val_weights.pt" in c["files"] for c in api.commits)
    assert "training_config.yaml" in api.commits[0]["files"] and "model.pt" not in api.commits[0]["files"]


def test_hub_repo_without_a_token_stops_before_training(tmp_path, corpus_cache, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    config = tiny_config(tmp_path, corpus_cache, checkpoint={"hub_repo": "me/runs"})
    with pytest.raises(pm.ConfigError, match=r"checkpoint\.hub_repo"):
        trainer.main(["--config", str(config), "--run-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_grad_cos_diagnostic_and_pcgrad_recipe_log_finite_cosines(tmp_path, corpus_cache):
    config = tiny_config(tmp_path, corpus_cache, eval={"grad_cos_every": 2},
                         hybrid={"mode": "weighted", "ratio": 0.3}, meta={"grad_surgery": "pcgrad"})  # fmt: skip
    rows = run(config, tmp_path / "run")
    logged = [r for r in rows if r.get("diag/grad_cos")]
    assert [int(r["step"]) for r in logged] == [2, 4]
    assert all(-1 <= float(r["diag/grad_cos"]) <= 1 and float(r["diag/grad_norm_ratio"]) > 0 for r in logged)
    assert "diag/grad_cos/layers.1" in rows[-1] and -1 <= float(rows[-1]["meta/grad_cos"]) <= 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_saves_the_current_step_and_exits_75(tmp_path, corpus_cache, sig):
    """What SLURM/Kubernetes send: the step finishes, a checkpoint is saved, the lock released, exit 75;
    --resume auto then continues bit-identically."""
    config = tiny_config(
        tmp_path, corpus_cache, trainer={"max_steps": 10_000, "save_every": 10_000, "log_every": 1}, hybrid={"ratio": 0.5}
    )  # fmt: skip
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(trainer_cmd(config, run_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if (run_dir / "metrics.csv").exists() and len(read_csv(run_dir / "metrics.csv")) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == trainer.PREEMPTED_EXIT == 75, err[-3000:]
    assert "Traceback" not in err and f"interrupted by {sig.name}" in out
    assert f"{sig.name}: stopping after step" in err and "resume:   run the same command again" in out
    rows = read_csv(run_dir / "metrics.csv")
    step = pm.load_checkpoint(run_dir / "checkpoints").step
    assert step == int(rows[-1]["step"]) >= 2  # nothing trained is lost
    assert not (run_dir / LOCK_FILE).exists()
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    resumed = run(config, run_dir, "--max-steps", str(step + 1))
    straight = run(config, tmp_path / "straight", "--max-steps", str(step + 1))
    assert [r["train/lm_loss"] for r in resumed] == [r["train/lm_loss"] for r in straight]


def raise_signal(sig: signal.Signals) -> None:
    """Send ``sig`` to this process, but only while the trainer's handler holds it (else pytest would die)."""
    assert signal.getsignal(sig) not in (signal.SIG_DFL, signal.SIG_IGN, None), f"no handler for {sig.name}"
    signal.raise_signal(sig)


def test_signals_during_the_save_never_cut_it(tmp_path, corpus_cache, monkeypatch, caplog):
    """A signal at a save step stops the run there (one save, not two); more signals while it is written
    are counted and wait for it."""
    config = tiny_config(tmp_path, corpus_cache, trainer={"max_steps": 100, "save_every": 2})
    real, saved = trainer.save_run_checkpoint, []

    def save_under_fire(run_dir, step, *args, **kwargs):
        if step == 2:
            raise_signal(signal.SIGTERM)  # the first stops the run after this step
            raise_signal(signal.SIGUSR1)  # ... the next ones only wait
        saved.append(step)
        return real(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(trainer, "save_run_checkpoint", save_under_fire)
    with caplog.at_level(logging.WARNING):
        assert trainer.main(["--config", str(config), "--run-dir", str(tmp_path / "run")]) == trainer.PREEMPTED_EXIT
    assert saved == [2]  # stopped at the step being saved: not saved twice, no further step
    assert pm.load_checkpoint(tmp_path / "run" / "checkpoints").step == 2
    assert "1 more stop signals came while stopping" in caplog.text


def test_a_signal_before_training_begins_unwinds_and_releases_the_lock(tmp_path, corpus_cache, monkeypatch, capsys):
    config = tiny_config(tmp_path, corpus_cache)
    real = trainer.build_run

    def build_then_signal(*args, **kwargs):
        components = real(*args, **kwargs)
        raise_signal(signal.SIGTERM)  # during setup: the run directory is locked already
        return components

    monkeypatch.setattr(trainer, "build_run", build_then_signal)
    assert trainer.run(["--config", str(config), "--run-dir", str(tmp_path / "run")]) == trainer.PREEMPTED_EXIT
    assert "stopped by SIGTERM before training began; nothing was trained" in capsys.readouterr().err
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are restored


def test_a_stop_signal_ends_an_evaluation_within_its_batch(tmp_path, corpus_cache, monkeypatch, caplog):
    """A signal during a long evaluation stops it after the episode batch in flight, not at its end."""
    config = tiny_config(tmp_path, corpus_cache, trainer={"max_steps": 3, "eval_every": 1}, eval={"episodes": 10_000})
    from picomaml.eval import fewshot

    scored = []
    real = fewshot.score_episode_batch

    def score_and_signal(*args, **kwargs):
        scored.append(1)
        if len(scored) == 2:
            raise_signal(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(fewshot, "score_episode_batch", score_and_signal)
    with caplog.at_level(logging.WARNING):
        code = trainer.main(["--config", str(config), "--run-dir", str(tmp_path / "run")])
    assert code == trainer.PREEMPTED_EXIT
    assert len(scored) == 2  # 10,000 episodes would be 625 batches
    assert "evaluation at step 1 stopped" in caplog.text
    assert pm.load_checkpoint(tmp_path / "run" / "checkpoints").step == 1  # the stop is seen right after it


def fail_on_call(monkeypatch, module, name: str, call: int) -> None:
    """``module.name`` raises ``RuntimeError`` on its ``call``-th call (1-based) and works otherwise."""
    real, calls = getattr(module, name), []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError(f"injected failure in {name}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, flaky)


def test_an_error_inside_a_step_saves_the_last_completed_one_and_resume_repeats_it(
    tmp_path, corpus_cache, monkeypatch, caplog
):
    """The failed step's data, sampler, RNG and counters are rolled back, so the emergency checkpoint is
    the one a save at step 2 would have written: a resume trains exactly what an unbroken run trains."""
    import picomaml.meta.learner

    config = tiny_config(tmp_path, corpus_cache, hybrid={"ratio": 0.5}, trainer={"max_steps": 5, "save_every": 100})
    with monkeypatch.context() as patch:
        fail_on_call(patch, picomaml.meta.learner, "meta_loss", 2)  # inside a later meta step, before its update
        with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="injected failure"):
            trainer.main(["--config", str(config), "--run-dir", str(tmp_path / "run")])
    saved = pm.load_checkpoint(tmp_path / "run" / "checkpoints")
    assert saved.step >= 1 and f"saved an emergency checkpoint of step {saved.step}" in caplog.text
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    resumed = run(config, tmp_path / "run")
    straight = run(config, tmp_path / "straight")
    assert [r["train/lm_loss"] for r in resumed] == [r["train/lm_loss"] for r in straight]
    assert [r["train/meta_loss"] for r in resumed] == [r["train/meta_loss"] for r in straight]
    a = pm.load_checkpoint(tmp_path / "straight" / "checkpoints").states
    b = pm.load_checkpoint(tmp_path / "run" / "checkpoints").states
    for part in ("model", "head", "optimizer", "data", "sampler"):
        assert_identical(b[part], a[part], part)


def test_an_error_in_an_evaluation_saves_its_step_and_one_in_the_update_saves_nothing(
    tmp_path, corpus_cache, monkeypatch, caplog
):
    config = tiny_config(tmp_path, corpus_cache, trainer={"max_steps": 4, "eval_every": 2})
    with monkeypatch.context() as patch:
        fail_on_call(patch, trainer, "evaluate_during_training", 1)  # at step 2, after the step completed
        with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError):
            trainer.main(["--config", str(config), "--run-dir", str(tmp_path / "eval")])
    assert pm.load_checkpoint(tmp_path / "eval" / "checkpoints").step == 2
    with monkeypatch.context() as patch:
        fail_on_call(patch, trainer, "experiment_step_flops", 3)  # after the optimizer stepped, before step 3 ends
        with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError):
            trainer.main(["--config", str(config), "--run-dir", str(tmp_path / "update")])
    assert "in step 3: no emergency checkpoint (it came during the optimizer update" in caplog.text
    assert not (tmp_path / "update" / "checkpoints").exists() or pm.find_latest(tmp_path / "update" / "checkpoints") is None


def test_a_run_dir_without_room_or_write_access_fails_before_training(tmp_path, corpus_cache, monkeypatch, capsys):
    import errno
    import shutil

    from picomaml.train import run_dir as run_dir_module

    config = tiny_config(tmp_path, corpus_cache)
    full = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(run_dir_module.shutil, "disk_usage", lambda path: full)
    assert trainer.run(["--config", str(config), "--run-dir", str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err
    assert "0.00 GB free, but a checkpoint takes about" in err and "Traceback" not in err
    monkeypatch.undo()

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(run_dir_module, "write_text", read_only)
    assert trainer.run(["--config", str(config), "--run-dir", str(tmp_path / "ro")]) == 2
    assert "cannot be written (Read-only file system); choose another --run-dir" in capsys.readouterr().err
    assert not (tmp_path / "ro" / "metrics.csv").exists()


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([*range(5, 100), 99_999, *range(100)], "model.vocab_size: the training data holds token id 99999, outside [0, 8192)"),
        ([*range(5, 100), 2.7, *range(100)], "input_ids: token id #95 is 2.7, not an integer >= 0"),
    ],
)
def test_bad_token_data_is_one_line_before_training(tmp_path, corpus_cache, ids, message):
    tokenizer = next(Path(corpus_cache).glob("corpus-*/tokenizer.json"))
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"input_ids": ids}) + "\n")
    config = tiny_config(
        tmp_path, corpus_cache, data={"source": "local", "paths": [str(data)], "tokenizer": str(tokenizer),
                                      "seq_len": 16, "batch_size": 2},
        sampler={"window_len": 8}, hybrid={"ratio": 0.0}, eval={"rows": 2, "episodes": 0},
    )  # fmt: skip
    result = subprocess.run(trainer_cmd(config, tmp_path / "run"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert message in result.stderr.strip().splitlines()[-1]  # one line, naming the file or the key
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_meta_noop_keeps_the_schedule_and_data_order_without_the_meta_steps(tmp_path, corpus_cache):
    """The schedule control: the same step indices, LR schedule and batches, meta-only steps doing nothing."""
    sections = {"hybrid": {"ratio": 0.5}, "trainer": {"max_steps": 8}, "optim": {"decay": "cosine", "warmup_steps": 2}}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    hybrid = run(tiny_config(tmp_path / "a", corpus_cache, **sections), tmp_path / "a" / "run")
    control_cfg = tiny_config(tmp_path / "b", corpus_cache, **sections | {"trainer": {"max_steps": 8, "meta_noop": True}})
    control = run(control_cfg, tmp_path / "b" / "run")
    h, c = hybrid[-1], control[-1]
    assert float(c["trainer/noop_steps"]) == float(h["trainer/meta_steps"]) > 0 and float(c["trainer/meta_steps"]) == 0
    assert float(c["trainer/ar_steps"]) == float(h["trainer/ar_steps"])
    assert [r["trainer/lr/model"] for r in control] == [r["trainer/lr/model"] for r in hybrid]  # the LR schedule
    assert float(c["trainer/flops"]) == run_flops(pm.load_config(str(control_cfg)))[-1] < float(h["trainer/flops"])
    # a no-op step draws its batch too: both runs end at the same data position, so every AR step saw the
    # batch it sees in the hybrid run
    positions = [pm.load_checkpoint(tmp_path / x / "run" / "checkpoints").states["data"] for x in ("a", "b")]
    assert positions[0] == positions[1] and positions[0]["position"] == 8


def test_normalised_meta_gradient_with_its_own_moments_and_update_norms(tmp_path, corpus_cache):
    """optim.meta_grad_norm: each meta step's clipped gradient is the fraction of the running AR norm;
    optim.meta_moments=separate: the main AdamW never sees a meta step; eval.update_norms logs both kinds."""
    config = tiny_config(
        tmp_path, corpus_cache, hybrid={"ratio": 0.5, "mode": "interleave"}, trainer={"max_steps": 8},
        optim={"meta_grad_norm": 0.25, "meta_grad_decay": 0.5, "meta_moments": "separate"}, eval={"update_norms": True},
    )  # fmt: skip
    rows = run(config, tmp_path / "run")
    running, checked = None, 0
    for r in rows:
        if r.get("train/clipped_grad_norm_ar"):
            g = float(r["train/clipped_grad_norm_ar"])
            running = g if running is None else 0.5 * running + 0.5 * g
            assert float(r["train/update_norm_ar"]) > 0 and not r.get("train/update_norm_meta")
        elif r.get("train/clipped_grad_norm_meta"):
            assert float(r["train/update_norm_meta"]) > 0
            if running is not None:  # before the first AR step a meta gradient is only clipped
                assert float(r["train/clipped_grad_norm_meta"]) == pytest.approx(0.25 * running, rel=1e-5)
                assert float(r["meta/grad_norm_raw"]) > 1.01 * float(r["train/clipped_grad_norm_meta"])  # it was rescaled
                checked += 1
    assert checked >= 3
    states = pm.load_checkpoint(tmp_path / "run" / "checkpoints").states
    last = rows[-1]
    main_steps = {float(s["step"]) for s in states["optimizer"]["state"].values()}
    meta_steps = {float(s["step"]) for s in states["meta_optimizer"]["state"].values()}
    assert main_steps == {float(last["trainer/ar_steps"])} and meta_steps == {float(last["trainer/meta_steps"])}
    assert len(states["meta_optimizer"]["state"]) > len(states["optimizer"]["state"])  # the head: meta steps only
    assert states["meta_grad_scale"]["ar_seen"] == int(float(last["trainer/ar_steps"]))
    # a resumed run continues both moments and the running norm bit for bit
    run(config, tmp_path / "b", "--max-steps", "5")
    resumed = run(config, tmp_path / "b", "--max-steps", "8", "--resume", "auto")
    assert [r.get("train/update_norm_meta") for r in resumed] == [r.get("train/update_norm_meta") for r in rows]
    again = pm.load_checkpoint(tmp_path / "b" / "checkpoints").states
    for part in ("model", "optimizer", "meta_optimizer", "meta_grad_scale"):
        assert_identical(again[part], states[part], part)


@pytest.mark.parametrize("override", ["optim.meta_grad_norm=0.5", "optim.meta_moments=separate"])
def test_meta_gradient_options_need_steps_of_one_objective(tmp_path, corpus_cache, override):
    config = tiny_config(tmp_path, corpus_cache, hybrid={"mode": "weighted"})
    with pytest.raises(pm.ConfigError, match=f"{override.split('=')[0]}: needs steps that are either AR or meta"):
        trainer.main(["--config", str(config), "--run-dir", str(tmp_path / "run"), "--set", override])
    assert not (tmp_path / "run").exists()


def test_lora_factors_adapt_in_meta_steps_and_the_checkpoint_holds_a_plain_backbone(tmp_path, corpus_cache):
    config = tiny_config(tmp_path, corpus_cache, meta={"pooling": "mask", "n_tasks": 2, "lora_rank": 2},
                         hybrid={"ratio": 0.5, "mode": "interleave"}, trainer={"max_steps": 4})  # fmt: skip
    rows = run(config, tmp_path / "run")
    last = rows[-1]
    assert float(last["trainer/meta_steps"]) == 2 and float(last["trainer/flops"]) == run_flops(pm.load_config(str(config)))[-1]
    meta_rows = [r for r in rows if r.get("train/meta_loss")]
    assert meta_rows and all(math.isfinite(float(r["train/meta_loss"])) for r in meta_rows)
    # the same run with the head adapting alone: the first step (AR) is the same, the first meta step is not
    (tmp_path / "head").mkdir()
    head_only = run(tiny_config(tmp_path / "head", corpus_cache, meta={"pooling": "mask", "n_tasks": 2},
                                hybrid={"ratio": 0.5, "mode": "interleave"}, trainer={"max_steps": 4}), tmp_path / "head" / "run")  # fmt: skip
    first_meta = next(i for i, r in enumerate(rows) if r.get("train/meta_loss"))
    assert rows[0]["train/lm_loss"] == head_only[0]["train/lm_loss"] or first_meta == 0
    assert rows[first_meta]["train/meta_loss"] != head_only[first_meta]["train/meta_loss"]
    states = pm.load_checkpoint(tmp_path / "run" / "checkpoints").states
    plain = pm.PicoDecoder(pm.load_config(str(config)).model)
    assert set(states["model"]) == set(plain.state_dict())  # no factor in the backbone's checkpoint
