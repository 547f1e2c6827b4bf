"""Fixtures for tests/data: one embedded-corpus build per session and a small trained tokenizer."""

from __future__ import annotations

import time

import pytest


@pytest.fixture(scope="session")
def corpus_build(tmp_path_factory):
    """The embedded corpus built once into a fresh cache dir: (corpus, cache_root, cold build seconds)."""
    from picomaml.data.corpus import load_default_corpus

    root = tmp_path_factory.mktemp("corpus-cache-a")
    start = time.perf_counter()
    corpus = load_default_corpus(seq_len=64, cache_dir=root)
    return corpus, root, time.perf_counter() - start


@pytest.fixture
def small_raw_tokenizer(_small_tokenizer_json):
    """A fresh copy (wrappers add a mask token in place) of a tiny byte-level BPE ``tokenizers.Tokenizer``
    with only an ``<|endoftext|>`` special (no pad, no mask)."""
    tk = pytest.importorskip("tokenizers")
    return tk.Tokenizer.from_str(_small_tokenizer_json)


@pytest.fixture(scope="session")
def _small_tokenizer_json():
    tk = pytest.importorskip("tokenizers")
    texts = ["the cat sat on the mat", "a dog ate the bone", "hello world, hello tokenizer"] * 20
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer.to_str()
