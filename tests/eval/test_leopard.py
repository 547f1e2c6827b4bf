"""The LEOPARD-format loader: parses generated files, rejects malformed ones clearly, builds right episodes."""

from __future__ import annotations

import json

import pytest
import torch

from picomaml.eval.leopard import (
    FewShotDataset,
    LeopardFormatError,
    load_leopard_file,
    parse_leopard_name,
    to_episodes,
    tokenize_examples,
)


class CharTokenizer:
    """One id per character (ids 3..), pad 1, eos 0: enough to check windows exactly."""

    pad_token_id, eos_token_id = 1, 0

    def encode(self, text: str) -> list[int]:
        return [3 + (ord(c) % 50) for c in text]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]


def _write(path, records, jsonl=True):
    if jsonl:
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    else:
        path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _records(labels=("neg", "pos", "neutral"), per_label=4, pair=False):
    out = []
    for y in labels:
        for i in range(per_label):
            r = {"sentence1": f"{y} example {i}", "label": y}
            if pair:
                r["sentence2"] = f"second {i}"
            out.append(r)
    return out


def test_load_generated_file(tmp_path):
    path = _write(tmp_path / "airline_train_4_7.jsonl", _records())
    ds = load_leopard_file(path)
    assert ds.label_names == ["neg", "neutral", "pos"]
    assert len(ds) == 12 and ds.counts() == [4, 4, 4]
    assert ds.texts[0] == "neg example 0" and ds.label_names[ds.labels[0]] == "neg"
    assert ds.text_pairs is None
    assert (ds.task, ds.split, ds.k_shot, ds.seed) == ("airline", "train", 4, 7)


def test_original_release_order_and_json_array(tmp_path):
    # <task>_train_<seed>_<k>.json holding a JSON array: k is the number equal to the per-label count
    path = _write(
        tmp_path / "scitail_train_2_8.json", _records(("entails", "neutral"), 8, pair=True), jsonl=False
    )
    ds = load_leopard_file(path)
    assert (ds.k_shot, ds.seed) == (8, 2)
    assert ds.text_pairs is not None and ds.text_pairs[0] == "second 0"


def test_integer_labels_and_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"sentence1": "a b", "label": 0}\n\n{"sentence1": "c d", "label": 1, "extra": 5}\n')
    ds = load_leopard_file(path)
    assert ds.label_names == ["0", "1"] and ds.labels == [0, 1]
    assert ds.task is None
    with pytest.raises(LeopardFormatError, match="file name"):
        load_leopard_file(path, strict_name=True)


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"label": "x"}', "line 2: missing field 'sentence1'"),
        ('{"sentence1": "", "label": "x"}', "line 2: field 'sentence1' must be a non-empty string"),
        ('{"sentence1": 3, "label": "x"}', "line 2: field 'sentence1'"),
        ('{"sentence1": "ok"}', "line 2: missing field 'label'"),
        ('{"sentence1": "ok", "label": 1.5}', "line 2: field 'label' must be"),
        ('{"sentence1": "ok", "label": true}', "line 2: field 'label' must be"),
        ('{"sentence1": "ok", "sentence2": 4, "label": "x"}', "line 2: field 'sentence2'"),
        ('["sentence1", "label"]', "line 2: expected a JSON object"),
        ('{"sentence1": "ok", "label": "x"', "line 2: invalid JSON"),
    ],
)
def test_malformed_lines_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad_train_4_0.jsonl"
    path.write_text('{"sentence1": "fine", "label": "x"}\n' + line + "\n")
    with pytest.raises(LeopardFormatError, match=message) as info:
        load_leopard_file(path)
    assert "bad_train_4_0.jsonl" in str(info.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_leopard_file(tmp_path / "nope.jsonl")
    (tmp_path / "empty_eval.jsonl").write_text("\n\n")
    with pytest.raises(LeopardFormatError, match="no records"):
        load_leopard_file(tmp_path / "empty_eval.jsonl")
    assert parse_leopard_name("x_y_eval.jsonl") == {"task": "x_y", "split": "eval", "numbers": ()}


def test_tokenize_truncates_pads_and_joins_pairs():
    ds = FewShotDataset(["abcdef", "ab"], [0, 1], ["a", "b"], text_pairs=["xy", None])
    ids, valid = tokenize_examples(ds, CharTokenizer(), 5)
    tok = CharTokenizer()
    assert ids[0].tolist() == tok.encode("abcde")  # truncated before the pair
    assert ids[1].tolist() == tok.encode("ab") + [1, 1, 1]  # right-padded with the pad id
    assert valid.sum(1).tolist() == [5, 2]
    ids, _ = tokenize_examples(ds, tok, 10)
    assert ids[0].tolist() == tok.encode("abcdef") + [0] + tok.encode("xy") + [1]  # eos between pair texts


def test_episodes_shapes_labels_and_determinism(tmp_path):
    ds = load_leopard_file(_write(tmp_path / "t_train_6_0.jsonl", _records(("a", "b", "c", "d"), 6)))
    tok = CharTokenizer()
    ep = to_episodes(ds, tok, n_way=3, k_shot=2, n_query=3, window_len=12, episodes=5, seed=1)
    assert ep.support_ids.shape == (5, 6, 12) and ep.query_ids.shape == (5, 9, 12)
    assert ep.support_labels[0].tolist() == [0, 0, 1, 1, 2, 2]
    assert ep.query_labels[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    ids, _ = tokenize_examples(ds, tok, 12)
    for e in range(5):
        classes = ep.class_ids[e].tolist()
        assert len(set(classes)) == 3
        rows = torch.cat([ep.support_ids[e], ep.query_ids[e]])
        labels = torch.cat([ep.support_labels[e], ep.query_labels[e]])
        found = [int((ids == r).all(1).nonzero()[0]) for r in rows]  # the source example of every row
        assert len(set(found)) == len(found)  # support and query never share an example
        assert [ds.labels[i] for i in found] == [classes[y] for y in labels.tolist()]
    again = to_episodes(ds, tok, n_way=3, k_shot=2, n_query=3, window_len=12, episodes=5, seed=1)
    assert torch.equal(again.support_ids, ep.support_ids) and torch.equal(again.class_ids, ep.class_ids)
    other = to_episodes(ds, tok, n_way=3, k_shot=2, n_query=3, window_len=12, episodes=5, seed=2)
    assert not torch.equal(other.class_ids, ep.class_ids)


def test_episodes_with_a_separate_query_file_and_errors(tmp_path):
    train = load_leopard_file(_write(tmp_path / "t_train_2_0.jsonl", _records(("a", "b"), 2)))
    test = load_leopard_file(_write(tmp_path / "t_eval.jsonl", _records(("b", "a"), 5)))
    ep = to_episodes(
        train, CharTokenizer(), n_way=2, k_shot=2, n_query=4, window_len=16, episodes=3, query_dataset=test
    )
    assert ep.query_ids.shape == (3, 8, 16)
    dec = {tuple(CharTokenizer().encode(t)): t for t in test.texts}
    for e in range(3):
        for row, y in zip(ep.query_ids[e], ep.query_labels[e].tolist(), strict=True):
            text = dec[tuple(t for t in row.tolist() if t != 1)]
            assert text.startswith(train.label_names[int(ep.class_ids[e, y])])
    with pytest.raises(ValueError, match="only 0 have them"):
        to_episodes(train, CharTokenizer(), n_way=2, k_shot=3, n_query=1, window_len=8, episodes=1)
    with pytest.raises(ValueError, match="n_way"):
        to_episodes(train, CharTokenizer(), n_way=1, k_shot=1, n_query=1, window_len=8, episodes=1)


def test_text_episodes_share_the_episode_fields_and_featuriser(tmp_path):
    from picomaml.meta.episode import COMMON_FIELDS
    from picomaml.meta.objectives import episode_features, pool_features

    ds = load_leopard_file(_write(tmp_path / "t_train_6_0.jsonl", _records(("a", "b", "c"), 6)))
    ep = to_episodes(ds, CharTokenizer(), n_way=3, k_shot=2, n_query=2, window_len=12, episodes=2, seed=0)
    assert all(hasattr(ep, name) for name in COMMON_FIELDS) and ep.padded
    assert not bool(ep.support_mask.any() or ep.query_mask.any())  # no class token is masked in text
    assert bool((ep.support_valid == (ep.support_ids != 1)).all())  # valid: the non-pad tokens
    assert ep.slice(1, 2).class_ids.tolist() == ep.class_ids[1:].tolist()

    emb = torch.nn.Embedding(64, 4)
    xs, ys, xq, yq = episode_features(None, ep, "mean", features=emb)
    for t in range(2):  # each window is the mean over its real tokens only
        ref = pool_features(emb(ep.support_ids[t]), None, "mean", valid=ep.support_valid[t])
        torch.testing.assert_close(xs[t], ref)
    last = episode_features(None, ep, "last", features=emb).query_feats
    lengths = ep.query_valid.sum(-1)
    torch.testing.assert_close(last[1, 0], emb(ep.query_ids[1, 0, lengths[1, 0] - 1]))
    assert torch.equal(ys, ep.support_labels) and torch.equal(yq, ep.query_labels)
