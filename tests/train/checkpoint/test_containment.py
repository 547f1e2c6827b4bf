"""Checkpoint code stays inside its root: no read, prune or resume through a symbolic link, and no read of
a FIFO or device that would never end; each refused entry is named with its reason."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from picomaml.train import checkpoint as ckpt
from picomaml.train.checkpoint.layout import (
    CheckpointWarning,
    DamagedCheckpointError,
    NoUsableCheckpointError,
)
from picomaml.train.checkpoint.save import recover_interrupted


def state(value: float) -> dict:
    return {"model": {"w": torch.full((4,), value)}}


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def other_run(tmp_path) -> Path:
    """Another run's checkpoint root with step 7 (and its learning dynamics), whose files must never change."""
    root = tmp_path / "other" / "checkpoints"
    ckpt.save_checkpoint(root, 7, state(7.0), writers={"learning_dynamics": dynamics}, fsync=False)
    return root


def dynamics(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train_weights.pt").write_bytes(b"weights")


def test_pruning_never_follows_a_linked_step_folder(tmp_path, other_run):
    before = snapshot(other_run)
    root = tmp_path / "run" / "checkpoints"
    ckpt.save_checkpoint(root, 1, state(1.0), fsync=False)
    (root / "step_0").symlink_to(other_run / "step_7", target_is_directory=True)
    for step in (2, 3, 4):  # pruning keeps each step's dynamics: it empties a folder instead of deleting it
        ckpt.save_checkpoint(
            root, step, state(float(step)), writers={"learning_dynamics": dynamics}, keep_last=1,
            keep_on_prune=("learning_dynamics",), fsync=False,
        )  # fmt: skip
    assert snapshot(other_run) == before  # nothing written, pruned or deleted there
    assert (root / "step_0").is_symlink() and not (root / "step_1").exists()
    assert (root / "step_2" / "PRUNED").exists()  # the run's own old steps are pruned as usual
    assert ckpt.find_latest(root) == root / "step_4"


def test_resume_never_continues_from_a_linked_step_folder(tmp_path, other_run):
    root = tmp_path / "run" / "checkpoints"
    ckpt.save_checkpoint(root, 2, state(2.0), fsync=False)
    (root / "step_9").symlink_to(other_run / "step_7", target_is_directory=True)  # newer than step 2
    with pytest.warns(CheckpointWarning, match=r"step_9: the step folder is a symbolic link"):
        assert ckpt.resolve_resume("auto", root) == root / "step_2"
    (root / "latest").write_text("step_9\n")  # even when latest names it
    with pytest.warns(CheckpointWarning, match="symbolic link"):
        assert ckpt.find_latest(root) == root / "step_2"
    only_link = tmp_path / "run2" / "checkpoints"
    only_link.mkdir(parents=True)
    (only_link / "step_7").symlink_to(other_run / "step_7", target_is_directory=True)
    with pytest.raises(NoUsableCheckpointError, match="step_7: the step folder is a symbolic link"):
        ckpt.resolve_resume("auto", only_link)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("special", ["dev-zero", "fifo"])
def test_latest_or_manifest_that_never_ends_is_refused_not_read(tmp_path, special):
    root = tmp_path / "checkpoints"
    ckpt.save_checkpoint(root, 1, state(1.0), fsync=False)
    ckpt.save_checkpoint(root, 2, state(2.0), fsync=False)

    def make(path: Path) -> None:
        path.unlink()
        if special == "fifo":
            os.mkfifo(path)
        else:
            path.symlink_to("/dev/zero")

    make(root / "latest")
    with pytest.warns(CheckpointWarning, match="latest: is"):
        assert ckpt.find_latest(root) == root / "step_2"
    make(root / "step_2" / "COMPLETE")
    with pytest.warns(CheckpointWarning, match="step_2: COMPLETE: is"):
        assert ckpt.find_latest(root) == root / "step_1"
    with pytest.raises(DamagedCheckpointError, match="COMPLETE: is"):
        ckpt.load_checkpoint(root / "step_2")


def test_a_checkpoint_file_or_folder_swapped_for_a_link_is_damaged(tmp_path, other_run):
    root = tmp_path / "checkpoints"
    step = ckpt.save_checkpoint(root, 1, state(1.0), fsync=False)
    model = step / "model.pt"
    copy = tmp_path / "model-copy.pt"
    copy.write_bytes(model.read_bytes())  # same bytes and hash: only the link is wrong
    model.unlink()
    model.symlink_to(copy)
    with pytest.raises(DamagedCheckpointError, match="model.pt: is a symbolic link"):
        ckpt.load_checkpoint(step)
    model.unlink()
    model.write_bytes(copy.read_bytes())
    ckpt.load_checkpoint(step)  # back to a regular file: verifies again


def test_a_nul_byte_in_a_manifest_name_falls_back_to_the_previous_step(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt.save_checkpoint(root, 1, state(1.0), fsync=False)
    newest = ckpt.save_checkpoint(root, 2, state(2.0), fsync=False)
    manifest = json.loads((newest / "COMPLETE").read_text())
    manifest["files"]["model\x00.pt"] = manifest["files"].pop("model.pt")
    manifest["sha256"]["model\x00.pt"] = manifest["sha256"].pop("model.pt")
    (newest / "COMPLETE").write_text(json.dumps(manifest))
    with pytest.warns(CheckpointWarning, match=r"step_2: COMPLETE: not a valid manifest .*not a relative path"):
        assert ckpt.find_latest(root) == root / "step_1"


def test_a_linked_saved_aside_copy_is_neither_used_nor_put_back(tmp_path, other_run):
    before = snapshot(other_run)
    root = tmp_path / "checkpoints"
    ckpt.save_checkpoint(root, 1, state(1.0), fsync=False)
    aside = root / ".tmp_delete_step_7_999999"  # as if a re-save of step 7 died between its renames
    aside.symlink_to(other_run / "step_7", target_is_directory=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        assert ckpt.find_latest(root) == root / "step_1"
    recover_interrupted(root)
    assert not (root / "step_7").exists() and aside.is_symlink()
    assert snapshot(other_run) == before
