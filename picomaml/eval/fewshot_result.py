"""The result of a few-shot evaluation: [`FewShotResult`][picomaml.eval.fewshot_result.FewShotResult], built
from per-episode accuracies by [`summarize_accuracies`][picomaml.eval.fewshot_result.summarize_accuracies] and
shown as a markdown table by [`format_fewshot_table`][picomaml.eval.fewshot_result.format_fewshot_table].

[`picomaml.eval.fewshot.fewshot_eval`][picomaml.eval.fewshot.fewshot_eval] returns one per setting;
``picomaml.eval.fewshot`` re-exports the three names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from picomaml.eval.stats import mean_ci

__all__ = ["FewShotResult", "summarize_accuracies", "format_fewshot_table"]


@dataclasses.dataclass
class FewShotResult:
    """Few-shot accuracy of one ``n_way``-way ``k_shot``-shot setting.

    Attributes:
        n_way, k_shot, n_query: The episode shape.
        episodes: Number of episodes evaluated.
        acc_ncm: Mean query accuracy of the nearest class mean on frozen features.
        acc_ncm_ci: Half-width of its confidence interval (``confidence``, Student t over episodes).
        acc_after: Mean query accuracy after inner-loop adaptation (``None`` without a head).
        acc_after_ci: Half-width of its confidence interval (``None`` without a head).
        chance: ``1 / n_way``.
        confidence: Coverage of the intervals.
        per_episode_ncm, per_episode_after: The per-episode accuracies behind the means.
        acc_probe: Mean query accuracy of a linear probe fitted on the support set (``None`` when not
            computed).
        acc_probe_ci: Half-width of its confidence interval.
        per_episode_probe: The per-episode probe accuracies.
    """

    n_way: int
    k_shot: int
    n_query: int
    episodes: int
    acc_ncm: float
    acc_ncm_ci: float
    acc_after: float | None
    acc_after_ci: float | None
    chance: float
    confidence: float = 0.95
    per_episode_ncm: tuple[float, ...] = ()
    per_episode_after: tuple[float, ...] = ()
    acc_probe: float | None = None
    acc_probe_ci: float | None = None
    per_episode_probe: tuple[float, ...] = ()

    @property
    def setting(self) -> str:
        """``"5w4s"``: a short name for metric keys."""
        return f"{self.n_way}w{self.k_shot}s"

    def metrics(self, prefix: str = "eval/fewshot") -> dict[str, float]:
        """Flat metrics for a logger: ``{prefix}_acc`` (after adaptation, or before without a head),
        ``{prefix}_acc_ci``, ``{prefix}_acc_ncm``, ``{prefix}_acc_ncm_ci``, ``{prefix}_chance``, and
        ``{prefix}_acc_probe``, ``{prefix}_acc_probe_ci`` when the probe was computed.
        """
        main = self.acc_after if self.acc_after is not None else self.acc_ncm
        main_ci = self.acc_after_ci if self.acc_after_ci is not None else self.acc_ncm_ci
        out = {
            f"{prefix}_acc": main,
            f"{prefix}_acc_ci": main_ci,
            f"{prefix}_acc_ncm": self.acc_ncm,
            f"{prefix}_acc_ncm_ci": self.acc_ncm_ci,
            f"{prefix}_chance": self.chance,
        }
        if self.acc_probe is not None:  # loggers take floats only
            out[f"{prefix}_acc_probe"] = self.acc_probe
            out[f"{prefix}_acc_probe_ci"] = self.acc_probe_ci
        return out


def summarize_accuracies(
    n_way: int,
    k_shot: int,
    n_query: int,
    before: Sequence[float],
    after: Sequence[float],
    confidence: float,
    *,
    probe: Sequence[float] = (),
) -> FewShotResult:
    """A [`FewShotResult`][picomaml.eval.fewshot_result.FewShotResult] (means, confidence half-widths, chance)
    from per-episode accuracies (``after`` and ``probe`` may be empty: their means are then ``None``)."""
    acc_ncm, ci_before = mean_ci(before, confidence)
    acc_after, ci_after = mean_ci(after, confidence) if after else (None, None)
    acc_probe, ci_probe = mean_ci(probe, confidence) if probe else (None, None)
    return FewShotResult(
        n_way=n_way,
        k_shot=k_shot,
        n_query=n_query,
        episodes=len(before),
        acc_ncm=acc_ncm,
        acc_ncm_ci=ci_before,
        acc_after=acc_after,
        acc_after_ci=ci_after,
        chance=1.0 / n_way,
        confidence=confidence,
        per_episode_ncm=tuple(before),
        per_episode_after=tuple(after),
        acc_probe=acc_probe,
        acc_probe_ci=ci_probe,
        per_episode_probe=tuple(probe),
    )


def _fmt(value: float | None, ci: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f} ± {ci:.3f}" if ci is not None and ci == ci else f"{value:.3f}"


def format_fewshot_table(results: Sequence[FewShotResult] | FewShotResult) -> str:
    """A markdown table of few-shot results with chance beside each row.

    Examples:
        ```markdown
        | setting | episodes | NCM before (95% CI) | linear probe (95% CI) | after inner loop (95% CI) | chance |
        |---|---|---|---|---|---|
        | 5-way 4-shot (4 query) | 100 | 0.412 ± 0.021 | 0.430 ± 0.022 | 0.455 ± 0.020 | 0.200 |
        ```
    """
    if isinstance(results, FewShotResult):
        results = [results]
    pct = f"{int(round(100 * results[0].confidence))}% CI" if results else "CI"
    lines = [
        f"| setting | episodes | NCM before ({pct}) | linear probe ({pct}) | after inner loop ({pct}) | chance |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.n_way}-way {r.k_shot}-shot ({r.n_query} query) | {r.episodes} | "
            f"{_fmt(r.acc_ncm, r.acc_ncm_ci)} | {_fmt(r.acc_probe, r.acc_probe_ci)} | "
            f"{_fmt(r.acc_after, r.acc_after_ci)} | {r.chance:.3f} |"
        )
    return "\n".join(lines)
