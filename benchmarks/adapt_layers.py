"""Cost of adapting the top blocks (``adapt_layers``) against the head-only meta step and an AR step.

One run times, interleaved (median of ``--repeats`` after a warm-up), every step including its AdamW step,
on the tiny PicoDecoder preset with an N-way 4-layer 128-unit MLP head (the paper's head):

* ``ar``: an AR step (``pm.lm_loss`` forward + backward) over the episode's ``N*(K+Q)`` windows;
* ``adapt_{k}`` for each ``k`` of ``--adapt`` (``all`` = every block): ``pm.meta_loss(..., adapt_layers=k)``
  (the lower blocks once, the top ``k`` blocks and the head re-run on every inner step), backward, AdamW;
  ``adapt_0`` is the head-only meta step.

For each row it reports the median time, the time ÷ the AR step, the peak of the bytes autograd holds for
backward during the step's forward (``saved_tensor_mb`` of ``benchmarks/inner_loop.py``, allocator-free),
and the FLOP ratio of the formulas (``pm.meta_step_flops(..., adapt_layers=k)`` ÷ ``pm.ar_step_flops``),
so the measured and the modelled costs sit side by side.

Usage::

    python benchmarks/adapt_layers.py                    # tiny preset, 32-way 4-shot, W=64, 10 steps
    python benchmarks/adapt_layers.py --adapt 0,1,2      # leave out "all" (its graph needs the most memory)
    python benchmarks/adapt_layers.py --quick            # seconds: 2 layers, 8-way, W=16, 3 steps
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch

import picomaml as pm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inner_loop import interleaved_medians, saved_tensor_mb  # noqa: E402  (sibling benchmark helpers)
from meta_step import build, make_episode, parse_step_args, step_parser  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> dict:
    p = step_parser(__doc__.split("\n")[0], RESULTS)
    p.add_argument("--adapt", default="0,1,2,all", help="comma-separated adapt_layers values; all = every block")
    p.add_argument("--first-order", action="store_true", help="FOMAML instead of exact second order")
    args = parse_step_args(p, argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ep, source = make_episode(args)
    ep = ep.to(device)
    cfg, model = build(args, device)
    ks = [cfg.n_layers if k.strip() == "all" else int(k) for k in args.adapt.split(",")]
    rows = torch.cat([ep.support_ids, ep.query_ids])
    ar_tokens = torch.cat([rows, rows[:, :1]], 1)  # W predicted tokens per window
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def ar_step() -> None:
        pm.lm_loss(model, ar_tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    runners, forwards = {"ar": ar_step}, {"ar": lambda: pm.lm_loss(model, ar_tokens)}
    for k in ks:
        head = pm.MetaHead(cfg.d_model, args.n_way, hidden_dims=(128, 128, 128), init="xavier").to(device)
        loop = pm.InnerLoop(args.steps, args.inner_lr, first_order=args.first_order).to(device)
        meta_opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-4)

        def meta_step(head=head, loop=loop, meta_opt=meta_opt, k=k) -> None:
            pm.meta_loss(model, head, loop, ep, adapt_layers=k).loss.backward()
            meta_opt.step()
            meta_opt.zero_grad(set_to_none=True)

        runners[f"adapt_{k}"] = meta_step
        forwards[f"adapt_{k}"] = lambda head=head, loop=loop, k=k: pm.meta_loss(model, head, loop, ep, adapt_layers=k).loss
    order = "first" if args.first_order else "second"
    print(f"adapt_layers: tiny preset ({cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}), "
          f"{args.n_way}-way {args.k_shot}-shot {args.n_query}-query, W={args.window}, {args.steps} inner steps "
          f"({order} order), episodes from {source}, {args.threads} thread(s), device {device}", flush=True)  # fmt: skip
    memory = {}
    for name, fn in forwards.items():
        memory[name] = saved_tensor_mb(fn)
        print(f"  {name}: {memory[name]:.1f} MiB saved for backward", flush=True)
    ms = {k: v * 1e3 for k, v in interleaved_medians(runners, args.repeats, 1, sync).items()}
    ar_flops = pm.ar_step_flops(cfg, rows.shape[0], args.window)
    flops = {"ar": ar_flops}
    for k in ks:
        flops[f"adapt_{k}"] = pm.meta_step_flops(
            cfg, args.n_way, args.k_shot, args.n_query, args.window, 1, (128, 128, 128), args.steps,
            args.first_order, adapt_layers=k,
        )  # fmt: skip
    lines = ["| step | median ms | ÷ AR step | FLOPs ÷ AR (formula) | saved-for-backward MiB |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for name in runners:
        lines.append(f"| {name} | {ms[name]:.1f} | {ms[name] / ms['ar']:.2f} | {flops[name] / ar_flops:.2f} | "
                     f"{memory[name]:.1f} |")  # fmt: skip
    table = "\n".join(lines)
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": {"n_layers": cfg.n_layers, "d_model": cfg.d_model, "vocab_size": cfg.vocab_size},
        "episode_source": source, "torch": torch.__version__, "platform": platform.platform(),
        "ms": ms, "saved_mb": memory, "flops": flops,
        "ratios": {f"{k} / ar": ms[k] / ms["ar"] for k in runners if k != "ar"},
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    name = "adapt_layers" + ("_quick" if args.quick else "") + ("_fo" if args.first_order else "")
    if not args.quick and args.n_way != 32:
        name += f"_{args.n_way}way"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{name}.md").write_text(table + "\n")
    print(table)
    return result


if __name__ == "__main__":
    main()
