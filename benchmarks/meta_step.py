"""Cost of a meta step against an AR step and against the replaced design, on the tiny PicoDecoder preset.

One run times, interleaved (median of ``--repeats`` after a warm-up), every step including its optimizer:

* (a) ``ar``: an AR step (``pm.lm_loss`` forward + backward + AdamW) over the same number of tokens as the
  episode: ``N*(K+Q)`` rows of ``W`` predicted tokens.
* (b) ``meta_SO`` / ``meta_FO``: the picomaml meta step: ``pm.meta_loss`` (one backbone forward over all
  support and query windows, an N-way ``MetaHead`` adapted by ``pm.InnerLoop``), backward, AdamW.
* (c) ``replaced``: a re-implementation, written here from its description, of the meta step of the
  trainer picomaml replaces (pico-maml-train), at its paper settings (a 4-layer 128-unit MLP head, 10
  inner steps): on every inner step the frozen backbone is re-run under ``no_grad`` over the support
  windows (its ``return_hidden=True`` call returns *before* the LM head, so: ``model.hidden_states``); a
  head whose last layer is vocabulary-wide is applied to *every* position of every window, and only then
  are the masked positions picked for the loss; that shared head is stepped in place by a second SGD
  optimizer (first order: nothing differentiates through the inner steps); then the backbone runs with
  grad over the query windows, the same all-positions head gives the query loss, backward, the head is
  restored from a copy, AdamW. ``replaced_anomaly`` is the same step under
  ``torch.autograd.set_detect_anomaly(True)``, which that code leaves on globally (``--no-anomaly`` drops
  the row).

Peak memory is the peak live bytes of distinct storages autograd holds for backward during the step's
forward (``torch.autograd.graph.saved_tensors_hooks``, see ``inner_loop.saved_tensor_mb``; allocator-free,
the same on CPU and GPU), plus ``torch.cuda.max_memory_allocated`` on CUDA.

Episodes come from ``pm.SMLMTSampler`` over a synthetic Zipf-distributed token buffer (the cost does not
depend on which tokens they are).

Usage::

    python benchmarks/meta_step.py              # tiny preset, 32-way 4-shot 4-query, W=64, 10 inner steps
    python benchmarks/meta_step.py --quick      # seconds: 2 layers, 8-way, W=16, 3 steps
    python benchmarks/meta_step.py --vocab 50304 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import picomaml as pm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inner_loop import interleaved_medians, saved_tensor_mb  # noqa: E402  (sibling benchmark helpers)

RESULTS = Path(__file__).resolve().parent / "results"


def token_buffer(vocab: int, rows: int, length: int, seed: int = 0) -> torch.Tensor:
    """Zipf-distributed token ids (rank^-1.1), ids 0..9 reserved (mask/special)."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab - 9, dtype=torch.float64)
    probs = ranks.pow(-1.1)
    ids = torch.multinomial(probs / probs.sum(), rows * length, replacement=True, generator=g) + 10
    return ids.view(rows, length)


def make_episode(args: argparse.Namespace) -> tuple[pm.Episode, str]:
    windows_needed = args.n_way * (args.k_shot + args.n_query)
    rows = max(8, 4 * windows_needed * args.window // 2048 + 1)
    buf = token_buffer(args.vocab, rows, 2048)
    try:
        sampler = pm.SMLMTSampler(
            n_way=args.n_way, k_shot=args.k_shot, n_query=args.n_query, mask_token_id=1, window_len=args.window,
            min_freq=args.k_shot + args.n_query, max_freq=0.25, exclude_token_ids=tuple(range(10)), seed=0,
        )  # fmt: skip
        return sampler.sample(buf), "SMLMTSampler"
    except Exception as exc:  # noqa: BLE001 - fall back to random windows; say so in the output
        print(f"SMLMTSampler failed ({exc}); using random windows with one masked position")
    g = torch.Generator().manual_seed(0)

    def part(per: int):
        ids = torch.randint(10, args.vocab, (args.n_way * per, args.window), generator=g)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, args.window // 2] = True
        ids[mask] = 1
        return ids, torch.arange(args.n_way).repeat_interleave(per), mask

    return pm.Episode(*part(args.k_shot), *part(args.n_query), torch.arange(10, 10 + args.n_way)), "random"


def build(args: argparse.Namespace, device: torch.device):
    overrides = {"n_layers": args.layers} if args.layers else {}
    cfg = pm.PicoDecoderConfig.preset(
        "tiny", vocab_size=args.vocab, max_seq_len=max(args.window + 1, 16), **overrides
    )
    torch.manual_seed(0)
    return cfg, pm.PicoDecoder(cfg).to(device)


def step_parser(description: str, results: Path) -> argparse.ArgumentParser:
    """The arguments of a meta-step benchmark (this one and ``adapt_layers.py``): model, episode, timing."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--vocab", type=int, default=8192, help="model vocabulary (8192 = the embedded tokenizer size)"
    )
    p.add_argument("--layers", type=int, default=None, help="override the preset's 12 layers")
    p.add_argument("--n-way", type=int, default=32)
    p.add_argument("--k-shot", type=int, default=4)
    p.add_argument("--n-query", type=int, default=4)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--inner-lr", type=float, default=0.01, help="the replaced code's paper setting")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="seconds: 2 layers, 8-way, W=16, 3 steps, 1 repeat")
    p.add_argument("--out", type=Path, default=results)
    return p


def parse_step_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, apply ``--quick`` and pin the thread count."""
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.n_way, args.window, args.steps, args.repeats = 2, 8, 16, 3, 1
    torch.set_num_threads(args.threads)
    return args


def main(argv: list[str] | None = None) -> dict:
    p = step_parser(__doc__.split("\n")[0], RESULTS)
    p.add_argument("--no-anomaly", action="store_true", help="skip the replaced_anomaly row")
    args = parse_step_args(p, argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ep, source = make_episode(args)
    ep = ep.to(device)
    n_rows = args.n_way * (args.k_shot + args.n_query)
    ar_tokens = torch.cat([ep.support_ids, ep.query_ids])  # same windows, W predicted tokens per row
    ar_tokens = torch.cat([ar_tokens, ar_tokens[:, :1]], 1)

    runners, forwards = {}, {}
    # (a) AR step
    cfg, model_a = build(args, device)
    opt_a = torch.optim.AdamW(model_a.parameters(), lr=1e-4)

    def ar_step() -> None:
        pm.lm_loss(model_a, ar_tokens).backward()
        opt_a.step()
        opt_a.zero_grad(set_to_none=True)

    runners["ar"], forwards["ar"] = ar_step, lambda: pm.lm_loss(model_a, ar_tokens)

    # (b) picomaml meta step, second and first order
    for order in ("SO", "FO"):
        _, model = build(args, device)
        head = pm.MetaHead(cfg.d_model, args.n_way, hidden_dims=(128, 128, 128), init="xavier").to(device)
        loop = pm.InnerLoop(args.steps, args.inner_lr, first_order=order == "FO").to(device)
        opt = torch.optim.AdamW([*model.parameters(), *head.parameters(), *loop.parameters()], lr=1e-4)

        def meta_step(model=model, head=head, loop=loop, opt=opt) -> None:
            pm.meta_loss(model, head, loop, ep).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        runners[f"meta_{order}"] = meta_step
        forwards[f"meta_{order}"] = lambda model=model, head=head, loop=loop: (
            pm.meta_loss(model, head, loop, ep).loss
        )

    # (c) the replaced design (see the module docstring)
    per_row_s = ep.class_token_ids[ep.support_labels]
    per_row_q = ep.class_token_ids[ep.query_labels]
    targets_s = per_row_s.unsqueeze(1).expand_as(ep.support_mask)[ep.support_mask]  # one per masked position
    targets_q = per_row_q.unsqueeze(1).expand_as(ep.query_mask)[ep.query_mask]
    variants = [("replaced", False)] + ([] if args.no_anomaly else [("replaced_anomaly", True)])
    for name, anomaly in variants:
        _, model = build(args, device)
        vhead = pm.MetaHead(cfg.d_model, args.vocab, hidden_dims=(128, 128, 128), init="xavier").to(device)
        inner_opt = torch.optim.SGD(vhead.parameters(), lr=args.inner_lr)
        opt = torch.optim.AdamW([*model.parameters(), *vhead.parameters()], lr=1e-4)

        def replaced_loss(model=model, vhead=vhead, inner_opt=inner_opt) -> torch.Tensor:
            for _ in range(args.steps):
                with torch.no_grad():  # the frozen backbone, re-run on every inner step
                    hs = model.hidden_states(ep.support_ids)
                inner_opt.zero_grad(set_to_none=True)
                logits = vhead(hs)  # (N*K, W, vocab): every position, before the masked ones are picked
                F.cross_entropy(logits[ep.support_mask], targets_s).backward()
                inner_opt.step()  # in-place SGD on the shared head: first order
            logits = vhead(model.hidden_states(ep.query_ids))
            return F.cross_entropy(logits[ep.query_mask], targets_q)

        def replaced_step(model=model, vhead=vhead, opt=opt, loss_fn=replaced_loss, anomaly=anomaly) -> None:
            with torch.autograd.set_detect_anomaly(anomaly):
                saved = copy.deepcopy(vhead.state_dict())
                loss_fn().backward()
                vhead.load_state_dict(saved)  # restore the head after the inner steps
                opt.step()
                opt.zero_grad(set_to_none=True)

        runners[name] = replaced_step

        def replaced_fwd(vhead=vhead, loss_fn=replaced_loss):
            saved = copy.deepcopy(vhead.state_dict())
            loss = loss_fn()
            vhead.load_state_dict(saved)
            return loss

        forwards[name] = replaced_fwd

    print(f"meta step: tiny preset ({cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}), "
          f"{args.n_way}-way {args.k_shot}-shot {args.n_query}-query, W={args.window} ({n_rows} windows, "
          f"{n_rows * args.window} tokens), {args.steps} inner steps, episodes from {source}, "
          f"{args.threads} thread(s), device {device}", flush=True)  # fmt: skip
    memory = {k: saved_tensor_mb(f) for k, f in forwards.items()}
    cuda_peak = {}
    if device.type == "cuda":
        for k, f in runners.items():
            torch.cuda.reset_peak_memory_stats()
            f()
            cuda_peak[k] = torch.cuda.max_memory_allocated() / 2**20
    med = interleaved_medians(runners, args.repeats, 1, sync)
    ms = {k: v * 1e3 for k, v in med.items()}
    ratios = {
        "meta_SO / ar": ms["meta_SO"] / ms["ar"],
        "meta_FO / ar": ms["meta_FO"] / ms["ar"],
        "replaced / meta_SO": ms["replaced"] / ms["meta_SO"],
        "memory meta_SO / meta_FO": memory["meta_SO"] / memory["meta_FO"],
    }
    if "replaced_anomaly" in ms:
        ratios["replaced_anomaly / meta_SO"] = ms["replaced_anomaly"] / ms["meta_SO"]
    goals = {
        "meta_SO / ar": ("<=", 1.15),
        "replaced / meta_SO": (">=", 3.5),
        "memory meta_SO / meta_FO": ("<=", 1.1),
    }
    lines = ["| step | median ms | saved-for-backward MiB |" + (" CUDA peak MiB |" if cuda_peak else ""),
             "|---|---:|---:|" + ("---:|" if cuda_peak else "")]  # fmt: skip
    for k in runners:
        extra = f" {cuda_peak[k]:.1f} |" if cuda_peak else ""
        lines.append(f"| {k} | {ms[k]:.1f} | {memory[k]:.1f} |{extra}")
    lines += ["", "| ratio | value | goal |", "|---|---:|---|"]
    for k, v in ratios.items():
        goal = goals.get(k)
        verdict = ""
        if goal:
            ok = v <= goal[1] if goal[0] == "<=" else v >= goal[1]
            verdict = f"{goal[0]} {goal[1]} ({'met' if ok else 'NOT met'})"
        lines.append(f"| {k} | {v:.2f} | {verdict} |")
    table = "\n".join(lines)
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": {"n_layers": cfg.n_layers, "d_model": cfg.d_model, "vocab_size": cfg.vocab_size},
        "episode_source": source, "torch": torch.__version__, "platform": platform.platform(),
        "ms": ms, "saved_mb": memory, "cuda_peak_mb": cuda_peak, "ratios": ratios,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    name = "meta_step_quick" if args.quick else "meta_step"
    if args.vocab != 8192:
        name += f"_vocab{args.vocab}"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{name}.md").write_text(table + "\n")
    print(table)
    return result


if __name__ == "__main__":
    main()
