#!/usr/bin/env python
"""Meta-pretrain a PicoDecoder with hybrid next-token + SMLMT-MAML training on Lightning Fabric.

    python examples/train_smlmt.py                                   # tiny-cpu.yaml, embedded corpus
    python examples/train_smlmt.py --config examples/configs/pico-maml-tiny.yaml --devices 8
    python examples/train_smlmt.py --set hybrid.ratio=0.25 --max-steps 500 --resume auto

Each optimizer step the HybridScheduler picks the AR objective, the meta objective, or (weighted mode)
both, for all micro-batches of the step. A meta step samples SMLMT episodes from the step's token rows,
runs the backbone once over support and query windows, adapts the head in the inner loop and
back-propagates the query loss. Outputs go to the run directory (see README.md, "Run directory").
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)

import torch  # noqa: E402

import picomaml as pm  # noqa: E402
from picomaml import checkpoint as ckpt  # noqa: E402
from picomaml.data.pipeline import build_training_data  # noqa: E402
from picomaml.dynamics import capture_learning_dynamics, learning_dynamics_writer  # noqa: E402
from picomaml.eval import check_eval_episodes, evaluate_during_training, experiment_step_flops  # noqa: E402
from picomaml.learner import HybridLearner  # noqa: E402
from picomaml.optim import build_lr_scheduler, build_optimizer  # noqa: E402
from picomaml.tracking import MetricsTracker, plot_curves  # noqa: E402

log = logging.getLogger("train_smlmt")
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tiny-cpu.yaml"
# what a log line shows (metrics.csv has everything)
SHOWN = (
    "train/lm_loss",
    "train/meta_loss",
    "meta/support_acc_after",
    "meta/query_acc",
    "eval/perplexity",
    "eval/fewshot_acc",
    "eval/fewshot_acc_ci",
    "eval/fewshot_acc_before",
    "trainer/lr",
    "trainer/tokens_per_s",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: tiny-cpu.yaml)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. hybrid.ratio=0.25"
    )
    p.add_argument("--max-steps", type=int, help="optimizer steps (trainer.max_steps)")
    p.add_argument("--run-dir", default="runs/tiny-cpu", help="outputs: config, metrics, checkpoints, plots")
    p.add_argument("--resume", default="auto", help="auto (latest in run dir, if any) | PATH | none")
    p.add_argument("--log-every", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--devices", type=int)
    p.add_argument("--strategy", choices=["auto", "ddp", "fsdp"])
    p.add_argument("--precision", help="Fabric precision, e.g. 32-true, bf16-mixed")
    p.add_argument("--logger", action="append", choices=["csv", "tensorboard", "wandb"], help="repeatable")
    args = p.parse_args(argv)
    flags = {
        "max_steps": args.max_steps,
        "log_every": args.log_every,
        "save_every": args.save_every,
        "eval_every": args.eval_every,
        "devices": args.devices,
        "strategy": args.strategy,
        "precision": args.precision,
        "loggers": args.logger,
    }
    args.set += [f"trainer.{k}={v}" for k, v in flags.items() if v is not None]
    return args


def make_fabric(cfg: pm.ExperimentConfig):
    from picomaml._optional import require

    L = require("lightning", "fabric", "the reference trainer")
    strategy = cfg.trainer.strategy
    if strategy == "fsdp":  # checkpoints here gather full states on rank 0, which FSDP shards
        raise pm.ConfigError(
            "trainer.strategy: 'fsdp' is not supported by this trainer yet; use 'ddp' "
            "(570M parameters with AdamW fit one 40 GB GPU per rank)"
        )
    if strategy == "ddp" or (strategy == "auto" and cfg.trainer.devices > 1):
        # AR steps leave the head unused and meta steps the LM head: DDP must allow unused parameters
        strategy = L.fabric.strategies.DDPStrategy(find_unused_parameters=True)
    return L.Fabric(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        strategy=strategy,
        precision=cfg.trainer.precision,
    )


def task_share(episode: pm.Episode, rank: int, world: int) -> pm.Episode:
    """This rank's tasks of a stacked episode that every rank sampled identically."""
    share = episode.n_tasks // world
    return pm.Episode.stack([episode.task(i) for i in range(rank * share, (rank + 1) * share)])


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = pm.load_config(args.config, args.set)  # every config error surfaces here, before any work
    run_dir, root = Path(args.run_dir), Path(args.run_dir) / "checkpoints"
    fabric = make_fabric(cfg)
    fabric.launch()
    rank, world, is_main = fabric.global_rank, fabric.world_size, fabric.global_rank == 0
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if cfg.meta.n_tasks % world:
        raise pm.ConfigError(f"meta.n_tasks: {cfg.meta.n_tasks} must be divisible by the {world} devices")

    # ---- data, model, head, inner loop, optimizer -------------------------------------------------
    data = build_training_data(cfg.data, seed=cfg.seed, rank=rank, world_size=world, eval_rows=cfg.eval.rows)
    tok, mask_id = data.tokenizer, data.tokenizer.mask_token_id
    if tok.vocab_size > cfg.model.vocab_size:
        raise pm.ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
            f"{tok.vocab_size} tokens"
        )
    sampler_kwargs = vars(cfg.sampler) | {
        "mask_token_id": mask_id,
        "exclude_token_ids": cfg.sampler.exclude_token_ids + data.special_ids,
    }
    sampler = pm.SMLMTSampler(**sampler_kwargs, seed=cfg.seed + (0 if data.train.shared else rank))
    hybrid = pm.HybridScheduler(
        **vars(cfg.hybrid) | {"total_steps": cfg.hybrid.total_steps or cfg.trainer.max_steps}, seed=cfg.seed
    )
    position = data.train.state_dict()
    probe = data.train.next_batch()
    data.train.load_state_dict(position)
    if max(cfg.hybrid.ratio, cfg.hybrid.final_ratio) > 0:  # fail fast: impossible episodes stop the run here
        try:
            pm.SMLMTSampler(**sampler_kwargs).sample(probe)
        except pm.SamplingError as exc:
            raise pm.ConfigError(f"sampler: no episode can be drawn from a training batch: {exc}") from exc
    check_eval_episodes(cfg, data.heldout_rows, mask_id, data.special_ids)

    torch.manual_seed(cfg.seed)  # the only global-RNG use: weight initialisation, identical on all ranks
    model = pm.PicoDecoder(cfg.model)
    head = pm.MetaHead(in_dim=cfg.model.d_model, n_way=cfg.sampler.n_way, **vars(cfg.head), seed=cfg.seed)
    loop = pm.InnerLoop(**vars(cfg.inner_loop))
    if cfg.inner_loop.learn_lr:
        loop.bind(head)
    learner = HybridLearner(model, head, loop, cfg.meta.pooling, cfg.meta.feature_norm)
    optimizer = build_optimizer(
        {"model": model, "head": head, "inner_loop": loop},
        cfg.optim.lr,
        cfg.optim.weight_decay,
        cfg.optim.betas,
        cfg.optim.eps,
        lr_overrides={"head": cfg.meta.head_lr, "inner_loop": cfg.meta.head_lr},
    )
    scheduler = build_lr_scheduler(
        optimizer, cfg.optim.warmup_steps, cfg.trainer.max_steps, cfg.optim.decay, cfg.optim.min_lr_ratio
    )
    learner, optimizer = fabric.setup(learner, optimizer)
    counters = {"ar_steps": 0, "meta_steps": 0, "tokens": 0, "flops": 0, "nonfinite_skipped": 0}
    stateful = {
        "model": model,
        "head": head,
        "inner_loop": loop,
        "optimizer": optimizer,
        "lr_scheduler": scheduler,
        "sampler": sampler,
        "hybrid": hybrid,
        "data": data.train,
    }

    # ---- resume -----------------------------------------------------------------------------------
    start = 0
    resume_dir = ckpt.resolve_resume(None if args.resume == "none" else args.resume, root)
    if resume_dir is not None:
        state = ckpt.load_checkpoint(resume_dir)
        # the hybrid schedule is a pure function of the config and step (saved only for the record), so a
        # run extended with a larger --max-steps follows the new schedule like the LR does
        state.load_into({k: v for k, v in stateful.items() if k != "hybrid"})
        state.restore_rng()
        counters.update(state.counters)
        start = state.step
        log.info("resumed from %s at step %d", resume_dir, start)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        pm.config.dump_config(cfg, run_dir / "config.yaml")
    tracker = MetricsTracker(
        run_dir,
        cfg.trainer.loggers,
        enabled=is_main,
        config=cfg.to_dict(),
        resume_step=start,
        wandb_project=cfg.trainer.wandb_project,
        wandb_offline=cfg.trainer.wandb_offline,
    )

    def save(step: int) -> None:
        if is_main:
            writers = {}
            if cfg.checkpoint.hf_export:
                writers["hf"] = lambda d: ckpt.export_hf(model, d, tok)
            if cfg.checkpoint.learning_dynamics:
                captured = {
                    split: capture_learning_dynamics(
                        model, rows, cfg.checkpoint.dynamics_layers, cfg.checkpoint.dynamics_seq_idx
                    )
                    for split, rows in dyn_rows.items()
                    if rows.shape[0]
                }
                writers["learning_dynamics"] = learning_dynamics_writer(captured)
            path = ckpt.save_checkpoint(
                root,
                step,
                stateful,
                config=cfg.to_dict(),
                counters=counters,
                writers=writers,
                keep_last=cfg.checkpoint.keep_last,
            )
            log.info("checkpoint: %s", path)
        fabric.barrier()

    # learning dynamics on fixed train and held-out rows, cut to the model's seq_len inputs
    n = cfg.checkpoint.dynamics_batch_size
    dyn_rows = {"train": data.train.local(probe)[:n, :-1], "val": data.heldout_rows[:n, :-1]}

    # ---- training loop ----------------------------------------------------------------------------
    bar = None
    if is_main and sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.trainer.max_steps, initial=start, desc="train", dynamic_ncols=True)
    interrupted = False

    def on_sigint(signum, frame):
        nonlocal interrupted
        interrupted = True
        log.warning("interrupt: finishing this step, then saving a checkpoint")

    signal.signal(signal.SIGINT, on_sigint)
    step, last_log, tokens_at_log, t0 = start, time.perf_counter(), counters["tokens"], time.perf_counter()
    window = {}
    end_reason = "max_steps"
    accum = cfg.data.grad_accum
    while step < cfg.trainer.max_steps:
        if interrupted:
            end_reason = "interrupted"
            break
        kinds = hybrid.objectives(step)
        w_ar, w_meta = hybrid.weights(step) if len(kinds) == 2 else (1.0, 1.0)
        lm_vals, meta_metrics = [], []
        try:
            for micro in range(accum):
                batch = data.train.next_batch()
                rows = data.train.local(batch).to(fabric.device)
                episode = None
                if "meta" in kinds:
                    if data.train.shared:
                        episode = task_share(sampler.sample(batch, n_tasks=cfg.meta.n_tasks), rank, world)
                    else:
                        episode = sampler.sample(rows, n_tasks=cfg.meta.n_tasks // world)
                    episode = episode.to(fabric.device)
                    counters["tokens"] += (
                        episode.support_ids.numel() * world + episode.query_ids.numel() * world
                    )
                if "ar" in kinds:
                    counters["tokens"] += rows.numel() * world
                with fabric.no_backward_sync(learner, enabled=micro < accum - 1):
                    out = learner(
                        rows=rows if "ar" in kinds else None, episode=episode, w_ar=w_ar, w_meta=w_meta
                    )
                    fabric.backward(out.loss / accum)
                if out.lm_loss is not None:
                    lm_vals.append(out.lm_loss.item())
                if out.meta is not None:
                    meta_metrics.append({"train/meta_loss": out.meta.loss.item(), **out.meta.metrics})
        except StopIteration:
            end_reason = "end of data"
            optimizer.zero_grad(set_to_none=True)
            break
        head_grad = math.sqrt(
            sum(float(p.grad.pow(2).sum()) for p in head.parameters() if p.grad is not None)
        )
        if cfg.optim.grad_clip is not None:
            grad_norm = float(
                fabric.clip_gradients(
                    learner, optimizer, max_norm=cfg.optim.grad_clip, error_if_nonfinite=False
                )
            )
        else:
            grads = [p.grad for p in learner.parameters() if p.grad is not None]
            grad_norm = float(
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            )
        losses = lm_vals + [m["train/meta_loss"] for m in meta_metrics]
        finite = torch.tensor(float(math.isfinite(grad_norm) and all(map(math.isfinite, losses))))
        if fabric.all_reduce(finite, reduce_op="min").item() < 1:
            counters["nonfinite_skipped"] += 1
            warnings.warn(f"step {step}: non-finite loss or gradient; optimizer step skipped", stacklevel=1)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        counters["ar_steps"] += "ar" in kinds
        counters["meta_steps"] += "meta" in kinds
        counters["flops"] += experiment_step_flops(cfg, kinds)
        step += 1

        # ---- metrics (kept separate per objective; never averaged together) ------------------------
        if lm_vals:
            window.setdefault("train/lm_loss", []).append(sum(lm_vals) / len(lm_vals))
        for m in meta_metrics:
            for key, value in m.items():
                name = key if "/" in key else f"meta/{key}"
                window.setdefault(name, []).append(value)
        window.setdefault("trainer/grad_norm", []).append(grad_norm)
        if meta_metrics:
            window.setdefault("meta/head_grad_norm", []).append(head_grad)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                {
                    k.split("/")[-1]: f"{v[-1]:.3f}"
                    for k, v in window.items()
                    if k in ("train/lm_loss", "train/meta_loss", "meta/query_acc")
                }
            )
        if step % cfg.trainer.log_every == 0 or step == cfg.trainer.max_steps:
            now = time.perf_counter()
            metrics = {k: sum(v) / len(v) for k, v in window.items() if v}
            metrics |= {f"trainer/{k}": float(v) for k, v in counters.items()}
            metrics["trainer/lr"] = scheduler.get_last_lr()[0]
            metrics["trainer/tokens_per_s"] = (counters["tokens"] - tokens_at_log) / max(now - last_log, 1e-9)
            metrics["meta/head_weight_norm"] = math.sqrt(
                sum(float(p.detach().pow(2).sum()) for p in head.parameters())
            )
            if step % cfg.trainer.eval_every == 0 or step == cfg.trainer.max_steps:
                if is_main:
                    metrics |= evaluate_during_training(
                        cfg, model, head, loop, data.heldout_rows, mask_id, data.special_ids
                    )
                fabric.barrier()
            tracker.log(step, metrics)
            if bar is None and is_main:
                log.info(
                    "step %d/%d %s",
                    step,
                    cfg.trainer.max_steps,
                    " ".join(f"{k}={metrics[k]:.4g}" for k in SHOWN if k in metrics),
                )
            window, last_log, tokens_at_log = {}, now, counters["tokens"]
        if step % cfg.trainer.save_every == 0 and step < cfg.trainer.max_steps:
            save(step)
    save(step)  # always: max steps, end of data or Ctrl-C
    if bar is not None:
        bar.close()
    tracker.close()
    if is_main:
        png = plot_curves(
            run_dir / "metrics.csv", run_dir / "curves.png", title=f"{run_dir.name} ({end_reason})"
        )
        final = {k: v for k, v in (tracker.rows[-1] if tracker.rows else {}).items() if k != "step"}
        print(
            f"\nrun finished ({end_reason}) at step {step}: {counters['ar_steps']} AR steps, "
            f"{counters['meta_steps']} meta steps, {counters['tokens']:,} tokens, "
            f"{time.perf_counter() - t0:.0f} s, {counters['nonfinite_skipped']} non-finite steps skipped"
        )
        for key in sorted(final):
            print(f"  {key:<28} {final[key]:.4g}")
        print(
            f"config: {run_dir / 'config.yaml'}\nmetrics: {run_dir / 'metrics.csv'}\n"
            f"checkpoints: {root}\ncurves: {png}"
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except pm.ConfigError as exc:  # a clear message, no traceback, before any training
        print(f"config error: {exc}", file=sys.stderr)
        sys.exit(2)
