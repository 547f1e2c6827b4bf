"""``picomaml eval``, ``sample``, ``config`` and ``export`` with bad arguments: each is refused before any
work, in one line naming the argument."""

from __future__ import annotations

from harness import area, cli, refused, succeeded, trained_run

case = area("cli", "picomaml eval / sample / config / export arguments")


def evaluate(tmp, *extra: str):
    _, run = trained_run(tmp)
    return cli(["eval", "--checkpoint", str(run), "--episodes", "2", "--no-downstream", *extra])


@case("eval-tokenizer-missing")
def _(tmp):
    return refused(evaluate(tmp, "--tokenizer", "/nonexistent"), "/nonexistent")


@case("eval-json-is-a-directory")
def _(tmp):
    return refused(evaluate(tmp, "--json", str(tmp)), "--json")


@case("eval-json-in-a-missing-folder")
def _(tmp):
    r = evaluate(tmp, "--json", str(tmp / "new" / "out.json"))
    return succeeded(r, lambda: None if (tmp / "new" / "out.json").is_file() else "no JSON written") if r.code == 0 else refused(r, "--json")


@case("eval-episodes-per-batch-zero")
def _(tmp):
    return refused(evaluate(tmp, "--episodes-per-batch", "0"), "--episodes-per-batch")


@case("eval-episodes-zero")
def _(tmp):
    return refused(evaluate(tmp, "--episodes", "0"), "--episodes")


@case("eval-episodes-negative")
def _(tmp):
    return refused(evaluate(tmp, "--episodes", "-4"), "--episodes")


@case("eval-episodes-1e9")
def _(tmp):
    return refused(evaluate(tmp, "--episodes", "1000000000"), "--episodes")


@case("eval-setting-one-way")
def _(tmp):
    return refused(evaluate(tmp, "--setting", "1,1"), "--setting")


@case("eval-setting-garbage")
def _(tmp):
    return refused(evaluate(tmp, "--setting", "five"), "--setting")


@case("eval-checkpoint-missing")
def _(tmp):
    return refused(cli(["eval", "--checkpoint", str(tmp / "nowhere"), "--episodes", "2"]), "nowhere")


@case("eval-checkpoint-a-file")
def _(tmp):
    (tmp / "model.bin").write_bytes(b"\x00" * 64)
    return refused(cli(["eval", "--checkpoint", str(tmp / "model.bin"), "--episodes", "2"]), "model.bin")


@case("eval-downstream-window-zero")
def _(tmp):
    _, run = trained_run(tmp)
    return refused(cli(["eval", "--checkpoint", str(run), "--episodes", "2", "--downstream-window-len", "0"]), "--downstream-window-len")


SAMPLE = {
    "n-zero": (["--n", "0"], "--n"),
    "n-way-one": (["--n-way", "1"], "--n-way"),
    "n-way-not-a-number": (["--n-way", "abc"], "--n-way"),
    "k-shot-zero": (["--k-shot", "0"], "--k-shot"),
    "n-query-negative": (["--n-query", "-1"], "--n-query"),
    "window-len-one": (["--window-len", "1"], "--window-len"),
    "seq-len-zero": (["--seq-len", "0"], "--seq-len"),
    "min-freq-negative": (["--min-freq", "-1"], "min_freq"),
    "max-freq-nan": (["--max-freq", "nan"], "max_freq"),
    "show-negative": (["--show", "-2"], "--show"),
    "n-way-1e5": (["--n-way", "100000"], "n_way"),
    "n-1e9": (["--n", "1000000000"], "--n"),
}


def _sample_case(name, argv, needle):
    @case(f"sample-{name}")
    def _(tmp):
        return refused(cli(["sample", *argv]), needle)


for _name, (_argv, _needle) in SAMPLE.items():
    _sample_case(_name, _argv, _needle)


@case("config-set-unknown-key")
def _(tmp):
    return refused(cli(["config", "--set", "model.bogus=1"]), "bogus")


@case("config-set-without-equals")
def _(tmp):
    return refused(cli(["config", "--set", "model.n_layers"]), "model.n_layers")


@case("config-file-missing")
def _(tmp):
    return refused(cli(["config", "--config", str(tmp / "none.yaml")]), "none.yaml")


@case("export-checkpoint-missing")
def _(tmp):
    return refused(cli(["export", "--checkpoint", str(tmp / "nowhere"), "--out", str(tmp / "hf")]), "nowhere")


@case("export-out-is-a-file")
def _(tmp):
    _, run = trained_run(tmp)
    (tmp / "hf").write_text("in the way")
    return refused(cli(["export", "--checkpoint", str(run), "--out", str(tmp / "hf")]), "hf")
