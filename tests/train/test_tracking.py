"""MetricsTracker: the CSV file, resume truncation, TensorBoard and offline W&B; plot_curves."""

from __future__ import annotations

import pytest

from picomaml.train.tracking import MetricsFileError, MetricsTracker, plot_curves, read_metrics_csv


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


def write_rows(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("step,loss\n1,2.0\n2,x\n", r"line 3, column 'loss': 'x' is not a number"),
        ("step,loss\n1,2.0,7\n", r"line 2: 3 fields, but the header has 2"),
        ("step,loss\n1,2.0\n,3.0\n", r"line 3: the row has no step"),
        ("loss\n2.0\n", r"line 1: the header has no 'step' column"),
        ("step,loss\n1,2\x00\n", r"line 2, column 'loss': '2\\x00' is not a number"),
    ],
)
def test_garbled_metrics_csv_names_the_file_and_line(tmp_path, text, message):
    path = write_rows(tmp_path / "metrics.csv", text)
    with pytest.raises(MetricsFileError, match=rf"^{path} {message}"):
        read_metrics_csv(path)
    with pytest.raises(MetricsFileError, match=message):
        MetricsTracker(tmp_path, resume_step=5)
    assert path.read_text(encoding="utf-8") == text  # left as it was


def test_non_utf8_metrics_csv_names_the_line(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_bytes(b"step,loss\n1,2\n2,\xff\n")
    with pytest.raises(MetricsFileError, match="line 3: not UTF-8"):
        read_metrics_csv(path)


def test_resume_drops_a_row_cut_short_by_a_crash(tmp_path, caplog):
    path = write_rows(tmp_path / "metrics.csv", "step,loss\r\n1,2.5\r\n2,2.25\r\n3,2.")
    with pytest.raises(MetricsFileError, match="line 3: 1 fields"):
        read_metrics_csv(write_rows(tmp_path / "torn.csv", "step,loss\n1,2.5\n3"))
    tracker = MetricsTracker(tmp_path, resume_step=3)
    assert "unterminated last line 4" in caplog.text
    tracker.log(3, {"loss": 2.0})
    assert read_metrics_csv(path) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.25}, {"step": 3, "loss": 2.0}]


def test_a_new_run_never_overwrites_rows(tmp_path):
    MetricsTracker(tmp_path).log(1, {"loss": 1.0})
    before = (tmp_path / "metrics.csv").read_bytes()
    with pytest.raises(FileExistsError, match="already holds the rows of a run"):
        MetricsTracker(tmp_path)
    assert (tmp_path / "metrics.csv").read_bytes() == before
    write_rows(tmp_path / "metrics.csv", "step,loss\n")  # a header alone is no run
    MetricsTracker(tmp_path).log(1, {"loss": 1.0})


def test_wandb_run_id_is_kept_on_resume_and_new_for_a_new_run(tmp_path):
    from picomaml.train.tracking import _wandb_run_id

    first = _wandb_run_id(tmp_path, resuming=False)
    assert first.startswith(tmp_path.name + "-") and _wandb_run_id(tmp_path, resuming=True) == first
    (tmp_path / "wandb" / "run_id").unlink()  # the earlier run moved aside with wandb/
    assert _wandb_run_id(tmp_path, resuming=False) != first


def _scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc, {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_a_resumed_tensorboard_run_has_no_step_twice_and_the_config_as_hparams(tmp_path):
    pytest.importorskip("tensorboard")
    config = {"model": {"d_model": 16, "n_layers": 2}, "hybrid": {"ratio": 0.5}, "data": {"files": None}}
    first = MetricsTracker(tmp_path, loggers=["csv", "tensorboard"], config=config)
    for step in (5, 10, 15, 20):
        first.log(step, {"train/loss": 1.0 / step})
    first.close()
    resumed = MetricsTracker(tmp_path, loggers=["csv", "tensorboard"], config=config, resume_step=10)
    for step in (15, 20, 25):  # steps 15 and 20 run again after the step-10 checkpoint
        resumed.log(step, {"train/loss": 2.0 / step})
    resumed.close()
    acc, steps = _scalars(tmp_path / "tensorboard")
    assert steps == {"train/loss": [5, 10, 15, 20, 25]}
    assert [e.value for e in acc.Scalars("train/loss")][2] == pytest.approx(2.0 / 15)  # the re-run's value
    assert "_hparams_/experiment" in acc.summary_metadata
