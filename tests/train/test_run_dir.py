"""A start in a run directory: the plan refuses before anything changes, a fresh start moves the earlier run
aside byte for byte, resume compares configs (architecture: error; others: warning and record)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from picomaml.params import ConfigError
from picomaml.train import checkpoint as ckpt
from picomaml.train.config import ExperimentConfig
from picomaml.train.run_dir import (
    CONFIG_CHANGES,
    PREVIOUS,
    RunDirError,
    RunLockedError,
    commit_start,
    error_line,
    open_run,
    plan_start,
)
from picomaml.train.run_lock import LOCK_FILE
from picomaml.train.tracking import MetricsFileError, MetricsTracker


def config(*overrides: str) -> ExperimentConfig:
    from picomaml.train.config import load_config

    model = ["model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=32"]
    return load_config(None, [*model, "data.seq_len=32", "sampler.window_len=8", *overrides])


def save(run_dir: Path, step: int, cfg: ExperimentConfig) -> Path:
    state = {"x": {"w": torch.full((3,), float(step))}}
    return ckpt.save_checkpoint(run_dir / "checkpoints", step, state, config=cfg.to_dict(), fsync=False, keep_last=None)


def make_run(run_dir: Path, cfg: ExperimentConfig, steps=(2, 4)) -> dict[str, bytes]:
    """A finished run: config.yaml, metrics.csv with a row per step, checkpoints; its files' bytes."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    tracker = MetricsTracker(run_dir)
    for step in range(1, max(steps) + 1):
        tracker.log(step, {"train/lm_loss": 10.0 - step})
    for step in steps:
        save(run_dir, step, cfg)
    return snapshot(run_dir)


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_fresh_start_moves_the_earlier_run_aside_byte_for_byte(tmp_path, caplog):
    run_dir = tmp_path / "run"
    before = make_run(run_dir, config())
    plan = plan_start(run_dir, "fresh", config())
    assert plan.checkpoint is None and plan.move == ["checkpoints", "config.yaml", "metrics.csv"]
    assert snapshot(run_dir) == before  # planning changes nothing
    with caplog.at_level(logging.WARNING, logger="picomaml.train.run_dir"):
        dest = commit_start(plan, config("seed=5"))
    assert dest.parent == run_dir / PREVIOUS and str(dest) in caplog.text
    assert snapshot(dest) == before
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", PREVIOUS, "training_config.yaml"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["seed"] == 5
    pico = yaml.safe_load((run_dir / "training_config.yaml").read_text())  # what pico-analyze reads
    assert pico["checkpointing"]["run_name"] == run_dir.name and pico["model"]["attention_n_heads"] > 0
    # a second fresh start in the same second gets its own folder
    again = commit_start(plan_start(run_dir, "none", config()), config())
    assert again != dest and snapshot(dest) == before


def test_auto_without_checkpoint_folders_starts_fresh_keeping_leftovers(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.csv").write_text("step,x\n1,2\n")  # a run that died before its first save
    plan = plan_start(run_dir, "auto", config())
    assert plan.checkpoint is None and plan.move == ["metrics.csv"]
    dest = commit_start(plan, config())
    assert (dest / "metrics.csv").read_text() == "step,x\n1,2\n"


def damage(step_dir: Path) -> None:
    data = bytearray((step_dir / "x.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (step_dir / "x.pt").write_bytes(bytes(data))


def test_no_usable_checkpoint_is_an_error_listing_each_folder(tmp_path):
    run_dir = tmp_path / "run"
    make_run(run_dir, config())
    for step_dir in (run_dir / "checkpoints").glob("step_*"):
        damage(step_dir)
    before = snapshot(run_dir)
    with pytest.raises(RunDirError) as info:
        plan_start(run_dir, "auto", config())
    message = str(info.value)
    assert "none usable" in message and "--resume fresh" in message
    assert "step_4: x.pt" in message and "step_2: x.pt" in message
    assert snapshot(run_dir) == before


def test_missing_resume_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^--resume: .*nowhere.* does not exist"):
        plan_start(tmp_path / "run", str(tmp_path / "nowhere"), config())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^--resume: no complete checkpoint"):
        plan_start(tmp_path / "run", str(tmp_path / "empty"), config())


def test_architecture_change_on_resume_is_an_error_listing_old_and_new(tmp_path):
    run_dir = tmp_path / "run"
    before = make_run(run_dir, config())
    with pytest.raises(ConfigError) as info:
        plan_start(run_dir, "auto", config("model.d_model=64", "sampler.n_way=4", "optim.lr=0.01"))
    message = str(info.value)
    assert message.startswith("model.d_model, sampler.n_way: changed since")
    assert "model.d_model: 32 -> 64" in message and "sampler.n_way: 8 -> 4" in message
    assert "optim.lr" not in message  # only what blocks the resume
    assert snapshot(run_dir) == before


def test_other_changes_are_warned_and_recorded_before_config_yaml_is_rewritten(tmp_path, caplog):
    run_dir = tmp_path / "run"
    make_run(run_dir, config())
    plan = plan_start(run_dir, "auto", config("optim.lr=0.002"))
    assert plan.checkpoint.name == "step_4" and plan.move == []
    assert [str(c) for c in plan.changes] == ["optim.lr: 0.0003 -> 0.002"]
    with caplog.at_level(logging.WARNING, logger="picomaml.train.run_dir"):
        commit_start(plan, config("optim.lr=0.002"))
    assert "optim.lr: 0.0003 -> 0.002" in caplog.text and CONFIG_CHANGES in caplog.text
    commit_start(plan_start(run_dir, "auto", config("optim.lr=0.005")), config("optim.lr=0.005"))
    # the checkpoint still holds the old config: the second record compares with it as well
    records = list(yaml.safe_load_all((run_dir / CONFIG_CHANGES).read_text()))
    assert [r["changes"] for r in records] == [
        [{"key": "optim.lr", "old": 0.0003, "new": 0.002}],
        [{"key": "optim.lr", "old": 0.0003, "new": 0.005}],
    ]
    assert records[0]["checkpoint"].endswith("step_4")
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == 0.005


def test_resume_from_an_older_step_moves_the_newer_ones_aside(tmp_path):
    run_dir = tmp_path / "run"
    before = make_run(run_dir, config())
    plan = plan_start(run_dir, str(run_dir / "checkpoints" / "step_2"), config())
    assert plan.move == ["checkpoints/step_4", "checkpoints/latest"]
    dest = commit_start(plan, config())
    kept = snapshot(dest)
    assert kept["metrics.csv"] == before["metrics.csv"] and kept["config.yaml"] == before["config.yaml"]
    assert all(kept[k] == v for k, v in before.items() if k.startswith("checkpoints/step_4"))
    assert ckpt.find_latest(run_dir / "checkpoints").name == "step_2"


def test_resume_from_another_runs_checkpoint_moves_this_run_aside(tmp_path):
    make_run(tmp_path / "a", config())
    before = make_run(tmp_path / "b", config(), steps=(1,))
    plan = plan_start(tmp_path / "b", str(tmp_path / "a" / "checkpoints"), config())
    assert plan.checkpoint == tmp_path / "a" / "checkpoints" / "step_4"
    assert snapshot(commit_start(plan, config())) == before


def test_garbled_metrics_csv_names_the_file_and_line(tmp_path):
    run_dir = tmp_path / "run"
    make_run(run_dir, config())
    path = run_dir / "metrics.csv"
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace("8", "x", 1)  # the row of step 2
    path.write_text("".join(lines))
    with pytest.raises(MetricsFileError, match=rf"{path} line 3, column 'train/lm_loss': 'x' is not a number"):
        plan_start(run_dir, "auto", config())
    # a last row cut short by a crash is no error: it is dropped
    path.write_text("".join(lines[:2]) + lines[3][:3])
    assert plan_start(run_dir, "auto", config()).checkpoint.name == "step_4"


def test_open_run_refuses_a_directory_another_process_holds(tmp_path):
    run_dir = tmp_path / "run"
    make_run(run_dir, config())
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from picomaml.train.run_lock import RunLock\n"
         "with RunLock(sys.argv[1]):\n print('held', flush=True); sys.stdin.read()", str(run_dir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid} on host '{socket.gethostname()}'"):
            open_run(run_dir, "auto", config())
    finally:
        holder.communicate("")
    with open_run(run_dir, "auto", config()) as start:
        assert start.lock.held and start.plan.checkpoint.name == "step_4"
    assert not (run_dir / LOCK_FILE).exists()


def test_open_run_releases_the_lock_when_the_plan_fails_and_broadcasts_the_error(tmp_path):
    sent = []

    def broadcast(obj):
        sent.append(obj)
        return obj

    with pytest.raises(ConfigError, match="--resume"):
        open_run(tmp_path / "run", str(tmp_path / "nowhere"), config(), broadcast=broadcast)
    assert isinstance(sent[0], ConfigError) and not (tmp_path / "run" / LOCK_FILE).exists()
    # another rank gets rank 0's error without touching the directory
    with pytest.raises(ConfigError, match="--resume"):
        open_run(tmp_path / "run", "auto", config(), is_main=False, broadcast=lambda obj: sent[0])


def test_error_line_is_one_bounded_line():
    line = error_line(ConfigError("a:\n" + "x" * 10_000))
    assert line.startswith("config error: a: xxx") and "\n" not in line and len(line) <= 2000
    assert error_line(RunDirError("in use")) == "error: in use"


def test_tracker_refuses_to_overwrite_another_runs_rows(tmp_path):
    make_run(tmp_path / "run", config())
    before = (tmp_path / "run" / "metrics.csv").read_bytes()
    with pytest.raises(FileExistsError, match="metrics.csv already holds"):
        MetricsTracker(tmp_path / "run")
    assert (tmp_path / "run" / "metrics.csv").read_bytes() == before
    assert os.path.getsize(tmp_path / "run" / "metrics.csv") > 0


@pytest.mark.parametrize("resume", ["auto", "fresh"])
def test_a_run_dir_entry_that_leads_out_is_refused_before_anything_changes(tmp_path, resume):
    other = tmp_path / "other"
    before = make_run(other, config())
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").symlink_to(other / "checkpoints", target_is_directory=True)
    with pytest.raises(RunDirError, match=r"run/checkpoints is a symbolic link .*replace the link by a folder"):
        open_run(run_dir, resume, config())
    assert snapshot(other) == before  # not resumed from, not moved into run/previous
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints"]  # no lock left, nothing moved


@pytest.mark.timeout(60)
def test_a_fifo_or_a_file_where_the_run_dir_needs_something_else_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.mkfifo(run_dir / "metrics.csv")  # reading it would block forever
    with pytest.raises(RunDirError, match="metrics.csv: expected a regular file"):
        open_run(run_dir, "auto", config())
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(RunDirError, match="--run-dir .*file: is a file, not a directory"):
        open_run(a_file, "auto", config())
