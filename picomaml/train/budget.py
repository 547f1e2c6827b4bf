"""The compute of a run: FLOPs per optimizer step and per run of an experiment config, for equal-FLOP
comparisons between arms (e.g. a hybrid run that spends what an AR-only run spends).

The per-step formulas are [`picomaml.eval.flops`][picomaml.eval.flops] (pure functions of shapes); this module
applies them to an [`ExperimentConfig`][picomaml.train.config.ExperimentConfig] and to the objectives its
hybrid schedule picks.
"""

from __future__ import annotations

from collections.abc import Iterable

from picomaml.eval.flops import ar_step_flops, meta_step_flops
from picomaml.params import check_int
from picomaml.train.build import hybrid_from_config
from picomaml.train.config import ExperimentConfig

__all__ = ["experiment_step_flops", "run_flops", "steps_for_flops"]


def experiment_step_flops(config: ExperimentConfig, objectives: Iterable[str]) -> int:
    """FLOPs of one optimizer step of the reference trainer, over all devices and micro-batches.

    Each of ``data.grad_accum`` micro-batches runs the AR objective on ``data.batch_size`` rows of
    ``data.seq_len`` inputs and/or the meta objective on ``meta.n_tasks`` episodes of the sampler's shape.
    PCGrad surgery (``meta.grad_surgery``) adds one backward of each loss (counted as 2/3 of its step) when
    both run. The gradient diagnostic (``eval.grad_cos_every``) is measurement, not training, and is not
    counted.

    Args:
        config: A [`picomaml.ExperimentConfig`][picomaml.train.config.ExperimentConfig].
        objectives: What the step ran: ``{"ar"}``, ``{"meta"}`` or both (``HybridScheduler.objectives``).
    """
    kinds = set(objectives)
    unknown = kinds - {"ar", "meta"}
    if unknown:
        raise ValueError(f"objectives: expected 'ar' and/or 'meta', got {sorted(unknown)}")
    data, s = config.data, config.sampler
    ar = meta = 0
    if "ar" in kinds:
        ar = ar_step_flops(config.model, data.batch_size, data.seq_len)
    if "meta" in kinds:
        meta = meta_step_flops(
            config.model,
            s.n_way,
            s.k_shot,
            s.n_query,
            s.window_len,
            n_tasks=config.meta.n_tasks,
            head_hidden_dims=tuple(config.head.hidden_dims),
            inner_steps=config.inner_loop.steps,
            first_order=config.inner_loop.first_order,
            adapt_layers=config.meta.adapt_layers,
        )
    total = ar + meta
    if config.meta.grad_surgery == "pcgrad" and ar and meta:  # one more backward of each loss (2/3 of a step)
        total += 2 * (ar + meta) // 3
    return total * data.grad_accum


def run_flops(config: ExperimentConfig, steps: int | None = None) -> list[int]:
    """Cumulative FLOPs after each optimizer step of a run, as the reference trainer counts them.

    The hybrid scheduler is pure in ``(seed, step)``, so the objective of every step, and with it the
    compute of a whole run, is known before training; a run's ``trainer/flops`` equals this list.

    Args:
        config: A [`picomaml.ExperimentConfig`][picomaml.train.config.ExperimentConfig].
        steps: Run length (default ``config.trainer.max_steps``). A ratio schedule without its own
            ``hybrid.total_steps`` stretches over ``steps``, as it does in the trainer.

    Returns:
        ``steps`` ints: FLOPs of steps ``0..i`` at index ``i``.
    """
    steps = config.trainer.max_steps if steps is None else check_int("steps", steps, ge=1)
    scheduler = hybrid_from_config(config, max_steps=steps)
    cost = {kinds: experiment_step_flops(config, kinds) for kinds in (("ar",), ("meta",), ("ar", "meta"))}
    out, total = [], 0
    for step in range(steps):
        total += cost[tuple(sorted(scheduler.objectives(step)))]
        out.append(total)
    return out


def steps_for_flops(config: ExperimentConfig, budget: int, max_steps: int = 1_000_000) -> int:
    """The shortest run of ``config`` whose total FLOPs reach ``budget`` (to use as ``trainer.max_steps``).

    For matching the compute of two arms: e.g. a hybrid run that spends as much as an AR-only run. A
    ratio schedule stretches over the run's own length, so each candidate length is counted in full;
    then the total is not strictly monotone in the length, and the first length found scanning upwards
    (from a lower bound, jumping by the fewest steps that could cover the remaining FLOPs) is returned.
    For a constant ratio that is exactly the shortest run.

    Args:
        config: A [`picomaml.ExperimentConfig`][picomaml.train.config.ExperimentConfig].
        budget: FLOPs to reach (>= 1).
        max_steps: Give up beyond this many steps.

    Raises:
        ValueError: ``budget`` is not reached within ``max_steps`` steps.
    """
    budget = check_int("budget", budget, ge=1)
    # the dearest step: both objectives (with PCGrad's extra backward passes, dearer than the two apart)
    dearest = max(experiment_step_flops(config, k) for k in (("ar",), ("meta",), ("ar", "meta")))
    steps = max(1, budget // dearest)  # a lower bound on the length: bracket, then scan upwards
    while steps <= max_steps:
        spent = run_flops(config, steps)[-1]
        if spent >= budget:
            return steps
        # the missing FLOPs need at least this many more steps, even if every one were the dearest
        steps += max(1, (budget - spent) // dearest)
    raise ValueError(f"budget: {budget:.3e} FLOPs are not reached within max_steps={max_steps} steps")
