"""Metric tracking for training runs: an always-on CSV file, optional TensorBoard and W&B, curve plots.

``metrics.csv`` has a ``step`` column and one column per metric name; a row per logged step, blank cells
where a metric was not logged at that step. New metric names extend the header (the file is rewritten
then, which is cheap at logging frequency). On resume, rows after the resumed step are dropped so the
file reads as one uninterrupted run.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from picomaml._optional import require

__all__ = ["MetricsTracker", "read_metrics_csv", "plot_curves"]

log = logging.getLogger(__name__)


def read_metrics_csv(path: str | Path) -> list[dict[str, float]]:
    """Rows of a ``metrics.csv`` as dicts of floats (blank cells omitted)."""
    rows: list[dict[str, float]] = []
    with open(path, newline="", encoding="utf-8") as fh:
        for raw in csv.DictReader(fh):
            rows.append({k: float(v) for k, v in raw.items() if v not in ("", None)})
    return rows


class MetricsTracker:
    """Write metrics to ``run_dir/metrics.csv`` and to the chosen extra loggers.

    Args:
        run_dir: Run directory; ``metrics.csv`` (and ``tensorboard/``, ``wandb/``) go there.
        loggers: Any of ``"csv"``, ``"tensorboard"``, ``"wandb"``; the CSV file is written regardless.
        enabled: False on non-zero ranks: every call is then a no-op.
        config: Resolved config (a plain dict) recorded by W&B.
        resume_step: When resuming, keep existing CSV rows with ``step <= resume_step``.
        wandb_project: W&B project name.
        wandb_offline: Run W&B in offline mode (no network needed; ``wandb sync`` later).
    """

    def __init__(
        self,
        run_dir: str | Path,
        loggers: Sequence[str] = ("csv",),
        enabled: bool = True,
        config: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
        wandb_project: str = "picomaml",
        wandb_offline: bool = True,
    ) -> None:
        unknown = set(loggers) - {"csv", "tensorboard", "wandb"}
        if unknown:
            raise ValueError(
                f"loggers: unknown {sorted(unknown)}; choose from ['csv', 'tensorboard', 'wandb']"
            )
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.csv"
        self._columns: list[str] = ["step"]
        self._rows: list[dict[str, float]] = []
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._rows = [r for r in read_metrics_csv(self.path) if r.get("step", math.inf) <= resume_step]
            for row in self._rows:
                self._columns += [k for k in row if k not in self._columns]
        self._rewrite()
        if "tensorboard" in loggers:
            tb = require("torch.utils.tensorboard", "logging", "the TensorBoard logger")
            self._tb = tb.SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if "wandb" in loggers:
            wandb = require("wandb", "logging", "the W&B logger")
            if wandb_offline:
                os.environ.setdefault("WANDB_MODE", "offline")
            self._wandb = wandb.init(
                project=wandb_project,
                dir=str(run_dir),
                config=dict(config or {}),
                resume="allow",
                id=Path(run_dir).resolve().name,
            )

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=self._columns)
            writer.writeheader()
            for row in self._rows:
                writer.writerow({k: _fmt(v) for k, v in row.items()})
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record ``metrics`` at ``step`` (values must be plain numbers)."""
        if not self.enabled:
            return
        row = {"step": float(step), **{k: float(v) for k, v in metrics.items()}}
        self._rows.append(row)
        new = [k for k in row if k not in self._columns]
        if new:
            self._columns += new
            self._rewrite()
        else:
            with open(self.path, "a", newline="", encoding="utf-8") as fh:
                csv.DictWriter(fh, fieldnames=self._columns).writerow({k: _fmt(v) for k, v in row.items()})
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=step)

    @property
    def rows(self) -> list[dict[str, float]]:
        """All rows logged so far (including those kept from before a resume)."""
        return list(self._rows)

    def close(self) -> None:
        """Flush and close the extra loggers."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


_PANELS = (
    ("LM loss", ("train/lm_loss",)),
    ("meta loss", ("train/meta_loss",)),
    ("meta accuracy", ("meta/support_acc_before", "meta/support_acc_after", "meta/query_acc")),
    ("held-out perplexity", ("eval/perplexity",)),
    ("few-shot accuracy", ("eval/fewshot_acc", "eval/fewshot_acc_ncm", "eval/fewshot_chance")),
    ("learning rate", ("trainer/lr/model", "trainer/lr/head")),
)


def plot_curves(metrics_csv: str | Path, out_png: str | Path, title: str | None = None) -> Path | None:
    """Plot the training curves of a ``metrics.csv`` to a PNG (one panel per metric family).

    Returns the PNG path, or ``None`` when the file holds no plottable metric.
    """
    rows = read_metrics_csv(metrics_csv)
    panels = [(name, [k for k in keys if any(k in r for r in rows)]) for name, keys in _PANELS]
    panels = [(name, keys) for name, keys in panels if keys]
    if not panels:
        return None
    matplotlib = require("matplotlib", "plots", "training-curve plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, (name, keys) in zip(axes.flat, panels, strict=False):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="." if len(pts) < 30 else None, label=key.split("/", 1)[-1])
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
