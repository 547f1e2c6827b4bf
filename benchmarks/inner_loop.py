"""Inner-loop variants against the references: {picomaml, higher, learn2learn} x {second, first order} x steps x
tasks x head, on fixed random features.

What is timed (median over interleaved repeats, after warm-up):

* ``inner_ms``: the inner loop alone: ``out = loop(head, xs, ys, xq, yq)`` then ``out.loss.backward()``
  into the head's initial weights and the (random, ``requires_grad``) features, as a meta step would.
  Features are ``n_way * k_shot`` support and ``n_way * n_query`` query rows of size ``--dim`` per task.
* ``meta_ms`` (only for ``--meta-tasks`` tasks and the largest step count): the full meta step on the tiny
  PicoDecoder preset: ``pm.meta_loss`` (one backbone forward over ``--meta-window``-token windows), backward
  and an AdamW step over backbone, head and inner loop.

Peak memory (``graph_mb``) is measured without any allocator hook: the peak, while ``loop(...)`` builds
its graph, of the bytes of distinct tensor storages that autograd holds for the backward pass (a
``torch.autograd.graph.saved_tensors_hooks`` pack hook registers a storage when it is saved and releases
it when autograd drops it, e.g. when an inner step's graph is freed). That is the memory a meta-gradient
costs beyond its inputs; temporaries that are not saved are not counted.

Variants (``--variants``): ``torch`` is picomaml's head form (the closed-form gradient for the linear head
automatically); ``torch-autograd`` forces its autograd path (``closed_form=False``); ``general`` is
picomaml's general form ``loop(module, (xs, ys), (xq, yq))`` on the same head as a plain ``nn.Sequential``
(vmap over tasks); ``higher`` and ``learn2learn`` are the textbook loops of those libraries on that module,
one task at a time (``benchmarks/references.py``; higher runs second order only, its first order
detaches the adapted weights from the initial ones).

Usage::

    python benchmarks/inner_loop.py                 # full grid (a few minutes on 1 CPU thread)
    python benchmarks/inner_loop.py --quick         # seconds
    python benchmarks/inner_loop.py --dim 384 --threads 2 --no-meta
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from references import head_as_sequential, higher_maml, learn2learn_maml

import picomaml as pm
from picomaml._optional import load_learn2learn, require

RESULTS = Path(__file__).resolve().parent / "results"
HEADS = {"linear": (), "mlp4x128": (128, 128, 128)}


class _Saved:
    """One tensor saved for backward; counts its storage as live until autograd drops it."""

    __slots__ = ("tensor", "key", "tracker")

    def __init__(self, tensor: torch.Tensor, tracker: _PeakTracker) -> None:
        self.tensor, self.tracker = tensor, tracker
        st = tensor.untyped_storage()
        self.key = (tensor.device.type, st.data_ptr())
        tracker.add(self.key, st.nbytes())

    def __del__(self) -> None:
        self.tracker.remove(self.key)


class _PeakTracker:
    def __init__(self) -> None:
        self.refs: dict[tuple, list[int]] = {}  # storage -> [count, bytes]
        self.live = self.peak = 0

    def add(self, key: tuple, nbytes: int) -> None:
        entry = self.refs.setdefault(key, [0, nbytes])
        if entry[0] == 0:
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        entry[0] += 1

    def remove(self, key: tuple) -> None:
        entry = self.refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.refs[key]


def saved_tensor_mb(fn: Callable[[], object]) -> float:
    """Peak MiB of distinct storages held by autograd for backward while ``fn()`` runs.

    Allocator-free: a ``saved_tensors_hooks`` pack hook registers each saved tensor's storage when autograd
    saves it and releases it when autograd drops it (an inner-step graph freed by ``autograd.grad`` is
    released at once), so the result is the peak of the live graph memory. Non-saved temporaries are not
    counted.
    """
    tracker = _PeakTracker()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: _Saved(t, tracker), lambda s: s.tensor):
        out = fn()
    peak = tracker.peak
    del out
    return peak / 2**20


def interleaved_medians(
    fns: dict[str, Callable[[], None]], repeats: int, warmup: int, sync=lambda: None
) -> dict:
    """Median seconds per function, calling them round-robin so load drifts hit all alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def make_features(tasks: int, args: argparse.Namespace, device: torch.device):
    g = torch.Generator().manual_seed(0)
    ns, nq = args.n_way * args.k_shot, args.n_way * args.n_query
    xs = torch.randn(tasks, ns, args.dim, generator=g).to(device).requires_grad_()
    xq = torch.randn(tasks, nq, args.dim, generator=g).to(device).requires_grad_()
    ys = torch.stack(
        [torch.randperm(args.n_way, generator=g).repeat_interleave(args.k_shot) for _ in range(tasks)]
    )
    yq = torch.stack(
        [torch.randperm(args.n_way, generator=g).repeat_interleave(args.n_query) for _ in range(tasks)]
    )
    return xs, ys.to(device), xq, yq.to(device)


OURS = ("torch", "torch-autograd", "general")
REFERENCES = ("higher", "learn2learn")


def step_fn(name: str, steps: int, order: str, head: pm.MetaHead, data: tuple, lr: float, device) -> Callable:
    """One meta-gradient of ``name``'s inner loop: the query loss after adaptation, then its backward."""
    xs, ys, xq, yq = data
    fo = order == "FO"
    if name in ("torch", "torch-autograd"):
        loop = pm.InnerLoop(steps, lr, first_order=fo, closed_form=None if name == "torch" else False).to(device)
        return lambda: loop(head, xs, ys, xq, yq).loss
    shell = head_as_sequential(head)
    if name == "general":
        loop = pm.InnerLoop(steps, lr, first_order=fo).to(device)
        return lambda: loop(shell, (xs, ys), (xq, yq)).loss
    if name == "higher":
        return lambda: higher_maml(shell, (xs, ys), (xq, yq), F.cross_entropy, steps, lr)
    return lambda: learn2learn_maml(shell, (xs, ys), (xq, yq), F.cross_entropy, steps, lr, first_order=fo)


def bench_inner(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for head_name in args.heads:
        for tasks in args.tasks:
            for steps in args.steps:
                for order in args.orders:
                    fns, meta = {}, {}
                    for name in args.variants:
                        if name == "torch-autograd" and HEADS[head_name]:
                            continue  # the closed form only exists for the linear head
                        if name == "higher" and order == "FO":
                            continue  # higher's first order detaches the adapted weights from the initial ones
                        head = pm.MetaHead(args.dim, args.n_way, hidden_dims=HEADS[head_name], init="xavier")
                        head = head.to(device)
                        data = make_features(tasks, args, device)
                        loss = step_fn(name, steps, order, head, data, args.lr, device)

                        def run(loss=loss, head=head, data=data) -> None:
                            loss().backward()
                            data[0].grad = data[2].grad = None
                            head.zero_grad(set_to_none=True)

                        fns[name] = run
                        meta[name] = saved_tensor_mb(loss)
                    med = interleaved_medians(fns, args.repeats, args.warmup, sync)
                    for name in fns:
                        rows.append(
                            {"head": head_name, "tasks": tasks, "steps": steps, "order": order, "variant": name,
                             "inner_ms": med[name] * 1e3, "graph_mb": meta[name]}
                        )  # fmt: skip
                    print(f"  {head_name:9s} T={tasks} S={steps:2d} {order}: "
                          + ", ".join(f"{n} {med[n] * 1e3:.1f} ms" for n in fns), flush=True)  # fmt: skip
    return rows


def bench_meta(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Full meta step (backbone forward + inner loop + backward + AdamW) for picomaml's head form."""
    rows = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cfg = pm.PicoDecoderConfig.preset("tiny", vocab_size=args.vocab, max_seq_len=max(args.meta_window, 16))
    steps = max(args.steps)
    g = torch.Generator().manual_seed(0)
    for head_name in args.heads:
        fns = {}
        for order in args.orders:
            for name in [v for v in args.variants if v in ("torch", "torch-autograd")]:
                if name == "torch-autograd" and HEADS[head_name]:
                    continue
                kw = {"closed_form": None if name == "torch" else False}
                torch.manual_seed(0)
                model = pm.PicoDecoder(cfg).to(device)
                head = pm.MetaHead(cfg.d_model, args.n_way, hidden_dims=HEADS[head_name]).to(device)
                loop = pm.InnerLoop(steps, args.lr, first_order=order == "FO", **kw).to(device)
                opt = torch.optim.AdamW(
                    [*model.parameters(), *head.parameters(), *loop.parameters()], lr=1e-4
                )
                ep = random_episode(args, args.meta_tasks, cfg.vocab_size, g).to(device)

                def step(model=model, head=head, loop=loop, opt=opt, ep=ep) -> None:
                    pm.meta_loss(model, head, loop, ep).loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                fns[(order, name)] = step
        med = interleaved_medians(fns, args.meta_repeats, 1, sync)
        for (order, name), sec in med.items():
            rows.append({"head": head_name, "tasks": args.meta_tasks, "steps": steps, "order": order,
                         "variant": name, "meta_ms": sec * 1e3})  # fmt: skip
            print(f"  meta step {head_name:9s} {order} {name}: {sec * 1e3:.1f} ms", flush=True)
    return rows


def random_episode(args: argparse.Namespace, tasks: int, vocab: int, g: torch.Generator) -> pm.Episode:
    """Random windows with one masked position per window (the inner-loop cost does not depend on content)."""
    n, w = args.n_way, args.meta_window

    def part(per: int):
        ids = torch.randint(2, vocab, (tasks, n * per, w), generator=g)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[..., w // 2] = True
        ids[mask] = 1
        labels = torch.arange(n).repeat_interleave(per).expand(tasks, -1).clone()
        return ids, labels, mask

    s, q = part(args.k_shot), part(args.n_query)
    cls = torch.arange(10, 10 + n).expand(tasks, -1).clone()
    return pm.Episode(*s, *q, cls)


def markdown(rows: list[dict], meta_rows: list[dict]) -> str:
    lines = ["| head | tasks | steps | order | variant | inner ms | speed-up vs best reference | graph MiB |",
             "|---|---:|---:|---|---|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        refs = [x["inner_ms"] for x in rows if x["variant"] in REFERENCES
                and all(x[k] == r[k] for k in ("head", "tasks", "steps", "order"))]  # fmt: skip
        speed = f"{min(refs) / r['inner_ms']:.2f}x" if refs else "-"
        lines.append(
            f"| {r['head']} | {r['tasks']} | {r['steps']} | {r['order']} | {r['variant']} | {r['inner_ms']:.2f} | "
            f"{speed} | {r['graph_mb']:.2f} |"
        )
    if meta_rows:
        lines += [
            "",
            "| head | tasks | steps | order | variant | full meta step ms |",
            "|---|---:|---:|---|---|---:|",
        ]
        for r in meta_rows:
            lines.append(
                f"| {r['head']} | {r['tasks']} | {r['steps']} | {r['order']} | {r['variant']} | {r['meta_ms']:.1f} |"
            )
    return "\n".join(lines)


def goals(rows: list[dict]) -> list[str]:
    """Speed-up of the torch SO inner loop over the faster reference at the largest step count."""
    out = []
    steps = max(r["steps"] for r in rows)
    for head in sorted({r["head"] for r in rows}):
        for tasks in sorted({r["tasks"] for r in rows}):
            sel = [
                r
                for r in rows
                if r["head"] == head and r["tasks"] == tasks and r["steps"] == steps and r["order"] == "SO"
            ]
            ours = [r["inner_ms"] for r in sel if r["variant"] == "torch"]
            refs = [r["inner_ms"] for r in sel if r["variant"] in REFERENCES]
            if ours and refs:
                goal = 1.7 if tasks == 1 else 3.0
                sp = min(refs) / ours[0]
                out.append(f"{head}, {tasks} task(s), {steps} steps, SO: torch is {sp:.2f}x faster than the faster "
                           f"reference (goal >= {goal}x: {'met' if sp >= goal else 'NOT met'})")  # fmt: skip
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads, tasks = sorted({r["head"] for r in rows}), sorted({r["tasks"] for r in rows})
    fig, axes = plt.subplots(
        len(heads), len(tasks), figsize=(5 * len(tasks), 3.6 * len(heads)), squeeze=False
    )
    for i, head in enumerate(heads):
        for j, t in enumerate(tasks):
            ax = axes[i][j]
            for variant in sorted({r["variant"] for r in rows}):
                for order, style in (("SO", "-"), ("FO", "--")):
                    sel = sorted((r["steps"], r["inner_ms"]) for r in rows if r["head"] == head and r["tasks"] == t
                                 and r["variant"] == variant and r["order"] == order)  # fmt: skip
                    if sel:
                        ax.plot(*zip(*sel, strict=True), style, marker="o", label=f"{variant} {order}")
            ax.set_title(f"{head}, {t} task(s)")
            ax.set_xlabel("inner steps")
            ax.set_ylabel("ms (loop + backward)")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=96, help="feature size (the tiny preset's d_model)")
    p.add_argument("--n-way", type=int, default=32)
    p.add_argument("--k-shot", type=int, default=4)
    p.add_argument("--n-query", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--tasks", type=int, nargs="+", default=[1, 8])
    p.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    p.add_argument("--orders", nargs="+", default=["SO", "FO"], choices=["SO", "FO"])
    p.add_argument("--variants", nargs="+", default=[*OURS, *REFERENCES], choices=[*OURS, *REFERENCES])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-meta", action="store_true", help="skip the full meta step on the tiny PicoDecoder")
    p.add_argument("--meta-tasks", type=int, default=1)
    p.add_argument("--meta-window", type=int, default=64)
    p.add_argument("--meta-repeats", type=int, default=3)
    p.add_argument(
        "--vocab", type=int, default=8192, help="vocabulary of the tiny PicoDecoder (embedding only)"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="a few seconds: small grid, few repeats")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.tasks, args.repeats, args.warmup = [1, 5], [1, 4], 3, 1
        args.n_way, args.meta_window, args.meta_repeats = 8, 16, 1
        args.orders = ["SO"] if args.orders == ["SO", "FO"] else args.orders
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    available = []
    for name in args.variants:
        try:
            if name == "higher":
                require("higher", "higher", "the higher reference")
            elif name == "learn2learn":
                load_learn2learn("maml")
            available.append(name)
        except pm.MissingDependencyError as exc:
            print(f"skipping reference {name}: {exc}")
    args.variants = available
    print(f"inner loop: {args.n_way}-way {args.k_shot}-shot {args.n_query}-query, dim {args.dim}, "
          f"{args.threads} thread(s), device {device}")  # fmt: skip
    rows = bench_inner(args, device)
    meta_rows = [] if args.no_meta else bench_meta(args, device)
    table = markdown(rows, meta_rows)
    summary = goals(rows)
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__, "platform": platform.platform(), "processor": platform.processor(),
        "memory_measure": "peak live bytes of distinct storages saved for backward (saved_tensors_hooks)",
        "rows": rows, "meta_rows": meta_rows, "goals": summary,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    name = "inner_loop_quick" if args.quick else "inner_loop"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{name}.md").write_text(table + "\n\n" + "\n".join(f"- {s}" for s in summary) + "\n")
    if not args.no_plot:
        plot(rows, args.out / f"{name}.png")
    print(table)
    print("\n".join(summary))
    return result


if __name__ == "__main__":
    main()
