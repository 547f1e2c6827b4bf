from __future__ import annotations

import json
import time

import pytest
import torch

from picomaml.data.corpus import (
    SPECIAL_TOKENS,
    corpus_cache_dir,
    is_heldout,
    load_default_corpus,
    pack_rows,
)

pytest.importorskip("tokenizers")


def test_rows_shape_dtype_and_ids(corpus_build):
    corpus, _, _ = corpus_build
    tok = corpus.tokenizer
    for rows in (corpus.train_rows, corpus.heldout_rows):
        assert rows.dtype == torch.long and rows.dim() == 2 and rows.shape[1] == 64
        assert rows.shape[0] > 10
        assert int(rows.min()) >= 0 and int(rows.max()) < tok.vocab_size
    assert tok.vocab_size == 8192
    assert len({tok.eos_token_id, tok.pad_token_id, tok.mask_token_id}) == 3
    assert tok.convert_ids_to_tokens([0, 1, 2]) == list(SPECIAL_TOKENS)
    # rows are the packed stream, in order
    n = corpus.train_rows.numel()
    assert torch.equal(corpus.train_rows.flatten(), corpus.train_tokens[:n].long())
    # specials: EOS ends every document, pad and mask never occur in text
    assert int((corpus.train_tokens == tok.eos_token_id).sum()) == len(corpus.train_documents)
    assert not bool(
        ((corpus.train_tokens == tok.pad_token_id) | (corpus.train_tokens == tok.mask_token_id)).any()
    )


def test_stats_match_tensors(corpus_build):
    corpus, _, _ = corpus_build
    stats = corpus.stats
    assert stats["train"]["tokens"] == corpus.train_tokens.numel()
    assert stats["heldout"]["tokens"] == corpus.heldout_tokens.numel()
    assert stats["train"]["documents"] == len(corpus.train_documents)
    assert stats["train"]["characters"] == sum(len(t) for _, t in corpus.train_documents)
    assert stats["train"]["topics"] > 50 and stats["train"]["modules"] > 200
    assert stats["train"]["characters"] > 1_000_000  # English prose: topics + stdlib docstrings


def test_split_is_by_document_and_disjoint(corpus_build):
    corpus, _, _ = corpus_build
    train_names = {n for n, _ in corpus.train_documents}
    held_names = {n for n, _ in corpus.heldout_documents}
    assert train_names.isdisjoint(held_names)
    assert all(is_heldout(n) for n in held_names) and not any(is_heldout(n) for n in train_names)
    total = len(train_names) + len(held_names)
    assert 0.04 * total < len(held_names) < 0.12 * total
    assert {t for _, t in corpus.train_documents}.isdisjoint({t for _, t in corpus.heldout_documents})
    # documents decode back from their token slices
    doc = corpus.document_tokens("heldout", 0)
    assert int(doc[-1]) == corpus.tokenizer.eos_token_id
    assert corpus.tokenizer.decode(doc[:-1]) == corpus.heldout_documents[0][1]


def test_documents_are_safe_prose(corpus_build):
    corpus, _, _ = corpus_build
    names = sorted(n for n, _ in corpus.train_documents + corpus.heldout_documents)
    assert [n for n, _ in corpus.train_documents] == sorted(n for n, _ in corpus.train_documents)
    assert len(names) == len(set(names))
    assert "module:json" in names and "topic:if" in names
    banned = ("test", "idlelib", "tkinter", "turtledemo", "lib2to3", "antigravity", "this")
    assert not [n for n in names if n.startswith("module:") and n[7:].split(".")[0] in banned]


def test_warm_load_is_fast_and_identical(corpus_build):
    corpus, root, cold = corpus_build
    start = time.perf_counter()
    again = load_default_corpus(seq_len=64, cache_dir=root)
    warm = time.perf_counter() - start
    assert warm < 2.0 and warm < cold
    assert torch.equal(again.train_rows, corpus.train_rows)
    assert again.stats == corpus.stats


def test_other_seq_len_reuses_cache(corpus_build):
    corpus, root, _ = corpus_build
    other = load_default_corpus(seq_len=100, cache_dir=root)
    assert other.train_rows.shape == (corpus.train_tokens.numel() // 100, 100)
    assert torch.equal(other.train_rows.flatten(), corpus.train_rows.flatten()[: other.train_rows.numel()])


def test_build_is_deterministic(corpus_build, tmp_path):
    """A second build into another cache dir gives a byte-identical tokenizer and identical tensors.

    The document list is remembered within the process, so this rebuild exercises tokenizer training and
    encoding (the parts with threads and hash maps); the document walk is sorted at every level.
    """
    corpus, root, _ = corpus_build
    second_corpus = load_default_corpus(seq_len=64, cache_dir=tmp_path)
    assert torch.equal(second_corpus.train_rows, corpus.train_rows)
    assert torch.equal(second_corpus.heldout_rows, corpus.heldout_rows)
    first, second = corpus_cache_dir(root), corpus_cache_dir(tmp_path)
    assert first.name == second.name
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    for name in ("train_tokens.pt", "heldout_tokens.pt"):
        a, b = torch.load(first / name), torch.load(second / name)
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["offsets"], b["offsets"])
    m1 = json.loads((first / "manifest.json").read_text())
    m2 = json.loads((second / "manifest.json").read_text())
    for m in (m1, m2):
        m.pop("build_seconds")
        m.pop("phase_seconds")
    assert m1 == m2


def test_cache_dir_env_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOMAML_CACHE", str(tmp_path))
    assert corpus_cache_dir().parent == tmp_path
    assert corpus_cache_dir(tmp_path / "x").parent == tmp_path / "x"
    assert corpus_cache_dir().name.startswith("corpus-")
    with pytest.raises(ValueError, match="seq_len"):
        load_default_corpus(seq_len=1, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="seq_len"):
        pack_rows(torch.arange(10), 0)
    assert pack_rows(torch.arange(10), 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
