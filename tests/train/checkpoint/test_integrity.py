"""Damaged checkpoints: every kind of damage is detected, named (checkpoint and file), and resume falls
back to the newest verified checkpoint loudly, or refuses when there is none."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from picomaml.train import checkpoint as ckpt
from picomaml.train.checkpoint import (
    CheckpointWarning,
    DamagedCheckpointError,
    NoUsableCheckpointError,
    find_latest,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    verify_checkpoint,
)


def _state(seed: int) -> dict:
    torch.manual_seed(seed)
    model = nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt}


CONFIG = {"lr": 1e-3, "name": "run", "notes": "a config long enough to hold a hostile YAML document"}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """step_1 and step_2 (the one the tests damage), ``latest`` at step 2."""
    for step in (1, 2):
        save_checkpoint(tmp_path, step, _state(step), config=CONFIG, fsync=False)
    return tmp_path


def _zero_4k(p: Path) -> None:
    with open(p, "r+b") as f:
        f.seek(4096)
        f.write(bytes(4096))


def _flip_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def _truncate(p: Path) -> None:
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size // 3)


def _bad_zip_header(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[:4] = b"\0\0\0\0"
    p.write_bytes(bytes(data))


def _same_size_junk(p: Path) -> None:
    p.write_bytes(b"\x00{junk" + b"x" * (p.stat().st_size - 6))


DAMAGE = {  # what is done, to which file, and what the reason must say
    "4 KB zeroed": (_zero_4k, "model.pt", "SHA-256"),
    "one flipped byte": (_flip_byte, "optimizer.pt", "SHA-256"),
    "truncated": (_truncate, "model.pt", "truncated"),
    "missing": (Path.unlink, "rng.pt", "missing"),
    "bad zip header": (_bad_zip_header, "model.pt", "SHA-256"),
    "junk trainer_state.json": (_same_size_junk, "trainer_state.json", "SHA-256"),
    "junk config.yaml": (_same_size_junk, "config.yaml", "SHA-256"),
    "junk COMPLETE": (_same_size_junk, "COMPLETE", "not a valid manifest"),
    "no COMPLETE": (Path.unlink, "COMPLETE", "did not finish"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damage_is_named_on_load_fallback_and_refusal(root, case):
    damage, name, why = DAMAGE[case]
    bad = root / "step_2"
    damage(bad / name)
    # explicit load: the checkpoint and the file are named; never the unsafe advice
    with pytest.raises(DamagedCheckpointError, match=f"{bad}.*{name}: .*{why}") as err:
        load_checkpoint(bad)
    assert err.value.file == bad / name and err.value.path == bad and "weights_only" not in str(err.value)
    with pytest.raises(DamagedCheckpointError, match=name):
        resolve_resume(str(bad), root)
    # auto: fall back to the newest verified checkpoint, saying which one was skipped and why
    with pytest.warns(CheckpointWarning, match=f"using step_1(.|\n)*step_2: {name}: .*{why}"):
        assert resolve_resume("auto", root) == root / "step_1"
    with pytest.warns(CheckpointWarning, match=name):
        assert load_checkpoint(root).step == 1
    # nothing usable left: an error listing each folder and why, not a fresh start
    shutil.rmtree(root / "step_1")
    with pytest.raises(NoUsableCheckpointError, match=f"step_2: {name}") as err:
        resolve_resume("auto", root)
    assert err.value.problems == [(bad, err.value.problems[0][1])] and name in err.value.problems[0][1]
    assert isinstance(err.value, FileNotFoundError)
    with pytest.warns(CheckpointWarning, match="no usable checkpoint"):
        assert find_latest(root) is None


def _legacy(step_dir: Path) -> None:
    """Rewrite the manifest as releases before checksums wrote it (sizes only)."""
    manifest = json.loads((step_dir / "COMPLETE").read_text())
    (step_dir / "COMPLETE").write_text(json.dumps({"step": manifest["step"], "files": manifest["files"]}))


def test_checkpoints_without_checksums_still_load_by_size(root, caplog):
    _legacy(root / "step_2")
    with caplog.at_level(logging.DEBUG, logger="picomaml.train.checkpoint"):
        loaded = load_checkpoint(root / "step_2")
    assert loaded.step == 2 and loaded.config == CONFIG
    assert "without checksums" in caplog.text and "size only" in caplog.text
    _truncate(root / "step_2" / "model.pt")  # sizes are still checked
    with pytest.raises(DamagedCheckpointError, match="model.pt: .* bytes, but COMPLETE says"):
        load_checkpoint(root / "step_2")


def _damage_pickle(p: Path) -> None:
    """Flip bytes inside the archive's ``data.pkl`` (the zip structure stays intact)."""
    with zipfile.ZipFile(p) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("data.pkl"))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data = bytearray(p.read_bytes())
    for k in range(21, info.compress_size, 37):
        data[start + k] ^= 0x55
    p.write_bytes(bytes(data))


LEGACY_DAMAGE = {  # without checksums, torch, JSON and YAML see the broken bytes: the message must still be right
    "bad zip header": (_bad_zip_header, "model.pt", "not a torch checkpoint file"),
    "damaged pickle": (_damage_pickle, "model.pt", "damaged"),
    "cut archive": (
        lambda p: p.write_bytes(p.read_bytes()[:100] + bytes(p.stat().st_size - 100)),
        "model.pt",
        "damaged",
    ),
    "junk trainer_state.json": (_same_size_junk, "trainer_state.json", "not valid JSON"),
    "junk config.yaml": (_same_size_junk, "config.yaml", "not valid YAML"),
}


@pytest.mark.parametrize("case", list(LEGACY_DAMAGE))
def test_damage_in_checkpoints_without_checksums_is_diagnosed_from_the_bytes(root, case):
    damage, name, why = LEGACY_DAMAGE[case]
    bad = root / "step_2"
    _legacy(bad)
    damage(bad / name)
    with pytest.raises(DamagedCheckpointError, match=f"{name}: .*{why}") as err:
        load_checkpoint(bad)
    assert err.value.file == bad / name
    assert "weights_only=False" not in str(err.value) and "arbitrary Python objects" not in str(err.value)


def test_python_tags_in_config_yaml_are_refused_not_run(root):
    bad = root / "step_2"
    _legacy(bad)
    text = "!!python/object/apply:os.system ['echo pwned']\n"
    (bad / "config.yaml").write_text(text.ljust((bad / "config.yaml").stat().st_size))
    with pytest.raises(DamagedCheckpointError, match="config.yaml: not valid YAML"):
        load_checkpoint(bad)


@pytest.mark.parametrize(
    "content", [b"\xff\xfe\x00step_2\n", b"../../etc/passwd\n", b"step_9\n", b"x" * 100_000]
)
def test_a_garbled_or_dangling_latest_is_named_and_the_newest_verified_checkpoint_used(root, content):
    (root / "latest").write_bytes(content)
    with pytest.warns(CheckpointWarning, match="latest: "):
        assert find_latest(root) == root / "step_2"
    with pytest.warns(CheckpointWarning, match="latest: "):
        assert load_checkpoint(root).step == 2  # never a UnicodeDecodeError


def test_no_step_folders_is_a_fresh_start_and_explicit_paths_are_checked(tmp_path):
    assert resolve_resume("auto", tmp_path / "missing") is None
    assert resolve_resume("auto", tmp_path) is None
    (tmp_path / ".tmp_step_3_999999999").mkdir()  # a first save that never finished
    assert resolve_resume("auto", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint at .*no such file"):
        resolve_resume(tmp_path / "nope", tmp_path)
    unfinished = tmp_path / "step_4"
    unfinished.mkdir()
    with pytest.raises(DamagedCheckpointError, match="step_4 .*COMPLETE: missing"):
        load_checkpoint(unfinished)
    with pytest.raises(NoUsableCheckpointError) as err:
        resolve_resume("auto", tmp_path)
    assert err.value.problems == [(unfinished, "COMPLETE: missing (the save did not finish)")]


def test_manifest_abuse(root):
    bad = root / "step_2"
    manifest = json.loads((bad / "COMPLETE").read_text())
    for files, why in [
        ({"../step_1/model.pt": 10}, "not a relative path"),
        ({"/etc/passwd": 10}, "not a relative path"),
        ({"model.pt": -1}, "not a byte count"),
        ({"model.pt": True}, "not a byte count"),
    ]:
        (bad / "COMPLETE").write_text(json.dumps({**manifest, "files": files, "sha256": {}}))
        with pytest.raises(DamagedCheckpointError, match=f"COMPLETE: not a valid manifest .*{why}"):
            verify_checkpoint(bad)
    (bad / "COMPLETE").write_text(json.dumps({**manifest, "sha256": {"model.pt": "ab"}}))
    with pytest.raises(DamagedCheckpointError, match="different files|64 hex"):
        verify_checkpoint(bad)
    (bad / "COMPLETE").write_text(json.dumps(manifest))
    shutil.copytree(bad, root / "step_5")  # a copy under another step's name
    with pytest.raises(DamagedCheckpointError, match="written for step 2, but the folder is for step 5"):
        verify_checkpoint(root / "step_5")


def test_verification_reads_every_file_but_completeness_only_sizes(root):
    bad = root / "step_2"
    _flip_byte(bad / "optimizer.pt")
    assert ckpt.is_complete(bad) and not ckpt.is_complete(bad, checksums=True)
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [1, 2]  # pruning counts it; resuming skips it
    assert verify_checkpoint(root / "step_1", checksums=True).sha256.keys() == {
        "model.pt",
        "optimizer.pt",
        "rng.pt",
        "config.yaml",
        "trainer_state.json",
    }


def test_errors_are_picklable_and_bounded(tmp_path):
    err = DamagedCheckpointError(tmp_path, "model.pt: missing", tmp_path / "model.pt")
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.file, back.reason, str(back)) == (err.path, err.file, err.reason, str(err))
    many = [(tmp_path / f"step_{i:06d}", "COMPLETE: missing (the save did not finish)") for i in range(500)]
    err = NoUsableCheckpointError(tmp_path, many)
    assert pickle.loads(pickle.dumps(err)).problems == many
    assert "and 488 more" in str(err) and len(str(err)) < 2000


def test_a_file_with_python_objects_is_refused_and_said_to_be_intact(tmp_path):
    save_checkpoint(tmp_path, 1, {"thing": {"cls": nn.Linear}}, fsync=False)
    with pytest.raises(RuntimeError, match="thing.pt: holds a Python object .*torch.nn.*intact") as err:
        load_checkpoint(tmp_path)
    assert not isinstance(err.value, DamagedCheckpointError)
