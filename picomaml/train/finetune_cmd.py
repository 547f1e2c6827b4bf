"""``picomaml finetune``: the papers' fine-tuning evaluation of a run (or an exported model) on labelled files.

    picomaml finetune --checkpoint runs/tiny-cpu --train train.conllu --test test.conllu --mode head
    picomaml finetune --checkpoint runs/tiny-cpu --train train.csv --test test.csv --k-per-class 8

The task follows the files: ``.conllu`` (a column as the tag, ``--column upos``), ``.conll``/``.iob``/``.txt``
(whitespace columns: word first, tag last) are token tagging
([`finetune_tagger`][picomaml.eval.finetune.finetune_tagger]); ``.csv``/``.tsv``/``.jsonl`` with ``text`` and
``label`` fields (``--text-field``, ``--label-field``) are k-shot classification
([`finetune_classifier`][picomaml.eval.finetune.finetune_classifier]). Any of them may be compressed
(``.gz``, ``.bz2``, ``.xz``). Each seed fine-tunes once; the table
gives every metric's mean and confidence interval over the seeds
([`finetune_eval`][picomaml.eval.finetune.finetune_eval]), ``--json`` writes every run's scores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from picomaml.data.labelled import (
    LabelledText,
    TaggedSentence,
    format_suffix,
    read_conll,
    read_conllu,
    read_text_labels,
)
from picomaml.params import count_arg

__all__ = ["TAGGING_SUFFIXES", "TEXT_SUFFIXES", "build_finetune_parser", "finetune_main", "read_labelled"]

TAGGING_SUFFIXES = (".conllu", ".conll", ".iob", ".txt")
TEXT_SUFFIXES = (".csv", ".tsv", ".jsonl")


def read_labelled(
    path: str | Path, column: str = "upos", text_field: str = "text", label_field: str = "label"
) -> list[TaggedSentence] | list[LabelledText]:
    """Read a labelled file by its suffix (see the module docstring).

    Raises:
        DataError: An unknown suffix or a bad file (file and line named).
    """
    from picomaml.data.sources import DataError

    p = Path(path)
    suffix = format_suffix(p)  # under .gz / .bz2 / .xz
    if suffix == ".conllu":
        return read_conllu(p, column=column)
    if suffix in TAGGING_SUFFIXES:
        return read_conll(p)
    if suffix in TEXT_SUFFIXES:
        return read_text_labels(p, text_field=text_field, label_field=label_field)
    raise DataError(f"{p}: unknown suffix {p.suffix!r}; allowed: {list(TAGGING_SUFFIXES + TEXT_SUFFIXES)}")


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds like 0,1,2, got {text!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds) or len(seeds) > 100:
        raise argparse.ArgumentTypeError(f"expected 1 to 100 distinct seeds >= 0, got {text!r}")
    return seeds


def _learning_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a learning rate in (0, 10], got {text!r}") from None
    if not 0 < value <= 10.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a learning rate in (0, 10], got {text!r}")
    return value


def build_finetune_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The arguments of ``picomaml finetune`` (added to ``parser`` when given)."""
    p = parser or argparse.ArgumentParser(prog="picomaml finetune", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="step dir, checkpoint root, run dir, or HF export dir")
    p.add_argument("--train", required=True, help="labelled training file (.conllu, .conll, .csv, .tsv, .jsonl)")
    p.add_argument("--test", required=True, help="labelled test file, same kind as --train")
    p.add_argument("--column", default="upos", help="CoNLL-U column used as the tag (default: %(default)s)")
    p.add_argument("--text-field", default="text", help="classification: the text column or field (default: %(default)s)")
    p.add_argument("--label-field", default="label", help="classification: the label column or field (default: %(default)s)")
    p.add_argument("--mode", choices=("head", "full"), default="head",
                   help="head: train a linear head on frozen features; full: fine-tune a copy of the backbone too "
                        "(default: %(default)s)")  # fmt: skip
    p.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="fine-tuning seeds (default: 0,1,2)")
    p.add_argument("--epochs", type=count_arg(1, 1000), help="passes over the training data (default: 5 tagging, 10 classification)")
    p.add_argument("--lr", type=_learning_rate, help="AdamW learning rate (default: 1e-3 head, 1e-4 full)")
    p.add_argument("--batch-size", type=count_arg(1, 4096), default=16, help="examples per step (default: %(default)s)")
    p.add_argument("--k-per-class", type=count_arg(1, 10**6),
                   help="classification: training examples per class, drawn per seed (default: all)")  # fmt: skip
    p.add_argument("--max-train", type=count_arg(1, 10**7), help="use only the first N training items")
    p.add_argument("--max-test", type=count_arg(1, 10**7), help="score only the first N test items")
    p.add_argument("--json", help="write the settings, the summary and every run's scores to this file")
    p.add_argument("--tokenizer", help="tokenizer of an HF export (default: its own files)")
    p.add_argument("--cache-dir", help="cache root of the embedded corpus")
    return p


def finetune_main(argv: Any = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run ``picomaml finetune``: print the summary table, write ``--json``; one-line errors, exit 2."""
    from picomaml._optional import MissingDependencyError
    from picomaml.data.sources import DataError
    from picomaml.eval.finetune import finetune_eval
    from picomaml.params import ConfigError
    from picomaml.train.loading import IncompatibleCheckpointError, load_for_eval

    out, err = stdout or sys.stdout, stderr or sys.stderr
    args = build_finetune_parser().parse_args(argv) if not isinstance(argv, argparse.Namespace) else argv
    if args.json and Path(args.json).is_dir():
        print(f"picomaml finetune: error: --json {args.json}: is a directory; give a file path", file=err)
        return 2
    try:
        train, test = (read_labelled(f, args.column, args.text_field, args.label_field) for f in (args.train, args.test))
        if type(train[0]) is not type(test[0]):
            raise DataError(f"--train {args.train} and --test {args.test} hold different kinds of labelled data")
        if args.k_per_class is not None and not isinstance(train[0], LabelledText):
            raise ConfigError("--k-per-class: applies to classification files (.csv, .tsv, .jsonl) only")
        train, test = train[: args.max_train], test[: args.max_test]
        bundle = load_for_eval(args.checkpoint, cache_dir=args.cache_dir, tokenizer=args.tokenizer)
        kwargs: dict[str, Any] = {"mode": args.mode, "lr": args.lr, "batch_size": args.batch_size}
        if args.epochs is not None:
            kwargs["epochs"] = args.epochs
        if isinstance(train[0], LabelledText):
            kwargs["k_per_class"] = args.k_per_class
        summary = finetune_eval(bundle.model, bundle.tokenizer, train, test, seeds=args.seeds, **kwargs)
    except (OSError, DataError, ConfigError, IncompatibleCheckpointError, MissingDependencyError) as exc:
        print(f"picomaml finetune: error: {exc}", file=err)
        return 2
    except ValueError as exc:  # the fine-tuning functions name the argument (a tag set of one tag, k too large)
        print(f"picomaml finetune: error: {exc}", file=err)
        return 2
    print(f"fine-tuned {bundle.path} on {args.train} ({len(train)} items), scored on {args.test} ({len(test)} items)", file=out)
    print(summary.format(), file=out)
    if args.json:
        record = {"checkpoint": str(bundle.path), "step": bundle.step, "train": str(args.train), "test": str(args.test),
                  "n_train": len(train), "n_test": len(test), **summary.to_dict()}  # fmt: skip
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"json: {path}", file=out)
    return 0
