"""One-command accelerator check: MFU of the AR step, meta ÷ AR, peak memory, eager vs compiled, and a short
hybrid run of the reference trainer with a resume. On CUDA it uses the small preset in bf16 and takes a few
minutes; without a GPU the same code runs on CPU with a tiny model (so CI keeps it working).

What one run measures (steps timed interleaved, median of ``--repeats`` after ``--warmup`` untimed calls;
every step is forward + backward + AdamW, as in training):

* ``AR eager`` / ``AR compiled``: a next-token step (``pm.lm_loss``) on ``--batch`` rows of ``--seq`` inputs,
  the model eager and ``torch.compile``-d (a failed compile is reported in its row, not raised). The
  compiled row also says how long the first (compiling) step took and how many graph breaks
  ``torch._dynamo.explain`` finds in the forward.
* ``meta eager`` / ``meta, compiled backbone``: a ``pm.meta_loss`` step on one SMLMT episode (default
  32-way 4-shot 4-query, W=64, 10 second-order inner steps, the 4-layer MLP head with 128 hidden units,
  xavier init). The inner loop always stays eager (second order through compiled graphs is unsupported);
  the second row compiles only the backbone forward (``features=torch.compile(model.hidden_states)``).
* ``AR eager, meta tokens``: an AR step on the episode's own windows (``N (K + Q)`` rows of ``W`` predicted
  tokens), for the ratio ``meta / AR`` on the same tokens.
* ``trainer``: ``examples/train_smlmt.py`` as a subprocess on the embedded corpus (the ``tiny-cpu`` config plus
  ``--set`` overrides; hybrid interleave, AR and meta steps alternate) for ``--trainer-steps`` steps (50 on
  CUDA) with ``--precision bf16-mixed`` (32-true on CPU), then ``--resume auto`` up to ``--resume-steps``
  (60): every logged loss must be finite, the resumed run must continue at the next step (``metrics.csv``
  steps ``1..60`` once each, counters carried over, ``resumed from ... at step 50`` in its log).

Formulas (``picomaml.eval.flops``): ``pm.ar_step_flops`` = ``6 * tokens * (P_body + d V) + 12 * n_layers *
L * d * tokens`` and ``pm.meta_step_flops`` (backbone without LM head + the inner loop's head matmuls).
MFU = formula FLOPs / step time / peak. Peak: the dense bf16 tensor-core figure of the GPU from the table
``PEAK_TFLOPS`` below (matched on ``torch.cuda.get_device_name()``), else ``--peak-tflops``, else (unknown
GPU, or CPU) the measured throughput of a large square matmul in the run's dtype; the output says which.
Measured matmul throughput is reported on every device beside the peak.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` over one step (``peak MiB``, everything allocated, the
other rows' models included, and ``step MiB``: above what was allocated before the step); on every device
the peak bytes autograd saves for backward during the step's forward (eager rows; ``saved MiB``, see
``inner_loop.saved_tensor_mb``).

Usage::

    python benchmarks/gpu.py                      # auto device: CUDA -> small preset, bf16 (<= 5 min on one GPU)
    python benchmarks/gpu.py --quick              # fewer repeats (the trainer still runs 50 + 10 steps on CUDA)
    python benchmarks/gpu.py --device cpu --quick --threads 1   # CI: tiny model, fp32, ~40 s
    python benchmarks/gpu.py --peak-tflops 989 --no-trainer
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import picomaml as pm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from inner_loop import saved_tensor_mb  # noqa: E402  (sibling benchmark helper)
from meta_step import make_episode  # noqa: E402

ROOT = HERE.parent
RESULTS = HERE / "results"
TRAINER = ROOT / "examples" / "train_smlmt.py"  # runs the packaged recipe, as `picomaml train` does
TRAINER_CONFIG = "tiny-cpu"

#: (pattern on torch.cuda.get_device_name(), name, dense bf16 tensor TFLOP/s from the vendor's data sheet);
#: the first match wins, so specific variants come before the family
PEAK_TFLOPS: tuple[tuple[str, str, float], ...] = (
    (r"H200 NVL", "H200 NVL", 835.0),
    (r"H200|GH200", "H200 / GH200 SXM", 989.0),
    (r"H100 NVL", "H100 NVL", 835.0),
    (r"H100 PCIe", "H100 PCIe", 756.0),
    (r"H100|H800", "H100 SXM", 989.0),
    (r"B200", "B200", 2250.0),
    (r"A100|A800", "A100", 312.0),
    (r"L40S", "L40S", 362.0),
    (r"\bL40\b", "L40", 181.0),
    (r"\bL4\b", "L4", 121.0),
    (r"\bA10\b", "A10", 125.0),
    (r"MI300X", "MI300X", 1307.0),
    (r"MI250X", "MI250X", 383.0),
)


def known_peak(device_name: str) -> tuple[str, float] | None:
    """``(matched name, dense bf16 TFLOP/s)`` of a GPU in :data:`PEAK_TFLOPS`, or None."""
    for pattern, name, tflops in PEAK_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return name, tflops
    return None


@dataclass
class Setting:
    """Everything one device's run uses (the defaults are the CUDA ones; :func:`setting` shrinks them)."""

    model: dict[str, Any]
    batch: int
    seq: int
    n_way: int = 32
    k_shot: int = 4
    n_query: int = 4
    window: int = 64
    inner_steps: int = 10
    inner_lr: float = 1e-3
    head_dims: tuple[int, ...] = (128, 128, 128)
    repeats: int = 10
    warmup: int = 3
    matmul_n: int = 8192
    trainer_sets: list[str] = field(default_factory=list)
    trainer_steps: int = 50
    resume_steps: int = 60


def _trainer_sets(small: bool, accelerator: str) -> list[str]:
    """``--set`` overrides of ``tiny-cpu.yaml`` for the trainer run (hybrid interleave: AR and meta alternate)."""
    common = [
        "hybrid.mode=interleave", "hybrid.ratio=0.5", "trainer.log_every=1", f"trainer.accelerator={accelerator}",
        "optim.warmup_steps=5", "head.init=xavier", "meta.n_tasks=2",
    ]  # fmt: skip
    if small:  # the small preset on the embedded corpus (vocab 8192), pico's head and inner loop
        return common + [
            "model.preset=small", "model.n_layers=12", "model.max_seq_len=256", "data.seq_len=256",
            "data.batch_size=64", "sampler.n_way=16", "sampler.k_shot=4", "sampler.n_query=4",
            "sampler.window_len=32", "sampler.min_freq=8", "sampler.max_freq=0.25",
            "head.hidden_dims=[128, 128, 128]", "inner_loop.steps=10", "inner_loop.lr=0.01",
            "trainer.eval_every=50", "trainer.save_every=25",
            "eval.rows=64", "eval.batch_size=16", "eval.episodes=20", "eval.settings=[[16, 4]]",
        ]  # fmt: skip
    return common + [  # tiny: 2 layers, d_model 32 (the trainer tests' model)
        "model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=64",
        "model.max_seq_len=32", "data.seq_len=32", "data.batch_size=8",
        "sampler.n_way=3", "sampler.k_shot=2", "sampler.n_query=2", "sampler.window_len=8",
        "sampler.min_freq=3", "sampler.max_freq=0.5", "head.hidden_dims=[16]", "inner_loop.steps=2",
        "trainer.eval_every=100", "trainer.save_every=100",
        "eval.rows=8", "eval.batch_size=8", "eval.episodes=2", "eval.settings=[[3, 2]]",
    ]  # fmt: skip


def setting(device: torch.device, quick: bool, vocab: int | None, profile: str = "auto") -> Setting:
    """The run's sizes: ``small`` (the default on CUDA) or ``tiny`` (the default on CPU)."""
    if profile == "auto":
        profile = "small" if device.type == "cuda" else "tiny"
    accelerator = "cuda" if device.type == "cuda" else "cpu"
    if profile == "small":
        s = Setting(model={"preset": "small", "vocab_size": vocab or 50304}, batch=16, seq=2048)
        s.trainer_sets = _trainer_sets(small=True, accelerator=accelerator)
        if quick:
            s.repeats, s.warmup = 5, 2
        return s
    tiny = {"preset": "tiny", "vocab_size": vocab or 8192, "n_layers": 2, "d_model": 64, "n_heads": 4,
            "n_kv_heads": 2, "ffn_dim": 256}  # fmt: skip
    s = Setting(model=tiny, batch=4, seq=128, repeats=3, warmup=1, matmul_n=1024)
    s.trainer_sets = _trainer_sets(small=False, accelerator=accelerator)
    s.trainer_steps, s.resume_steps = 20, 24
    if quick:
        s.batch, s.seq, s.n_way, s.k_shot, s.n_query, s.window, s.inner_steps = 2, 64, 8, 2, 2, 16, 3
        s.repeats, s.warmup, s.trainer_steps, s.resume_steps = 2, 1, 4, 6
    return s


# -- measurements ----------------------------------------------------------------------------------------


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, sync) -> float:
    """Measured TFLOP/s of ``(n x n) @ (n x n)`` in ``dtype`` (median of a few, after a warm-up)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    reps = 20 if device.type == "cuda" else 3
    times = []
    for i in range(reps + 2):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e12


def _short(exc: BaseException, limit: int = 160) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"[:limit]


@dataclass
class Row:
    """One benchmarked step."""

    name: str
    tokens: int  # predicted (AR) or processed (meta) tokens per step
    flops: int
    formula: str
    step: Any = None  # () -> None: one training step
    forward: Any = None  # () -> loss: the step's forward, for the saved-for-backward memory
    compiled: bool = False
    error: str | None = None
    first_step_s: float | None = None
    graph_breaks: int | None = None
    result: dict[str, Any] = field(default_factory=dict)


def compile_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"backend": args.compile_backend}
    if args.compile_mode:
        kwargs["mode"] = args.compile_mode
    return kwargs


def build_rows(args: argparse.Namespace, s: Setting, device: torch.device, amp) -> tuple[list[Row], Any, Any]:
    cfg = pm.PicoDecoderConfig.preset(
        s.model["preset"], **{k: v for k, v in s.model.items() if k != "preset"},
        max_seq_len=max(s.seq, s.window + 1),
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, cfg.vocab_size, (s.batch, s.seq + 1), generator=g).to(device)
    ns = argparse.Namespace(
        n_way=s.n_way, k_shot=s.k_shot, n_query=s.n_query, window=s.window, vocab=cfg.vocab_size
    )
    episode, source = make_episode(ns)
    episode = episode.to(device)
    meta_ids = torch.cat([episode.support_ids, episode.query_ids])
    meta_ids = torch.cat([meta_ids, meta_ids[:, :1]], 1)  # W predicted tokens per window

    def fresh_model() -> pm.PicoDecoder:
        torch.manual_seed(0)
        return pm.PicoDecoder(cfg).to(device)

    def ar(model, call, tokens):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def forward():
            with amp():
                return pm.lm_loss(call, tokens)

        def step():
            forward().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step, forward

    def meta(model, features=None):
        head = pm.MetaHead(cfg.d_model, s.n_way, hidden_dims=s.head_dims, init="xavier").to(device)
        loop = pm.InnerLoop(s.inner_steps, s.inner_lr, first_order=False).to(device)
        opt = torch.optim.AdamW([*model.parameters(), *head.parameters(), *loop.parameters()], lr=1e-4)

        def forward():
            with amp():
                return pm.meta_loss(model, head, loop, episode, features=features).loss

        def step():
            forward().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step, forward

    ar_formula = "6*tokens*(P_body + d*V) + 12*n_layers*L*d*tokens (pm.ar_step_flops)"
    meta_formula = "6*M*W*P_body + 12*n_layers*W*d*M*W + inner loop (pm.meta_step_flops)"
    ar_flops = pm.ar_step_flops(cfg, s.batch, s.seq)
    meta_flops = pm.meta_step_flops(
        cfg, s.n_way, s.k_shot, s.n_query, s.window, head_hidden_dims=s.head_dims, inner_steps=s.inner_steps
    )
    rows = []
    m = fresh_model()
    rows.append(Row("AR eager", s.batch * s.seq, ar_flops, ar_formula, *ar(m, m, ids)))
    m = fresh_model()
    row = Row("AR compiled", s.batch * s.seq, ar_flops, ar_formula, compiled=True)
    if args.no_compile:
        row.error = "skipped (--no-compile)"
    else:
        try:
            explain = torch._dynamo.explain(m)(ids[:, :-1])
            row.graph_breaks = int(explain.graph_break_count)
        except Exception as exc:  # noqa: BLE001 - diagnostic only
            print(f"torch._dynamo.explain failed: {_short(exc)}")
        torch._dynamo.reset()
        try:
            row.step, row.forward = ar(m, torch.compile(m, **compile_kwargs(args)), ids)
        except Exception as exc:  # noqa: BLE001 - e.g. an unknown backend: the row says so
            row.error = f"torch.compile: {_short(exc)}"
    rows.append(row)
    m = fresh_model()
    rows.append(Row("meta eager", meta_ids.shape[0] * s.window, meta_flops, meta_formula, *meta(m)))
    m = fresh_model()
    row = Row(
        "meta, compiled backbone", meta_ids.shape[0] * s.window, meta_flops, meta_formula, compiled=True
    )
    if args.no_compile:
        row.error = "skipped (--no-compile)"
    else:
        try:
            row.step, row.forward = meta(m, features=torch.compile(m.hidden_states, **compile_kwargs(args)))
        except Exception as exc:  # noqa: BLE001
            row.error = f"torch.compile: {_short(exc)}"
    rows.append(row)
    m = fresh_model()
    n_rows = meta_ids.shape[0]
    rows.append(Row(
        "AR eager, meta tokens", n_rows * s.window, pm.ar_step_flops(cfg, n_rows, s.window), ar_formula,
        *ar(m, m, meta_ids),
    ))  # fmt: skip
    return rows, cfg, source


def _fail(row: Row, exc: BaseException, when: str) -> None:
    row.error = f"{when}: {_short(exc)}"
    row.step = row.forward = None
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()


def _timed_step(step, sync) -> float:
    """Seconds of one ``step()``, synchronised before and after (so queued device work is counted)."""
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - t0


def timed_medians(rows: list[Row], repeats: int, warmup: int, sync) -> dict[str, float]:
    """Median seconds per row's step, rows called round-robin (as ``inner_loop.interleaved_medians``) so
    drifts in machine load hit all alike; a step that raises ends its row (reported), not the run."""
    times: dict[str, list[float]] = {r.name: [] for r in rows}
    for i in range(warmup + repeats):
        for row in rows:
            if row.step is None:
                continue
            try:
                seconds = _timed_step(row.step, sync)
            except Exception as exc:  # noqa: BLE001 - e.g. a recompile that fails, or out of memory
                _fail(row, exc, "timing")
                continue
            if i >= warmup:
                times[row.name].append(seconds)
    return {r.name: statistics.median(times[r.name]) for r in rows if r.step is not None and times[r.name]}


def measure(rows: list[Row], s: Setting, device: torch.device, sync, peak_tflops: float) -> None:
    # first step of each row (compiles the compiled ones); a failure is the row's result, not a crash
    for row in rows:
        if row.step is None:
            continue
        try:
            row.first_step_s = _timed_step(row.step, sync)
        except Exception as exc:  # noqa: BLE001 - torch.compile can fail in many ways: report it
            _fail(row, exc, "first step" + (" (compile)" if row.compiled else ""))
            torch._dynamo.reset()  # nothing compiled is timed yet: the next compiled row starts clean
    med = timed_medians(rows, s.repeats, s.warmup, sync)
    for row in rows:
        if row.name not in med:
            continue
        sec = med[row.name]
        row.result = {
            "ms": sec * 1e3,
            "tokens_per_s": row.tokens / sec,
            "tflops": row.flops / sec / 1e12,
            "mfu": row.flops / sec / 1e12 / peak_tflops,
        }
        if row.first_step_s is not None and row.compiled:
            row.result["first_step_s"] = row.first_step_s
        try:
            if not row.compiled:
                row.result["saved_mib"] = saved_tensor_mb(row.forward)
            if device.type == "cuda":
                sync()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                row.step()
                sync()
                row.result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
                row.result["step_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        except Exception as exc:  # noqa: BLE001 - keep the timing, say why memory is missing
            row.error = f"memory: {_short(exc)}"


# -- the trainer run ---------------------------------------------------------------------------------------


def _finite_losses(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


def trainer_run(args: argparse.Namespace, s: Setting, precision: str) -> dict[str, Any]:
    """50 steps of the reference trainer, then a resume to 60: finite losses, the resume continues."""
    run_dir = (
        Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="picomaml-gpu-check-")) / "run"
    )
    steps, total = s.trainer_steps, s.resume_steps
    base = [sys.executable, str(TRAINER), "--config", str(TRAINER_CONFIG), "--run-dir", str(run_dir),
            "--precision", precision, "--set", "trainer.loggers=[csv]"]  # fmt: skip
    for item in s.trainer_sets + list(args.trainer_set):
        base += ["--set", item]
    if args.cache_dir:
        base += ["--set", f"data.cache_dir={args.cache_dir}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.threads:  # the trainer's CPU threads too (torch reads it at start-up)
        env["OMP_NUM_THREADS"] = str(args.threads)
    out: dict[str, Any] = {
        "run_dir": str(run_dir),
        "precision": precision,
        "steps": steps,
        "resume_steps": total,
    }
    # the embedded corpus first, in this process: its one-time build (cached) is not trainer time
    t0 = time.perf_counter()
    corpus = pm.load_default_corpus(cache_dir=args.cache_dir)
    out["corpus_s"] = time.perf_counter() - t0
    out["corpus_cache"] = str(corpus.cache_dir)
    for name, extra in (("first", ["--max-steps", str(steps), "--resume", "fresh"]),
                        ("resume", ["--max-steps", str(total), "--resume", "auto"])):  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(
            [*base, *extra], capture_output=True, text=True, env=env, timeout=args.trainer_timeout
        )
        out[f"{name}_s"] = time.perf_counter() - t0
        out[f"{name}_rc"] = proc.returncode
        log = proc.stdout + proc.stderr
        if name == "resume":
            out["resume_log_says"] = bool(re.search(rf"resumed from .* at step {steps}\b", log))
        if proc.returncode != 0:
            out["error"] = (
                f"{name} run exited {proc.returncode}: " + " | ".join(log.strip().splitlines()[-3:])[-400:]
            )
            return out
    with open(run_dir / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    logged = [int(float(r["step"])) for r in rows]
    lm, meta = _finite_losses(rows, "train/lm_loss"), _finite_losses(rows, "train/meta_loss")
    last = rows[-1] if rows else {}
    counted = int(float(last.get("trainer/ar_steps", 0))) + int(float(last.get("trainer/meta_steps", 0)))
    out |= {
        "logged_steps": logged,
        "lm_losses": len(lm),
        "meta_losses": len(meta),
        "losses_finite": bool(lm and meta and all(math.isfinite(v) for v in lm + meta)),
        "last_lm_loss": lm[-1] if lm else None,
        "last_meta_loss": meta[-1] if meta else None,
        "first_lm_loss": lm[0] if lm else None,
        "steps_counted": counted,
        "resume_continued": logged == list(range(1, total + 1)) and counted == total,
        "tokens_per_s": float(last["trainer/tokens_per_s"]) if last.get("trainer/tokens_per_s") else None,
    }
    out["ok"] = bool(out["losses_finite"] and out["resume_continued"] and out["resume_log_says"])
    if out["ok"] and not args.run_dir:  # a temporary run directory that passed: nothing to look at
        shutil.rmtree(run_dir.parent, ignore_errors=True)
        out["run_dir"] += " (removed after the check; pass --run-dir to keep it)"
    return out


# -- main --------------------------------------------------------------------------------------------------


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument(
        "--quick", action="store_true", help="fewer repeats; on CPU also a smaller episode and trainer run"
    )
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="autocast dtype of the steps (auto: bf16 on CUDA, fp32 on CPU)")  # fmt: skip
    p.add_argument("--profile", choices=["auto", "small", "tiny"], default="auto",
                   help="sizes: small preset (auto on CUDA) or the tiny CPU model (auto on CPU)")  # fmt: skip
    p.add_argument(
        "--vocab", type=int, default=None, help="model vocabulary (default 50304 on CUDA, 8192 on CPU)"
    )
    p.add_argument("--batch", type=int, default=None, help="AR rows (default 16 on CUDA)")
    p.add_argument("--seq", type=int, default=None, help="AR input tokens per row (default 2048 on CUDA)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None, help="untimed calls of every step before timing")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="peak TFLOP/s for MFU (overrides the table)"
    )
    p.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads, of the trainer subprocesses too (default: torch's; on a shared CPU 1 is faster)",
    )  # fmt: skip
    p.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    p.add_argument(
        "--compile-backend", default=None,
        help="torch.compile backend (default inductor; CPU --quick: aot_eager, since inductor's C++ build of "
        "each graph takes 10-40 s on a small CPU: dynamo and AOTAutograd still run, graph breaks included)",
    )  # fmt: skip
    p.add_argument("--no-trainer", action="store_true", help="skip the trainer run")
    p.add_argument("--no-bench", action="store_true", help="only the trainer run")
    p.add_argument("--trainer-precision", default="auto", help="auto: bf16-mixed on CUDA, 32-true on CPU")
    p.add_argument(
        "--trainer-steps", type=int, default=None, help="first trainer run (default 50; CPU: 20, quick 4)"
    )
    p.add_argument("--resume-steps", type=int, default=None, help="resumed run's max steps (default 60)")
    p.add_argument("--trainer-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra trainer override after the built-in ones (repeatable)")  # fmt: skip
    p.add_argument("--trainer-timeout", type=float, default=600.0, help="seconds per trainer subprocess")
    p.add_argument("--run-dir", default=None, help="trainer run directory (default: a new temporary one)")
    p.add_argument(
        "--cache-dir", default=None, help="embedded-corpus cache root (default: $PICOMAML_CACHE or ~/.cache)"
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for gpu*.{json,md}")
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    s = setting(device, args.quick, args.vocab, args.profile)
    s.batch, s.seq, s.repeats = args.batch or s.batch, args.seq or s.seq, args.repeats or s.repeats
    if args.warmup is not None:
        s.warmup = args.warmup
    if device.type == "cpu":  # an 8192^2 matmul takes seconds on a CPU
        s.matmul_n = min(s.matmul_n, 1024)
    s.trainer_steps = args.trainer_steps or s.trainer_steps
    s.resume_steps = args.resume_steps or max(s.resume_steps, s.trainer_steps + 1)
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if device.type == "cpu" and args.quick else "inductor"
    dtype_name = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32

    def amp():
        if dtype is torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    )
    if device.type == "cpu":
        n = torch.get_num_threads()
        device_name = f"CPU {platform.machine()} ({n} thread{'s' if n != 1 else ''})"

    result: dict[str, Any] = {
        "device": device_name, "device_type": device.type, "dtype": dtype_name, "quick": args.quick,
        "torch": torch.__version__, "picomaml": pm.__version__, "platform": platform.platform(),
        "compile_backend": args.compile_backend, "compile_mode": args.compile_mode,
    }  # fmt: skip
    lines: list[str] = []
    if not args.no_bench:
        measured = matmul_tflops(device, dtype, s.matmul_n, sync)
        known = known_peak(device_name) if device.type == "cuda" else None
        if args.peak_tflops:
            peak, peak_src = args.peak_tflops, f"--peak-tflops {args.peak_tflops:g}"
        elif known:
            peak, peak_src = known[1], f"table: {known[0]} dense bf16 {known[1]:g} TFLOP/s"
        else:
            peak = measured
            what = "unknown GPU" if device.type == "cuda" else "CPU"
            peak_src = f"measured {s.matmul_n}^2 {dtype_name} matmul ({what}; pass --peak-tflops for a data-sheet peak)"
        if known and dtype is torch.float32:
            peak_src += " (the steps run in fp32: MFU against a bf16 peak)"
        rows, cfg, source = build_rows(args, s, device, amp)
        print(
            f"gpu check on {device_name}, {dtype_name}: model {s.model['preset']} ({cfg.n_layers} layers, d_model "
            f"{cfg.d_model}, vocab {cfg.vocab_size}, {cfg.num_parameters() / 1e6:.1f}M params); compile backend "
            f"{args.compile_backend}; AR {s.batch} x "
            f"{s.seq}; meta {s.n_way}-way {s.k_shot}-shot {s.n_query}-query W={s.window}, {s.inner_steps} inner "
            f"steps, head {list(s.head_dims)} ({source}); median of {s.repeats} after {s.warmup} warm-up",
            flush=True,
        )  # fmt: skip
        measure(rows, s, device, sync, peak)
        by = {r.name: r for r in rows}

        def ms(name: str) -> float | None:
            return by[name].result.get("ms")

        def ratio(a: str, b: str) -> float | None:
            return ms(a) / ms(b) if ms(a) and ms(b) else None

        ratios = {
            "meta / AR (same tokens, eager)": ratio("meta eager", "AR eager, meta tokens"),
            "AR eager / AR compiled (speed-up)": ratio("AR eager", "AR compiled"),
            "meta eager / meta compiled backbone (speed-up)": ratio("meta eager", "meta, compiled backbone"),
        }
        cuda = device.type == "cuda"
        header = "| step | tokens | ms | tokens/s | TFLOP/s | MFU | saved MiB |" + (
            " peak MiB | step MiB |" if cuda else ""
        )
        header += " compile: first step s / graph breaks | note |"
        lines += [
            f"device: {device_name}; steps in {dtype_name}; model {s.model['preset']} {cfg.n_layers}L d{cfg.d_model} "
            f"V{cfg.vocab_size} ({cfg.num_parameters() / 1e6:.1f}M params); torch {torch.__version__}",
            f"peak for MFU: {peak:.4g} TFLOP/s ({peak_src}); measured {s.matmul_n}^2 {dtype_name} matmul: "
            f"{measured:.4g} TFLOP/s",
            f"FLOPs: AR {rows[0].formula}; meta {rows[2].formula}",
            f"compiled rows: torch.compile(backend={args.compile_backend!r}"
            + (f", mode={args.compile_mode!r}" if args.compile_mode else "") + "); the meta inner loop stays eager",
            "",
            header,
            "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if cuda else "") + "---|---|",
        ]  # fmt: skip
        for r in rows:
            res = r.result
            comp = ""
            if r.compiled:
                comp = f"{_fmt(res.get('first_step_s'), '.1f')} / {'n/a' if r.graph_breaks is None else r.graph_breaks}"
            mem = f" {_fmt(res.get('saved_mib'), '.1f')} |"
            if cuda:
                mem += f" {_fmt(res.get('peak_mib'), '.0f')} | {_fmt(res.get('step_mib'), '.0f')} |"
            note = (r.error or "").replace("|", "/")
            mfu = f"{100 * res['mfu']:.1f}%" if "mfu" in res else "n/a"
            lines.append(
                f"| {r.name} | {r.tokens} | {_fmt(res.get('ms'), '.2f')} | {_fmt(res.get('tokens_per_s'), ',.0f')} | "
                f"{_fmt(res.get('tflops'), '.3g')} | {mfu} |"
                f"{mem} {comp} | {note} |"
            )
        lines += ["", "| ratio | value |", "|---|---:|"]
        lines += [f"| {k} | {_fmt(v, '.2f')} |" for k, v in ratios.items()]
        result |= {
            "model": {"preset": s.model["preset"], "n_layers": cfg.n_layers, "d_model": cfg.d_model,
                      "vocab_size": cfg.vocab_size, "params": cfg.num_parameters()},
            "setting": {k: v for k, v in vars(s).items() if k not in ("trainer_sets",)},
            "episode_source": source, "peak_tflops": peak, "peak_source": peak_src, "matmul_tflops": measured,
            "rows": {r.name: {"tokens": r.tokens, "flops": r.flops, "formula": r.formula, "error": r.error,
                              "compiled": r.compiled, "graph_breaks": r.graph_breaks, **r.result} for r in rows},
            "ratios": ratios,
        }  # fmt: skip
    if not args.no_trainer:
        precision = args.trainer_precision
        if precision == "auto":
            precision = "bf16-mixed" if device.type == "cuda" else "32-true"
        print(
            f"trainer: {s.trainer_steps} steps then resume to {s.resume_steps}, --precision {precision} ...",
            flush=True,
        )
        tr = trainer_run(args, s, precision)
        result["trainer"] = tr
        if "error" in tr:
            status = f"FAILED: {tr['error']}".replace("|", "/")
        else:
            status = (
                f"{'ok' if tr['ok'] else 'NOT ok'}: losses finite {tr['losses_finite']} ({tr['lm_losses']} LM, "
                f"{tr['meta_losses']} meta; LM {tr['first_lm_loss']:.3f} -> {tr['last_lm_loss']:.3f}), resume "
                f"continued from step {tr['steps']}: {tr['resume_continued'] and tr['resume_log_says']}"
            )
        lines += [
            "",
            f"| trainer ({precision}, hybrid interleave) | corpus s | first run s | resume s | tokens/s (last log) | result |",
            "|---|---:|---:|---:|---:|---|",
            f"| {tr['steps']} steps, resume to {tr['resume_steps']} | {_fmt(tr.get('corpus_s'), '.1f')} | "
            f"{_fmt(tr.get('first_s'), '.1f')} | {_fmt(tr.get('resume_s'), '.1f')} | "
            f"{_fmt(tr.get('tokens_per_s'), ',.0f')} | {status} |",
            f"(corpus: loaded or built once into {tr.get('corpus_cache')}; each run's seconds include the "
            "trainer's start-up: imports, Fabric, evaluation at the last step, checkpoint, plot)",
        ]
    result["total_s"] = time.perf_counter() - t_start
    lines += ["", f"total wall time {result['total_s']:.1f} s"]
    table = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "gpu" + ("" if device.type == "cuda" else "_cpu") + ("_quick" if args.quick else "")
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    (args.out / f"{name}.md").write_text(table + "\n")
    print(table)
    return result


if __name__ == "__main__":
    main()
