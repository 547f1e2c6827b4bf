"""Host syncs of one training step's library calls: ``pm.lm_loss`` and ``pm.meta_loss``, forward + backward.

A host sync is a read of a tensor's value by Python (``.item()``, ``.tolist()``, ``bool(tensor)``,
``.numpy()``): on an accelerator the host then waits for every queued kernel, which stalls the pipeline.
``.item()`` and ``bool()`` dispatch ``aten._local_scalar_dense``, which a ``TorchDispatchMode`` counts;
``.tolist()`` and ``.numpy()`` of a CPU tensor dispatch nothing (on CUDA they copy to the host first), so
the counter also counts calls of those two methods. The count is the same on any device (on the CPU the
syncs cost nothing, but they are the same calls).

What is counted: the first call (checks that need host values may run there, once per shape) and the
median of the next ``--calls`` calls with the same shapes, for AR (``lm_loss``), the head-only meta step
and the meta step with adapted backbone tensors (``adapt_layers=1``); learned per-tensor inner LRs.
The goal: 0 after the first call. Metrics stay tensors until the caller reads them (one sync for all,
when it logs); reading them is not part of the step.

How a user checks their own loop: wrap a few steps in ``picomaml.checks.SyncCounter``, or on CUDA run them
under ``torch.cuda.set_sync_debug_mode("error")``.

Usage::

    python benchmarks/host_syncs.py            # tiny preset, prints a table, writes results/host_syncs.{md,json}
    python benchmarks/host_syncs.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

import picomaml as pm
from picomaml.checks import SyncCounter

RESULTS = Path(__file__).resolve().parent / "results"


def count(fn) -> int:
    with SyncCounter() as counter:
        fn()
    return counter.count


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=3, help="calls after the first one")
    p.add_argument("--quick", action="store_true", help="2 layers, 4-way, W=16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(args.device)
    layers, n_way, window = (2, 4, 16) if args.quick else (None, 8, 64)
    cfg = pm.PicoDecoderConfig.preset("tiny", vocab_size=512, max_seq_len=window + 1)
    if layers:
        cfg = pm.PicoDecoderConfig(**{**cfg.__dict__, "n_layers": layers})
    model = pm.PicoDecoder(cfg).to(device)
    head = pm.MetaHead(cfg.d_model, n_way, hidden_dims=(32,)).to(device)
    rows = torch.randint(3, cfg.vocab_size, (64, 4 * window), generator=torch.Generator().manual_seed(0))
    sampler = pm.SMLMTSampler(n_way=n_way, k_shot=2, n_query=2, mask_token_id=2, window_len=window, seed=0)
    episodes = [sampler.sample(rows, n_tasks=2).to(device) for _ in range(args.calls + 1)]
    tokens = rows[:8, : window + 1].to(device)
    loops = {
        "meta_loss (head)": (pm.InnerLoop(steps=3, lr=0.3, learn_lr="per_tensor", head=head).to(device), {}),
        "meta_loss (adapt_layers=1)": (
            pm.InnerLoop(steps=3, lr=0.3, learn_lr="per_tensor").bind(head, model, adapt_layers=1).to(device),
            {"adapt_layers": 1},
        ),
    }

    def ar() -> None:
        pm.lm_loss(model, tokens).backward()

    steps = {"lm_loss": lambda i: ar()}
    for name, (loop, kw) in loops.items():
        steps[name] = lambda i, loop=loop, kw=kw: pm.meta_loss(model, head, loop, episodes[i], **kw).loss.backward()
    result = {}
    for name, step in steps.items():
        first = count(lambda step=step: step(0))
        later = [count(lambda step=step, i=i: step(i)) for i in range(1, args.calls + 1)]
        result[name] = {"first": first, "later": statistics.median(later), "later_max": max(later)}
    lines = ["| call (forward + backward) | syncs, first call | syncs, later calls (median, max) |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['first']} | {v['later']:g} ({v['later_max']}) |" for k, v in result.items()]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "host_syncs_quick" if args.quick else "host_syncs"
    payload = {"counts": result, "device": str(device), "torch": torch.__version__, "platform": platform.platform()}
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(table + "\n")
    return payload


if __name__ == "__main__":
    main()
