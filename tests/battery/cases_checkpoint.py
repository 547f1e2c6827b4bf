"""Checkpoint contents that verify (sizes and SHA-256 match the manifest) but do not fit the run: every
state is checked against the config before anything is loaded, and the error names the key."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from harness import area, cli, load_pt, refused, rewrite, step_dir, succeeded, train, trained_run

case = area("checkpoint", "verified checkpoints whose contents do not fit the run (resume, eval, export)")


def resume(config: Path, run: Path, *extra: str):
    return train(["--config", str(config), "--run-dir", str(run), "--max-steps", "6", *extra])


def edited(tmp: Path, name: str, edit, step: int = 4) -> tuple[Path, Path, str]:
    """A trained run whose ``step_<step>/<name>`` was edited by ``edit(state) -> needle``."""
    config, run = trained_run(tmp)
    s = step_dir(run, step)
    state = load_pt(s, name)
    needle = edit(state)
    rewrite(s, name, state)
    return config, run, needle


def first_weight(state: dict) -> str:
    return next(k for k, v in state.items() if v.ndim == 2)


def model_edit(fn):
    def edit(state):
        key = first_weight(state)
        fn(state, key)
        return key

    return edit


@case("model-int64-weights")
def _(tmp):
    config, run, key = edited(tmp, "model.pt", model_edit(lambda s, k: s.__setitem__(k, s[k].long())))
    return refused(resume(config, run), key, "int64")


@case("model-float64-weights")
def _(tmp):
    config, run, key = edited(tmp, "model.pt", model_edit(lambda s, k: s.__setitem__(k, s[k].double())))
    return refused(resume(config, run), key, "float64")


@case("model-wrong-shape")
def _(tmp):
    config, run, key = edited(tmp, "model.pt", model_edit(lambda s, k: s.__setitem__(k, s[k][:-1].clone())))
    return refused(resume(config, run), key)


@case("model-nan-weights")
def _(tmp):
    config, run, key = edited(tmp, "model.pt", model_edit(lambda s, k: s[k].view(-1).__setitem__(0, float("nan"))))
    return refused(resume(config, run), key, "NaN")


@case("model-missing-key")
def _(tmp):
    config, run, key = edited(tmp, "model.pt", model_edit(lambda s, k: s.pop(k)))
    return refused(resume(config, run), key)


@case("model-extra-key")
def _(tmp):
    config, run, _ = edited(tmp, "model.pt", lambda s: s.__setitem__("stowaway.weight", torch.zeros(2)))
    return refused(resume(config, run), "stowaway.weight")


@case("model-not-a-state-dict")
def _(tmp):
    config, run = trained_run(tmp)
    rewrite(step_dir(run, 4), "model.pt", [1, 2, 3])
    return refused(resume(config, run), "model")


@case("head-inf-weights")
def _(tmp):
    def edit(state):
        key = next(k for k, v in state.items() if isinstance(v, torch.Tensor))
        state[key].view(-1)[0] = float("inf")
        return key

    config, run, key = edited(tmp, "head.pt", edit)
    return refused(resume(config, run), key)


@case("optimizer-exp-avg-wrong-shape")
def _(tmp):
    config, run, _ = edited(tmp, "optimizer.pt", lambda s: s["state"][0].__setitem__("exp_avg", torch.zeros(3)))
    return refused(resume(config, run), "exp_avg")


@case("optimizer-state-for-unknown-parameter")
def _(tmp):
    config, run, _ = edited(tmp, "optimizer.pt", lambda s: s["state"].__setitem__(100, s["state"][0]))
    return refused(resume(config, run), "100")


@case("optimizer-nan-moment")
def _(tmp):
    config, run, _ = edited(tmp, "optimizer.pt", lambda s: s["state"][1]["exp_avg_sq"].fill_(float("nan")))
    return refused(resume(config, run), "exp_avg_sq")


@case("optimizer-group-count")
def _(tmp):
    config, run, _ = edited(tmp, "optimizer.pt", lambda s: s["param_groups"].pop())
    return refused(resume(config, run), "group")


@case("lr-scheduler-epoch-1e9")
def _(tmp):
    config, run, _ = edited(tmp, "lr_scheduler.pt", lambda s: s.__setitem__("last_epoch", 10**9))
    return refused(resume(config, run), "last_epoch")


@case("data-position-negative")
def _(tmp):
    config, run, _ = edited(tmp, "data.pt", lambda s: s.__setitem__("position", -5))
    return refused(resume(config, run), "position")


@case("data-position-1e12")
def _(tmp):
    config, run, _ = edited(tmp, "data.pt", lambda s: s.__setitem__("position", 10**12))
    return refused(resume(config, run), "position")


@case("data-epoch-negative")
def _(tmp):
    config, run, _ = edited(tmp, "data.pt", lambda s: s.__setitem__("epoch", -1))
    return refused(resume(config, run), "epoch")


@case("data-position-a-string")
def _(tmp):
    config, run, _ = edited(tmp, "data.pt", lambda s: s.__setitem__("position", "six"))
    return refused(resume(config, run), "position")


@case("sampler-generator-garbage")
def _(tmp):
    config, run, _ = edited(tmp, "sampler.pt", lambda s: s.__setitem__("generator", torch.zeros(7, dtype=torch.uint8)))
    return refused(resume(config, run), "generator")


@case("sampler-episodes-negative")
def _(tmp):
    config, run, _ = edited(tmp, "sampler.pt", lambda s: s.__setitem__("episodes_sampled", -3))
    return refused(resume(config, run), "episodes_sampled")


def edit_trainer_state(run: Path, step: int, edit) -> None:
    s = step_dir(run, step)
    state = json.loads((s / "trainer_state.json").read_text())
    edit(state)
    rewrite(s, "trainer_state.json", json.dumps(state).encode())


@case("trainer-state-step-3-in-step-4-falls-back")
def _(tmp):
    config, run = trained_run(tmp)
    edit_trainer_state(run, 4, lambda s: s.__setitem__("step", 3))
    r = resume(config, run)

    def check():  # resumed from step 2 (the newest that verifies), with the reason named
        if "trainer_state.json" not in r.text or "step_2" not in r.text.replace("step_000002", "step_2"):
            return f"no fallback to step 2 named: {r.last_line}"
        rows = (run / "metrics.csv").read_text().splitlines()
        return None if rows[-1].split(",")[0] == "6" else f"last metrics row {rows[-1][:40]}"

    return succeeded(r, check) if r.code == 0 else refused(r, "trainer_state.json")


@case("trainer-state-step-3-in-the-only-step")
def _(tmp):
    config, run = trained_run(tmp)
    edit_trainer_state(run, 4, lambda s: s.__setitem__("step", 3))
    import shutil

    shutil.rmtree(step_dir(run, 2))
    return refused(resume(config, run), "trainer_state.json")


@case("trainer-state-negative-tokens")
def _(tmp):
    config, run = trained_run(tmp)
    edit_trainer_state(run, 4, lambda s: s["counters"].__setitem__("tokens", -1))
    return refused(resume(config, run), "tokens")


@case("trainer-state-unknown-counter")
def _(tmp):
    config, run = trained_run(tmp)
    edit_trainer_state(run, 4, lambda s: s["counters"].__setitem__("bananas", 1))
    return refused(resume(config, run), "bananas")


@case("trainer-state-more-steps-than-step")
def _(tmp):
    config, run = trained_run(tmp)
    edit_trainer_state(run, 4, lambda s: s["counters"].__setitem__("ar_steps", 10**6))
    return refused(resume(config, run), "ar_steps")


@case("trainer-state-ghost-component")
def _(tmp):
    config, run = trained_run(tmp)
    edit_trainer_state(run, 4, lambda s: s["components"].append("ghost"))
    r = resume(config, run)
    return succeeded(r, lambda: None if "ghost" in r.text else "ghost component not named") if r.code == 0 else refused(r, "ghost")


@case("model-pt-holds-a-python-object")
def _(tmp):
    config, run = trained_run(tmp)
    import collections

    rewrite(step_dir(run, 4), "model.pt", collections.Counter(a=1))  # not tensors: the safe loader refuses it
    return refused(resume(config, run), "model")


@case("config-yaml-garbage")
def _(tmp):
    config, run = trained_run(tmp)
    rewrite(step_dir(run, 4), "config.yaml", b"model: [unclosed\n")
    r = resume(config, run)
    return succeeded(r, lambda: None if "config.yaml" in r.text else "garbled config.yaml not named") if r.code == 0 else refused(r, "config.yaml")


@case("eval-on-nan-weights")
def _(tmp):
    config, run, key = edited(tmp, "model.pt", model_edit(lambda s, k: s[k].view(-1).__setitem__(0, float("nan"))))
    return refused(cli(["eval", "--checkpoint", str(run), "--episodes", "2", "--no-downstream"]), key)


@case("eval-on-wrong-shape")
def _(tmp):
    config, run, key = edited(tmp, "model.pt", model_edit(lambda s, k: s.__setitem__(k, s[k][:-1].clone())))
    return refused(cli(["eval", "--checkpoint", str(run), "--episodes", "2", "--no-downstream"]), key)


@case("load-checkpoint-then-load-into-a-smaller-model")
def _(tmp):
    import picomaml as pm

    config, run = trained_run(tmp)
    loaded = pm.load_checkpoint(run / "checkpoints")
    model = pm.PicoDecoder(pm.PicoDecoderConfig(vocab_size=8192, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32))
    from harness import raises

    return raises(lambda: loaded.load_into({"model": model}), "layers.1")
