"""Checkpoints: full round trip, atomic writes, pointer order, pruning, and a real SIGKILL mid-write."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import picomaml.train.checkpoint.save as ck_save
from picomaml.meta.hybrid import HybridScheduler
from picomaml.train.checkpoint import (
    find_latest,
    is_complete,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)


class Counter:
    """A stand-in for a stateful component with a generator (like the sampler)."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.calls = 0

    def draw(self) -> int:
        self.calls += 1
        return int(torch.randint(0, 1000, (1,), generator=self.generator))

    def state_dict(self):
        return {"generator": self.generator.get_state(), "calls": self.calls}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.calls = state["calls"]


def _components(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    head = nn.Linear(2, 3)
    inner = nn.ParameterList([nn.Parameter(torch.full((2,), 0.1))])
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters(), *inner.parameters()], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    sampler = Counter(seed + 1)
    hybrid = HybridScheduler(ratio=0.3, seed=seed)
    return model, head, inner, opt, sched, sampler, hybrid


def _train(model, head, inner, opt, sched, steps: int):
    for _ in range(steps):
        x = torch.randn(5, 4)
        loss = head(model(x)).pow(2).mean() + inner[0].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _state(model, head, inner, opt, sched, sampler, hybrid):
    return {
        "model": model,
        "head": head,
        "inner_loop": inner,
        "optimizer": opt,
        "lr_scheduler": sched,
        "sampler": sampler,
        "hybrid": hybrid,
        "data_state": {"row": 17, "epoch": 2},
    }


def test_round_trip_restores_everything_and_training_continues_identically(tmp_path):
    comps = _components()
    _train(*comps[:5], steps=3)
    comps[5].draw()
    random.random()
    path = save_checkpoint(
        tmp_path,
        3,
        _state(*comps),
        config={"hybrid": {"ratio": 0.3}, "betas": (0.9, 0.95)},
        counters={"ar_steps": 2, "meta_steps": 1, "tokens": 1234},
        fsync=False,
    )
    assert path == tmp_path / "step_3" and is_complete(path)
    # reference continuation from the live objects (global RNG included)
    torch_state = torch.get_rng_state()
    py_next = random.random()
    _train(*comps[:5], steps=2)
    ref = [p.detach().clone() for p in comps[0].parameters()]
    ref_draw = comps[5].draw()

    # fresh objects, different seed, restored from disk
    fresh = _components(seed=5)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 3 and ckpt.path == path
    assert ckpt.counters == {"ar_steps": 2, "meta_steps": 1, "tokens": 1234}
    assert ckpt.config == {"hybrid": {"ratio": 0.3}, "betas": [0.9, 0.95]}
    assert ckpt.states["data_state"] == {"row": 17, "epoch": 2}
    loaded = ckpt.load_into({k: v for k, v in _state(*fresh).items() if k != "data_state"})
    assert set(loaded) == {"model", "head", "inner_loop", "optimizer", "lr_scheduler", "sampler", "hybrid"}
    assert fresh[6].state_dict() == comps[6].state_dict()
    assert fresh[4].last_epoch == 3
    torch.manual_seed(999)
    random.seed(999)
    ckpt.restore_rng()
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.random() == py_next
    _train(*fresh[:5], steps=2)
    for a, b in zip(fresh[0].parameters(), ref, strict=True):
        assert torch.equal(a, b)
    assert fresh[5].draw() == ref_draw

    ts = json.loads((path / "trainer_state.json").read_text())
    assert ts["step"] == 3 and ts["picomaml_version"] and ts["time"] and "model" in ts["components"]


def test_weights_only_load_of_everything(tmp_path):
    save_checkpoint(tmp_path, 1, _state(*_components()), fsync=False)
    for f in (tmp_path / "step_1").glob("*.pt"):
        torch.load(f, weights_only=True)  # no arbitrary objects in any file


def test_unsafe_value_gives_clear_error(tmp_path):
    save_checkpoint(tmp_path, 1, {"thing": {"cls": Counter}}, fsync=False)
    with pytest.raises(RuntimeError, match="weights_only=False"):
        load_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path, weights_only=False).states["thing"]["cls"] is Counter


def test_latest_pointer_keep_last_and_overwrite(tmp_path):
    comps = _components()
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, _state(*comps), keep_last=2, fsync=False)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 40]
    assert (tmp_path / "latest").read_text().strip() == "step_40"
    assert find_latest(tmp_path) == tmp_path / "step_40"
    # saving the same step again replaces it cleanly
    save_checkpoint(tmp_path, 40, {"x": torch.ones(2)}, keep_last=2, fsync=False)
    states = load_checkpoint(tmp_path).states
    assert list(states) == ["x"] and torch.equal(states["x"], torch.ones(2))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_find_latest_ignores_tmp_and_incomplete_dirs(tmp_path):
    save_checkpoint(tmp_path, 5, {"x": torch.arange(3)}, fsync=False)
    # a crash left a temporary directory, an unmarked step directory and a damaged one
    (tmp_path / ".tmp_step_9_123456").mkdir()
    (tmp_path / ".tmp_step_9_123456" / "model.pt").write_bytes(b"partial")
    unmarked = tmp_path / "step_7"
    unmarked.mkdir()
    torch.save({"x": 1}, unmarked / "x.pt")
    damaged = tmp_path / "step_8"
    save_checkpoint(tmp_path, 8, {"x": torch.arange(100)}, fsync=False)
    with open(damaged / "x.pt", "r+b") as f:  # truncated after the manifest was written
        f.truncate(10)
    (tmp_path / "latest").write_text("step_8\n")
    assert not is_complete(unmarked) and not is_complete(damaged)
    assert find_latest(tmp_path) == tmp_path / "step_5"
    assert torch.equal(load_checkpoint(tmp_path).states["x"], torch.arange(3))
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_checkpoint(damaged)
    # no pointer at all: the highest complete step wins
    (tmp_path / "latest").unlink()
    assert find_latest(tmp_path) == tmp_path / "step_5"


def test_latest_is_updated_last(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"x": torch.zeros(1)}, fsync=False)

    def boom(*args, **kwargs):
        raise OSError("disk full while writing the pointer")

    monkeypatch.setattr(ck_save, "_write_latest", boom)
    with pytest.raises(OSError, match="pointer"):
        save_checkpoint(tmp_path, 2, {"x": torch.ones(1)}, fsync=False)
    # the step directory was already complete and in place; the pointer still names the old one
    assert is_complete(tmp_path / "step_2")
    assert (tmp_path / "latest").read_text().strip() == "step_1"
    assert find_latest(tmp_path) == tmp_path / "step_1"


def test_failed_write_leaves_no_tmp_and_keeps_previous(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": torch.zeros(1)}, fsync=False)

    def failing_writer(d: Path) -> None:
        (d / "half").write_text("...")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        save_checkpoint(tmp_path, 2, {"x": torch.ones(1)}, writers={"extra": failing_writer}, fsync=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_1"]


def test_writers_are_part_of_the_checkpoint(tmp_path):
    def writer(d: Path) -> None:
        (d / "note.txt").write_text("hello")

    path = save_checkpoint(tmp_path, 3, {"x": torch.ones(1)}, writers={"notes": writer}, fsync=False)
    assert (path / "notes" / "note.txt").read_text() == "hello"
    manifest = json.loads((path / "COMPLETE").read_text())
    assert "notes/note.txt" in manifest["files"]
    (path / "notes" / "note.txt").write_text("changed!")  # size differs from the manifest
    assert not is_complete(path)


def test_resolve_resume(tmp_path):
    assert resolve_resume("auto", tmp_path / "none_yet") is None
    assert resolve_resume("none", tmp_path) is None and resolve_resume(None, tmp_path) is None
    p = save_checkpoint(tmp_path, 4, {"x": torch.ones(1)}, fsync=False)
    assert resolve_resume("auto", tmp_path) == p
    assert resolve_resume(str(p), tmp_path / "elsewhere") == p
    assert resolve_resume(tmp_path, tmp_path) == p
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_resume(tmp_path / "missing", tmp_path)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, -1, {})
    with pytest.raises(ValueError, match="component name"):
        save_checkpoint(tmp_path, 1, {"rng": torch.ones(1)})
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 1, {}, keep_last=0)
    with pytest.raises(KeyError, match="no state 'nope'"):
        save_checkpoint(tmp_path, 1, {"x": torch.ones(1)}, fsync=False)
        load_checkpoint(tmp_path).load_into({"nope": nn.Linear(1, 1)})


_CHILD = textwrap.dedent(
    """
    import sys, time, torch
    from pathlib import Path
    from picomaml.train.checkpoint import save_checkpoint
    root = Path(sys.argv[1])
    model = torch.nn.Linear(64, 64)
    torch.nn.init.constant_(model.weight, 1.0)
    save_checkpoint(root, 1, {"model": model}, counters={"tokens": 1})
    torch.nn.init.constant_(model.weight, 2.0)

    def slow_writer(d):
        (d / "started").write_text("x")
        time.sleep(60)  # the parent kills us here, mid-checkpoint

    save_checkpoint(root, 2, {"model": model, "big": torch.zeros(2_000_000)}, writers={"slow": slow_writer})
    """
)


def test_sigkill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    root = tmp_path / "ckpts"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(root)])
    try:
        deadline = time.monotonic() + 60
        started = None
        while time.monotonic() < deadline and started is None:
            hits = list(root.glob(".tmp_step_2_*/slow/started")) if root.exists() else []
            started = hits[0] if hits else None
            time.sleep(0.02)
        assert started is not None, "child never reached the second save"
        assert (started.parent.parent / "big.pt").exists()  # killed mid-write, after the big tensor
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert find_latest(root) == root / "step_1"
    ckpt = load_checkpoint(root)
    assert ckpt.step == 1 and ckpt.counters == {"tokens": 1}
    assert torch.all(ckpt.states["model"]["weight"] == 1.0)
    # the next save cleans the dead writer's temporary directory (and a pointer file it might have left)
    (root / f".latest.tmp_{proc.pid}").write_text("step_2\n")
    save_checkpoint(root, 3, {"x": torch.ones(1)}, fsync=False)
    assert not list(root.glob(".tmp_*")) and not list(root.glob(".latest.tmp_*"))
    assert find_latest(root) == root / "step_3"


def test_hf_export_beside_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    from picomaml.model.config import PicoDecoderConfig
    from picomaml.model.decoder import PicoDecoder
    from picomaml.model.hf import export_hf

    torch.manual_seed(0)
    model = PicoDecoder(
        PicoDecoderConfig(
            vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=16
        )
    ).eval()

    class Tok:  # the tokenizer protocol export_hf uses
        def save_pretrained(self, path):
            Path(path, "tokenizer.json").write_text("{}")

    path = save_checkpoint(
        tmp_path, 1, {"model": model}, fsync=False, writers={"hf": lambda d: export_hf(model, d, Tok())}
    )
    assert (
        is_complete(path)
        and (path / "hf" / "config.json").exists()
        and (path / "hf" / "tokenizer.json").exists()
    )
    hf = transformers.LlamaForCausalLM.from_pretrained(path / "hf").eval()
    ids = torch.randint(0, 32, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="to_hf"):
        export_hf(nn.Linear(2, 2), tmp_path / "x")


def test_resume_with_real_components_is_bit_identical(tmp_path):
    """3 steps + save + load into fresh objects + 3 steps == 6 uninterrupted steps (hybrid AR/meta)."""
    import picomaml as pm

    rows = _zipf_rows()

    def build(seed_offset: int):
        torch.manual_seed(100 + seed_offset)  # fresh objects start different; the checkpoint must fix that
        model = pm.PicoDecoder(
            pm.PicoDecoderConfig(
                vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=32
            )
        )
        head = pm.MetaHead(16, 3, hidden_dims=(8,), init="xavier", seed=seed_offset)
        loop = pm.InnerLoop(steps=2, lr=0.1, learn_lr="per_step", head=head)
        opt = torch.optim.AdamW([*model.parameters(), *head.parameters(), *loop.parameters()], lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
        sampler = pm.SMLMTSampler(
            n_way=3,
            k_shot=2,
            n_query=2,
            mask_token_id=0,
            window_len=8,
            min_freq=2,
            max_freq=0.9,
            seed=seed_offset,
        )
        hybrid = pm.HybridScheduler(ratio=0.5, mode="interleave", seed=0)
        return {
            "model": model,
            "head": head,
            "inner_loop": loop,
            "optimizer": opt,
            "lr_scheduler": sched,
            "sampler": sampler,
            "hybrid": hybrid,
        }

    def step(c, s):
        if c["hybrid"].choose(s) == "meta":
            loss = pm.meta_loss(c["model"], c["head"], c["inner_loop"], c["sampler"].sample(rows)).loss
        else:
            loss = pm.lm_loss(c["model"], rows[s % 4 : s % 4 + 4])
        c["optimizer"].zero_grad()
        loss.backward()
        c["optimizer"].step()
        c["lr_scheduler"].step()
        return loss.item()

    full = build(0)
    ref_losses = [step(full, s) for s in range(6)]

    first = build(0)
    losses = [step(first, s) for s in range(3)]
    save_checkpoint(tmp_path, 3, first, fsync=False)
    resumed = build(7)
    ckpt = load_checkpoint(tmp_path)
    ckpt.load_into(resumed)
    losses += [step(resumed, s) for s in range(ckpt.step, 6)]
    assert losses == ref_losses
    for name in ("model", "head", "inner_loop"):
        for (n, a), b in zip(full[name].named_parameters(), resumed[name].parameters(), strict=True):
            assert torch.equal(a, b), (name, n)


def _zipf_rows() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    p = 1.0 / torch.arange(1, 60).float()
    return torch.multinomial(p / p.sum(), 8 * 32, replacement=True, generator=g).view(8, 32) + 1


def test_the_latest_pointer_and_a_run_directory_are_paths_load_checkpoint_takes(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    for step in (10, 20):
        save_checkpoint(root, step, {"x": torch.full((2,), float(step))}, fsync=False)
    for path in (root / "latest", tmp_path / "run", root):
        ckpt = load_checkpoint(path)
        assert ckpt.step == 20 and ckpt.path == root / "step_20", path
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_checkpoint(tmp_path)  # neither a run directory nor a root
