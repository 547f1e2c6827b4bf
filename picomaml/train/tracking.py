"""Metric tracking for training runs: an always-on CSV file, optional TensorBoard and W&B, curve plots.

``metrics.csv`` has a ``step`` column and one column per metric name; a row per logged step, blank cells
where a metric was not logged at that step. New metric names extend the header (the file is rewritten
then, which is cheap at logging frequency). On resume, rows after the resumed step are dropped so the
file reads as one uninterrupted run; a tracker never overwrites the rows of a run it does not continue.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from picomaml._optional import require
from picomaml.params import short_repr

__all__ = ["MetricsTracker", "MetricsFileError", "read_metrics_csv", "plot_curves"]

log = logging.getLogger(__name__)


class MetricsFileError(ValueError):
    """A ``metrics.csv`` that cannot be read; the message names the file and the line."""


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise MetricsFileError(f"{path} line {line}: not UTF-8 text (byte {exc.start})") from None


def read_metrics_csv(path: str | Path, *, drop_torn_tail: bool = False) -> list[dict[str, float]]:
    """Rows of a ``metrics.csv`` as dicts of floats (blank cells omitted).

    Args:
        path: The file.
        drop_torn_tail: Drop a last line without its line break (a row cut short by a crash while it was
            appended) with a warning, instead of reading it.

    Raises:
        MetricsFileError: A line that is not a row of numbers under the header (the message names the file,
            the line and the column).
    """
    path = Path(path)
    text = _decode(path)
    if drop_torn_tail and text and not text.endswith("\n"):
        keep = text.rfind("\n") + 1
        log.warning("%s: dropping its unterminated last line %d (a write cut short)", path, text.count("\n") + 1)
        text = text[:keep]
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[dict[str, float]] = []
    try:
        header = next(reader, None)
        if header is None:
            return rows
        if "step" not in header:
            raise MetricsFileError(f"{path} line 1: the header has no 'step' column: {short_repr(header)}")
        for fields in reader:
            if fields:
                rows.append(_parse_row(path, reader.line_num, header, fields))
    except csv.Error as exc:
        raise MetricsFileError(f"{path} line {reader.line_num}: {exc}") from None
    return rows


def _parse_row(path: Path, line: int, header: list[str], fields: list[str]) -> dict[str, float]:
    if len(fields) != len(header):
        raise MetricsFileError(f"{path} line {line}: {len(fields)} fields, but the header has {len(header)}")
    row = {}
    for name, cell in zip(header, fields, strict=True):
        if cell == "":
            continue
        try:
            row[name] = float(cell)
        except ValueError:
            raise MetricsFileError(
                f"{path} line {line}, column {short_repr(name)}: {short_repr(cell)} is not a number"
            ) from None
    if "step" not in row:
        raise MetricsFileError(f"{path} line {line}: the row has no step")
    return row


class MetricsTracker:
    """Write metrics to ``run_dir/metrics.csv`` and to the chosen extra loggers.

    Args:
        run_dir: Run directory; ``metrics.csv`` (and ``tensorboard/``, ``wandb/``) go there.
        loggers: Any of ``"csv"``, ``"tensorboard"``, ``"wandb"``; the CSV file is written regardless.
        enabled: False on non-zero ranks: every call is then a no-op.
        config: Resolved config (a plain dict) recorded by W&B.
        resume_step: When resuming, keep existing CSV rows with ``step <= resume_step`` (an unterminated
            last line, a row cut short by a crash, is dropped). ``None``: a new run, and ``metrics.csv``
            must not hold rows yet.
        wandb_project: W&B project name.
        wandb_offline: Run W&B in offline mode (no network needed; ``wandb sync`` later).

    Raises:
        FileExistsError: ``resume_step`` is ``None`` and ``metrics.csv`` already holds rows (of a run this
            tracker does not continue: nothing is overwritten).
        MetricsFileError: When resuming, a ``metrics.csv`` that cannot be read (file and line named).
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
            rows = read_metrics_csv(self.path, drop_torn_tail=True)
            self._rows = [r for r in rows if r["step"] <= resume_step]
            if len(rows) > len(self._rows):  # logged after the checkpoint: those steps run again
                log.info("%s: dropping %d rows after step %d", self.path, len(rows) - len(self._rows), resume_step)
            for row in self._rows:
                self._columns += [k for k in row if k not in self._columns]
        elif resume_step is None and _holds_rows(self.path):
            raise FileExistsError(
                f"{self.path} already holds the rows of a run; pass resume_step= to continue it, or move the "
                "file away first (a new run never overwrites it)"
            )
        self._rewrite()
        if "tensorboard" in loggers:
            tb = require("torch.utils.tensorboard", "logging", "the TensorBoard logger")
            # on a resume, TensorBoard drops the events of the steps that run again (they were logged after
            # the checkpoint), so no tag shows a step twice
            purge = None if resume_step is None else resume_step + 1
            self._tb = tb.SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=purge)
            if resume_step is None and config:
                _write_hparams(self._tb, config)
        if "wandb" in loggers:
            wandb = require("wandb", "logging", "the W&B logger")
            if wandb_offline:
                os.environ.setdefault("WANDB_MODE", "offline")
            self._wandb = wandb.init(
                project=wandb_project,
                name=Path(run_dir).resolve().name,  # the run directory's name, as in the CSV and TensorBoard
                dir=str(run_dir),
                config=dict(config or {}),
                resume="allow",
                id=_wandb_run_id(Path(run_dir), resuming=resume_step is not None),
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


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``; values TensorBoard's hparams cannot show (lists, None) as text."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


def _write_hparams(writer: Any, config: Mapping[str, Any]) -> None:
    """The resolved config as TensorBoard hparams of this run (its HPARAMS tab), in the run's own folder."""
    from torch.utils.tensorboard.summary import hparams

    for summary in hparams(_flatten(config), {}):
        writer._get_file_writer().add_summary(summary)


def _holds_rows(path: Path) -> bool:
    """Whether ``path`` exists with more than a header line."""
    try:
        with open(path, "rb") as fh:
            return sum(1 for line in fh if line.strip()) > 1
    except FileNotFoundError:
        return False


def _wandb_run_id(run_dir: Path, resuming: bool) -> str:
    """The W&B run id, kept in ``wandb/run_id``: a resume continues its W&B run, a new run in the same
    directory (the earlier one moved aside with ``wandb/``) gets a new one instead of appending to it."""
    id_file = run_dir / "wandb" / "run_id"
    if resuming:
        if id_file.exists():
            return id_file.read_text(encoding="utf-8").strip()
        return run_dir.resolve().name  # a run started before ids were kept
    run_id = f"{run_dir.resolve().name}-{secrets.token_hex(4)}"
    id_file.parent.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id + "\n", encoding="utf-8")
    return run_id


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
