"""Pieces of a hybrid training loop that every trainer needs and none should rewrite.

* [`meta_episode`][picomaml.train.training.meta_episode] / [`shard_tasks`][picomaml.train.training.shard_tasks]: the step's episode for this rank. With an in-memory source
  every rank sees the same global batch, samples the same ``n_tasks`` tasks and keeps its share, so
  the tasks of a step do not depend on the number of devices; with a sharded stream each rank samples
  ``n_tasks / world`` tasks from its own rows.
* [`MetricWindow`][picomaml.train.training.MetricWindow]: per-step metrics averaged over a logging window, one name per metric: the inner
  loop's metrics go under ``meta/``, the loop's own under ``train/`` and ``trainer/``.
* [`check_run`][picomaml.train.training.check_run]: every problem that can be seen before training (tokenizer vs. model vocabulary, tasks
  vs. devices, impossible training or evaluation episodes), as a [`ConfigError`][picomaml.params.ConfigError].
* `global_grad_norm` ([`grad_norm`][picomaml.train.meta_update.grad_norm]), [`group_lrs`][picomaml.train.training.group_lrs]: what a log line reports about the optimizer.
* [`NonFiniteGuard`][picomaml.train.training.NonFiniteGuard]: counts the steps skipped for a non-finite loss or gradient, warns with the step
  number, and stops the run ([`NonFiniteRunError`][picomaml.train.training.NonFiniteRunError]) after too many in a row.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from picomaml.eval.during_training import check_eval_episodes
from picomaml.meta.episode import Episode
from picomaml.meta.sampler import SamplingError, SMLMTSampler
from picomaml.params import ConfigError, check_int
from picomaml.train.build import eval_episode_kwargs, head_from_config, sampler_from_config
from picomaml.train.config import ExperimentConfig
from picomaml.train.meta_update import grad_norm as global_grad_norm  # one implementation, named here too

__all__ = [
    "COUNTERS",
    "new_counters",
    "run_summary",
    "shard_tasks",
    "meta_episode",
    "MetricWindow",
    "peek_batch",
    "check_run",
    "is_log_step",
    "global_grad_norm",
    "group_lrs",
    "NonFiniteGuard",

    "NonFiniteRunError",
    "grad_conflict_metrics",
    "NonFiniteStepWarning",
]

# tasks drawn by the start-up check: an impossible episode shape fails there, not at step 2
PROBE_TASKS = 4


#: what a run counts (saved in every checkpoint, logged as ``trainer/<name>``)
COUNTERS = ("ar_steps", "meta_steps", "noop_steps", "tokens", "flops", "nonfinite_skipped", "nonfinite_consecutive")


def new_counters() -> dict[str, float]:
    """Every counter of `COUNTERS` at zero."""
    return dict.fromkeys(COUNTERS, 0)


def run_summary(
    step: int, counters: Mapping[str, float], end_reason: str, seconds: float, final: Mapping[str, float]
) -> str:
    """The text a trainer prints when a run ends: what ran, then the last metric row, one per line."""
    c = counters
    lines = [
        f"run finished ({end_reason}) at step {step}: {c['ar_steps']:.0f} AR steps, {c['meta_steps']:.0f} meta steps, "
        f"{c['tokens']:,.0f} tokens, {seconds:.0f} s, {c['nonfinite_skipped']:.0f} non-finite steps skipped"
    ]
    lines += [f"  {key:<28} {final[key]:.4g}" for key in sorted(final) if key != "step"]
    return "\n".join(lines)


def run_status(run_dir: Path, loggers: Sequence[str], step: int, hub: Any = None, *, finished: bool = True) -> str:
    """What a run leaves and what to do next: where each logger wrote, the Hub uploads, and the commands
    that extend (``finished``) or resume (stopped early), evaluate and read the run (paths as given)."""
    d = Path(run_dir)
    lines = ["logged to: metrics.csv"]
    if "tensorboard" in loggers:
        lines.append(f"  tensorboard --logdir {d / 'tensorboard'}")
    if "wandb" in loggers:
        lines.append(f"  W&B (offline unless trainer.wandb_offline=false): wandb sync {d / 'wandb'}")
    if hub is not None:
        failed = [s for s, _ in hub.failures]
        lines.append(
            f"hub: {hub.repo_id}@{hub.branch}: {len(hub.uploaded)} checkpoints pushed, {len(failed)} failed"
            f"{f' (steps {failed})' if failed else ''}, {len(hub.pending)} pending (waited for on exit)"
        )
    go_on = (
        f"  extend:   picomaml train --config {d / 'config.yaml'} --run-dir {d} --resume auto --max-steps {2 * max(step, 1)}"
        if finished  # a stopped run resumes with its own command: a new --max-steps would change its schedule
        else f"  resume:   run the same command again (--resume auto continues from step {step})"
    )
    lines += [
        "next:",
        go_on,
        f"  evaluate: picomaml eval --checkpoint {d}",
        f"  export:   picomaml export --checkpoint {d} --out {d / 'hf'}  (for transformers)",
        f"  load:     picomaml.train.checkpoint.load_checkpoint('{d}')  (the newest verified step)",
    ]
    return "\n".join(lines)


def shard_tasks(episode: Episode, rank: int, world: int) -> Episode:
    """This rank's tasks of a stacked episode that every rank sampled identically.

    Args:
        episode: An episode with a leading task dimension ``T`` divisible by ``world``.
        rank: This process's rank in ``[0, world)``.
        world: Number of processes.

    Returns:
        An episode of ``T / world`` tasks: ``[rank * T/world, (rank + 1) * T/world)``.
    """
    if episode.n_tasks is None:
        raise ValueError("episode: expected stacked tasks (sample with n_tasks=...)")
    if world < 1 or not 0 <= rank < world or episode.n_tasks % world:
        raise ValueError(f"episode: {episode.n_tasks} tasks cannot be split over rank {rank} of {world}")
    share = episode.n_tasks // world
    return Episode.stack([episode.task(i) for i in range(rank * share, (rank + 1) * share)])


def meta_episode(
    sampler: SMLMTSampler,
    batch: Tensor,
    rows: Tensor,
    n_tasks: int,
    shared: bool,
    rank: int = 0,
    world: int = 1,
) -> Episode:
    """The meta episode of one micro-batch for this rank (see the module docstring).

    Args:
        sampler: The training sampler (same seed on every rank when ``shared``).
        batch: The micro-batch as the source returned it (the global batch when ``shared``).
        rows: This rank's rows of it.
        n_tasks: Tasks of the step over all ranks (``meta.n_tasks``).
        shared: Whether every rank sees the same ``batch``.
        rank: This process's rank.
        world: Number of processes.

    Returns:
        A stacked episode of ``n_tasks / world`` tasks.
    """
    if shared:
        return shard_tasks(sampler.sample(batch, n_tasks=n_tasks), rank, world)
    return sampler.sample(rows, n_tasks=n_tasks // world)


class MetricWindow:
    """Per-step values averaged over a logging window.

    Why not `torchmetrics.MeanMetric` per key: the keys are not known in advance (one per adapted tensor's
    learned LR, per objective that ran), a window is read once per log step in a single device-to-host
    transfer (one `MeanMetric.compute` per key would be one sync each), and the trainer logs rank 0's
    values, so the cross-rank sync torchmetrics adds is not wanted; it would also be a core dependency for
    ~40 lines.

    Examples:
        >>> w = MetricWindow()
        >>> w.add({"train/lm_loss": 2.0}); w.add_inner_loop({"query_acc": 0.5})
        >>> w.means()
        {'train/lm_loss': 2.0, 'meta/query_acc': 0.5}
    """

    #: prefix of every inner-loop metric (``query_acc`` -> ``meta/query_acc``, ``inner_lr/out.weight`` ->
    #: ``meta/inner_lr/out.weight``)
    INNER_PREFIX = "meta/"

    def __init__(self) -> None:
        self._values: dict[str, list[float | torch.Tensor]] = {}

    def add(self, metrics: Mapping[str, float | torch.Tensor]) -> None:
        """Record one value per named metric (names are kept as they are). Tensors (the inner loop's metrics)
        stay on their device until [`means`][picomaml.train.training.MetricWindow.means] reads them all at once: no host sync per step."""
        for key, value in metrics.items():
            value = value.detach().float().reshape(()) if isinstance(value, torch.Tensor) else float(value)
            self._values.setdefault(key, []).append(value)

    def _read(self) -> None:
        """Replace every pending tensor by its float, in one transfer."""
        at = [(k, i) for k, vs in self._values.items() for i, v in enumerate(vs) if isinstance(v, torch.Tensor)]
        if at:
            floats = torch.stack([self._values[k][i] for k, i in at]).tolist()
            for (k, i), f in zip(at, floats, strict=True):
                self._values[k][i] = f

    def add_inner_loop(self, metrics: Mapping[str, float | torch.Tensor]) -> None:
        """Record an [`InnerLoopOutput`][picomaml.meta.engine.InnerLoopOutput]'s metrics under ``meta/``."""
        self.add({self.INNER_PREFIX + key: value for key, value in metrics.items()})

    def last(self, key: str) -> float | None:
        """The newest value of ``key`` (``None`` when it has none in this window)."""
        values = self._values.get(key)
        return float(values[-1]) if values else None

    def means(self) -> dict[str, float]:
        """``name -> mean`` over the window."""
        self._read()
        return {k: sum(v) / len(v) for k, v in self._values.items() if v}

    def clear(self) -> None:
        """Start a new window."""
        self._values = {}


class ProgressBar:
    """A tqdm bar over optimizer steps showing the newest losses, or nothing when ``enabled`` is false
    (a non-main rank, or output that is not a terminal: the log lines say the same).

    While the bar is shown, log records of the root logger's console handlers are written through
    ``tqdm.write`` (``tqdm.contrib.logging``), above the bar: a log line never splices into it. The shown
    losses are read (a host sync) at most once a second, as the bar redraws. The drawing is tqdm's; this
    class only adds that redirect as a context manager and the rate limit on reading losses.
    """

    SHOWN = ("train/lm_loss", "train/meta_loss", "meta/query_acc")
    REFRESH_S = 1.0

    def __init__(self, total: int, initial: int = 0, enabled: bool = True) -> None:
        self.bar = None
        self._redirect = None
        self._shown_at = 0.0
        if enabled:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
            self._redirect = logging_redirect_tqdm(tqdm_class=type(self.bar))
            self._redirect.__enter__()

    @property
    def active(self) -> bool:
        """Whether a bar is shown."""
        return self.bar is not None

    def update(self, window: MetricWindow) -> None:
        """Advance one step and show the window's newest values."""
        if self.bar is not None:
            self.bar.update(1)
            now = time.monotonic()
            if now - self._shown_at >= self.REFRESH_S:
                self._shown_at = now
                shown = {k.split("/")[-1]: window.last(k) for k in self.SHOWN}
                self.bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items() if v is not None})

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the bar and give the log handlers back (also on leaving a ``with`` block, error or not)."""
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def group_lrs(optimizer: torch.optim.Optimizer, prefix: str = "trainer/lr/") -> dict[str, float]:
    """The current learning rate of every parameter group, keyed by the module that owns it.

    Groups named ``"<module>/decay"`` and ``"<module>/no_decay"`` (see [`picomaml.train.optim.param_groups`][picomaml.train.optim.param_groups])
    share one LR and give one key ``{prefix}<module>``; unnamed groups are numbered.
    """
    out: dict[str, float] = {}
    for i, group in enumerate(optimizer.param_groups):
        name = str(group.get("name", i)).split("/")[0]
        out.setdefault(f"{prefix}{name}", float(group["lr"]))
    return out


def peek_batch(source: Any) -> Tensor:
    """The next batch of a resumable batch source, leaving the source where it was."""
    position = source.state_dict()
    try:
        return source.next_batch()
    finally:
        source.load_state_dict(position)


def _check_token_range(cfg: ExperimentConfig, data: Any) -> None:
    """Every token id of the in-memory rows (else of the first batch) and of the held-out rows lies in
    ``[0, model.vocab_size)``: found now, not inside the first step that meets one."""
    rows = getattr(getattr(data.train, "batcher", None), "rows", None)
    parts = (("training", rows if rows is not None else peek_batch(data.train)), ("held-out", data.heldout_rows))
    for name, ids in parts:
        if ids.numel() == 0:
            continue
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= cfg.model.vocab_size:
            bad = low if low < 0 else high
            raise ConfigError(
                f"model.vocab_size: the {name} data holds token id {bad}, outside [0, {cfg.model.vocab_size}); "
                "the data was made with another tokenizer (data.tokenizer) or model.vocab_size is too small"
            )


def is_log_step(cfg: ExperimentConfig, step: int) -> bool:
    """Whether the trainer writes a metric row after ``step``: every ``trainer.log_every`` steps, at every
    evaluation (``trainer.eval_every``) and gradient diagnostic (``eval.grad_cos_every``) even when they
    fall between logging steps, and at the last step."""
    t, every = cfg.trainer, cfg.eval.grad_cos_every
    return step % t.log_every == 0 or step % t.eval_every == 0 or step == t.max_steps or bool(every and step % every == 0)


def check_run(
    cfg: ExperimentConfig,
    data: Any,
    world: int = 1,
    probe_tasks: int = PROBE_TASKS,
) -> None:
    """Everything about a run that can fail before training, checked before any training work.

    Args:
        cfg: The experiment config.
        data: The [`TrainingData`][picomaml.data.pipeline.TrainingData] of the run (its position is left as it was).
        world: Number of processes.
        probe_tasks: Training tasks drawn from the first batch (several, so a shape that only sometimes
            fits fails here).

    Raises:
        ConfigError: naming the key to change.
    """
    tok = data.tokenizer
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's {tok.vocab_size} tokens"
        )
    if cfg.meta.n_tasks % world:
        raise ConfigError(f"meta.n_tasks: {cfg.meta.n_tasks} must be divisible by the {world} devices")
    _check_token_range(cfg, data)
    mask_id, special = tok.mask_token_id, data.special_ids
    if max(cfg.hybrid.ratio, cfg.hybrid.final_ratio) > 0:
        batch = peek_batch(data.train)
        if cfg.sampler.window_len > batch.shape[-1]:
            raise ConfigError(
                f"sampler.window_len: {cfg.sampler.window_len} tokens do not fit a training row of "
                f"{batch.shape[-1]} (data.seq_len + 1); lower sampler.window_len or raise data.seq_len"
            )
        try:
            sampler_from_config(cfg, mask_id, special).sample(
                batch, n_tasks=max(probe_tasks, cfg.meta.n_tasks)
            )
        except SamplingError as exc:
            raise ConfigError(f"sampler: no episode can be drawn from a training batch: {exc}") from exc
    check_eval_episodes(
        data.heldout_rows, cfg.eval, eval_episode_kwargs(cfg, mask_id, special), head=head_from_config(cfg)
    )


class NonFiniteRunError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient: the run cannot recover alone."""


class NonFiniteStepWarning(UserWarning):
    """One optimizer step was skipped because its loss or gradient was non-finite (a ``UserWarning``, as the
    trainer's warning was before)."""


class NonFiniteGuard:
    """Counts optimizer steps skipped for a non-finite loss or gradient; stops a run that keeps skipping.

    The trainer decides whether a step is finite (on every rank together: an all-reduced flag over the
    losses and the gradient norm) and reports it with [`record`][picomaml.train.training.NonFiniteGuard.record]. A skipped step warns with its step
    number; ``max_consecutive`` skipped steps in a row raise [`NonFiniteRunError`][picomaml.train.training.NonFiniteRunError], on every rank
    alike, since the flag is the same everywhere.

    The state is two counters whose names are those of `COUNTERS`, so a trainer keeps them in its
    counters dict (saved with every checkpoint): ``counters.update(guard.state_dict())`` after each step,
    ``NonFiniteGuard(n, state=counters)`` on resume (a streak of skipped steps continues across it).

    Args:
        max_consecutive: Skipped steps in a row that stop the run (>= 1; ``trainer.max_nonfinite_skips``).
        state: Counters to start from (see [`load_state_dict`][picomaml.train.training.NonFiniteGuard.load_state_dict]), e.g. a resumed run's; default zeros.

    Examples:
        >>> guard = NonFiniteGuard(max_consecutive=2)
        >>> guard.record(True, step=1), guard.record(False, step=2), guard.total, guard.consecutive
        (True, False, 1, 1)
    """

    def __init__(self, max_consecutive: int, state: Mapping[str, Any] | None = None) -> None:
        self.max_consecutive = check_int("max_consecutive", max_consecutive, ge=1)
        self.total = 0
        self.consecutive = 0
        if state is not None:
            self.load_state_dict(state)

    def record(self, finite: bool, step: int) -> bool:
        """Count one optimizer step; return whether the trainer should apply it.

        Args:
            finite: Whether the step's losses and gradient norm are finite (on every rank).
            step: The step's number as its metrics row shows it (the count of steps done, this one included).

        Returns:
            ``finite``: True means step the optimizer; False means skip it (after a ``NonFiniteStepWarning``).

        Raises:
            NonFiniteRunError: the ``max_consecutive``-th skipped step in a row; the message names the steps,
                the last finite step and what to change.
        """
        step = check_int("step", step, ge=1)
        if finite:
            self.consecutive = 0
            return True
        self.total += 1
        self.consecutive += 1
        first, last_good = step - self.consecutive + 1, step - self.consecutive
        since = f"the last finite step was {last_good}" if last_good > 0 else "no step of this run was finite"
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteRunError(
                f"{self.consecutive} optimizer steps in a row ({first}-{step}) had a non-finite loss or gradient "
                f"and were skipped ({self.total} in all); {since}, so the weights are still those of step "
                f"{max(last_good, 0)}. Try a lower optim.lr, a smaller optim.grad_clip, trainer.precision=32-true, "
                f"or look for bad data; trainer.max_nonfinite_skips={self.max_consecutive} sets this limit."
            )
        warnings.warn(
            f"step {step}: non-finite loss or gradient; optimizer step skipped ({self.consecutive} in a row, "
            f"{self.total} in all; the run stops at {self.max_consecutive} in a row)",
            NonFiniteStepWarning,
            stacklevel=2,
        )
        return False

    def state_dict(self) -> dict[str, int]:
        """``{"nonfinite_skipped": total, "nonfinite_consecutive": consecutive}`` (counter names)."""
        return {"nonfinite_skipped": self.total, "nonfinite_consecutive": self.consecutive}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore [`state_dict`][picomaml.train.training.NonFiniteGuard.state_dict] (other keys of ``state``, e.g. a trainer's other counters, are ignored).

        A checkpoint written before ``nonfinite_consecutive`` existed resumes with 0 in a row.
        """
        if "nonfinite_skipped" not in state:
            raise KeyError(f"NonFiniteGuard.load_state_dict: no 'nonfinite_skipped' among {sorted(state)}")
        self.total = check_int("nonfinite_skipped", int(state["nonfinite_skipped"]), ge=0)
        self.consecutive = check_int("nonfinite_consecutive", int(state.get("nonfinite_consecutive", 0)), ge=0)


def grad_conflict_metrics(run: Any, cfg: ExperimentConfig, data: Any, step: int) -> dict[str, float]:
    """``diag/grad_cos*`` of [`picomaml.meta.grad_conflict.gradient_conflict`][picomaml.meta.grad_conflict.gradient_conflict] at ``step``: the AR gradient on
    the next batch (the data position is left as it was) and the meta gradient on one episode from it,
    drawn by a sampler of its own (seeded by the step, so the training sampler never moves), on the
    backbone parameters both reach. Costs about one AR and one meta forward and backward.

    Args:
        run: The [`RunComponents`][picomaml.train.build.RunComponents] (its unwrapped model, head and inner loop).
        cfg: The experiment config (pooling, feature norm, adapted blocks).
        data: The run's [`TrainingData`][picomaml.data.pipeline.TrainingData].
        step: The optimizer step (the diagnostic sampler's seed).
    """
    from picomaml.meta.grad_conflict import gradient_conflict, shared_parameters
    from picomaml.meta.objectives import lm_loss, meta_loss
    from picomaml.train.compile import eager_mode

    rows = data.train.local(peek_batch(data.train))
    sampler = sampler_from_config(cfg, data.tokenizer.mask_token_id, data.special_ids, seed=cfg.seed * 7919 + step)
    device = next(run.model.parameters()).device
    episode = sampler.sample(rows).to(device)
    m = cfg.meta
    with eager_mode(run.model):  # each loss is differentiated with its graph kept: compiled graphs refuse that
        ar = lm_loss(run.model, rows.to(device))
        meta = meta_loss(run.model, run.head, run.inner_loop, episode, m.pooling, m.feature_norm, adapt_layers=m.adapt_layers)
        out = gradient_conflict(ar, meta.loss, shared_parameters(run.model))
    return {f"diag/{k}": v for k, v in out.items()}
