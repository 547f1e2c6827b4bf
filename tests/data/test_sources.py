from __future__ import annotations

import json
import types

import pytest
import torch

from picomaml.data.sources import TokenRows, iter_sequences, iter_token_rows, load_token_rows, resolve_files


class CharTokenizer:
    """One id per character (ord % 250 + 1), eos = 0: enough to check packing exactly."""

    eos_token_id = 0

    def encode(self, text):
        return [ord(c) % 250 + 1 for c in text]


TOK = CharTokenizer()


def _expected_rows(stream, seq_len):
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).reshape(n, seq_len)


def test_txt_files_are_documents_with_eos(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.txt").write_text("second doc!")
    stream = [*TOK.encode("hello world"), 0, *TOK.encode("second doc!"), 0]
    rows = load_token_rows(tmp_path, seq_len=5, tokenizer=TOK)
    assert torch.equal(rows, _expected_rows(stream, 5))
    assert rows.dtype == torch.long


def test_jsonl_text_and_ids(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [{"text": "abc"}, {"input_ids": [7, 8, 9, 10]}, {"text": "xy", "meta": 1}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    stream = [*TOK.encode("abc"), 0, 7, 8, 9, 10, *TOK.encode("xy"), 0]
    assert list(iter_sequences(path, TOK)) == [[*TOK.encode("abc"), 0], [7, 8, 9, 10], [*TOK.encode("xy"), 0]]
    rows = list(iter_token_rows(path, 3, TOK))
    assert all(r.shape == (3,) for r in rows)
    assert torch.equal(torch.stack(rows), _expected_rows(stream, 3))


def test_parquet_ids_and_text(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    ids = [[i * 10 + j for j in range(6)] for i in range(5)]
    pq.write_table(pa.table({"input_ids": ids, "other": list(range(5))}), tmp_path / "ids.parquet")
    rows = load_token_rows(tmp_path / "ids.parquet", seq_len=4)  # no tokenizer needed for ids
    assert torch.equal(rows, _expected_rows([t for r in ids for t in r], 4))
    pq.write_table(pa.table({"text": ["ab", "cde"]}), tmp_path / "text.parquet")
    rows = load_token_rows(tmp_path / "text.parquet", seq_len=2, tokenizer=TOK)
    assert torch.equal(rows, _expected_rows([*TOK.encode("ab"), 0, *TOK.encode("cde"), 0], 2))


def test_batches_and_reiteration(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        "\n".join(json.dumps({"input_ids": list(range(i, i + 10))}) for i in range(7))
    )
    source = TokenRows(tmp_path, seq_len=4, batch_size=3)
    batches = list(source)
    assert [b.shape for b in batches] == [(3, 4)] * 5  # 70 tokens -> 17 rows -> 5 full batches
    assert torch.equal(torch.cat(batches), source.to_tensor()[:15])
    assert torch.equal(torch.cat(list(source)), torch.cat(batches))  # iterating again starts over
    last = list(iter_token_rows(tmp_path, 4, batch_size=3, drop_last=False))[-1]
    assert last.shape == (2, 4)
    assert load_token_rows(tmp_path, 4, max_rows=2).shape == (2, 4)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        iter_token_rows(tmp_path / "nope.txt", 4, TOK)  # eager: fails at the call
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match=r"\.csv.*allowed"):
        resolve_files(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError, match="no data files"):
        resolve_files(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x", "id": 1}))
    with pytest.raises(KeyError, match=r"fields found: \['body', 'id'\]"):
        load_token_rows(bad, 4, TOK)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_token_rows(bad, 4, TOK)
    bad.unlink()
    (tmp_path / "t.txt").write_text("text needs a tokenizer")
    with pytest.raises(ValueError, match="tokenizer="):
        load_token_rows(tmp_path / "t.txt", 4)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        load_token_rows(tmp_path / "t.txt", 1000, TOK)
    with pytest.raises(ValueError, match="seq_len"):
        iter_token_rows(tmp_path / "t.txt", 1, TOK)


def test_parquet_missing_column_lists_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"tokens": [[1, 2]], "score": [0.5]}), tmp_path / "p.parquet")
    with pytest.raises(KeyError, match=r"columns found: \['tokens', 'score'\]"):
        load_token_rows(tmp_path / "p.parquet", 2)
    assert load_token_rows(tmp_path / "p.parquet", 2, ids_key="tokens").tolist() == [[1, 2]]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("float.jsonl", b'{"input_ids": [1, 2.7, 3]}\n', r"float.jsonl:1 input_ids: token id #1 is 2.7, not an integer >= 0"),
        ("neg.jsonl", b'{"input_ids": [1, -2]}\n', r"token id #1 is -2"),
        ("str.jsonl", b'{"input_ids": "1 2 3"}\n', r"token ids must be a list of integers, got str"),
        ("num.jsonl", b'{"text": 12}\n', r"num.jsonl:1: text must be a string, got int"),
        ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"latin1.jsonl:2: not UTF-8 text \(byte 13"),
        ("binary.txt", b"\xff\xfe\x00\x01", r"binary.txt: not UTF-8 text \(byte 0"),
        ("empty.txt", b"", r"empty.txt: fewer than seq_len=4 tokens in all"),
        ("junk.parquet", b"not parquet", r"junk.parquet: not a readable parquet file"),
    ],
)
def test_a_bad_data_file_is_a_data_error_naming_file_and_place(tmp_path, name, content, message):
    from picomaml.data.sources import DataError

    path = tmp_path / name
    path.write_bytes(content)
    tokenizer = types.SimpleNamespace(encode=lambda text: [ord(c) % 50 for c in text], eos_token_id=0)
    with pytest.raises(DataError, match=message):
        load_token_rows(path, seq_len=4, tokenizer=tokenizer)
