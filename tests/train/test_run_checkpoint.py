"""The extras of a run's checkpoints: learning-dynamics rows (enough for pico-analyze), writers, pruning."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import picomaml as pm
from picomaml.data.pipeline import InMemoryBatches
from picomaml.data.row_batcher import RowBatcher
from picomaml.train.run_checkpoint import (
    dynamics_row_count,
    dynamics_rows,
    heldout_rows_needed,
    save_run_checkpoint,
)


def config(**checkpoint) -> pm.ExperimentConfig:
    cfg = pm.ExperimentConfig.from_dict({
        "model": {"vocab_size": 64, "d_model": 16, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 32,
                  "max_seq_len": 16},
        "data": {"seq_len": 8, "batch_size": 4}, "sampler": {"window_len": 8},
        "checkpoint": {"learning_dynamics": True, **checkpoint},
    })  # fmt: skip
    return cfg


def source(rows: int) -> InMemoryBatches:
    data = torch.randint(0, 64, (rows, 9), generator=torch.Generator().manual_seed(0))
    return InMemoryBatches(RowBatcher(data, batch_size=4, seed=0))


def test_rows_default_to_twice_d_model_gathered_from_several_batches_without_moving_the_data():
    cfg, train = config(), source(100)
    assert dynamics_row_count(cfg) == 32 and heldout_rows_needed(cfg) == 64  # eval.rows (64) is more
    position = train.state_dict()
    rows = dynamics_rows(cfg, train, torch.randint(0, 64, (40, 9)))
    assert rows["train"].shape == (32, 8) and rows["val"].shape == (32, 8)  # 8 batches of 4 rows
    assert train.state_dict() == position
    first = train.next_batch()
    assert torch.equal(rows["train"][:4], first[:, :-1])  # the batches the run is about to see


def test_fewer_rows_than_asked_warn_naming_the_key():
    cfg = config(dynamics={"batch_size": 48})
    with pytest.warns(UserWarning, match=r"20 val rows of the 48 asked for .*more need eval.rows"):
        rows = dynamics_rows(cfg, source(200), torch.randint(0, 64, (20, 9)))
    assert rows["val"].shape[0] == 20 and rows["train"].shape[0] == 48


def test_save_run_checkpoint_keeps_every_steps_dynamics_and_hands_the_step_to_the_uploader(tmp_path):
    cfg = dataclasses.replace(config(dynamics={"batch_size": 2}), checkpoint=dataclasses.replace(
        config().checkpoint, keep_last=1, dynamics=dataclasses.replace(config().checkpoint.dynamics, batch_size=2)))
    model = pm.PicoDecoder(cfg.model)
    rows = {"train": torch.randint(0, 64, (2, 8)), "val": torch.randint(0, 64, (2, 8))}
    submitted = []

    class Recorder:
        def submit(self, step, folders):
            submitted.append((step, sorted(folders)))

    for step in (0, 5):
        save_run_checkpoint(tmp_path, step, {"model": model}, cfg, {}, model, None, rows, Recorder())
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_0", "step_5"]
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "step_0").iterdir()) == ["PRUNED", "learning_dynamics"]
    assert [s for s, _ in submitted] == [0, 5] and "learning_dynamics" in submitted[0][1]
