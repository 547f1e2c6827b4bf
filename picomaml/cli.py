"""The ``picomaml`` console script: ``train``, ``cp``, ``eval``, ``export``, ``sample``, ``config``, ``info``.

Subcommands print to stdout (this is the user-facing front end); the library modules they call only log.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from picomaml._version import __version__
from picomaml.params import ConfigError, count_arg

__all__ = ["main", "build_parser", "build_eval_parser", "eval_main"]

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


def _installed_version(module: str) -> str | None:
    """Version of an optional package from its installed metadata, without importing it (None: missing).

    ``picomaml info`` must stay light: importing ``lightning``, ``transformers``, ``datasets`` and
    ``matplotlib`` only to read ``__version__`` cost ~5 s. The metadata says what is installed;
    ``importlib.util.find_spec`` (no import either) says whether the top-level module is there to import.
    ``--check-imports`` really imports each one (see `_import_status`).
    """
    from importlib.metadata import PackageNotFoundError, version
    from importlib.util import find_spec

    try:
        ver = version(module)  # the distribution names of these packages equal their module names
    except PackageNotFoundError:
        ver = None
    try:
        found = find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if ver is None:
        return "installed (no metadata)" if found else None
    return ver if found else f"{ver} (metadata only: the module is not importable)"


def _import_status(module: str) -> str:
    """``--check-imports``: import ``module`` and say how long it took, or why it failed."""
    import time

    start = time.perf_counter()
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"; say which
        return f"import fails: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]
    return f"imports in {time.perf_counter() - start:.2f} s"


def _learn2learn_status() -> str:
    # `import learn2learn` fails on CPU-only torch builds (it imports torchvision/gym), so ask the metadata
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("learn2learn")
    except PackageNotFoundError:
        return "missing -> see docs/inner_loop.md for the install recipe"


def cmd_info(args: argparse.Namespace) -> int:
    """Print versions and which optional backends are installed (from package metadata: nothing optional is
    imported unless ``--check-imports`` asks for it)."""
    import torch  # a core dependency, and the only way to know whether CUDA is usable

    check = bool(getattr(args, "check_imports", False))
    print(f"picomaml     {__version__}")
    print(f"python       {platform.python_version()} ({sys.executable})")
    print(
        f"torch        {torch.__version__} (cuda available: {torch.cuda.is_available()}, threads: {torch.get_num_threads()})"
    )
    for module, extra in _OPTIONAL.items():
        ver = _installed_version(module)
        state = ver if ver else f"missing -> pip install 'picomaml[{extra}]'"
        if ver and check:
            state += f"; {_import_status(module)}"
        print(f"{module:<12} {state}")
    print(f"{'learn2learn':<12} {_learn2learn_status()}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """Print decoded SMLMT episodes from the embedded corpus."""
    from picomaml.data.corpus import load_default_corpus
    from picomaml.data.display import format_episode
    from picomaml.meta.sampler import SMLMTSampler

    if args.window_len > args.seq_len:  # before the corpus is built: a window is cut from one row
        raise ConfigError(f"--window-len {args.window_len} is longer than --seq-len {args.seq_len}: no window fits a row")
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


#: most episodes one ``picomaml eval`` row runs (``eval.episodes`` has the same bound), shares in one forward,
#: and ``picomaml sample`` prints
MAX_EVAL_EPISODES, MAX_EPISODES_PER_BATCH, MAX_SAMPLE_EPISODES = 10**6, 4096, 10**4


def _setting(text: str) -> tuple[int, int]:
    try:
        n, k = (int(x) for x in text.replace("x", ",").split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected N,K (e.g. 5,4), got {text!r}") from exc
    if n < 2 or k < 1:
        raise argparse.ArgumentTypeError(f"need N >= 2 and K >= 1, got {text!r}")
    return n, k


def build_eval_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The arguments of ``picomaml eval`` (added to ``parser`` when given, e.g. a subcommand parser)."""
    p = parser or argparse.ArgumentParser(
        prog="picomaml eval", description="Run the few-shot evaluation suite."
    )
    p.add_argument("--checkpoint", required=True, help="step dir, checkpoint root, run dir, or HF export dir")
    p.add_argument(
        "--episodes", type=count_arg(1, MAX_EVAL_EPISODES), default=500, help="episodes per setting and task (default 500)"
    )
    p.add_argument("--json", help="write all numbers (per-episode accuracies included) to this JSON file")
    p.add_argument(
        "--setting", action="append", type=_setting, metavar="N,K",
        help="(n_way, k_shot), repeatable; default 5,1 and 5,4 plus the run's training setting",
    )  # fmt: skip
    p.add_argument("--seed", type=int, help="episode seed (default: the run's seed, else 0)")
    p.add_argument("--no-downstream", action="store_true", help="skip the downstream task")
    p.add_argument(
        "--downstream-window-len", type=count_arg(2), default=64,
        help="tokens per window of the downstream task (default: 64)",
    )
    p.add_argument(
        "--tokenizer", help="tokenizer of an HF export (default: its own files, else the corpus one)"
    )
    p.add_argument("--cache-dir", help="cache root of the embedded corpus")
    p.add_argument(
        "--episodes-per-batch", type=count_arg(1, MAX_EPISODES_PER_BATCH), default=16,
        help="episodes that share one backbone forward (memory against speed; same results) (default: 16)",
    )  # fmt: skip
    return p


class EvalProgress:
    """Progress of ``picomaml eval``: a tqdm bar (episodes, rate, time left) on a terminal; elsewhere, or
    without tqdm, a line on ``stream`` at every tenth of the episodes with the time spent and an estimate of
    the time left. Called as ``progress(episodes_done, part)`` by [`run_suite`][picomaml.eval.suite.run_suite]."""

    def __init__(self, total: int, stream: TextIO) -> None:
        import time

        self.total, self.done, self.stream, self._clock = max(total, 1), 0, stream, time.perf_counter
        self.start, self._next_line, self.bar = self._clock(), 0.1, None
        if getattr(stream, "isatty", lambda: False)():
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, unit="episode", file=stream, dynamic_ncols=True, leave=False)

    def __call__(self, n: int, part: str) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.set_description(part, refresh=False)
            self.bar.update(n)
            return
        frac = self.done / self.total
        if frac + 1e-9 < self._next_line:
            return
        while self._next_line <= frac + 1e-9:
            self._next_line += 0.1
        spent = self._clock() - self.start
        left = spent / self.done * (self.total - self.done)
        print(
            f"picomaml eval: {self.done}/{self.total} episodes ({frac:.0%}, {part}), {spent:.0f} s spent, "
            f"about {left:.0f} s left", file=self.stream, flush=True,
        )  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def eval_main(
    argv: Sequence[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """``picomaml eval --checkpoint DIR [--episodes N] [--json OUT] ...``: print the table, write JSON.

    Returns:
        0 on success, 2 when the checkpoint is missing or incompatible (the reason goes to ``stderr``).
    """
    from picomaml._optional import MissingDependencyError
    from picomaml.eval.downstream import load_downstream_dataset
    from picomaml.eval.suite import DEFAULT_SETTINGS, format_suite_table, run_suite
    from picomaml.params import ConfigError
    from picomaml.train.loading import IncompatibleCheckpointError, load_for_eval

    out, err = stdout or sys.stdout, stderr or sys.stderr
    args = build_eval_parser().parse_args(argv) if not isinstance(argv, argparse.Namespace) else argv
    bounds = (("--episodes", args.episodes, 1, MAX_EVAL_EPISODES), ("--episodes-per-batch", args.episodes_per_batch, 1, MAX_EPISODES_PER_BATCH),
              ("--downstream-window-len", args.downstream_window_len, 2, 2**22))  # a Namespace skips argparse's types
    for flag, value, low, high in bounds:
        if not low <= value <= high:
            print(f"picomaml eval: error: {flag} must be in [{low}, {high:,}], got {value}", file=err)
            return 2
    if args.json and Path(args.json).is_dir():  # found now, not after the whole evaluation
        print(f"picomaml eval: error: --json {args.json}: is a directory; give a file path", file=err)
        return 2
    try:
        bundle = load_for_eval(args.checkpoint, cache_dir=args.cache_dir, tokenizer=args.tokenizer)
    except (FileNotFoundError, IncompatibleCheckpointError, MissingDependencyError, ConfigError) as exc:
        print(f"picomaml eval: error: {exc}", file=err)
        return 2
    settings = list(args.setting or DEFAULT_SETTINGS)
    if not args.setting and bundle.train_setting and bundle.train_setting not in settings:
        settings.append(bundle.train_setting)
    kwargs = dict(bundle.suite_kwargs)
    if args.seed is not None:
        kwargs["seed"] = args.seed
    head = bundle.head
    if (
        head is None and bundle.inner_loop is not None
    ):  # an HF export: a fresh prototype head (ProtoMAML init)
        from picomaml.meta.head import MetaHead

        head = MetaHead(bundle.model.config.d_model, 2, init="prototype")
    dataset = None
    if not args.no_downstream:
        dataset = load_downstream_dataset("heldout", corpus=bundle.corpus, cache_dir=args.cache_dir)
    progress = EvalProgress(len(settings) * args.episodes * (1 if args.no_downstream else 2), err)
    try:
        results = run_suite(
            bundle.model, bundle.tokenizer, bundle.heldout_rows, head, bundle.inner_loop, settings, args.episodes,
            downstream=not args.no_downstream, downstream_window_len=args.downstream_window_len,
            downstream_dataset=dataset, episodes_per_batch=args.episodes_per_batch, progress=progress, **kwargs,
        )  # fmt: skip
    finally:
        progress.close()
    results["checkpoint"] = {"path": str(bundle.path), "source": bundle.source, "step": bundle.step}
    title = f"{bundle.source} {bundle.path}" + (f" (step {bundle.step})" if bundle.step is not None else "")
    print(
        f"few-shot evaluation of {title}: {args.episodes} episodes per row, seed {results['seed']}", file=out
    )
    split = results.get("class_split") or {}
    if split:
        print(
            f"SMLMT classes: only the run's held-out token types (holdout_fraction {split['holdout_fraction']}, "
            f"holdout_seed {split['holdout_seed']}), never meta-training classes",
            file=out,
        )
    print(format_suite_table(results), file=out)
    if args.json:
        target = Path(args.json)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(results, indent=1), encoding="utf-8")
        print(f"wrote {target}", file=out)
    return 0


def cmd_config(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``picomaml config``: the resolved config as YAML, or ``--reference`` for the field reference."""
    out = out or sys.stdout
    from picomaml.params import ConfigError
    from picomaml.train.config import load_config, reference_markdown

    if args.reference:
        print(reference_markdown(), file=out)
        return 0
    try:
        print(load_config(args.config, args.set).to_yaml(), end="", file=out)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    """``picomaml cp NAME DEST``: copy the reference recipe or a shipped config for editing."""
    from picomaml.train.catalog import copy_item

    written = copy_item(args.name, args.dest, overwrite=args.force)
    print(f"wrote {written}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``picomaml export --checkpoint RUN --out DIR``: a trainer checkpoint as a ``transformers`` model."""
    from picomaml._optional import require
    from picomaml.model.hf import export_hf
    from picomaml.train.loading import IncompatibleCheckpointError, load_for_eval

    require("transformers", "hf", "picomaml export")
    try:
        bundle = load_for_eval(args.checkpoint, cache_dir=args.cache_dir)
    except (FileNotFoundError, IncompatibleCheckpointError) as exc:
        print(f"picomaml export: error: {exc}", file=sys.stderr)
        return 2
    out = export_hf(bundle.model, args.out, bundle.tokenizer)
    step = f" step {bundle.step}" if bundle.step is not None else ""
    print(f"wrote {out} ({bundle.path}{step}); load it with transformers.AutoModelForCausalLM.from_pretrained")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the console script."""
    parser = argparse.ArgumentParser(
        prog="picomaml",
        description="picomaml: MAML over SMLMT for small language-model pretraining. Subcommands: train, cp, "
        "eval, export, sample, config, info (each has --help).",
    )
    parser.add_argument("--version", action="version", version=f"picomaml {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    # parsed by the recipe itself (see main): `picomaml train --help` shows the recipe's options
    sub.add_parser("train", add_help=False, help="run the reference recipe (picomaml train --help for its options)")

    from picomaml.train.catalog import RECIPE, config_names

    names = [RECIPE, *config_names()]
    p = sub.add_parser("cp", help="copy the reference recipe or a shipped config to edit (like torchtune's tune cp)")
    p.add_argument("name", choices=names, metavar="NAME", help=f"one of: {', '.join(names)}")
    p.add_argument("dest", metavar="DEST", help="a directory (the file keeps its name) or a file path")
    p.add_argument("--force", action="store_true", help="replace an existing file (default: refuse)")
    p.set_defaults(func=cmd_cp)

    p = sub.add_parser("export", help="save a trainer checkpoint as a transformers Llama model (config, weights, tokenizer)")
    p.add_argument("--checkpoint", required=True, help="a run directory, its checkpoints/ or a step directory")
    p.add_argument("--out", required=True, help="output directory for save_pretrained")
    p.add_argument("--cache-dir", help="cache root of the embedded corpus (default: the run's data.cache_dir)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="versions and which optional backends are installed")
    p.add_argument(
        "--check-imports", action="store_true",
        help="also import each installed optional package and report its import time or error (seconds)",
    )  # fmt: skip
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("sample", help="print decoded SMLMT episodes from the embedded corpus")
    p.add_argument("--n", type=count_arg(1, MAX_SAMPLE_EPISODES), default=2, help="number of episodes (default: %(default)s)")
    p.add_argument("--n-way", type=count_arg(2), default=4, help="classes per episode, >= 2 (default: %(default)s)")
    p.add_argument("--k-shot", type=count_arg(1), default=2, help="support windows per class (default: %(default)s)")
    p.add_argument("--n-query", type=count_arg(1), default=1, help="query windows per class (default: %(default)s)")
    p.add_argument("--window-len", type=count_arg(2), default=24, help="tokens per window (default: %(default)s)")
    p.add_argument("--seq-len", type=count_arg(2), default=256, help="tokens per corpus row (default: %(default)s)")
    p.add_argument("--min-freq", type=float, default=8, help="fewest windows a class token is in (default: %(default)s)")
    p.add_argument("--max-freq", type=float, default=0.05,
                   help="most windows a class token is in, a fraction or a count (default: %(default)s)")  # fmt: skip
    p.add_argument("--show", type=count_arg(0), default=2, help="windows shown per class (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed (default: %(default)s)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("config", help="print the default config as YAML, or the reference of every field")
    p.add_argument(
        "--reference", action="store_true", help="Markdown table of every field (type, default, meaning)"
    )
    p.add_argument("--config", help="a YAML config to resolve (defaults: every field at its default)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. hybrid.ratio=0.25"
    )
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("eval", help="few-shot evaluation suite of a checkpoint or HF export (table + JSON)")
    build_eval_parser(p)
    p.set_defaults(func=eval_main)

    from picomaml.train.finetune_cmd import build_finetune_parser, finetune_main

    p = sub.add_parser("finetune", help="fine-tuned tagging F1 or k-shot classification of a checkpoint on labelled files")
    build_finetune_parser(p)
    p.set_defaults(func=finetune_main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``picomaml`` console script. A bad value (a config error naming its argument, an
    impossible episode) is one line on stderr and exit status 2, not a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        from picomaml.train import recipe

        return recipe.run(argv[1:], prog="picomaml train")
    args = build_parser().parse_args(argv)
    from picomaml._optional import MissingDependencyError

    try:
        return int(args.func(args) or 0)
    except (ValueError, MissingDependencyError, OSError) as exc:
        # a bad argument (ConfigError), an impossible episode (SamplingError), a missing extra or a path that
        # cannot be written (OSError names it) says so in one line; any other ValueError is a bug
        if isinstance(exc, ValueError) and not isinstance(exc, ConfigError) and type(exc).__name__ != "SamplingError":
            raise
        print(f"picomaml {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: stop now, one line instead of a traceback (nothing is written)
        print(f"picomaml {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
