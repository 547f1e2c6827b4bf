#!/usr/bin/env python
"""Meta-pretrain a PicoDecoder with hybrid next-token + SMLMT-MAML training on Lightning Fabric.

    picomaml train                                             # tiny-cpu, embedded corpus
    picomaml train --config pico-maml-tiny --devices 8         # a shipped config by name, or a YAML path
    picomaml train --set hybrid.ratio=0.25 --max-steps 500 --resume auto --export-hf

Each optimizer step the HybridScheduler plans the AR objective, the meta objective, or (weighted mode)
both, for all micro-batches of the step. A meta step samples SMLMT episodes from the step's token rows,
runs the backbone once over support and query windows, adapts the head in the inner loop and
back-propagates the query loss. Outputs go to the run directory (see README.md, "Run directory").

The reference recipe, to copy and edit: ``picomaml cp recipe my_run/`` writes this file as
``my_run/train_smlmt.py``; it imports only the installed package, so the copy runs as
``python my_run/train_smlmt.py``. Setup, then the loop (train step, log/evaluate, save), then a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)

import torch  # noqa: E402

import picomaml as pm  # noqa: E402
from picomaml._optional import require  # noqa: E402
from picomaml.data.pipeline import TrainingData, build_training_data  # noqa: E402
from picomaml.eval import evaluate_during_training  # noqa: E402
from picomaml.train import training  # noqa: E402
from picomaml.train.budget import check_memory, device_memory, experiment_step_flops  # noqa: E402
from picomaml.train.build import RunComponents, build_run, eval_episode_kwargs  # noqa: E402
from picomaml.train.catalog import config_names, resolve_config  # noqa: E402
from picomaml.train.meta_update import step_kind, update_norm  # noqa: E402
from picomaml.train.preemption import PREEMPTED_EXIT, Preempted, StopRequested, StopSignals  # noqa: E402
from picomaml.train.rng_state import capture_rng_state, restore_rng_state  # noqa: E402
from picomaml.train.run_checkpoint import (  # noqa: E402
    check_dynamics_layers,
    dynamics_rows,
    heldout_rows_needed,
    hub_uploader,
    save_run_checkpoint,
)  # fmt: skip
from picomaml.train.run_dir import RESUME_HELP, USER_ERRORS, RunDirError, check_writable, error_line, open_run  # noqa: E402
from picomaml.train.tracking import MetricsTracker, plot_curves  # noqa: E402

log = logging.getLogger("picomaml.train.recipe")
DEFAULT_CONFIG = "tiny-cpu"  # a shipped config (picomaml/train/configs/) or a YAML path
# what a log line shows (metrics.csv has everything)
SHOWN = (
    "train/lm_loss", "train/meta_loss", "meta/support_acc_after", "meta/query_acc", "eval/perplexity",
    "eval/fewshot_acc", "eval/fewshot_acc_ci", "eval/fewshot_acc_ncm", "trainer/lr/model", "trainer/tokens_per_s",
)  # fmt: skip
FLAGS = ("max_steps", "log_every", "save_every", "eval_every", "devices", "strategy", "precision")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The recipe's command line (every option says its default)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument(
        "--config", default=DEFAULT_CONFIG,
        help=f"a YAML path or a shipped config: {', '.join(config_names())} (default: %(default)s)",
    )  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, repeatable, e.g. hybrid.ratio=0.25 (default: none)")  # fmt: skip
    p.add_argument("--run-dir", help="outputs: config, metrics, checkpoints, plots (default: runs/<config name>; "
                   "for RUN/config.yaml, runs/<RUN's name>)")  # fmt: skip
    p.add_argument("--resume", default="auto", help=f"{RESUME_HELP} (default: %(default)s)")
    shipped = pm.load_config(resolve_config(DEFAULT_CONFIG)).trainer
    for flag in FLAGS:  # shorthands for trainer.<flag>
        p.add_argument(f"--{flag.replace('_', '-')}", dest=flag,
                       help=f"trainer.{flag} (default: the config's; {DEFAULT_CONFIG}: {getattr(shipped, flag)})")  # fmt: skip
    p.add_argument("--logger", action="append", choices=["csv", "tensorboard", "wandb"],
                   help=f"repeatable; csv is always written (default: the config's trainer.loggers; {DEFAULT_CONFIG}: "
                   f"{', '.join(shipped.loggers)})")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="trainer.compile=true: torch.compile the backbone (default: off)")
    p.add_argument("--export-hf", action="store_true",
                   help="at the end, save the model for transformers in RUN_DIR/hf (needs picomaml[hf]; default: off)")  # fmt: skip
    return p


def parse_args(argv: Sequence[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """Parse the command line; ``--max-steps`` and the other shorthands become ``--set trainer.<flag>``."""
    args = build_parser(prog).parse_args(argv)
    args.set += [f"trainer.{k}={getattr(args, k)}" for k in FLAGS if getattr(args, k) is not None]
    if args.logger:
        args.set.append(f"trainer.loggers=[{', '.join(args.logger)}]")
    if args.compile:
        args.set.append("trainer.compile=true")
    args.run_dir = args.run_dir or str(Path("runs") / default_run_name(args.config))
    return args


def default_run_name(config: str) -> str:
    """``runs/<this>`` when ``--run-dir`` is not given: a shipped config's name, a YAML file's stem, or for a
    run's own ``config.yaml`` (``--config runs/a/config.yaml``) its folder's name, so it extends that run."""
    path = Path(config)
    if path.name == "config.yaml" and path.parent.name:
        return path.parent.name
    return path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.stem


def make_fabric(cfg: pm.ExperimentConfig):
    L, t = require("lightning", "fabric", "the reference trainer"), cfg.trainer
    strategy = t.strategy
    if strategy == "ddp" or (strategy == "auto" and t.devices > 1):
        # AR steps leave the head unused and meta steps the LM head: DDP must allow unused parameters
        strategy = L.fabric.strategies.DDPStrategy(find_unused_parameters=True)
    try:
        return L.Fabric(accelerator=t.accelerator, devices=t.devices, strategy=strategy, precision=t.precision)
    except (RuntimeError, ValueError) as exc:  # a setting this machine cannot run, in Lightning's words
        raise pm.ConfigError(f"trainer.accelerator={t.accelerator!r} devices={t.devices}: {exc}") from None


@dataclass
class Trainer:
    """Everything the loop touches; built once by `setup`."""

    cfg: pm.ExperimentConfig
    fabric: Any
    data: TrainingData
    run: RunComponents
    learner: Any  # run.learner wrapped by Fabric
    optimizer: Any  # run.optimizer wrapped by Fabric
    run_dir: Path
    dynamics_rows: dict[str, torch.Tensor]
    tracker: MetricsTracker | None = None
    step: int = 0
    counters: dict[str, float] = field(default_factory=training.new_counters)
    guard: training.NonFiniteGuard | None = None
    hub: Any = None  # the Hub uploader (checkpoint.hub_repo), main process only
    stop: StopSignals = field(default_factory=StopSignals)  # Ctrl-C, SIGTERM, SIGUSR1: a flag in the loop
    interrupted: str | None = None  # why the loop stops: set on every rank at once (see sync)
    saved_step: int | None = None  # the step of the newest checkpoint this process wrote
    updating: bool = False  # inside the optimizer update: no consistent state to save until the step ends
    meta_optimizer: Any = None  # run.meta_optimizer wrapped by Fabric (optim.meta_moments=separate)

    @property
    def is_main(self) -> bool:
        return self.fabric.global_rank == 0

    def stateful(self) -> dict[str, Any]:
        wrapped = {"optimizer": self.optimizer, "data": self.data.train}
        return self.run.stateful() | wrapped | ({"meta_optimizer": self.meta_optimizer} if self.meta_optimizer is not None else {})


def setup(args: argparse.Namespace, stack: contextlib.ExitStack, stop: StopSignals) -> Trainer:
    cfg = pm.load_config(resolve_config(args.config), args.set)  # every config error surfaces here, before any work
    if args.export_hf:
        require("transformers", "hf", "--export-hf")  # now, not after the run
    fabric = make_fabric(cfg)
    fabric.launch()
    rank, world = fabric.global_rank, fabric.world_size
    check_memory(cfg, device_memory(str(fabric.device)), world)  # a config that cannot fit: refused now
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=fmt)
    run_dir = Path(args.run_dir)
    # rank 0 locks the run directory and plans the start: every refusal (in use, no usable checkpoint,
    # another architecture, a damaged metrics.csv) comes before any change; the stack releases the lock
    start = stack.enter_context(open_run(run_dir, args.resume, cfg, is_main=rank == 0, broadcast=fabric.broadcast))
    data = build_training_data(cfg.data, seed=cfg.seed, rank=rank, world_size=world, eval_rows=heldout_rows_needed(cfg))
    training.check_run(cfg, data, world)  # vocabulary, tasks per device, training and evaluation episodes
    tok = data.tokenizer
    sampler_seed = cfg.seed + (0 if data.train.shared else rank)
    run = build_run(cfg, mask_token_id=tok.mask_token_id, special_ids=data.special_ids, sampler_seed=sampler_seed)
    check_dynamics_layers(cfg, run.model)  # a misspelt dynamics layer fails now, not at the first save
    # a read-only or full run directory fails now, not at the first save (rank 0 checks, every rank learns)
    weights = sum(p.numel() * p.element_size() for p in (*run.model.parameters(), *run.head.parameters()))
    problem = None
    if rank == 0:
        try:
            moments = 4 if cfg.optim.meta_moments == "separate" else 2  # AdamW's two moments (twice: separate)
            check_writable(run_dir, need_bytes=(1 + moments) * weights)
        except RunDirError as exc:
            problem = str(exc)
    if (problem := fabric.broadcast(problem)) is not None:
        raise RunDirError(problem)
    learner, *optimizers = fabric.setup(run.learner, *(o for o in (run.optimizer, run.meta_optimizer) if o))
    dyn_rows = dynamics_rows(cfg, data.train, data.heldout_rows) if cfg.checkpoint.learning_dynamics else {}
    t = Trainer(cfg, fabric, data, run, learner, optimizers[0], run_dir, dyn_rows, stop=stop)
    t.meta_optimizer = optimizers[1] if len(optimizers) > 1 else None
    t.hub = hub_uploader(cfg, run_dir, t.is_main, stack)  # pushes each checkpoint in the background
    # the hybrid schedule is a pure function of the config and step (saved only for the record), so a
    # run extended with a larger --max-steps follows the new schedule like the LR does
    # RNG states too; every state and counter is checked against the built run before anything is loaded
    state = start.restore({k: v for k, v in t.stateful().items() if k != "hybrid"}, counters=training.COUNTERS)
    if state is not None:
        t.counters.update(state.counters)
        t.step = state.step
    t.guard = training.NonFiniteGuard(cfg.trainer.max_nonfinite_skips, state=t.counters)  # a streak continues
    start.commit(cfg)  # rank 0: an earlier run moved aside, config changes recorded, then config.yaml
    t.tracker = start.tracker(cfg)  # continues metrics.csv from the resumed step
    return t


def train_step(t: Trainer, window: training.MetricWindow) -> bool:
    """One optimizer step over ``data.grad_accum`` micro-batches; False at the end of the data."""
    cfg, fabric, run = t.cfg, t.fabric, t.run
    plan, accum, world = run.hybrid.plan(t.step), cfg.data.grad_accum, fabric.world_size
    if cfg.trainer.meta_noop and "meta" in plan.objectives:  # the schedule control: the meta part is skipped
        plan = plan._replace(objectives=tuple(k for k in plan.objectives if k != "meta"))
        if not plan.objectives:
            return noop_step(t)
    losses = []
    try:
        for micro in range(accum):
            batch = t.data.train.next_batch()
            rows = t.data.train.local(batch).to(fabric.device)
            episode = None
            if "meta" in plan.objectives:
                episode = training.meta_episode(
                    run.sampler, batch, rows, cfg.meta.n_tasks, t.data.train.shared, fabric.global_rank, world
                ).to(fabric.device)
                t.counters["tokens"] += (episode.support_ids.numel() + episode.query_ids.numel()) * world
            if "ar" in plan.objectives:
                t.counters["tokens"] += rows.numel() * world
            ar_rows = rows if "ar" in plan.objectives else None
            with fabric.no_backward_sync(t.learner, enabled=micro < accum - 1):
                out = t.learner(rows=ar_rows, episode=episode, w_ar=plan.w_ar, w_meta=plan.w_meta)
                fabric.backward(out.loss / accum)
            if out.lm_loss is not None:
                losses.append(out.lm_loss.item())
                window.add({"train/lm_loss": losses[-1]})
            if out.meta is not None:
                losses.append(out.meta.loss.item())
                window.add({"train/meta_loss": losses[-1]})
                window.add_inner_loop({k: v for k, v in out.meta.metrics.items() if k != "query_loss"})
    except StopIteration:
        t.optimizer.zero_grad(set_to_none=True)
        return False
    if "meta" in plan.objectives:
        window.add({"meta/head_grad_norm": training.global_grad_norm(run.head.parameters())})
    update(t, losses, window, step_kind(plan.objectives))
    t.counters["ar_steps"] += "ar" in plan.objectives
    t.counters["meta_steps"] += "meta" in plan.objectives
    t.counters["flops"] += experiment_step_flops(cfg, plan.objectives)
    t.step += 1
    t.updating = False
    return True


def noop_step(t: Trainer) -> bool:
    """A meta-only step under ``trainer.meta_noop``: its batches are drawn (the data order stays that of the
    run it controls), the LR schedule advances, nothing is computed or updated; False at the end of the data."""
    try:
        for _ in range(t.cfg.data.grad_accum):
            t.data.train.next_batch()
    except StopIteration:
        return False
    sync(t)  # a stop signal ends the run after this step, as after any other
    t.run.lr_scheduler.step()
    t.counters["noop_steps"] += 1
    t.step += 1
    return True


def update(t: Trainer, losses: list[float], window: training.MetricWindow, kind: str = "ar") -> None:
    """Rescale a meta gradient (``optim.meta_grad_norm``), clip, then step the optimizer (a meta step's own
    under ``optim.meta_moments=separate``) unless a loss or the gradient is non-finite on any rank."""
    clip, scale = t.cfg.optim.grad_clip, t.run.meta_scale
    optimizer = t.meta_optimizer if kind == "meta" and t.meta_optimizer is not None else t.optimizer
    if kind == "meta" and scale is not None and (raw := scale.rescale_(list(t.learner.parameters()))) is not None:
        window.add({"meta/grad_norm_raw": raw})
    if clip is not None:
        grad_norm = float(t.fabric.clip_gradients(t.learner, optimizer, max_norm=clip, error_if_nonfinite=False))
    else:
        grad_norm = training.global_grad_norm(t.learner.parameters())
    window.add({"trainer/grad_norm": grad_norm})
    clipped = grad_norm if clip is None else min(grad_norm, clip)  # what the optimizer is given
    finite = bool(torch.isfinite(torch.tensor([grad_norm, *losses])).all())
    before = [p.detach().clone() for p in t.run.model.parameters()] if t.cfg.eval.update_norms else None
    # the same flag on every rank: all skip together, and all stop together (NonFiniteRunError) at the limit
    if t.guard.record(not sync(t, nonfinite=not finite), step=t.step + 1):
        t.updating = True  # from here to the step's end the weights are ahead of t.step
        if optimizer is not t.optimizer:  # the meta moments follow the one LR schedule
            for mine, main in zip(optimizer.param_groups, t.optimizer.param_groups, strict=True):
                mine["lr"] = main["lr"]
        optimizer.step()
        if kind == "ar" and scale is not None:
            scale.observe_ar(clipped)
        if before is not None:
            moved = update_norm(list(t.run.model.parameters()), before)
            window.add({f"train/update_norm_{kind}": moved, f"train/clipped_grad_norm_{kind}": clipped})
    t.counters.update(t.guard.state_dict())
    optimizer.zero_grad(set_to_none=True)
    t.run.lr_scheduler.step()


def sync(t: Trainer, nonfinite: bool = False) -> bool:
    """Max over ranks of [this step non-finite, stop-signal code]: a signal to any rank stops every rank after
    the same step. Returns whether any rank's step was non-finite."""
    flags = torch.tensor([float(nonfinite), float(t.stop.code)], device=t.fabric.device)
    any_nonfinite, code = t.fabric.all_reduce(flags, reduce_op="max").tolist()
    if code and t.interrupted is None:
        t.interrupted = t.stop.received if t.stop.code == code else StopSignals.name_of(int(code))
        log.warning("%s: stopping after step %d: saving a checkpoint, then exiting", t.interrupted, t.step)
    return any_nonfinite > 0


def log_and_evaluate(t: Trainer, window: training.MetricWindow, elapsed: float, tokens0: float, quiet: bool) -> None:
    cfg, run = t.cfg, t.run
    metrics = window.means() | {f"trainer/{k}": float(v) for k, v in t.counters.items()}
    metrics |= training.group_lrs(t.optimizer)
    metrics["trainer/tokens_per_s"] = (t.counters["tokens"] - tokens0) / max(elapsed, 1e-9)
    metrics["meta/head_weight_norm"] = math.sqrt(sum(float(p.detach().pow(2).sum()) for p in run.head.parameters()))
    if cfg.eval.grad_cos_every and t.step % cfg.eval.grad_cos_every == 0 and t.is_main:  # AR vs meta gradients
        metrics |= training.grad_conflict_metrics(run, cfg, t.data, t.step)
    if t.step % cfg.trainer.eval_every == 0 or t.step == cfg.trainer.max_steps:
        if t.is_main and t.stop.received is not None:
            log.warning("%s: evaluation at step %d skipped (stopping)", t.stop.received, t.step)
        elif t.is_main:
            episode_args = eval_episode_kwargs(cfg, t.data.tokenizer.mask_token_id, t.data.special_ids)
            try:  # a stop signal ends the evaluation after its current batch of episodes
                metrics |= evaluate_during_training(
                    run.model, run.head, run.inner_loop, t.data.heldout_rows, cfg.eval, episode_args,
                    progress=t.stop.raise_if_stopped,
                )  # fmt: skip
            except StopRequested:
                log.warning("%s: evaluation at step %d stopped; its metrics are not logged", t.stop.received, t.step)
        sync(t)  # every rank waits for the evaluation, and learns of a signal that came during it
    t.tracker.log(t.step, metrics)
    if t.is_main and not quiet:  # the progress bar shows the losses instead
        shown = " ".join(f"{k}={metrics[k]:.4g}" for k in SHOWN if k in metrics)
        log.info("step %d/%d %s", t.step, cfg.trainer.max_steps, shown)


def save(t: Trainer) -> None:
    if t.is_main and t.saved_step != t.step:  # state, HF export, dynamics (every step's kept), Hub upload
        save_run_checkpoint(
            t.run_dir, t.step, t.stateful(), t.cfg, t.counters, t.run.model, t.data.tokenizer, t.dynamics_rows, t.hub,
        )  # fmt: skip
    t.saved_step = t.step
    sync(t)  # every rank waits for the save, and learns of a signal that came during it


def train(t: Trainer) -> str:
    """The loop: train step, log (and evaluate) at ``training.is_log_step``, save every ``save_every``."""
    trainer_cfg = t.cfg.trainer
    t.stop.enter_loop()  # from here a signal only sets a flag: no step, save or evaluation is cut
    with training.ProgressBar(trainer_cfg.max_steps, t.step, enabled=t.is_main and sys.stderr.isatty()) as bar:
        window, last_log, tokens_at_log = training.MetricWindow(), time.perf_counter(), t.counters["tokens"]
        end_reason = "max_steps"
        if t.step == 0 and t.cfg.checkpoint.learning_dynamics:
            save(t)  # step 0's dynamics: where every analysis starts
        while t.step < trainer_cfg.max_steps:
            if t.interrupted:
                end_reason = f"interrupted by {t.interrupted}"
                break
            before = step_start(t)
            try:
                if not train_step(t, window):
                    end_reason = "end of data"
                    break
                bar.update(window)
                if training.is_log_step(t.cfg, t.step):
                    now = time.perf_counter()
                    log_and_evaluate(t, window, now - last_log, tokens_at_log, quiet=bar.active)
                    window.clear()
                    last_log, tokens_at_log = now, t.counters["tokens"]
            except Exception as exc:  # the trained steps are saved (when consistent), then the error goes on
                emergency_save(t, before, exc)
                raise
            if t.step % trainer_cfg.save_every == 0 and t.step < trainer_cfg.max_steps:
                save(t)
        save(t)  # always: max steps, end of data or a stop signal (unless this step is saved already)
    if t.stop.count > 1:
        log.warning("%d more stop signals came while stopping; the checkpoint was finished first", t.stop.count - 1)
    return end_reason


def step_start(t: Trainer) -> dict[str, Any]:
    """What a step changes besides the weights (cheap to copy): data position, sampler, RNGs, counters."""
    return {
        "step": t.step, "data": t.data.train.state_dict(), "sampler": t.run.sampler.state_dict(),
        "rng": capture_rng_state(), "counters": dict(t.counters),
    }  # fmt: skip


def emergency_save(t: Trainer, before: dict[str, Any], exc: BaseException) -> None:
    """After an error, save the last completed step if that state is consistent, or say why not.

    A step that failed before its optimizer update left the weights, optimizer and schedule of the last
    completed step; its data position, sampler, RNG and counters go back to the step's start, so the
    checkpoint is the one a save at that step would have written, and a resume repeats the failed step.
    An error in the logging or evaluation after a step saves that step as it is. One process only: with
    several ranks the others are inside a collective and cannot join a save.
    """
    what = f"{type(exc).__name__} in step {t.step + 1}"
    why = None
    if t.fabric.world_size > 1:
        why = "the other ranks cannot join a save after an error on one rank"
    elif t.updating:
        why = "it came during the optimizer update, so the weights may be half-updated"
    elif t.step == 0 or t.saved_step == t.step:
        why = f"step {t.step} is {'saved already' if t.step else 'the start: nothing trained yet'}"
    if why is not None:
        log.error("%s: no emergency checkpoint (%s)", what, why)
        return
    if t.step == before["step"]:  # the step failed (not its logging or evaluation): undo its side effects
        t.data.train.load_state_dict(before["data"])
        t.run.sampler.load_state_dict(before["sampler"])
        restore_rng_state(before["rng"])
        t.counters.clear()
        t.counters.update(before["counters"])
    t.optimizer.zero_grad(set_to_none=True)
    try:
        save(t)
    except Exception as save_exc:  # noqa: BLE001 - the original error is the one that goes on
        log.error("%s: the emergency checkpoint of step %d failed too: %s", what, t.step, save_exc)
        return
    log.error("%s: saved an emergency checkpoint of step %d (the last completed one); fix the cause, then "
              "resume with --resume auto", what, t.step)  # fmt: skip


def summarize(t: Trainer, end_reason: str, seconds: float, export_hf: bool, preempted: bool) -> None:
    d = t.run_dir
    try:  # a plot that cannot be written (full disk) does not turn a finished run into a failed one
        png = plot_curves(d / "metrics.csv", d / "curves.png", title=f"{d.name} ({end_reason})")
    except OSError as exc:
        png = f"not written ({exc})"
    last = t.tracker.rows[-1] if t.tracker.rows else {}
    print(f"\n{training.run_summary(t.step, t.counters, end_reason, seconds, last)}\nconfig: {d / 'config.yaml'}")
    print(f"metrics: {d / 'metrics.csv'}\ncheckpoints: {d / 'checkpoints'}\ncurves: {png}")
    if export_hf and preempted:  # the grace period is for the checkpoint; the export can be made from it
        print("transformers export: skipped (preempted); `picomaml export` makes it from the checkpoint")
    elif export_hf:  # the final model, loadable with transformers' AutoModelForCausalLM.from_pretrained
        print(f"transformers export: {pm.export_hf(t.run.model, d / 'hf', t.data.tokenizer)}")
    print(training.run_status(d, t.cfg.trainer.loggers, t.step, t.hub, finished=not end_reason.startswith("interrupted")))


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Parse ``argv``, train, summarize; the exit status (exceptions propagate: see [`run`][picomaml.train.recipe.run])."""
    t0 = time.perf_counter()
    args = parse_args(argv, prog)
    # the signal handlers are entered first, so they are restored last: after the lock is released
    with StopSignals() as stop, contextlib.ExitStack() as stack:  # the lock is released on every exit path
        t = setup(args, stack, stop)  # a stop signal in here raises Preempted (see run)
        end_reason = train(t)
        # a run that reached its end in the same step is finished, whatever signal came in meanwhile
        preempted = end_reason.startswith("interrupted") and t.interrupted != "SIGINT"
        t.tracker.close()
        if t.is_main:
            summarize(t, end_reason, time.perf_counter() - t0, args.export_hf, preempted)
    # rank 0 alone reports the preemption: launchers (Lightning's, torchrun) treat a worker's non-zero
    # exit as a crash and kill the others, rank 0 included, before it has finished
    return PREEMPTED_EXIT if preempted and t.is_main else 0


def run(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """[`main`][picomaml.train.recipe.main] for a command line: the user's errors (a config key, the run
    directory, too many non-finite steps) are one line on stderr and exit status 2, not a traceback."""
    try:
        return main(argv, prog)
    except (*USER_ERRORS, training.NonFiniteRunError, pm.MissingDependencyError) as exc:  # the user's to fix
        print(error_line(exc), file=sys.stderr)  # one bounded line
        return 2
    except OSError as exc:  # a missing file, a full disk, a file that cannot be written: the message names it
        print(error_line(exc), file=sys.stderr)
        return 2 if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)) else 1
    except Preempted as exc:  # a stop signal before training began: nothing trained, the lock released
        print(f"{exc}; nothing was trained", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:  # Ctrl-C outside the handlers (before they are installed)
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run())
