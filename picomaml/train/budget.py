"""The compute and memory of a run: FLOPs per optimizer step and per run of an experiment config, for
equal-FLOP comparisons between arms (e.g. a hybrid run that spends what an AR-only run spends), and a memory
estimate that refuses a config that cannot fit before anything is allocated.

The per-step formulas are [`picomaml.eval.flops`][picomaml.eval.flops] (pure functions of shapes); this module
applies them to an [`ExperimentConfig`][picomaml.train.config.ExperimentConfig] and to the objectives its
hybrid schedule picks.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from picomaml.eval.flops import _model_dims, ar_step_flops, body_matmul_params, meta_step_flops
from picomaml.params import ConfigError, check_int
from picomaml.train.build import hybrid_from_config
from picomaml.train.config import ExperimentConfig

__all__ = ["experiment_step_flops", "run_flops", "steps_for_flops", "memory_estimate", "device_memory", "check_memory"]


def experiment_step_flops(config: ExperimentConfig, objectives: Iterable[str]) -> int:
    """FLOPs of one optimizer step of the reference trainer, over all devices and micro-batches.

    Each of ``data.grad_accum`` micro-batches runs the AR objective on ``data.batch_size`` rows of
    ``data.seq_len`` inputs and/or the meta objective on ``meta.n_tasks`` episodes of the sampler's shape.
    PCGrad surgery (``meta.grad_surgery``) adds one backward of each loss to the backbone's parameters when
    both run (2/3 of its step, less the LM head's weight gradient; it was counted as a full 2/3, which gave
    PCGrad arms about 9 % less compute than AR at "equal" FLOPs). The gradient diagnostic
    (``eval.grad_cos_every``) is measurement, not training, and is not counted.
    [`measure_step_flops`][picomaml.train.flop_count.measure_step_flops] counts a real step with torch's
    ``FlopCounterMode``; the two agree within 3 % for every recipe the tests try.

    Args:
        config: A [`picomaml.ExperimentConfig`][picomaml.train.config.ExperimentConfig].
        objectives: What the step ran: ``{"ar"}``, ``{"meta"}`` or both (``HybridScheduler.objectives``); ``()``
            for a no-op step (``trainer.meta_noop``), which costs nothing.
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
            grad_blocks=config.meta.grad_blocks,
            lora_rank=config.meta.lora_rank,
            lora_targets=tuple(config.meta.lora_targets),
        )
    total = ar + meta
    if config.meta.grad_surgery == "pcgrad" and ar and meta:
        # pcgrad_term differentiates each loss once more, to the backbone's parameters only: 2/3 of its step,
        # less the LM head's weight gradient (not a shared parameter unless tied to the embedding)
        m = config.model
        lm_head_dw = 0 if m.tie_embeddings else 2 * data.batch_size * data.seq_len * m.d_model * m.vocab_size
        total += 2 * (ar + meta) // 3 - lm_head_dw
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
    cost = {kinds: experiment_step_flops(config, kinds) for kinds in ((), ("ar",), ("meta",), ("ar", "meta"))}
    out, total = [], 0
    for step in range(steps):
        total += cost[step_objectives(config, scheduler, step)]
        out.append(total)
    return out


def step_objectives(config: ExperimentConfig, scheduler: Any, step: int) -> tuple[str, ...]:
    """What the reference trainer computes at ``step``: the scheduler's objectives, without the meta
    objective under ``trainer.meta_noop`` (``()``: a no-op step)."""
    kinds = scheduler.objectives(step)
    return tuple(sorted(k for k in kinds if not (config.trainer.meta_noop and k == "meta")))


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


# float32 bytes kept per parameter while training: weights, gradients and AdamW's two moments
_STATE_BYTES = 16
# float32 activations a block keeps per token for its backward, in units of d_model and ffn_dim (norms,
# q/k/v/o, residuals; the SwiGLU's three ffn-wide tensors): a generous round figure, not a measurement
_ACT_D, _ACT_F = 12, 4


def memory_estimate(config: ExperimentConfig) -> dict[str, int]:
    """Bytes a training step of ``config`` needs, by part (float32; a rough upper-leaning estimate).

    Returns:
        ``{"state": weights + gradients + AdamW moments, "ar": one AR micro-batch's activations and logits,
        "meta": one meta micro-batch's activations}``.
    """
    m, d_cfg, s = config.model, config.data, config.sampler
    d, kv, f, v, n_layers = _model_dims(m)
    params = body_matmul_params(m) + v * d * (1 if m.tie_embeddings else 2) + (2 * n_layers + 1) * d
    rope = 2 * m.max_seq_len * (d // m.n_heads)  # the cos/sin tables, counted with the state
    per_token = 4 * n_layers * (_ACT_D * d + _ACT_F * f)
    attention = 4 * n_layers * m.n_heads  # scores kept per (query, key) pair, per row
    rows, length = d_cfg.batch_size, d_cfg.seq_len
    ar = rows * length * per_token + rows * attention * length * length + 3 * 4 * rows * length * v
    windows = config.meta.n_tasks * s.n_way * (s.k_shot + s.n_query)
    meta = windows * s.window_len * per_token + windows * attention * s.window_len**2
    state = (_STATE_BYTES + (8 if config.optim.meta_moments == "separate" else 0)) * params  # + meta steps' moments
    state += 4 * params if config.eval.update_norms else 0  # the weights' copy before each update
    return {"state": state + 4 * rope, "ar": ar, "meta": meta}


def device_memory(device: str = "cpu") -> int | None:
    """Memory of ``device`` in bytes: a GPU's total, or for ``"cpu"`` the memory available now (Linux's
    ``MemAvailable``, else the machine's RAM); ``None`` when unknown."""
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        return int(torch.cuda.get_device_properties(index).total_memory)
    try:  # what the kernel can give now (other processes' memory is not ours), else the machine's RAM
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return None


def check_memory(config: ExperimentConfig, available: int | None, devices: int = 1) -> None:
    """Refuse a config whose training cannot fit in ``available`` bytes per device, before any allocation.

    Refused when the training state alone (weights, gradients, AdamW moments: close to exact) exceeds
    ``available``, or when the rough activation estimate of one micro-batch (its rows divided over
    ``devices``) exceeds it sixteenfold. The margin is wide on purpose: mixed precision, fused attention and
    activation checkpointing need far less than the estimate, and a config near the limit should meet the
    allocator rather than a guess; what is refused is the config that cannot fit on any device (a typo in
    ``model.n_layers``, ``meta.n_tasks``, ``data.batch_size``, ...).

    Raises:
        ConfigError: Naming the keys that drive the largest part, the estimate and ``available``.
    """
    if not available:
        return
    parts = memory_estimate(config)
    ar = parts["ar"] if config.hybrid.ratio < 1 or config.hybrid.mode == "weighted" else 0
    step = max(ar // max(devices, 1), parts["meta"])
    if parts["state"] <= available and step <= 16 * available:
        return
    keys = {
        "state": "model.n_layers / d_model / ffn_dim / vocab_size / max_seq_len",
        "ar": "data.batch_size / data.seq_len (or model.vocab_size: the logits)",
        "meta": "meta.n_tasks / sampler.n_way, k_shot, n_query / sampler.window_len",
    }
    worst = "state" if parts["state"] > available else ("meta" if parts["meta"] >= ar // max(devices, 1) else "ar")
    gb = lambda n: f"{n / 2**30:,.1f} GiB"  # noqa: E731
    raise ConfigError(
        f"{keys[worst]}: training needs about {gb(parts['state'])} for weights, gradients and AdamW moments "
        f"and about {gb(step)} of activations per micro-batch, but a device has {gb(available)}; make "
        f"{'the model' if worst == 'state' else 'the micro-batch'} smaller"
    )
