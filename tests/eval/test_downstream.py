"""The offline downstream task: labels from held-out documents, right episodes, deterministic evaluation."""

from __future__ import annotations

import pytest
import torch

from picomaml.data.corpus import is_heldout
from picomaml.eval.downstream import (
    documents_dataset,
    downstream_eval,
    load_downstream_dataset,
    split_paragraphs,
)
from picomaml.eval.leopard import to_episodes
from picomaml.meta.head import MetaHead
from picomaml.meta.inner_loop import InnerLoop
from picomaml.meta.objectives import pool_features
from picomaml.model.config import PicoDecoderConfig
from picomaml.model.decoder import PicoDecoder

pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from picomaml.data.corpus import load_default_corpus

    # one build per session shared with test_suite.py (same path under the session's base temp dir)
    return load_default_corpus(seq_len=33, cache_dir=tmp_path_factory.getbasetemp() / "eval-corpus")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = PicoDecoderConfig(
        vocab_size=8192, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64
    )
    return PicoDecoder(cfg)


def test_split_paragraphs_keeps_prose_only():
    text = (
        "Short.\n\n"
        + "A real paragraph of prose that is long enough\n   to be kept as one.\n \n"
        + "x = [1, 2, 3] " * 8
    )
    assert split_paragraphs(text, min_chars=40) == [
        "A real paragraph of prose that is long enough to be kept as one."
    ]


def test_documents_dataset_labels_and_duplicates():
    para = "This paragraph is shared by two documents and so cannot be classified at all."
    docs = [
        ("module:a", f"Alpha one is a paragraph about alpha things.\n\n{para}"),
        ("topic:b", f"Beta paragraph about beta things, long enough.\n\n{para}\n\n{para}"),
    ]
    ds = documents_dataset(docs, min_chars=30)
    assert ds.label_names == ["module:a", "topic:b"]
    assert para not in ds.texts and ds.counts() == [1, 1]
    assert (
        ds.label_names[ds.labels[ds.texts.index("Beta paragraph about beta things, long enough.")]]
        == "topic:b"
    )


def test_heldout_labels_come_from_heldout_documents(corpus):
    ds = load_downstream_dataset("heldout", corpus=corpus)
    assert ds.label_names and all(is_heldout(n) for n in ds.label_names)
    assert {n.split(":")[0] for n in ds.label_names} == {"topic", "module"}
    assert sum(c >= 8 for c in ds.counts()) >= 10  # enough labels for 5-way 4-shot, 4 queries
    train = load_downstream_dataset("train", corpus=corpus)
    assert not set(train.label_names) & set(ds.label_names)


def test_episodes_have_right_shapes_and_labels(corpus):
    ds = load_downstream_dataset("heldout", corpus=corpus)
    tok = corpus.tokenizer
    ep = to_episodes(ds, tok, n_way=5, k_shot=2, n_query=3, window_len=24, episodes=4, seed=0)
    assert ep.support_ids.shape == (4, 10, 24) and ep.query_ids.shape == (4, 15, 24)
    assert ep.support_labels.tolist() == [[i // 2 for i in range(10)]] * 4
    assert int(ep.support_ids.max()) < tok.vocab_size
    assert bool(ep.support_valid[..., 0].all())  # every window starts with a real token
    # a window's text is the start of a paragraph of the label it stands for
    text = tok.decode(ep.support_ids[0, 0][ep.support_valid[0, 0]].tolist())
    label = int(ep.class_ids[0, 0])
    assert any(p.startswith(text) for p, y in zip(ds.texts, ds.labels, strict=True) if y == label)


def test_pool_text_features():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    assert torch.equal(pool_features(hidden, None, "last", valid=mask), hidden[[0, 1], [1, 3]])
    assert torch.allclose(pool_features(hidden, None, "mean", valid=mask)[0], hidden[0, :2].mean(0))
    with pytest.raises(ValueError, match="pooling"):
        pool_features(hidden, None, "mask", valid=mask)


def test_downstream_eval_is_deterministic_and_in_range(corpus, model):
    ds = load_downstream_dataset("heldout", corpus=corpus)
    head = MetaHead(32, 3, init="prototype")
    loop = InnerLoop(steps=2, lr=0.1)
    kwargs = dict(
        n_way=5,
        k_shot=2,
        n_query=2,
        window_len=24,
        episodes=6,
        head=head,
        inner_loop=loop,
        dataset=ds,
        seed=3,
    )
    first = downstream_eval(model, corpus.tokenizer, **kwargs)
    second = downstream_eval(model, corpus.tokenizer, **kwargs, episodes_per_batch=4)
    assert first.per_episode_ncm == second.per_episode_ncm
    assert first.per_episode_after == pytest.approx(second.per_episode_after)
    assert len(first.per_episode_ncm) == 6 and len(first.per_episode_after) == 6
    assert all(0.0 <= a <= 1.0 for a in first.per_episode_ncm + first.per_episode_after)
    assert first.chance == pytest.approx(0.2) and first.acc_after is not None and first.acc_after_ci >= 0
    assert model.training  # mode restored
    ncm_only = downstream_eval(
        model, corpus.tokenizer, n_way=5, k_shot=2, n_query=2, window_len=24, episodes=6, dataset=ds, seed=3
    )
    assert ncm_only.acc_after is None and ncm_only.per_episode_ncm == first.per_episode_ncm


def test_downstream_eval_errors(corpus, model):
    ds = load_downstream_dataset("heldout", corpus=corpus)
    with pytest.raises(ValueError, match="inner_loop"):
        downstream_eval(model, corpus.tokenizer, episodes=1, head=MetaHead(32, 5), dataset=ds)
    with pytest.raises(ValueError, match="labels with enough examples"):
        downstream_eval(model, corpus.tokenizer, n_way=5, k_shot=500, episodes=1, dataset=ds)
    with pytest.raises(ValueError, match="pooling"):
        downstream_eval(model, corpus.tokenizer, episodes=1, dataset=ds, pooling="mask")
    small = PicoDecoder(
        PicoDecoderConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32)
    )
    with pytest.raises(ValueError, match="vocabulary"):
        downstream_eval(small, corpus.tokenizer, episodes=1, dataset=ds, window_len=16)
