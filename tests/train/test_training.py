"""The training-loop pieces: task sharding, the metric window, optimizer reports, the start-up check."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import picomaml as pm
from picomaml.data.pipeline import InMemoryBatches, TrainingData
from picomaml.data.row_batcher import RowBatcher
from picomaml.params import ConfigError
from picomaml.train.build import build_run
from picomaml.train.config import ExperimentConfig
from picomaml.train.training import (
    COUNTERS,
    MetricWindow,
    NonFiniteGuard,
    NonFiniteRunError,
    NonFiniteStepWarning,
    check_run,
    global_grad_norm,
    group_lrs,
    meta_episode,
    new_counters,
    peek_batch,
    shard_tasks,
)

V = 200


def _rows(n=16, length=33, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 40, (n, length), generator=g)  # few types: frequent enough for episodes


def _sampler(**kw) -> pm.SMLMTSampler:
    return pm.SMLMTSampler(**({"n_way": 3, "k_shot": 2, "n_query": 2, "mask_token_id": 2, "window_len": 8} | kw))


def test_shard_tasks_splits_a_stack_in_order():
    ep = _sampler().sample(_rows(), n_tasks=4)
    parts = [shard_tasks(ep, r, 2) for r in range(2)]
    assert [p.n_tasks for p in parts] == [2, 2]
    assert torch.equal(torch.cat([p.support_ids for p in parts]), ep.support_ids)
    with pytest.raises(ValueError, match="cannot be split"):
        shard_tasks(ep, 0, 3)
    with pytest.raises(ValueError, match="stacked"):
        shard_tasks(_sampler().sample(_rows()), 0, 1)


def test_meta_episode_shared_batches_give_the_same_tasks_on_any_number_of_ranks():
    batch = _rows()
    one = meta_episode(_sampler(seed=5), batch, batch, 4, shared=True)
    halves = [meta_episode(_sampler(seed=5), batch, batch[r * 8 : (r + 1) * 8], 4, True, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([h.query_ids for h in halves]), one.query_ids)
    own = meta_episode(_sampler(seed=5), batch, batch[:8], 4, shared=False, rank=0, world=2)
    assert own.n_tasks == 2  # a sharded stream samples its share from its own rows


def test_metric_window_names_and_means():
    w = MetricWindow()
    w.add({"train/lm_loss": 2.0})
    w.add({"train/lm_loss": 4.0})
    w.add_inner_loop({"query_acc": 0.5, "inner_lr/out.weight": 0.1})
    assert w.means() == {"train/lm_loss": 3.0, "meta/query_acc": 0.5, "meta/inner_lr/out.weight": 0.1}
    assert w.last("train/lm_loss") == 4.0 and w.last("missing") is None
    w.clear()
    assert w.means() == {}


def test_grad_norm_and_group_lrs():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0, 0.0])
    assert global_grad_norm([a, b]) == pytest.approx(5.0)
    assert global_grad_norm([torch.nn.Parameter(torch.zeros(1))]) == 0.0
    b.grad[0] = math.inf
    assert math.isinf(global_grad_norm([a, b]))
    opt = torch.optim.SGD(
        [{"params": [a], "lr": 0.1, "name": "model/decay"}, {"params": [b], "lr": 0.1, "name": "model/no_decay"},
         {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.5, "name": "head/no_decay"}], lr=1.0
    )  # fmt: skip
    assert group_lrs(opt) == {"trainer/lr/model": 0.1, "trainer/lr/head": 0.5}


def _data(rows: torch.Tensor, vocab: int = V) -> TrainingData:
    class Tok:
        vocab_size, mask_token_id = vocab, 2

    return TrainingData(InMemoryBatches(RowBatcher(rows, 8, seed=0)), rows[:8], Tok(), (0, 1))


def _cfg(**sections) -> ExperimentConfig:
    base = {
        "model": {"vocab_size": V, "d_model": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 64,
                  "max_seq_len": 32},
        "data": {"seq_len": 32}, "sampler": {"n_way": 3, "k_shot": 2, "n_query": 2, "window_len": 8, "min_freq": 2},
        "meta": {"n_tasks": 2}, "eval": {"episodes": 2, "settings": [[3, 2]]},
    }  # fmt: skip
    return ExperimentConfig.from_dict(base | sections)


def test_check_run_passes_and_leaves_the_data_where_it_was():
    data = _data(_rows())
    expected = peek_batch(data.train)
    check_run(_cfg(), data, world=2)
    assert torch.equal(data.train.next_batch(), expected)


@pytest.mark.parametrize(
    ("cfg", "world", "vocab", "match"),
    [
        ({}, 1, V + 1, "model.vocab_size"),
        ({}, 3, V, "meta.n_tasks: 2 must be divisible by the 3 devices"),
        ({"sampler": {"n_way": 30, "window_len": 8}}, 1, V, "sampler: no episode"),
        ({"eval": {"settings": [[30, 2]]}}, 1, V, "eval.settings: no 30-way"),
        ({"eval": {"settings": [[2, 2]]}}, 1, V, "eval.settings: .*3-way head"),
    ],
)
def test_check_run_refuses_what_would_fail_later(cfg, world, vocab, match):
    with pytest.raises(ConfigError, match=match):
        check_run(_cfg(**cfg), _data(_rows(), vocab), world=world)


def test_check_run_without_meta_steps_skips_the_episode_probe():
    check_run(_cfg(sampler={"n_way": 30, "window_len": 8}, hybrid={"ratio": 0.0}, eval={"episodes": 0}), _data(_rows()))


def test_built_run_steps_with_the_plan_weights():
    cfg = _cfg(hybrid={"mode": "weighted", "ratio": 0.25})
    run = build_run(cfg, mask_token_id=2, special_ids=(0, 1))
    plan = run.hybrid.plan(0)
    assert plan.objectives == ("ar", "meta") and (plan.w_ar, plan.w_meta) == (0.75, 0.25)
    rows = _rows()
    out = run.learner(rows=rows, episode=run.sampler.sample(rows, n_tasks=2), w_ar=plan.w_ar, w_meta=plan.w_meta)
    assert torch.allclose(out.loss, 0.75 * out.lm_loss + 0.25 * out.meta.loss)


def test_progress_bar_shows_the_newest_values(capsys):
    from picomaml.train.training import ProgressBar

    off = ProgressBar(10, enabled=False)
    off.update(MetricWindow())
    off.close()
    assert not off.active
    w = MetricWindow()
    w.add({"train/lm_loss": 1.23456})
    bar = ProgressBar(10, 2, enabled=True)
    bar.update(w)
    assert bar.active and bar.bar.n == 3 and bar.bar.postfix == "lm_loss=1.235"
    w.add({"train/lm_loss": 2.0})
    bar.update(w)  # within a second of the last redraw: the values are not read again
    assert bar.bar.n == 4 and bar.bar.postfix == "lm_loss=1.235"
    bar.close()


def test_log_lines_go_above_the_progress_bar_not_into_it():
    import logging
    import sys

    from picomaml.train.training import ProgressBar

    handler = logging.StreamHandler(sys.stderr)  # a console handler, as logging.basicConfig makes
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        bar = ProgressBar(10, enabled=True)
        assert handler not in root.handlers  # records go through tqdm.write while the bar shows
        assert [h for h in root.handlers if type(h).__name__ == "_TqdmLoggingHandler"]
        bar.close()
        assert handler in root.handlers and not [h for h in root.handlers if type(h).__name__ == "_TqdmLoggingHandler"]
    finally:
        root.removeHandler(handler)


def test_run_summary_lists_counters_and_the_last_row():
    from picomaml.train.training import new_counters, run_summary

    c = new_counters() | {"ar_steps": 3, "meta_steps": 1, "tokens": 12345}
    text = run_summary(4, c, "max_steps", 9.6, {"step": 4, "eval/perplexity": 341.7})
    assert text.splitlines()[0] == (
        "run finished (max_steps) at step 4: 3 AR steps, 1 meta steps, 12,345 tokens, 10 s, 0 non-finite steps skipped"
    )
    assert text.splitlines()[1].split() == ["eval/perplexity", "341.7"]


# ---------------------------------------------------------------------- NonFiniteGuard


def test_nonfinite_guard_counts_warns_with_the_step_and_resets_on_a_good_step():
    guard = NonFiniteGuard(max_consecutive=3)
    assert guard.record(True, step=1) is True
    with pytest.warns(NonFiniteStepWarning, match=r"^step 2: non-finite loss or gradient; optimizer step skipped "
                      r"\(1 in a row, 1 in all; the run stops at 3 in a row\)"):
        assert guard.record(False, step=2) is False
    with pytest.warns(NonFiniteStepWarning, match="step 3: .*2 in a row, 2 in all"):
        guard.record(False, step=3)
    assert guard.record(True, step=4) and (guard.total, guard.consecutive) == (2, 0)
    with pytest.warns(NonFiniteStepWarning, match="step 5: .*1 in a row, 3 in all"):
        guard.record(False, step=5)
    assert issubclass(NonFiniteStepWarning, UserWarning)  # what the trainer warned before


def test_nonfinite_guard_stops_after_max_consecutive_naming_steps_and_remedies():
    guard = NonFiniteGuard(max_consecutive=3)
    guard.record(True, step=10)
    with pytest.warns(NonFiniteStepWarning):
        guard.record(False, step=11), guard.record(False, step=12)
    with pytest.raises(NonFiniteRunError) as info:
        guard.record(False, step=13)
    message = str(info.value)
    assert message.startswith("3 optimizer steps in a row (11-13) had a non-finite loss or gradient")
    for part in ("the last finite step was 10", "weights are still those of step 10", "optim.lr",
                 "optim.grad_clip", "trainer.max_nonfinite_skips=3"):
        assert part in message
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(NonFiniteRunError, match=r"\(1-1\).*no step of this run was finite"):
        NonFiniteGuard(1).record(False, step=1)


def test_nonfinite_guard_state_rides_in_the_counters_and_resumes_a_streak():
    guard = NonFiniteGuard(max_consecutive=3)
    with pytest.warns(NonFiniteStepWarning):
        guard.record(False, step=1), guard.record(True, step=2), guard.record(False, step=3)
    counters = new_counters() | guard.state_dict()
    assert set(guard.state_dict()) <= set(COUNTERS) and counters["nonfinite_consecutive"] == 1
    resumed = NonFiniteGuard(max_consecutive=3, state=counters)  # other counters are ignored
    assert (resumed.total, resumed.consecutive) == (2, 1)
    with pytest.warns(NonFiniteStepWarning):
        resumed.record(False, step=4)
    with pytest.raises(NonFiniteRunError, match=r"\(3-5\).*the last finite step was 2"):
        resumed.record(False, step=5)  # the streak continues across the resume
    old = NonFiniteGuard(3)
    old.load_state_dict({"nonfinite_skipped": 4.0})  # a checkpoint from before nonfinite_consecutive
    assert (old.total, old.consecutive) == (4, 0)
    with pytest.raises(KeyError, match="nonfinite_skipped"):
        old.load_state_dict({})
    for bad in (0, 1.5, True):
        with pytest.raises(ConfigError, match="^max_consecutive: must be an integer >= 1"):
            NonFiniteGuard(bad)


def test_a_diverging_run_stops_instead_of_skipping_every_step():
    """The issue's run: lr 1e6 skipped 14 of 15 steps and exited 0. With the guard it stops, naming the steps."""
    cfg = pm.PicoDecoderConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32,
                               max_seq_len=40)  # fmt: skip
    model = pm.PicoDecoder(cfg, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e6)
    guard, batch, skipped = NonFiniteGuard(max_consecutive=5), _rows(4, 17), []
    with pytest.raises(NonFiniteRunError, match=r"^5 optimizer steps in a row \(2-6\).*last finite step was 1"):
        for step in range(1, 16):
            loss = pm.lm_loss(model, batch)
            loss.backward()
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if guard.record(math.isfinite(norm) and math.isfinite(loss.item()), step=step):
                    optimizer.step()
            skipped += [step] if caught else []
            optimizer.zero_grad()
    assert skipped == [2, 3, 4, 5] and guard.total == 5


def test_evaluations_and_diagnostics_between_logging_steps_still_write_a_row():
    from picomaml.train.config import ExperimentConfig
    from picomaml.train.training import is_log_step

    cfg = ExperimentConfig.from_dict(
        {"trainer": {"log_every": 10, "eval_every": 57, "max_steps": 130}, "eval": {"grad_cos_every": 25}}
    )
    rows = [s for s in range(1, 131) if is_log_step(cfg, s)]
    assert rows == [10, 20, 25, 30, 40, 50, 57, 60, 70, 75, 80, 90, 100, 110, 114, 120, 125, 130]


def test_run_status_says_where_things_went_and_what_to_run_next(tmp_path):
    from types import SimpleNamespace

    from picomaml.train.training import run_status

    hub = SimpleNamespace(repo_id="me/run", branch="main", uploaded=[10], failures=[(20, "503")], pending=[])
    text = run_status(tmp_path / "run", ["csv", "tensorboard"], 20, hub)
    assert f"tensorboard --logdir {tmp_path / 'run' / 'tensorboard'}" in text
    assert "hub: me/run@main: 1 checkpoints pushed, 1 failed (steps [20]), 0 pending" in text
    assert f"--run-dir {tmp_path / 'run'} --resume auto --max-steps 40" in text
    assert f"picomaml eval --checkpoint {tmp_path / 'run'}" in text
    assert "wandb" not in run_status(tmp_path, ["csv"], 0)
