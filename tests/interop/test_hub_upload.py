"""HubUploader up to the network: a recording stand-in for ``HfApi`` checks what is pushed where; a real
``HfApi`` against a closed local port checks that an unreachable Hub is reported and nothing hangs."""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from picomaml.interop.hub_upload import (
    HubUploader,
    HubUploadError,
    branch_name,
    checkpoint_folders,
    uploader_from_config,
)

huggingface_hub = pytest.importorskip("huggingface_hub")
from fakes import RecordingApi  # noqa: E402

pytestmark = pytest.mark.timeout(60)

# pico-analyze's remote mode finds a step's dynamics by this commit-title pattern (src/utils/data.py)
PICO_ANALYZE = r"Saving Learning Dynamics Data \({split}\) -- Step (\d+)"


def make_step(run_dir: Path, step: int) -> Path:
    """A checkpoint folder as the trainer writes it, with an HF export and learning dynamics."""
    step_dir = run_dir / "checkpoints" / f"step_{step}"
    hf = ["hf/config.json", "hf/model.safetensors", "hf/tokenizer.json", "hf/.cache/lock"]
    dynamics = ["train_activations.pt", "val_weights.pt", "train_data/data.arrow"]
    state = ["config.yaml", "model.pt", "trainer_state.json"]
    for rel in hf + [f"learning_dynamics/{d}" for d in dynamics] + state:
        (step_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (step_dir / rel).write_text(f"{rel} at {step}")
    (run_dir / "training_config.yaml").write_text("checkpointing: {run_name: x}\n")
    return step_dir


def snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def config(repo="user/picomaml-runs", branch=None):
    return SimpleNamespace(hub_repo=repo, hub_branch=branch)


def test_each_checkpoint_is_one_commit_on_the_run_branch(tmp_path):
    run_dir, api = tmp_path / "my run:1", RecordingApi()
    steps = {s: make_step(run_dir, s) for s in (20, 40)}
    uploader = uploader_from_config(config(), run_dir, api=api, backoff_s=0)
    for step, step_dir in steps.items():
        assert uploader.submit(step, checkpoint_folders(step_dir)) is None
    assert uploader.close(timeout=10) == []

    assert api.repos == [("user/picomaml-runs", {"private": True, "exist_ok": True})]
    assert api.branches == [("user/picomaml-runs", {"branch": "my-run-1", "exist_ok": True})]
    assert [c["revision"] for c in api.commits] == ["my-run-1", "my-run-1"]
    assert uploader.uploaded == [20, 40] and uploader.failures == [] and uploader.pending == []
    for commit, (step, step_dir) in zip(api.commits, steps.items(), strict=True):
        assert commit["files"] == {  # HF export at the root, dynamics beside it; no training state
            "config.json": step_dir / "hf/config.json",
            "model.safetensors": step_dir / "hf/model.safetensors",
            "tokenizer.json": step_dir / "hf/tokenizer.json",
            "learning_dynamics/train_activations.pt": step_dir / "learning_dynamics/train_activations.pt",
            "learning_dynamics/val_weights.pt": step_dir / "learning_dynamics/val_weights.pt",
            "learning_dynamics/train_data/data.arrow": step_dir / "learning_dynamics/train_data/data.arrow",
            "config.yaml": step_dir / "config.yaml",
            "training_config.yaml": run_dir / "training_config.yaml",
        }
        title = commit["commit_message"]
        assert title.startswith(f"my run:1 step {step}: Saving HF Model -- Step {step}")
        for split in ("train", "val"):
            assert int(re.search(PICO_ANALYZE.format(split=split), title).group(1)) == step


def test_only_existing_parts_are_pushed_and_explicit_branch_is_used(tmp_path):
    step_dir, api = make_step(tmp_path / "run", 5), RecordingApi()
    for part in ("hf", "learning_dynamics"):
        for p in sorted((step_dir / part).rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        (step_dir / part).rmdir()
    uploader = uploader_from_config(config(branch="exp-2"), tmp_path / "run", api=api, backoff_s=0)
    uploader.submit(5, checkpoint_folders(step_dir))
    uploader.close(timeout=10)
    (commit,) = api.commits
    assert commit["revision"] == "exp-2" and set(commit["files"]) == {"config.yaml", "training_config.yaml"}
    assert commit["commit_message"] == "run step 5"


def test_retries_then_success_creates_the_repo_once(tmp_path):
    step_dir, api = make_step(tmp_path / "run", 20), RecordingApi(fail=2)
    uploader = HubUploader("user/x", "run", api=api, retries=3, backoff_s=0)
    uploader.submit(20, checkpoint_folders(step_dir))
    assert uploader.close(timeout=10) == []
    assert api.attempts == 3 and len(api.commits) == 1 and len(api.repos) == len(api.branches) == 1
    assert uploader.uploaded == [20] and uploader.failures == []


def test_persistent_failure_is_logged_and_training_goes_on(tmp_path, caplog):
    run_dir, api = tmp_path / "run", RecordingApi(fail=10**6)
    steps = {s: make_step(run_dir, s) for s in (20, 40)}
    before = snapshot(run_dir)
    uploader = HubUploader("user/x", "run", api=api, retries=2, backoff_s=0)
    with caplog.at_level(logging.WARNING, logger="picomaml.interop.hub_upload"):
        for step, step_dir in steps.items():
            uploader.submit(step, checkpoint_folders(step_dir))  # never raises
        assert uploader.close(timeout=10) == []
    assert api.attempts == 6 and api.commits == [] and uploader.uploaded == []
    assert uploader.failures == [(s, "ConnectionError: network is unreachable") for s in (20, 40)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 20" in w and "network is unreachable" in w and "kept" in w for w in warnings)
    assert snapshot(run_dir) == before  # the local checkpoints are untouched


def test_client_errors_are_not_retried(tmp_path):
    class Forbidden(Exception):
        response = SimpleNamespace(status_code=403)

    api = RecordingApi(fail=10, error=Forbidden("403 Forbidden: no write access"))
    uploader = HubUploader("user/x", "run", api=api, retries=3, backoff_s=0)
    uploader.submit(1, checkpoint_folders(make_step(tmp_path / "run", 1)))
    uploader.close(timeout=10)
    assert api.attempts == 1 and uploader.failures == [(1, "Forbidden: 403 Forbidden: no write access")]


def test_submit_does_not_wait_and_close_waits_with_a_timeout(tmp_path, caplog):
    gate, step_dir = threading.Event(), make_step(tmp_path / "run", 20)
    api = RecordingApi(gate=gate)
    uploader = HubUploader("user/x", "run", api=api, backoff_s=0)
    uploader.submit(20, checkpoint_folders(step_dir))  # returns while the upload is blocked
    assert uploader.pending == [20]
    with caplog.at_level(logging.WARNING, logger="picomaml.interop.hub_upload"):
        assert uploader.close(timeout=0.1) == [20]
    assert "steps [20] not pushed" in caplog.text
    gate.set()
    assert uploader.close(timeout=10) == [] and uploader.uploaded == [20]
    with caplog.at_level(logging.WARNING, logger="picomaml.interop.hub_upload"):
        uploader.submit(40, checkpoint_folders(step_dir))
        uploader.submit(41, {"": tmp_path / "missing"})
    assert "step 40 skipped: uploader closed" in caplog.text and len(api.commits) == 1


def test_unreachable_hub_with_real_hfapi_is_a_recorded_failure(tmp_path):
    run_dir = tmp_path / "run"
    step_dir = make_step(run_dir, 20)
    before = snapshot(run_dir)
    api = huggingface_hub.HfApi(endpoint="http://127.0.0.1:9", token="hf_dummy")  # a closed port
    uploader = HubUploader("user/x", "run", api=api, retries=1, backoff_s=0)
    uploader.submit(20, checkpoint_folders(step_dir))
    assert uploader.close(timeout=30) == []
    ((step, error),) = uploader.failures
    assert step == 20 and "connect" in error.lower(), error
    assert snapshot(run_dir) == before


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


def test_no_token_is_a_clear_error_at_construction(no_token, tmp_path):
    with pytest.raises(HubUploadError, match=r"checkpoint\.hub_repo='user/x'.*hf auth login.*HF_TOKEN"):
        uploader_from_config(config("user/x"), tmp_path / "run")


def test_token_from_environment_or_argument(no_token, monkeypatch, tmp_path):
    HubUploader("user/x", "run", token="hf_arg").close()
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    uploader = uploader_from_config(config("user/x"), tmp_path / "run")
    assert isinstance(uploader, HubUploader) and uploader.branch == "run"
    uploader.close()


def test_no_hub_repo_means_no_uploader(tmp_path):
    assert uploader_from_config(config(repo=None), tmp_path) is None


@pytest.mark.parametrize(
    "repo_id", ["name", "a/b/c", "user/na me", "-user/x", "user--x/y", "u/x.", "u/" + "x" * 95]
)
def test_bad_repo_id_names_the_setting(repo_id):
    with pytest.raises(HubUploadError, match=r"checkpoint\.hub_repo"):
        HubUploader(repo_id, "run", api=RecordingApi())


@pytest.mark.parametrize("branch", ["has space", "-x", "a..b", "x.lock", "a/b", ""])
def test_bad_explicit_branch_names_the_setting(branch):
    with pytest.raises(HubUploadError, match=r"checkpoint\.hub_branch"):
        HubUploader("user/x", branch, api=RecordingApi())


@pytest.mark.parametrize(
    ("run_name", "branch"),
    [("run-1", "run-1"), ("my run:1", "my-run-1"), ("a/b", "a-b"), ("..x..lock", "x"), ("exp@{1}", "exp--1"),
     ("v1.2_final.", "v1.2_final"), ("-dash", "dash")],
)  # fmt: skip
def test_run_names_become_valid_branch_names(run_name, branch):
    assert branch_name(run_name) == branch


def test_a_run_name_without_valid_characters_is_refused():
    with pytest.raises(HubUploadError, match=r"checkpoint\.hub_branch"):
        branch_name("~^:?*")
