"""Saving: a full disk is a clear error that changes nothing, a re-save never loses its step, leftovers of
dead writers are repaired, and what is written is exactly what the manifest's checksums describe."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from picomaml.train import _atomic_io as aio
from picomaml.train.checkpoint import (
    CheckpointWarning,
    find_latest,
    is_complete,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)


class Crash(BaseException):
    """The process dies here (nothing after it runs, not even cleanup)."""


def _fail_nth(monkeypatch, name: str, n: int, exc: BaseException, *, keep_failing: bool = False) -> None:
    """Make the ``n``-th call of ``picomaml.train._atomic_io.<name>`` raise ``exc`` (and later ones too with
    ``keep_failing``: a crash)."""
    original, calls = getattr(aio, name), [0]

    def seam(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n or (keep_failing and calls[0] > n):
            raise exc
        return original(*args, **kwargs)

    monkeypatch.setattr(aio, name, seam)


def _w(path: Path) -> float:
    return float(load_checkpoint(path).states["model"]["w"][0])


def _model(value: float, n: int = 8) -> dict:
    return {"model": {"w": torch.full((n,), value)}}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("nth_write", [1, 2, 3])
def test_disk_full_inside_torch_save_names_the_file_and_keeps_everything(tmp_path, monkeypatch, nth_write):
    save_checkpoint(tmp_path, 1, _model(1.0), fsync=False)
    before = sorted(p.name for p in tmp_path.iterdir())
    # model.pt is 3 MiB: torch.save hands it over in several writes; the disk fills on one of them
    _fail_nth(monkeypatch, "write_out", nth_write, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(
        OSError, match=r"step_2 .*disk full \(no space left on device\) while writing model.pt"
    ) as err:
        save_checkpoint(tmp_path, 2, _model(2.0, 3 << 18), fsync=False)
    assert err.value.errno == errno.ENOSPC and err.value.filename.endswith("model.pt")
    assert "unexpected pos" not in str(err.value) and "earlier checkpoints are intact" in str(err.value)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # the temporary directory is gone
    assert find_latest(tmp_path) == tmp_path / "step_1" and _w(tmp_path) == 1.0


@pytest.mark.parametrize("op, n, file", [("fsync_fd", 1, "model.pt"), ("create_file", 5, "COMPLETE")])
def test_disk_full_at_fsync_or_manifest(tmp_path, monkeypatch, op, n, file):
    save_checkpoint(tmp_path, 1, _model(1.0), fsync=False)
    _fail_nth(monkeypatch, op, n, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError, match=f"disk full .*{file}"):
        save_checkpoint(tmp_path, 2, _model(2.0), rng=True, config={"a": 1}, fsync=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_1"]


def test_resave_crash_between_the_renames_keeps_the_step(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, _model(1.0), fsync=False)
    save_checkpoint(tmp_path, 2, _model(2.0), fsync=False)
    # re-save step 2: the old copy is renamed aside (rename 1), then the process dies (rename 2)
    _fail_nth(monkeypatch, "rename", 2, Crash(), keep_failing=True)
    _fail_nth(monkeypatch, "remove_file", 1, Crash(), keep_failing=True)
    _fail_nth(monkeypatch, "remove_dir", 1, Crash(), keep_failing=True)
    with pytest.raises(Crash):
        save_checkpoint(tmp_path, 2, _model(2.5), fsync=False)
    monkeypatch.undo()
    assert not (tmp_path / "step_2").exists()
    aside = tmp_path / f".tmp_delete_step_2_{os.getpid()}"
    assert is_complete(aside)
    # a reader still gets step 2 (from the copy aside), and says so
    with pytest.warns(CheckpointWarning, match="previous copy of step folder step_2"):
        assert find_latest(tmp_path) == aside
    assert load_checkpoint(aside).step == 2 and _w(aside) == 2.0
    # the next save (a new process) puts it back instead of deleting it as stale
    dead = _dead_pid()
    for p in tmp_path.glob(f".tmp_*_{os.getpid()}"):
        p.rename(p.with_name(p.name.removesuffix(str(os.getpid())) + str(dead)))
    save_checkpoint(tmp_path, 3, _model(3.0), keep_last=None, fsync=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest",
        "step_1",
        "step_2",
        "step_3",
    ]
    assert _w(tmp_path / "step_2") == 2.0


def test_resave_error_at_the_second_rename_puts_the_old_copy_back(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 2, _model(2.0), fsync=False)
    _fail_nth(monkeypatch, "rename", 2, OSError(errno.EIO, "Input/output error"))
    with pytest.raises(OSError, match="cannot save checkpoint step_2 .*Input/output error"):
        save_checkpoint(tmp_path, 2, _model(2.5), fsync=False)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_2"]
    assert _w(tmp_path / "step_2") == 2.0
    save_checkpoint(tmp_path, 2, _model(2.5), fsync=False)  # and a re-save replaces it
    assert _w(tmp_path) == 2.5 and sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_2"]


def test_leftovers_of_live_writers_are_left_alone_and_dead_ones_cleaned(tmp_path):
    save_checkpoint(tmp_path, 1, _model(1.0), fsync=False)
    live, dead = os.getppid(), _dead_pid()
    for pid in (live, dead):
        (tmp_path / f".tmp_step_5_{pid}").mkdir()
        (tmp_path / f".latest.tmp_{pid}").write_text("step_5\n")
        (tmp_path / f".tmp_prune_step_0_{pid}").mkdir()
    # a stale copy aside whose step folder exists is old: deleted; one whose folder is missing is put back
    save_checkpoint(tmp_path, 4, _model(4.0), fsync=False)
    (tmp_path / "step_4").rename(tmp_path / f".tmp_delete_step_4_{dead}")
    (tmp_path / "step_1").rename(tmp_path / f".tmp_delete_step_1_{live}")
    save_checkpoint(tmp_path, 6, _model(6.0), keep_last=None, fsync=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(
        [
            "latest",
            "step_4",
            "step_6",
            f".tmp_delete_step_1_{live}",
            f".tmp_step_5_{live}",
            f".latest.tmp_{live}",
            f".tmp_prune_step_0_{live}",
        ]
    )
    assert _w(tmp_path / "step_4") == 4.0


def test_a_failed_prune_is_a_warning_not_a_failed_save(tmp_path, monkeypatch, caplog):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, _model(float(step)), fsync=False)
    _fail_nth(monkeypatch, "rename", 2, PermissionError(errno.EACCES, "Permission denied"))
    with caplog.at_level(logging.WARNING, logger="picomaml.train.checkpoint"):
        path = save_checkpoint(tmp_path, 3, _model(3.0), keep_last=1, fsync=False)
    assert path == find_latest(tmp_path) and "could not prune old checkpoint" in caplog.text


def test_manifest_checksums_match_the_files_written_including_writers(tmp_path):
    def writer(d: Path) -> None:
        (d / "notes.txt").write_text("hello")
        (d / "deep").mkdir()
        (d / "deep" / "big.bin").write_bytes(os.urandom(3 << 20))

    path = save_checkpoint(tmp_path, 7, _model(7.0, 1 << 19), writers={"extra": writer}, config={"a": 1})
    manifest = json.loads((path / "COMPLETE").read_text())
    assert manifest["format"] == 2 and manifest["step"] == 7
    on_disk = {
        p.relative_to(path).as_posix(): p for p in path.rglob("*") if p.is_file() and p.name != "COMPLETE"
    }
    assert set(manifest["files"]) == set(manifest["sha256"]) == set(on_disk)
    for name, p in on_disk.items():
        assert manifest["files"][name] == p.stat().st_size
        assert manifest["sha256"][name] == hashlib.sha256(p.read_bytes()).hexdigest()
    (path / "extra" / "notes.txt").write_text("HELLO")  # same size, other bytes
    assert is_complete(path) and not is_complete(path, checksums=True)
    with pytest.raises(FileNotFoundError, match="extra/notes.txt: contents changed"):
        verify_checkpoint(path)


def test_hashing_writer_passes_large_and_small_writes_through(tmp_path):
    blob = os.urandom((1 << 20) + 123)
    digest = aio.write_bytes(
        tmp_path / "f", lambda f: [f.write(b"ab"), f.write(blob), f.write(memoryview(b"c"))], True
    )
    assert (tmp_path / "f").read_bytes() == b"ab" + blob + b"c"
    assert digest == aio.hash_file(tmp_path / "f") == hashlib.sha256(b"ab" + blob + b"c").hexdigest()


def test_step_folders_have_pico_train_names_and_old_padded_ones_still_resume(tmp_path):
    save_checkpoint(tmp_path, 20, {"x": torch.arange(3)}, rng=False, fsync=False)
    assert (tmp_path / "step_20").is_dir() and (tmp_path / "latest").read_text().strip() == "step_20"
    # a run written by an earlier version: zero-padded names
    (tmp_path / "step_20").rename(tmp_path / "step_000020")
    (tmp_path / "latest").write_text("step_000020\n")
    assert find_latest(tmp_path) == tmp_path / "step_000020"
    assert torch.equal(load_checkpoint(tmp_path).states["x"], torch.arange(3))
    save_checkpoint(tmp_path, 20, {"x": torch.arange(4)}, rng=False, fsync=False)  # the same step again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_20"]  # no second copy of step 20
    save_checkpoint(tmp_path, 30, {"x": torch.arange(5)}, rng=False, fsync=False)
    assert find_latest(tmp_path) == tmp_path / "step_30"


def test_pruning_can_keep_the_learning_dynamics_of_every_step(tmp_path):
    def dynamics(d: Path) -> None:
        torch.save({"layers.0.attention.o_proj": torch.ones(2, 2)}, d / "train_weights.pt")

    for step in (0, 10, 20, 30):
        save_checkpoint(tmp_path, step, {"x": torch.tensor(step)}, writers={"learning_dynamics": dynamics},
                        keep_last=2, keep_on_prune=("learning_dynamics",), rng=False, fsync=False)  # fmt: skip
    for step in (0, 10):  # pruned: the dynamics stay for pico-analyze, the training state is gone
        folder = tmp_path / f"step_{step}"
        assert sorted(p.name for p in folder.iterdir()) == ["PRUNED", "learning_dynamics"]
        loaded = torch.load(folder / "learning_dynamics" / "train_weights.pt", weights_only=True)
        assert torch.equal(loaded["layers.0.attention.o_proj"], torch.ones(2, 2))
        with pytest.raises(Exception, match="pruned by keep_last"):
            verify_checkpoint(folder)
    assert is_complete(tmp_path / "step_20") and find_latest(tmp_path) == tmp_path / "step_30"
    (tmp_path / "step_30" / "x.pt").write_bytes(b"damaged")  # the fallback skips pruned folders silently
    with pytest.warns(CheckpointWarning) as caught:
        assert find_latest(tmp_path) == tmp_path / "step_20"
    assert "step_10" not in str(caught[0].message)
    save_checkpoint(tmp_path, 40, {"x": torch.tensor(4)}, keep_last=1, rng=False, fsync=False)
    assert not (tmp_path / "step_20").exists()  # without keep_on_prune a folder goes entirely
