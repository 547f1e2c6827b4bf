from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from picomaml.data.display import format_episode, format_window

WORDS = ["<mask>", "the", "cat", "dog", "sat", "ran", "on", "mat", "far", "away"]
MASK = 0


class WordTokenizer:
    """id -> word; decode joins with spaces (a stand-in with exactly known output)."""

    def decode(self, ids):
        return " ".join(WORDS[i] for i in ids)


def _episode(episode_cls):
    # 2-way, 3-shot, 1 query; label 0 stands for "cat" (2), label 1 for "dog" (3), windows of 4
    support = torch.tensor([[1, MASK, 4, 6], [MASK, 5, 8, 9], [1, MASK, 5, 9], [1, MASK, 4, 7], [1, MASK, 5, 6],
                            [MASK, 4, 1, MASK]])  # fmt: skip
    query = torch.tensor([[1, MASK, 4, 6], [MASK, 5, 8, 9]])
    return episode_cls(
        support_ids=support,
        support_labels=torch.tensor([0, 0, 0, 1, 1, 1]),
        support_mask=support == MASK,
        query_ids=query,
        query_labels=torch.tensor([0, 1]),
        query_mask=query == MASK,
        class_token_ids=torch.tensor([2, 3]),
    )


def _episode_class():
    try:
        from picomaml.meta.episode import Episode
    except ImportError:  # written in parallel by another module owner
        return SimpleNamespace
    return Episode


def test_format_episode_shows_classes_and_masks():
    text = format_episode(_episode(_episode_class()), WordTokenizer(), max_windows_per_class=2)
    lines = text.splitlines()
    assert lines[0] == "label 0: class token 'cat' (id 2)"
    assert lines[1] == "  support | the[MASK]sat on"
    assert lines[2] == "  support | [MASK]ran far away"
    assert lines[3] == "  support | ... 1 more"
    assert lines[4] == "  query   | the[MASK]sat on"
    assert "label 1: class token 'dog' (id 3)" in lines
    assert "  support | the[MASK]sat mat" in lines and "[MASK]sat the[MASK]" not in text  # third window cut
    assert text.count("[MASK]") == 6  # 2 support + 1 query windows per label, one mask each
    full = format_episode(
        _episode(SimpleNamespace), WordTokenizer(), max_windows_per_class=10, mask_text="<<M>>"
    )
    assert "more" not in full and full.count("<<M>>") == 9


def test_format_stacked_episode():
    one = _episode(SimpleNamespace)
    stacked = SimpleNamespace(**{k: torch.stack([v, v]) for k, v in vars(one).items()})
    text = format_episode(stacked, WordTokenizer(), max_windows_per_class=1)
    assert text.splitlines()[0] == "task 0" and "task 1" in text.splitlines()
    assert text.count("class token 'cat'") == 2


def test_format_with_real_tokenizer(small_raw_tokenizer):
    from picomaml.data.tokenizer import TokenizerWrapper

    tok = TokenizerWrapper(small_raw_tokenizer)
    ids = torch.tensor(tok.encode("the cat sat on the mat"))
    cat = tok.encode(" cat")
    assert len(cat) == 1
    mask = ids == cat[0]
    assert format_window(ids, mask, tok) == "the[MASK] sat on the mat"
    assert format_window(ids, mask, tok, class_text=" cat") == "the [MASK] sat on the mat"
    text = format_episode(
        SimpleNamespace(support_ids=ids[None].masked_fill(mask, 99), support_labels=torch.tensor([0]),
                        support_mask=mask[None], query_ids=ids[None, :0], query_labels=torch.tensor([], dtype=torch.long),
                        query_mask=mask[None, :0], class_token_ids=torch.tensor(cat)),
        tok,
    )  # fmt: skip
    assert text.splitlines() == [
        f"label 0: class token ' cat' (id {cat[0]})",
        "  support | the [MASK] sat on the mat",
    ]


def test_errors():
    with pytest.raises(ValueError, match="max_windows_per_class"):
        format_episode(_episode(SimpleNamespace), WordTokenizer(), max_windows_per_class=-1)
    with pytest.raises(TypeError, match="query_ids"):
        format_episode(SimpleNamespace(support_ids=torch.zeros(2, 2)), WordTokenizer())
    with pytest.raises(ValueError, match="same shape"):
        format_window(torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.bool), WordTokenizer())


def test_format_text_episode_names_classes_and_drops_padding():
    # a text episode: no masked class token, right-padded rows (pad id 9 = "away"), dataset label ids
    ids = torch.tensor([[1, 2, 4, 9], [1, 3, 9, 9]])
    valid = ids != 9
    episode = SimpleNamespace(
        support_ids=ids, support_labels=torch.tensor([0, 1]), support_mask=torch.zeros_like(valid),
        support_valid=valid, query_ids=ids[:0], query_labels=torch.tensor([], dtype=torch.long),
        query_mask=valid[:0], query_valid=valid[:0], class_ids=torch.tensor([5, 2]), padded=True,
    )  # fmt: skip
    text = format_episode(episode, WordTokenizer(), class_names=[f"name{i}" for i in range(6)])
    assert text.splitlines() == [
        "label 0: class 'name5' (id 5)",
        "  support | the cat sat",
        "label 1: class 'name2' (id 2)",
        "  support | the dog",
    ]
    assert format_episode(episode, WordTokenizer()).splitlines()[0] == "label 0: class (id 5)"
    assert format_window(ids[1], valid[1] & False, WordTokenizer(), valid=valid[1]) == "the dog"
    with pytest.raises(ValueError, match="valid"):
        format_window(ids[1], valid[1], WordTokenizer(), valid=valid[1, :2])
