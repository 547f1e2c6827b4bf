"""A training step's FLOPs counted by torch, as a check of the formulas that set equal-compute budgets.

[`experiment_step_flops`][picomaml.train.budget.experiment_step_flops] models a step from the config (matmuls
only, the backward at twice the forward, see [`picomaml.eval.flops`][picomaml.eval.flops]). A study at
equal compute is only as fair as that model, and some recipes change the graph in ways a formula can miss
(PCGrad's extra backwards run through the inner loop's second-order graph). [`measure_step_flops`]
[picomaml.train.flop_count.measure_step_flops] runs one real step of the model, head and inner loop built
from the config, on token ids of the step's shapes (the values do not change the matmuls), under
``torch.utils.flop_counter.FlopCounterMode``, and returns what torch counted: the forward of every objective
the step runs and the backward of its loss, the inner loop's differentiation included.

Attention runs on the math kernel while counting, so its ``L x L`` products are counted in full, as the
formulas count them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from picomaml.meta.episode import Episode
from picomaml.train.config import ExperimentConfig

__all__ = ["counted_run_flops", "measure_step_flops", "synthetic_episode"]


def synthetic_episode(
    n_tasks: int, n_way: int, k_shot: int, n_query: int, window_len: int, vocab_size: int, mask_token_id: int,
    generator: torch.Generator,
) -> Episode:  # fmt: skip
    """An episode of the sampler's shapes ``(T, N*K, W)`` / ``(T, N*Q, W)``: random ids, one masked position
    per window (its class token), labels label-major. For counting work, not for learning."""
    n_s, n_q = n_way * k_shot, n_way * n_query
    classes = torch.stack([torch.randperm(vocab_size - 1, generator=generator)[:n_way] + 1 for _ in range(n_tasks)])
    classes = torch.where(classes == mask_token_id, torch.zeros_like(classes), classes)

    def part(rows: int, per: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.randint(0, vocab_size, (n_tasks, rows, window_len), generator=generator)
        ids = torch.where(torch.isin(ids, classes) | (ids == mask_token_id), torch.ones_like(ids), ids)
        labels = (torch.arange(rows) // per).expand(n_tasks, rows).contiguous()
        mask = torch.zeros(n_tasks, rows, window_len, dtype=torch.bool)
        mask[:, :, window_len // 2] = True
        return ids.masked_fill(mask, mask_token_id), labels, mask

    (s_ids, s_lab, s_mask), (q_ids, q_lab, q_mask) = part(n_s, k_shot), part(n_q, n_query)
    return Episode(s_ids, s_lab, s_mask, q_ids, q_lab, q_mask, classes)


def measure_step_flops(config: ExperimentConfig, objectives: Iterable[str], *, seed: int = 0) -> int:
    """FLOPs of one optimizer step of the reference trainer as torch counts them (all micro-batches).

    Builds the run's model, head and inner loop from ``config`` (on the CPU, uncompiled), runs the learner on
    ``data.batch_size`` rows of ``data.seq_len + 1`` ids (AR) and/or ``meta.n_tasks`` episodes of the
    sampler's shapes (meta), weighted as a step of ``hybrid.mode`` would, and its backward, under
    ``FlopCounterMode``; times ``data.grad_accum``.

    Args:
        config: The experiment config.
        objectives: ``{"ar"}``, ``{"meta"}`` or both (both: weighted mode, where PCGrad surgery engages).
        seed: Seeds the synthetic ids.

    Returns:
        The counted FLOPs (an integer), comparable with
        [`experiment_step_flops`][picomaml.train.budget.experiment_step_flops].
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from picomaml.meta.learner import HybridLearner
    from picomaml.train.build import build_run

    kinds = set(objectives)
    if not kinds or kinds - {"ar", "meta"}:
        raise ValueError(f"objectives: expected 'ar' and/or 'meta', got {sorted(kinds)}")
    m, s, d = config.model, config.sampler, config.data
    mask_id = m.vocab_size - 1
    run = build_run(config, mask_token_id=mask_id, special_ids=(), optimizer=False, compile=False)
    learner: HybridLearner = run.learner
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, m.vocab_size - 1, (d.batch_size, d.seq_len + 1), generator=g) if "ar" in kinds else None
    episode = None
    if "meta" in kinds:
        episode = synthetic_episode(config.meta.n_tasks, s.n_way, s.k_shot, s.n_query, s.window_len, m.vocab_size, mask_id, g)
    ratio = config.hybrid.ratio
    w_ar, w_meta = (1.0 - ratio, ratio) if kinds == {"ar", "meta"} else (1.0, 1.0)
    learner.train()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = learner(rows=rows, episode=episode, w_ar=w_ar, w_meta=w_meta)
        out.loss.backward()
    return int(counter.get_total_flops()) * d.grad_accum



def counted_run_flops(config: ExperimentConfig, steps: int | None = None) -> int:
    """FLOPs of a whole run as torch counts them: [`measure_step_flops`][picomaml.train.flop_count.measure_step_flops]
    of each kind of step (AR, meta, both) times how often the run's hybrid schedule takes it.

    The counterpart of [`run_flops`][picomaml.train.budget.run_flops]`(config)[-1]`, for checking that runs
    given "equal FLOPs" by the formulas spend equal FLOPs by torch's count.
    """
    from picomaml.params import check_int
    from picomaml.train.budget import step_objectives
    from picomaml.train.build import hybrid_from_config

    steps = config.trainer.max_steps if steps is None else check_int("steps", steps, ge=1)
    scheduler = hybrid_from_config(config, max_steps=steps)
    taken: dict[tuple[str, ...], int] = {}
    for step in range(steps):
        kinds = step_objectives(config, scheduler, step)
        taken[kinds] = taken.get(kinds, 0) + 1
    return sum(n * measure_step_flops(config, kinds) for kinds, n in taken.items() if kinds)  # a no-op step: 0
