"""HybridScheduler: per optimizer step, train on the AR objective, the meta objective, or both.

The decision for a step is a *pure function* of ``(seed, step)`` and the scheduler's hyperparameters.
There is no hidden state that advances with calls, so every rank of a distributed job reaches the same
answer without communication, and a resumed run replays exactly the branch sequence of the original
one, whatever the order or number of earlier calls.

Why a counter-based hash rather than a sequential ``torch.Generator``: a sequential generator makes the
answer for step ``s`` depend on how many draws happened before it (a skipped step, an extra call for
logging, or a resume from a checkpoint taken mid-accumulation would all shift the stream). A
counter-based generator (SplitMix64 of the seed and the step, the finaliser used to seed xoshiro and
Java's ``SplittableRandom``) maps each ``(seed, step)`` to an independent uniform number directly. It
costs about a microsecond in pure Python, far below one forward pass, and needs no device or state.

The three modes (``mode``):

* ``"bernoulli"``: meta with probability ``ratio_at(step)`` (independently per step).
* ``"interleave"``: a deterministic pattern; step ``s`` is meta iff ``floor((s + 1) * r) > floor(s * r)``.
  Over any ``S`` steps from 0 at a constant ratio the meta count is exactly ``floor(S * r)``, spread as
  evenly as possible (AR comes first).
* ``"weighted"``: both objectives every step; the loss is ``w_ar * AR + w_meta * meta`` with
  ``(w_ar, w_meta) = (1 - r, r)`` from [`HybridScheduler.weights`][picomaml.meta.hybrid.HybridScheduler.weights].
  [`choose`][picomaml.meta.hybrid.HybridScheduler.choose] returns ``"both"`` in this mode.

Ratio schedules, shaped like a learning-rate schedule
([`HybridScheduler.ratio_at`][picomaml.meta.hybrid.HybridScheduler.ratio_at]):

1. warm-up: for ``step < warmup_steps`` the ratio rises linearly from 0 to ``ratio`` (the first steps are
   pure AR; meta-learning on an untrained backbone has little signal);
2. then ``"constant"`` keeps ``ratio``; ``"linear"`` and ``"cosine"`` move from ``ratio`` to
   ``final_ratio`` between ``warmup_steps`` and ``total_steps`` and hold ``final_ratio`` afterwards.

With ``meta_start > 0`` every step before ``meta_start * total_steps`` has ratio 0 (late meta: the meta
objective only in the last part of a run). The result is clipped to [0, 1], so ratio 0 never asks for meta
and ratio 1 never asks for AR (after any warm-up).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Literal, NamedTuple

from picomaml.params import Params, check, check_int, hparam

__all__ = ["HybridScheduler", "HybridConfig", "StepPlan", "Mode", "Schedule", "uniform_hash"]

Mode = Literal["bernoulli", "interleave", "weighted"]
Schedule = Literal["constant", "linear", "cosine"]
Choice = Literal["ar", "meta", "both"]


class StepPlan(NamedTuple):
    """One optimizer step's objectives and loss weights (see
    [`HybridScheduler.plan`][picomaml.meta.hybrid.HybridScheduler.plan])."""

    objectives: tuple[str, ...]
    w_ar: float
    w_meta: float


@dataclasses.dataclass
class HybridConfig(Params):
    """Hyperparameters of [`HybridScheduler`][picomaml.meta.hybrid.HybridScheduler] (YAML section ``hybrid``);
    its seed is the experiment's."""

    ratio: float = hparam(0.5, ge=0, le=1, doc="meta fraction of steps (the meta loss weight in weighted mode)")
    mode: Mode = hparam("bernoulli", doc="bernoulli per step, a deterministic interleave, or both losses weighted")
    schedule: Schedule = hparam("constant", doc="ratio after warm-up: constant, or linear/cosine to final_ratio")
    warmup_steps: int = hparam(0, ge=0, doc="steps over which the ratio rises from 0 to ratio")
    total_steps: int | None = hparam(None, ge=1, doc="end of a linear/cosine ratio schedule; null: trainer.max_steps")
    final_ratio: float = hparam(0.0, ge=0, le=1, doc="ratio reached at total_steps by linear/cosine schedules")
    meta_start: float = hparam(
        0.0, ge=0, lt=1, doc="fraction of total_steps before which every step is AR (late meta: 0.667)"
    )

_MASK64 = (1 << 64) - 1
# Distinguishes this component's stream from any other user of the same experiment seed.
_STREAM = 0x68796272696400  # "hybrid"


def _splitmix64(x: int) -> int:
    """The SplitMix64 finaliser: a bijective 64-bit mix with good avalanche."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform_hash(seed: int, step: int, stream: int = _STREAM) -> float:
    """A uniform number in [0, 1) that depends only on ``(seed, step, stream)``.

    Args:
        seed: Any Python int (negative values are reduced modulo 2**64).
        step: Any Python int.
        stream: Separates independent users of the same seed.

    Returns:
        ``u`` with 53 random bits, ``0 <= u < 1``.
    """
    key = _splitmix64((seed ^ stream) & _MASK64)
    return (_splitmix64((key + _splitmix64(step & _MASK64)) & _MASK64) >> 11) * (1.0 / (1 << 53))


class HybridScheduler:
    """Decides per optimizer step between the AR objective, the meta objective, or a weighted sum.

    The constructor arguments ``ratio``, ``mode``, ``schedule``, ``warmup_steps``, ``total_steps``,
    ``final_ratio`` and ``meta_start`` are the fields of [`HybridConfig`][picomaml.meta.hybrid.HybridConfig]
    (whose ``total_steps: null`` means ``trainer.max_steps``); ``seed`` is the experiment seed.

    Args:
        ratio: Meta fraction (or meta loss weight in ``"weighted"`` mode), in [0, 1].
        mode: ``"bernoulli"``, ``"interleave"`` or ``"weighted"`` (see the module docstring).
        schedule: ``"constant"``, ``"linear"`` or ``"cosine"`` ratio schedule after warm-up.
        warmup_steps: Steps over which the ratio rises linearly from 0 to ``ratio``.
        seed: Seed of the counter-based random numbers (``"bernoulli"`` mode).
        total_steps: Last step of a ``"linear"``/``"cosine"`` schedule (required for those; usually
            ``trainer.max_steps``).
        final_ratio: Ratio reached at ``total_steps`` by ``"linear"``/``"cosine"``, in [0, 1].
        meta_start: Fraction of ``total_steps`` before which the ratio is 0 (needs ``total_steps``).

    Examples:
        >>> hs = HybridScheduler(ratio=0.5, mode="bernoulli", seed=0)
        >>> hs.choose(10) in ("ar", "meta")
        True
        >>> hs.objectives(10) in (("ar",), ("meta",))
        True
    """

    def __init__(
        self,
        ratio: float = HybridConfig.ratio,
        mode: Mode = HybridConfig.mode,
        schedule: Schedule = HybridConfig.schedule,
        warmup_steps: int = HybridConfig.warmup_steps,
        seed: int = 0,
        total_steps: int | None = HybridConfig.total_steps,
        final_ratio: float = HybridConfig.final_ratio,
        meta_start: float = HybridConfig.meta_start,
    ) -> None:
        config = HybridConfig(
            ratio=ratio, mode=mode, schedule=schedule, warmup_steps=warmup_steps, total_steps=total_steps,
            final_ratio=final_ratio, meta_start=meta_start,
        )  # fmt: skip
        seed = check_int("seed", seed)
        ratio, warmup_steps, final_ratio = config.ratio, config.warmup_steps, config.final_ratio
        if schedule != "constant":
            check(
                total_steps is not None and total_steps > warmup_steps,
                "total_steps",
                f"schedule {schedule!r} needs total_steps > warmup_steps ({warmup_steps}), got {total_steps!r}",
            )
        self.ratio = float(ratio)
        self.mode: Mode = mode
        self.schedule: Schedule = schedule
        self.warmup_steps = int(warmup_steps)
        self.seed = int(seed)
        self.total_steps = total_steps
        self.final_ratio = float(final_ratio)
        check(
            config.meta_start == 0 or total_steps is not None,
            "meta_start",
            f"{config.meta_start} is a fraction of total_steps, which is not set",
        )
        self.meta_start = float(config.meta_start)

    @classmethod
    def from_config(cls, config: Any, seed: int = 0, total_steps: int | None = None) -> HybridScheduler:
        """Build from a [`HybridConfig`][picomaml.meta.hybrid.HybridConfig] (or its dict) and the experiment
        seed.

        Args:
            config: The ``hybrid`` section; unknown keys raise.
            seed: The experiment seed.
            total_steps: Default end of a ``"linear"``/``"cosine"`` schedule (e.g. ``trainer.max_steps``),
                used when the config does not set ``total_steps`` itself.
        """
        values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
        if values.get("total_steps") is None and total_steps is not None:
            values["total_steps"] = total_steps
        return cls(**values, seed=seed)

    # ------------------------------------------------------------------ schedule

    def ratio_at(self, step: int) -> float:
        """The meta ratio in effect at optimizer step ``step`` (0-based), clipped to [0, 1]."""
        step = self._check_step(step)
        if self.meta_start and step < self.meta_start * (self.total_steps or 0):
            return 0.0  # late meta: AR only until then
        if step < self.warmup_steps:
            r = self.ratio * step / self.warmup_steps
        elif self.schedule == "constant":
            r = self.ratio
        else:
            assert self.total_steps is not None  # validated in __init__
            span = self.total_steps - self.warmup_steps
            t = min(1.0, (step - self.warmup_steps) / span)
            frac = t if self.schedule == "linear" else 0.5 * (1.0 - math.cos(math.pi * t))
            r = self.ratio + (self.final_ratio - self.ratio) * frac
        return min(1.0, max(0.0, r))

    # ------------------------------------------------------------------ decisions

    def choose(self, step: int) -> Choice:
        """``"ar"`` or ``"meta"`` for step ``step`` (``"both"`` in ``"weighted"`` mode).

        A pure function of ``(seed, step)`` and the hyperparameters: call it in any order, any number
        of times, on any rank.
        """
        r = self.ratio_at(step)
        if self.mode == "weighted":
            return "both"
        if self.mode == "interleave":
            return "meta" if math.floor((step + 1) * r) > math.floor(step * r) else "ar"
        return "meta" if uniform_hash(self.seed, step) < r else "ar"

    def objectives(self, step: int) -> tuple[str, ...]:
        """The objectives to compute at ``step``: ``("ar",)``, ``("meta",)`` or ``("ar", "meta")``.

        In ``"weighted"`` mode an objective whose weight is 0 at this step is left out, so ratio 0
        never computes meta and ratio 1 never computes AR.
        """
        choice = self.choose(step)
        if choice != "both":
            return (choice,)
        w_ar, w_meta = self.weights(step)
        return tuple(name for name, w in (("ar", w_ar), ("meta", w_meta)) if w > 0.0)

    def weights(self, step: int) -> tuple[float, float]:
        """Loss weights ``(w_ar, w_meta)`` at ``step``.

        ``"weighted"`` mode: ``(1 - r, r)`` with ``r = ratio_at(step)``. The other modes give the
        one-hot weights of [`choose`][picomaml.meta.hybrid.HybridScheduler.choose] (``(1, 0)`` for AR,
        ``(0, 1)`` for meta), so a training loop can always write
        ``loss = w_ar * ar_loss + w_meta * meta_loss`` over
        [`objectives`][picomaml.meta.hybrid.HybridScheduler.objectives].
        """
        if self.mode == "weighted":
            r = self.ratio_at(step)
            return (1.0 - r, r)
        return (0.0, 1.0) if self.choose(step) == "meta" else (1.0, 0.0)

    def plan(self, step: int) -> StepPlan:
        """What a training loop does at ``step``: the objectives and the weight of each loss.

        ``loss = w_ar * ar_loss + w_meta * meta_loss`` over ``plan.objectives`` is the step's loss in every
        mode (in ``"weighted"`` mode both weights come from the ratio; otherwise the one objective has 1).
        """
        w_ar, w_meta = self.weights(step)
        return StepPlan(self.objectives(step), w_ar, w_meta)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The hyperparameters and seed (there is no other state: decisions are pure in the step)."""
        return {
            "ratio": self.ratio,
            "mode": self.mode,
            "schedule": self.schedule,
            "warmup_steps": self.warmup_steps,
            "seed": self.seed,
            "total_steps": self.total_steps,
            "final_ratio": self.final_ratio,
            "meta_start": self.meta_start,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from [`state_dict`][picomaml.meta.hybrid.HybridScheduler.state_dict] (validated like the
        constructor; unknown keys raise)."""
        known = set(self.state_dict())
        unknown = sorted(set(state) - known)
        if unknown:
            raise KeyError(
                f"HybridScheduler.load_state_dict: unknown keys {unknown}; valid keys: {sorted(known)}"
            )
        merged = {**self.state_dict(), **state}
        fresh = HybridScheduler(**merged)  # validates
        self.__dict__.update(fresh.__dict__)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.state_dict().items())
        return f"HybridScheduler({args})"

    @staticmethod
    def _check_step(step: int) -> int:
        if isinstance(step, bool) or not isinstance(step, int):
            try:
                step = operator.index(step)  # numpy / torch integer scalars
            except TypeError:
                raise TypeError(f"step must be an integer, got {type(step).__name__} {step!r}") from None
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return step
