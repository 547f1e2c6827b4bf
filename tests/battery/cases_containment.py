"""Links, FIFOs and devices in a run directory: nothing outside it is read, changed or deleted, nothing
hangs, and a damaged or foreign step falls back to the newest verified one with the reason named."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from harness import (
    Outcome,
    area,
    cli,
    refused,
    rewrite,
    snapshot,
    step_dir,
    succeeded,
    train,
    trained_run,
    untouched,
)

case = area("containment", "links, FIFOs and devices inside a run directory")


def other_run(tmp: Path) -> tuple[Path, dict[str, str]]:
    """Another run next to this one (outside its run dir) and its snapshot."""
    _, other = trained_run(tmp / "other")
    return other, snapshot(tmp / "other")


def resume(config: Path, run: Path, *extra: str):
    return train(["--config", str(config), "--run-dir", str(run), "--max-steps", "6", *extra])


def fell_back(r, run: Path, *needles: str) -> Outcome:
    """Success that resumed from step 2 and says why step 4 was skipped; or a refusal naming it."""
    if r.code != 0:
        return refused(r, *needles)

    def check():
        missing = [n for n in needles if n not in r.text]
        if missing:
            return f"{missing} not named"
        last = (run / "metrics.csv").read_text().splitlines()[-1].split(",")[0]
        return None if last == "6" else f"last metrics step {last}"

    return succeeded(r, check)


@case("step-folder-linked-to-another-run")
def _(tmp):
    config, run = trained_run(tmp / "this")
    other, before = other_run(tmp)
    s = step_dir(run, 4)
    shutil.rmtree(s)
    os.symlink(step_dir(other, 4), s)
    return untouched(before, tmp / "other", fell_back(resume(config, run), run, s.name))


@case("pruning-never-follows-a-linked-step")
def _(tmp):
    config, run = trained_run(tmp / "this")
    other, before = other_run(tmp)
    s = step_dir(run, 2)
    shutil.rmtree(s)
    os.symlink(step_dir(other, 2), s)
    r = train(["--config", str(config), "--run-dir", str(run), "--max-steps", "8", "--set", "checkpoint.keep_last=1"])
    return untouched(before, tmp / "other", succeeded(r) if r.code == 0 else refused(r, s.name))


@case("latest-points-at-dev-zero")
def _(tmp):
    config, run = trained_run(tmp)
    latest = run / "checkpoints" / "latest"
    latest.unlink()
    os.symlink("/dev/zero", latest)
    return fell_back(resume(config, run), run, "latest")


@case("latest-is-a-fifo")
def _(tmp):
    config, run = trained_run(tmp)
    latest = run / "checkpoints" / "latest"
    latest.unlink()
    os.mkfifo(latest)
    r = resume(config, run)
    return fell_back(r, run, "latest") if r.code else succeeded(r)


@case("latest-names-a-folder-outside")
def _(tmp):
    config, run = trained_run(tmp / "this")
    other, before = other_run(tmp)
    (run / "checkpoints" / "latest").write_text(f"../../../other/run/checkpoints/{step_dir(other, 4).name}\n")
    r = resume(config, run)
    return untouched(before, tmp / "other", succeeded(r) if r.code == 0 else refused(r, "latest"))


@case("complete-marker-is-a-fifo")
def _(tmp):
    config, run = trained_run(tmp)
    marker = step_dir(run, 4) / "COMPLETE"
    marker.unlink()
    os.mkfifo(marker)
    return fell_back(resume(config, run), run, "COMPLETE")


@case("model-file-linked-to-another-run")
def _(tmp):
    config, run = trained_run(tmp / "this")
    other, before = other_run(tmp)
    f = step_dir(run, 4) / "model.pt"
    f.unlink()
    os.symlink(step_dir(other, 4) / "model.pt", f)
    return untouched(before, tmp / "other", fell_back(resume(config, run), run, "model.pt"))


@case("model-file-is-dev-zero")
def _(tmp):
    config, run = trained_run(tmp)
    f = step_dir(run, 4) / "model.pt"
    f.unlink()
    os.symlink("/dev/zero", f)
    return fell_back(resume(config, run), run, "model.pt")


@case("checkpoints-folder-linked-to-another-run-fresh-start")
def _(tmp):
    config, run = trained_run(tmp / "this")
    other, before = other_run(tmp)
    shutil.rmtree(run / "checkpoints")
    os.symlink(other / "checkpoints", run / "checkpoints")
    r = train(["--config", str(config), "--run-dir", str(run), "--resume", "none"])
    return untouched(before, tmp / "other", refused(r, "checkpoints"))


@case("checkpoints-folder-linked-to-another-run-resume")
def _(tmp):
    config, run = trained_run(tmp / "this")
    other, before = other_run(tmp)
    shutil.rmtree(run / "checkpoints")
    os.symlink(other / "checkpoints", run / "checkpoints")
    return untouched(before, tmp / "other", refused(resume(config, run), "checkpoints"))


@case("delete-copy-linked-to-another-run")
def _(tmp):
    config, run = trained_run(tmp / "this")
    other, before = other_run(tmp)
    s = step_dir(run, 4)
    shutil.rmtree(s)
    os.symlink(step_dir(other, 4), run / "checkpoints" / f".tmp_delete_{s.name}_123")
    r = resume(config, run)
    return untouched(before, tmp / "other", succeeded(r) if r.code == 0 else refused(r, ".tmp_delete"))


@case("nul-byte-in-a-manifest-name")
def _(tmp):
    config, run = trained_run(tmp)
    s = step_dir(run, 4)
    manifest = json.loads((s / "COMPLETE").read_text())
    manifest["files"]["model\u0000.pt"] = manifest["files"].pop("model.pt")
    if "sha256" in manifest:
        manifest["sha256"]["model\u0000.pt"] = manifest["sha256"].pop("model.pt")
    (s / "COMPLETE").write_text(json.dumps(manifest))
    return fell_back(resume(config, run), run, "COMPLETE")


@case("manifest-names-a-file-outside")
def _(tmp):
    config, run = trained_run(tmp / "this")
    other, before = other_run(tmp)
    s = step_dir(run, 4)
    manifest = json.loads((s / "COMPLETE").read_text())
    manifest["files"]["../../../../other/run/metrics.csv"] = 1
    (s / "COMPLETE").write_text(json.dumps(manifest))
    return untouched(before, tmp / "other", fell_back(resume(config, run), run, "COMPLETE"))


@case("trainer-state-is-a-link-outside")
def _(tmp):
    config, run = trained_run(tmp / "this")
    other, before = other_run(tmp)
    f = step_dir(run, 4) / "trainer_state.json"
    f.unlink()
    os.symlink(step_dir(other, 4) / "trainer_state.json", f)
    return untouched(before, tmp / "other", fell_back(resume(config, run), run, "trainer_state.json"))


@case("eval-through-a-latest-at-dev-zero")
def _(tmp):
    _, run = trained_run(tmp)
    latest = run / "checkpoints" / "latest"
    latest.unlink()
    os.symlink("/dev/zero", latest)
    r = cli(["eval", "--checkpoint", str(run), "--episodes", "2", "--no-downstream"])
    return succeeded(r, lambda: None if "latest" in r.text else "the unusable latest was not named") if r.code == 0 else refused(r, "latest")


@case("load-checkpoint-on-a-root-with-only-a-linked-step")
def _(tmp):
    from harness import raises

    import picomaml as pm

    _, run = trained_run(tmp / "this")
    other, before = other_run(tmp)
    for s in (step_dir(run, 2), step_dir(run, 4)):
        shutil.rmtree(s)
    os.symlink(step_dir(other, 4), run / "checkpoints" / "step_4")
    return untouched(before, tmp / "other", raises(lambda: pm.load_checkpoint(run / "checkpoints"), "step_4"))


@case("rewritten-step-of-another-run")
def _(tmp):
    """A step copied in from another run with another seed: it verifies, and its config says so."""
    config, run = trained_run(tmp / "this")
    other_cfg, other = trained_run(tmp / "other")
    s = step_dir(run, 4)
    shutil.rmtree(s)
    shutil.copytree(step_dir(other, 4), s)
    cfg = (s / "config.yaml").read_text().replace("seed: 3", "seed: 99")
    rewrite(s, "config.yaml", cfg.encode())
    r = resume(config, run)
    return succeeded(r, lambda: None if "seed" in r.text else "the other run's seed was not reported") if r.code == 0 else refused(r, "seed")
