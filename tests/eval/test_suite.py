"""The suite and `picomaml eval`: runs on a saved checkpoint (step dir, root, run dir), clear errors otherwise."""

from __future__ import annotations

import hashlib
import io
import json

import pytest
import torch
import yaml

from picomaml.cli import eval_main
from picomaml.eval.suite import format_suite_table, run_suite
from picomaml.meta.head import MetaHead
from picomaml.meta.inner_loop import InnerLoop
from picomaml.model.decoder import PicoDecoder
from picomaml.train.checkpoint import save_checkpoint
from picomaml.train.config import ExperimentConfig
from picomaml.train.loading import IncompatibleCheckpointError, load_for_eval

pytest.importorskip("tokenizers")

MODEL = {
    "vocab_size": 8192,
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "ffn_dim": 64,
    "max_seq_len": 32,
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    from picomaml.data.corpus import load_default_corpus

    path = tmp_path_factory.getbasetemp() / "eval-corpus"  # shared with test_downstream.py
    load_default_corpus(seq_len=33, cache_dir=path)
    return str(path)


def _config(cache: str, **model) -> ExperimentConfig:
    return ExperimentConfig.from_dict(
        {
            "seed": 1,
            "model": MODEL | model,
            "data": {"source": "embedded", "seq_len": 32, "batch_size": 8, "cache_dir": cache},
            "sampler": {
                "n_way": 3,
                "k_shot": 2,
                "n_query": 2,
                "window_len": 8,
                "min_freq": 3,
                "max_freq": 0.5,
            },
            "head": {"hidden_dims": [16], "init": "xavier"},
            "inner_loop": {"steps": 2, "lr": 0.1, "learn_lr": "per_tensor"},
        }
    )


def _save(tmp_path, cfg: ExperimentConfig, step: int = 2):
    torch.manual_seed(0)
    model = PicoDecoder(cfg.model)
    head = MetaHead(cfg.model.d_model, cfg.sampler.n_way, **vars(cfg.head))
    loop = InnerLoop(**vars(cfg.inner_loop), head=head)
    with torch.no_grad():
        loop.lrs.fill_(0.05)  # a learned value that must come back
    root = tmp_path / "run" / "checkpoints"
    return save_checkpoint(
        root,
        step,
        {"model": model, "head": head, "inner_loop": loop, "sampler": {"x": 1}},
        config=cfg.to_dict(),
        fsync=False,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory, cache):
    return _save(tmp_path_factory.mktemp("ckpt"), _config(cache))


def test_load_for_eval_rebuilds_everything(saved):
    for path in (saved, saved.parent, saved.parent.parent):  # step dir, checkpoint root, run dir
        bundle = load_for_eval(path)
        assert bundle.path == saved and bundle.step == 2 and bundle.source == "checkpoint"
        assert bundle.model.config.d_model == 32 and bundle.head.hidden_dims == (16,)
        assert torch.allclose(bundle.inner_loop.lrs, torch.full_like(bundle.inner_loop.lrs, 0.05))
        assert bundle.heldout_rows.shape[1] == 33 and bundle.train_setting == (3, 2)
        assert 2 in bundle.suite_kwargs["exclude_token_ids"]  # the mask token is never a class
    torch.manual_seed(0)
    reference = PicoDecoder(bundle.config.model)
    assert torch.equal(bundle.model.embed_tokens.weight, reference.embed_tokens.weight)


def test_run_suite_and_table(saved):
    b = load_for_eval(saved)
    kw = dict(settings=[(3, 2), (5, 1)], episodes=4, downstream_window_len=24, **b.suite_kwargs)
    res = run_suite(b.model, b.tokenizer, b.heldout_rows, b.head, b.inner_loop, **kw)
    again = run_suite(b.model, b.tokenizer, b.heldout_rows, b.head, b.inner_loop, **kw)
    assert [r["setting"] for r in res["smlmt"]] == ["3w2s", "5w1s"]
    assert [r["setting"] for r in res["downstream"]] == ["3w2s", "5w1s"]
    assert res["smlmt"][0]["acc_after"] is not None  # the 3-way head serves its own setting
    assert res["smlmt"][1]["acc_after"] is None  # an xavier 3-way head cannot score 5-way episodes
    assert any(s["setting"] == "5w1s" and "head" in s["reason"] for s in res["skipped"])
    for r in res["smlmt"] + res["downstream"]:
        assert 0 <= r["acc_ncm"] <= 1 and len(r["per_episode_ncm"]) == 4
        assert r["chance"] == pytest.approx(1 / r["n_way"])
    assert [r["per_episode_ncm"] for r in res["smlmt"]] == [
        r["per_episode_ncm"] for r in again["smlmt"]
    ]
    json.dumps(res)  # JSON-ready
    table = format_suite_table(res)
    assert (
        "| SMLMT held-out | 3-way 2-shot (2 query) | 4 |" in table and "0.333" in table and "0.200" in table
    )
    assert "downstream" in table and "skipped:" in table


def test_eval_main_prints_table_and_writes_json(saved, tmp_path):
    out, err = io.StringIO(), io.StringIO()
    target = tmp_path / "out" / "eval.json"
    code = eval_main(
        [
            "--checkpoint",
            str(saved.parent.parent),
            "--episodes",
            "3",
            "--json",
            str(target),
            "--downstream-window-len",
            "16",
        ],
        stdout=out,
        stderr=err,
    )
    assert code == 0, err.getvalue()
    text = out.getvalue()
    assert "step 2" in text and "| task | setting |" in text
    data = json.loads(target.read_text())
    assert [r["setting"] for r in data["smlmt"]] == [
        "5w1s",
        "5w4s",
        "3w2s",
    ]  # defaults + the training setting
    assert data["checkpoint"]["step"] == 2 and data["episodes"] == 3 and data["seed"] == 1


def test_missing_path_is_a_clear_error(tmp_path):
    err = io.StringIO()
    assert eval_main(["--checkpoint", str(tmp_path / "nowhere")], stderr=err) == 2
    assert "nowhere" in err.getvalue() and "no such file or directory" in err.getvalue()
    (tmp_path / "empty").mkdir()
    err = io.StringIO()
    assert eval_main(["--checkpoint", str(tmp_path / "empty")], stderr=err) == 2
    assert "no complete trainer checkpoint" in err.getvalue()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_for_eval(tmp_path / "nowhere")


def test_incompatible_checkpoints(tmp_path, cache, saved):
    # weights of a 32-wide model under a config that says 64
    bad = _save(tmp_path / "a", _config(cache))
    cfg = yaml.safe_load((bad / "config.yaml").read_text())
    cfg["model"]["d_model"] = 64
    (bad / "config.yaml").write_text(yaml.safe_dump(cfg))
    manifest = json.loads((bad / "COMPLETE").read_text())  # keep the checkpoint "complete"
    manifest["files"]["config.yaml"] = (bad / "config.yaml").stat().st_size
    manifest["sha256"]["config.yaml"] = hashlib.sha256((bad / "config.yaml").read_bytes()).hexdigest()
    (bad / "COMPLETE").write_text(json.dumps(manifest))
    with pytest.raises(IncompatibleCheckpointError, match="a saved state does not fit the modules its config.yaml describes: model: 'embed_tokens.weight' is \\(8192, 32\\)"):
        load_for_eval(bad)
    # an unknown config key
    cfg["model"]["d_model"] = 32
    cfg["sampler"]["n_ways"] = 3
    (bad / "config.yaml").write_text(yaml.safe_dump(cfg))
    manifest["files"]["config.yaml"] = (bad / "config.yaml").stat().st_size
    manifest["sha256"]["config.yaml"] = hashlib.sha256((bad / "config.yaml").read_bytes()).hexdigest()
    (bad / "COMPLETE").write_text(json.dumps(manifest))
    err = io.StringIO()
    assert eval_main(["--checkpoint", str(bad)], stderr=err) == 2
    assert "n_ways" in err.getvalue() and "config.yaml" in err.getvalue()


def test_hf_export(tmp_path, cache):
    pytest.importorskip("transformers")
    from picomaml.model.hf import export_hf

    torch.manual_seed(0)
    model = PicoDecoder(_config(cache).model)
    export_hf(model, tmp_path / "hf")
    out, err = io.StringIO(), io.StringIO()
    code = eval_main(
        [
            "--checkpoint",
            str(tmp_path / "hf"),
            "--episodes",
            "2",
            "--setting",
            "3,1",
            "--no-downstream",
            "--cache-dir",
            cache,
        ],
        stdout=out,
        stderr=err,
    )
    assert code == 0, err.getvalue()
    assert "hf " in out.getvalue() and "3-way 1-shot" in out.getvalue()
