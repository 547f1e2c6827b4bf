"""Local data files as users have them: broken encodings, wrong fields, ids outside the vocabulary, files too
small. Each must be refused before training, naming the file (and line) or the key."""

from __future__ import annotations

import json
from pathlib import Path

from harness import area, corpus_cache, refused, tiny_config, train

case = area("data", "local data files (jsonl, parquet, text)")


def tokenizer_file() -> str:
    return str(next(Path(corpus_cache()).glob("corpus-*/tokenizer.json")))


def run_on(tmp: Path, paths: list[Path], **data):
    config = tiny_config(
        tmp, data={"source": "local", "paths": [str(p) for p in paths], "tokenizer": tokenizer_file(), "seq_len": 16,
                   "batch_size": 2, **data},
        sampler={"window_len": 8}, hybrid={"ratio": 0.0}, eval={"rows": 2, "episodes": 0},
    )  # fmt: skip
    return train(["--config", str(config), "--run-dir", str(tmp / "run")])


def ids_file(tmp: Path, ids: list, name: str = "rows.jsonl") -> Path:
    f = tmp / name
    f.write_text(json.dumps({"input_ids": ids}) + "\n")
    return f


GOOD = list(range(5, 200))


@case("jsonl-invalid-utf8")
def _(tmp):
    f = tmp / "bad.jsonl"
    f.write_bytes(b'{"text": "hello"}\n{"text": "\xff\xfe broken"}\n')
    return refused(run_on(tmp, [f]), "bad.jsonl:2")


@case("txt-invalid-utf8")
def _(tmp):
    f = tmp / "bad.txt"
    f.write_bytes(b"fine text " * 100 + b"\xc3\x28")
    return refused(run_on(tmp, [f]), "bad.txt")


@case("jsonl-float-ids")
def _(tmp):
    return refused(run_on(tmp, [ids_file(tmp, [*GOOD[:50], 2.7, *GOOD])]), "2.7")


@case("jsonl-negative-ids")
def _(tmp):
    return refused(run_on(tmp, [ids_file(tmp, [*GOOD[:50], -3, *GOOD])]), "-3")


@case("jsonl-ids-beyond-vocab")
def _(tmp):
    return refused(run_on(tmp, [ids_file(tmp, [*GOOD[:50], 99_999, *GOOD])]), "99999", "vocab_size")


@case("jsonl-string-ids")
def _(tmp):
    return refused(run_on(tmp, [ids_file(tmp, [*GOOD[:50], "seven", *GOOD])]), "seven")


@case("jsonl-not-json")
def _(tmp):
    f = tmp / "rows.jsonl"
    f.write_text(json.dumps({"input_ids": GOOD}) + "\n{not json\n")
    return refused(run_on(tmp, [f]), "rows.jsonl:2")


@case("jsonl-missing-field")
def _(tmp):
    f = tmp / "rows.jsonl"
    f.write_text(json.dumps({"tokens": GOOD}) + "\n")
    return refused(run_on(tmp, [f]), "rows.jsonl", "input_ids")


@case("jsonl-a-list-per-line")
def _(tmp):
    f = tmp / "rows.jsonl"
    f.write_text(json.dumps(GOOD) + "\n")
    return refused(run_on(tmp, [f]), "rows.jsonl")


@case("empty-file")
def _(tmp):
    f = tmp / "empty.jsonl"
    f.write_text("")
    return refused(run_on(tmp, [f]), "empty.jsonl")


@case("binary-file-as-parquet")
def _(tmp):
    f = tmp / "junk.parquet"
    f.write_bytes(bytes(range(256)) * 64)
    return refused(run_on(tmp, [f]), "junk.parquet")


@case("parquet-wrong-column")
def _(tmp):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp / "rows.parquet"
    pq.write_table(pa.table({"tokens": [GOOD, GOOD]}), f)
    return refused(run_on(tmp, [f]), "rows.parquet", "input_ids")


@case("parquet-float-column")
def _(tmp):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp / "rows.parquet"
    pq.write_table(pa.table({"input_ids": [[float(i) + 0.5 for i in GOOD]]}), f)
    return refused(run_on(tmp, [f]), "rows.parquet")


@case("corpus-smaller-than-a-batch")
def _(tmp):
    return refused(run_on(tmp, [ids_file(tmp, GOOD[:20])], batch_size=4), "batch_size")


@case("unsupported-extension")
def _(tmp):
    f = tmp / "rows.csv"
    f.write_text("a,b\n1,2\n")
    return refused(run_on(tmp, [f]), "rows.csv")


@case("path-missing")
def _(tmp):
    return refused(run_on(tmp, [tmp / "nowhere.jsonl"]), "nowhere.jsonl")


@case("folder-without-data-files")
def _(tmp):
    (tmp / "folder").mkdir()
    (tmp / "folder" / "notes.md").write_text("nothing here")
    return refused(run_on(tmp, [tmp / "folder"]), "folder")


@case("tokenizer-path-missing")
def _(tmp):
    f = tmp / "doc.txt"
    f.write_text("some words " * 400)
    config = tiny_config(
        tmp, data={"source": "local", "paths": [str(f)], "tokenizer": str(tmp / "no-tokenizer.json"), "seq_len": 16, "batch_size": 2},
        sampler={"window_len": 8}, hybrid={"ratio": 0.0}, eval={"rows": 2, "episodes": 0},
    )  # fmt: skip
    return refused(train(["--config", str(config), "--run-dir", str(tmp / "run")]), "no-tokenizer.json")


@case("text-data-too-short-for-an-episode")
def _(tmp):
    f = tmp / "doc.txt"
    f.write_text("the cat sat on the mat " * 30)
    config = tiny_config(
        tmp, data={"source": "local", "paths": [str(f)], "tokenizer": tokenizer_file(), "seq_len": 16, "batch_size": 2},
        sampler={"window_len": 8}, hybrid={"ratio": 1.0}, eval={"rows": 2, "episodes": 0},
    )  # fmt: skip
    return refused(train(["--config", str(config), "--run-dir", str(tmp / "run")]), "sampler")
