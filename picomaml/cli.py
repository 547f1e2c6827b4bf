"""The ``picomaml`` console script: ``picomaml info``, ``picomaml sample``, ``picomaml eval``.

Subcommands print to stdout (this is the user-facing front end); the library modules they call only log.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from collections.abc import Sequence

from picomaml._version import __version__

__all__ = ["main", "build_parser"]

# optional package -> the picomaml extra that installs it
_OPTIONAL = {
    "lightning": "fabric",
    "tqdm": "fabric",
    "datasets": "data",
    "tokenizers": "data",
    "pyarrow": "data",
    "transformers": "hf",
    "tensorboard": "logging",
    "wandb": "logging",
    "higher": "higher",
    "matplotlib": "plots",
}


def _version_of(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        return None
    return str(getattr(mod, "__version__", "installed"))


def _learn2learn_status() -> str:
    # `import learn2learn` fails on CPU-only torch builds (it imports torchvision/gym), so ask the metadata
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("learn2learn")
    except PackageNotFoundError:
        return "missing -> see docs/inner_loop.md for the install recipe"


def cmd_info(args: argparse.Namespace) -> int:
    """Print versions and which optional backends import."""
    import torch

    print(f"picomaml     {__version__}")
    print(f"python       {platform.python_version()} ({sys.executable})")
    print(
        f"torch        {torch.__version__} (cuda available: {torch.cuda.is_available()}, threads: {torch.get_num_threads()})"
    )
    for module, extra in _OPTIONAL.items():
        ver = _version_of(module)
        state = ver if ver else f"missing -> pip install 'picomaml[{extra}]'"
        print(f"{module:<12} {state}")
    print(f"{'learn2learn':<12} {_learn2learn_status()}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """Print decoded SMLMT episodes from the embedded corpus."""
    from picomaml.data.corpus import load_default_corpus
    from picomaml.data.display import format_episode
    from picomaml.meta.sampler import SMLMTSampler

    corpus = load_default_corpus(seq_len=args.seq_len)
    tok = corpus.tokenizer
    sampler = SMLMTSampler(
        n_way=args.n_way,
        k_shot=args.k_shot,
        n_query=args.n_query,
        mask_token_id=tok.mask_token_id,
        window_len=args.window_len,
        min_freq=args.min_freq,
        max_freq=args.max_freq,
        exclude_token_ids=tuple(i for i in (tok.eos_token_id, tok.pad_token_id) if i is not None),
        seed=args.seed,
    )
    for i in range(args.n):
        episode = sampler.sample(corpus.train_rows)
        print(
            f"=== episode {i + 1}/{args.n}: {args.n_way}-way {args.k_shot}-shot, {args.n_query} query per class"
        )
        print(format_episode(episode, tok, max_windows_per_class=args.show))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Run the few-shot evaluation suite on a checkpoint or an HF export."""
    from picomaml.eval.suite import eval_main

    return eval_main(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the console script."""
    parser = argparse.ArgumentParser(prog="picomaml", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"picomaml {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions and which optional backends import")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("sample", help="print decoded SMLMT episodes from the embedded corpus")
    p.add_argument("--n", type=int, default=2, help="number of episodes")
    p.add_argument("--n-way", type=int, default=4)
    p.add_argument("--k-shot", type=int, default=2)
    p.add_argument("--n-query", type=int, default=1)
    p.add_argument("--window-len", type=int, default=24)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--min-freq", type=float, default=8)
    p.add_argument("--max-freq", type=float, default=0.05)
    p.add_argument("--show", type=int, default=2, help="windows shown per class")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample)

    from picomaml.eval.suite import build_eval_parser

    p = sub.add_parser("eval", help="few-shot evaluation suite of a checkpoint or HF export (table + JSON)")
    build_eval_parser(p)
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``picomaml`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
