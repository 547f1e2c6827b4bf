"""MetricsTracker: the CSV file, resume truncation, TensorBoard and offline W&B; plot_curves."""

from __future__ import annotations

import pytest

from picomaml.tracking import MetricsTracker, plot_curves, read_metrics_csv


def test_csv_grows_columns_and_keeps_rows(tmp_path):
    tracker = MetricsTracker(tmp_path)
    tracker.log(1, {"train/lm_loss": 5.0})
    tracker.log(2, {"train/meta_loss": 1.5, "meta/query_acc": 0.25})
    tracker.log(3, {"train/lm_loss": 4.5})
    rows = read_metrics_csv(tmp_path / "metrics.csv")
    assert rows == [
        {"step": 1.0, "train/lm_loss": 5.0},
        {"step": 2.0, "train/meta_loss": 1.5, "meta/query_acc": 0.25},
        {"step": 3.0, "train/lm_loss": 4.5},
    ]
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert header == "step,train/lm_loss,train/meta_loss,meta/query_acc"


def test_resume_drops_rows_after_the_resumed_step(tmp_path):
    tracker = MetricsTracker(tmp_path)
    for step in range(1, 6):
        tracker.log(step, {"train/lm_loss": float(step)})
    again = MetricsTracker(tmp_path, resume_step=3)
    again.log(4, {"train/lm_loss": 40.0})
    steps = [(r["step"], r["train/lm_loss"]) for r in read_metrics_csv(tmp_path / "metrics.csv")]
    assert steps == [(1, 1), (2, 2), (3, 3), (4, 40)]


def test_disabled_tracker_writes_nothing(tmp_path):
    tracker = MetricsTracker(tmp_path / "run", enabled=False)
    tracker.log(1, {"x": 1.0})
    assert not (tmp_path / "run").exists()


def test_unknown_logger_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="loggers"):
        MetricsTracker(tmp_path, loggers=["csv", "mlflow"])


def test_tensorboard_logger_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    tracker = MetricsTracker(tmp_path, loggers=["csv", "tensorboard"])
    tracker.log(1, {"train/lm_loss": 5.0})
    tracker.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_wandb_logger_runs_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = MetricsTracker(tmp_path, loggers=["wandb"], config={"seed": 0})
    tracker.log(1, {"train/lm_loss": 5.0})
    tracker.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_plot_curves(tmp_path):
    pytest.importorskip("matplotlib")
    tracker = MetricsTracker(tmp_path)
    for step in range(1, 5):
        tracker.log(step, {"train/lm_loss": 5.0 - step, "meta/query_acc": 0.2 + 0.05 * step})
    png = plot_curves(tmp_path / "metrics.csv", tmp_path / "curves.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = MetricsTracker(tmp_path / "empty")
    empty.log(1, {"unrelated": 1.0})
    assert plot_curves(tmp_path / "empty" / "metrics.csv", tmp_path / "none.png") is None
