"""The bad-input battery's harness: cases by area, how an outcome is classified, and ways to run picomaml.

Every case tries one thing an operator or a careless user does (a bad argument, a damaged or foreign file,
a signal, a link out of the run directory) through the public surface (the CLI, the trainer, the library)
and classifies what happened:

- ``clean``: the right result, or a one-line error that names what the caller passed (the key, file or
  argument) and no traceback;
- ``traceback``: an uncaught exception reached the user;
- ``unnamed``: an error, but it does not name what was wrong;
- ``silent``: exit 0 / no error on bad input, or a wrong result;
- ``hang``: no answer within the case's time limit;
- ``lost``: trained steps lost beyond the one in flight;
- ``outside``: a file outside the run directory was read, changed or deleted.

``tests/battery/test_inputs_battery.py`` asserts every case is clean; ``python tests/battery/tally.py``
prints the tally by area. The cases use only the public surface, so the tally also runs against an older
checkout (``PYTHONPATH=<old>/ python tests/battery/tally.py``) for a before/after comparison.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

KINDS = ("clean", "traceback", "unnamed", "silent", "hang", "lost", "outside")
AREAS: dict[str, str] = {}  # area -> one-line description, in registration order


@dataclass
class Outcome:
    kind: str
    detail: str = ""

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind


@dataclass
class Case:
    area: str
    name: str
    fn: Callable[[Path], Outcome]

    @property
    def id(self) -> str:
        return f"{self.area}/{self.name}"


CASES: list[Case] = []


def area(name: str, about: str) -> Callable[[str], Callable]:
    """``case = area("data", "...")`` then ``@case("name")`` registers ``fn(tmp_dir) -> Outcome``."""
    AREAS[name] = about

    def case(case_name: str) -> Callable:
        def register(fn: Callable[[Path], Outcome]) -> Callable[[Path], Outcome]:
            CASES.append(Case(name, case_name, fn))
            return fn

        return register

    return case


# -- running picomaml ------------------------------------------------------------------------------------


#: seconds without an answer that count as a hang (every case here answers in a few seconds when it works)
HANG_S = float(os.environ.get("PICOMAML_BATTERY_HANG_S", "120"))


class Hang(BaseException):
    """A case ran past its time limit (raised in the main thread by a watchdog)."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise [`Hang`] in the main thread after ``seconds`` (SIGUSR2 from a timer thread: SIGALRM belongs to
    pytest-timeout, SIGINT/SIGTERM/SIGUSR1 to the trainer)."""

    def on_timeout(signum, frame):
        raise Hang(f"no answer within {seconds:.0f} s")

    previous = signal.signal(signal.SIGUSR2, on_timeout)
    main = threading.main_thread().ident
    timer = threading.Timer(seconds, lambda: signal.pthread_kill(main, signal.SIGUSR2))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR2, previous)


@dataclass
class Result:
    code: int | None
    out: str = ""
    err: str = ""
    exc: BaseException | None = None

    @property
    def text(self) -> str:
        return self.out + self.err

    @property
    def last_line(self) -> str:
        lines = self.err.strip().splitlines() or self.out.strip().splitlines()
        return lines[-1] if lines else ""


def _reset_logging() -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):  # basicConfig bound them to an earlier case's captured stream
        root.removeHandler(handler)


def call(main: Callable[[list[str]], int | None], argv: list[str], timeout: float | None = None) -> Result:
    """Run ``main(argv)`` in this process as a console script would: captured output, exit code, and an
    uncaught exception printed as the traceback the user would see."""
    timeout = HANG_S if timeout is None else timeout
    out, err = io.StringIO(), io.StringIO()
    _reset_logging()
    code: int | None = None
    exc: BaseException | None = None
    caught: list[warnings.WarningMessage] = []
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), deadline(timeout), \
                warnings.catch_warnings(record=True) as caught:  # fmt: skip
            warnings.simplefilter("always")  # a user sees each warning on stderr (pytest would keep them)
            try:
                code = main(argv)
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except Hang as hung:
        exc = hung
    except KeyboardInterrupt as ki:
        exc = ki
        err.write("".join(traceback.format_exception(ki)))
    except Exception as bad:  # noqa: BLE001 - what reaches the user uncaught
        exc = bad
        err.write("".join(traceback.format_exception(bad)))
    finally:
        _reset_logging()
    err.write("".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught))
    return Result(0 if code is None and exc is None else code, out.getvalue(), err.getvalue(), exc)


def cli(argv: list[str], timeout: float | None = None) -> Result:
    from picomaml import cli as picomaml_cli

    return call(picomaml_cli.main, argv, timeout)


def _train_main() -> Callable[[list[str]], int | None]:
    """``picomaml train`` where it exists, else the reference script of older checkouts, run as ``__main__``
    (its one-line error handling lived in the script's ``if __name__ == "__main__":`` block)."""
    try:
        importlib.import_module("picomaml.train.recipe")
    except ImportError:
        import runpy

        script = Path(os.environ.get("PICOMAML_ROOT", Path(__file__).resolve().parents[2])) / "examples" / "train_smlmt.py"

        def as_script(argv: list[str]) -> int:
            saved = sys.argv
            sys.argv = [str(script), *argv]
            try:
                runpy.run_path(str(script), run_name="__main__")
            finally:
                sys.argv = saved
            return 0

        return as_script
    from picomaml import cli as picomaml_cli

    return lambda argv: picomaml_cli.main(["train", *argv])


def train(argv: list[str], timeout: float | None = None) -> Result:
    return call(_train_main(), argv, timeout)


def train_command() -> list[str]:
    try:
        importlib.import_module("picomaml.train.recipe")
        return [sys.executable, "-c", "import sys; from picomaml.cli import main; sys.exit(main(['train', *sys.argv[1:]]))"]
    except ImportError:
        root = Path(os.environ.get("PICOMAML_ROOT", Path(__file__).resolve().parents[2]))
        return [sys.executable, str(root / "examples" / "train_smlmt.py")]


def subprocess_run(cmd: list[str], timeout: float | None = None, mem_gb: float = 6.0, **kw) -> Result:
    """A child process with its address space capped (a config that allocates without bound fails there
    instead of taking the machine)."""

    def limits() -> None:
        cap = int(mem_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    timeout = HANG_S if timeout is None else timeout
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=limits, **kw)
    except subprocess.TimeoutExpired as exc:
        return Result(None, _s(exc.stdout), _s(exc.stderr), Hang(f"no answer within {timeout:.0f} s"))
    return Result(p.returncode, p.stdout, p.stderr)


def _s(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


# -- classifying ---------------------------------------------------------------------------------------


def refused(r: Result, *needles: str) -> Outcome:
    """Bad input must end in an error (non-zero exit) that names every needle, with no traceback."""
    if isinstance(r.exc, Hang):
        return Outcome("hang", str(r.exc))
    if r.exc is not None or "Traceback (most recent call last)" in r.text:
        return Outcome("traceback", _tail(r.text))
    if r.code == 0:
        return Outcome("silent", f"exit 0; {_tail(r.text, 300)}")
    missing = [n for n in needles if n not in r.text]
    if missing:
        return Outcome("unnamed", f"exit {r.code}, {missing} not named: {r.last_line[:300]}")
    return Outcome("clean", r.last_line[:200])


def succeeded(r: Result, check: Callable[[], str | None] = lambda: None) -> Outcome:
    """Good (or tolerable) input must run: exit 0, and ``check()`` (a problem or ``None``) passes."""
    if isinstance(r.exc, Hang):
        return Outcome("hang", str(r.exc))
    if r.exc is not None or "Traceback (most recent call last)" in r.text:
        return Outcome("traceback", _tail(r.text))
    if r.code != 0:
        return Outcome("unnamed", f"exit {r.code}: {r.last_line[:300]}")
    problem = check()
    return Outcome("silent", problem) if problem else Outcome("clean")


USER_ERRORS = (ValueError, TypeError, KeyError, LookupError, OSError)


def raises(fn: Callable[[], object], *needles: str, timeout: float | None = None) -> Outcome:
    """A library call on bad input must raise a user error (``ValueError``, ``TypeError``, ``KeyError``,
    ``OSError``) naming every needle; anything else is a traceback."""
    try:
        with deadline(HANG_S if timeout is None else timeout):
            fn()
    except Hang as hung:
        return Outcome("hang", str(hung))
    except USER_ERRORS as exc:
        text = f"{type(exc).__name__}: {exc}"
        missing = [n for n in needles if n not in text]
        return Outcome("unnamed", f"{missing} not named: {text[:300]}") if missing else Outcome("clean", text[:200])
    except Exception as exc:  # noqa: BLE001
        return Outcome("traceback", f"{type(exc).__name__}: {str(exc)[:300]}")
    return Outcome("silent", "accepted")


def _tail(text: str, n: int = 600) -> str:
    return " | ".join(text.strip().splitlines()[-4:])[-n:]


# -- fixtures --------------------------------------------------------------------------------------------

def _cache() -> Path:
    """Where the corpus and the trained run are kept between cases (``PICOMAML_BATTERY_CACHE``; the test
    suite points it at a session folder, so a run trained by other code is never reused)."""
    return Path(os.environ.get("PICOMAML_BATTERY_CACHE", "/tmp/picomaml-battery-cache"))


def corpus_cache() -> str:
    """The embedded corpus, built once per machine for every case."""
    path = _cache() / "corpus"
    if not (path / ".done").exists():
        import picomaml as pm

        pm.load_default_corpus(seq_len=33, cache_dir=path)
        (path / ".done").write_text("")
    return str(path)


def tiny_config(directory: Path, **sections: dict) -> Path:
    """A 2-layer model on the embedded corpus, 4 steps, a checkpoint every 2."""
    cfg = {
        "seed": 3,
        "model": {"vocab_size": 8192, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 64, "max_seq_len": 32},
        "data": {"source": "embedded", "seq_len": 32, "batch_size": 8, "cache_dir": corpus_cache()},
        "sampler": {"n_way": 3, "k_shot": 2, "n_query": 2, "window_len": 8, "min_freq": 3, "max_freq": 0.5},
        "head": {"hidden_dims": [16], "init": "xavier"},
        "inner_loop": {"steps": 2, "lr": 0.1, "first_order": False},
        "meta": {"pooling": "mask", "n_tasks": 2},
        "hybrid": {"ratio": 0.5, "mode": "bernoulli"},
        "optim": {"lr": 1e-3, "warmup_steps": 0, "decay": "constant", "grad_clip": 1.0},
        "trainer": {"max_steps": 4, "log_every": 1, "eval_every": 100, "save_every": 2, "accelerator": "cpu"},
        "eval": {"rows": 8, "batch_size": 8, "episodes": 2, "settings": [[3, 2]]},
        "checkpoint": {"keep_last": 3},
    }  # fmt: skip
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def trained_run(directory: Path) -> tuple[Path, Path]:
    """A copy of a finished 4-step run (checkpoints at steps 2 and 4) in ``directory/run``; returns
    ``(config, run_dir)``. The run is trained once per machine and copied for each case."""
    master = _cache() / "trained"
    if not (master / ".done").exists():
        shutil.rmtree(master, ignore_errors=True)
        config = tiny_config(master)
        r = train(["--config", str(config), "--run-dir", str(master / "run")])
        assert r.code == 0, r.text[-3000:]
        (master / ".done").write_text("")
    config = tiny_config(directory)
    run = directory / "run"
    shutil.copytree(master / "run", run, symlinks=True)
    return config, run


def step_dir(run: Path, step: int) -> Path:
    found = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("step_") and int(p.name[5:]) == step]
    assert found, sorted(p.name for p in (run / "checkpoints").iterdir())
    return found[0]


def rewrite(step: Path, name: str, data: bytes | object) -> None:
    """Replace ``step/name`` and update the manifest's size and SHA-256, as a careful forger (or other code
    writing the same layout) would: the checkpoint verifies, only its contents are wrong."""
    import torch

    f = step / name
    if isinstance(data, bytes):
        f.write_bytes(data)
    else:
        torch.save(data, f)
    manifest = json.loads((step / "COMPLETE").read_text())
    blob = f.read_bytes()
    manifest["files"][name] = len(blob)
    if "sha256" in manifest:
        manifest["sha256"][name] = hashlib.sha256(blob).hexdigest()
    (step / "COMPLETE").write_text(json.dumps(manifest))


def load_pt(step: Path, name: str) -> object:
    import torch

    return torch.load(step / name, weights_only=True)


def snapshot(root: Path) -> dict[str, str]:
    """Path -> content hash (or link target) of everything under ``root``, never following links."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                found[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                found[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                found[rel] = "dir"
    return found


def untouched(before: dict[str, str], root: Path, outcome: Outcome) -> Outcome:
    """``outcome``, unless something under ``root`` (outside the run) changed."""
    after = snapshot(root)
    if after != before:
        changed = sorted(set(before.items()) ^ set(after.items()))[:4]
        return Outcome("outside", f"changed outside the run dir: {changed}")
    return outcome


def is_root() -> bool:
    return os.geteuid() == 0


def dedent(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


@dataclass
class Tally:
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, case: Case, outcome: Outcome) -> None:
        row = self.counts.setdefault(case.area, dict.fromkeys(KINDS, 0))
        row[outcome.kind] += 1

    def table(self) -> str:
        head = f"{'area':<14}{'tries':>6}" + "".join(f"{k:>10}" for k in KINDS)
        lines = [head, "-" * len(head)]
        total = dict.fromkeys(KINDS, 0)
        for name, row in self.counts.items():
            lines.append(f"{name:<14}{sum(row.values()):>6}" + "".join(f"{row[k]:>10}" for k in KINDS))
            for k in KINDS:
                total[k] += row[k]
        lines += ["-" * len(head), f"{'total':<14}{sum(total.values()):>6}" + "".join(f"{total[k]:>10}" for k in KINDS)]
        return "\n".join(lines)
