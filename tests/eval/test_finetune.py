"""Fine-tuning evaluations: tagging metrics, subword alignment, head-only and full fine-tuning, k-shot classification."""

from __future__ import annotations

import importlib.metadata
import json
import math
import random
import warnings
from pathlib import Path

import pytest
import torch

from picomaml.data.labelled import LabelledText, TaggedSentence, read_conllu
from picomaml.data.tokenizer import TokenizerWrapper
from picomaml.eval.finetune import (
    ClassificationResult,
    TaggingResult,
    finetune_classifier,
    finetune_eval,
    finetune_tagger,
)
from picomaml.eval.tagging import (
    IGNORE_INDEX,
    align_subwords,
    entity_chunks,
    entity_scores,
    is_bio,
    macro_f1,
    token_accuracy,
)
from picomaml.model.config import PicoDecoderConfig
from picomaml.model.decoder import PicoDecoder

KEYS = ["apple", "river", "stone", "cloud"]
FILLER = ["the", "a", "big", "small", "runs", "sees", "near", "over", "red", "blue"]

# -- metrics -------------------------------------------------------------------------------------------------------


def test_entity_chunks_follow_conlleval():
    assert entity_chunks(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    # I- after O or after another type starts a chunk; B- always does
    assert entity_chunks(["I-PER", "I-PER", "B-PER", "I-LOC", "O", "I-LOC"]) == [
        ("PER", 0, 1),
        ("PER", 2, 2),
        ("LOC", 3, 3),
        ("LOC", 5, 5),
    ]
    assert entity_chunks(["O", "O"]) == [] and entity_chunks([]) == []
    assert entity_chunks(["B-ORG-X", "I-ORG-X"]) == [("ORG-X", 0, 1)]
    with pytest.raises(ValueError, match="'NOUN' at position 1"):
        entity_chunks(["O", "NOUN"])
    assert is_bio(["O", "B-A", "I-B"]) and not is_bio(["O", "B-"]) and not is_bio(["S-PER"])


def test_entity_scores_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "I-ORG"]]
    s = entity_scores(gold, pred)  # gold: PER, LOC, ORG; predicted: PER (right), ORG, ORG (too long)
    assert (s.n_gold, s.n_pred, s.n_correct) == (3, 3, 1)
    assert s.precision == s.recall == s.f1 == pytest.approx(1 / 3)
    assert s.per_type == {"LOC": (0.0, 0.0, 0.0), "ORG": (0.0, 0.0, 0.0), "PER": (1.0, 1.0, 1.0)}
    half = entity_scores([["B-A", "O", "B-B"]], [["B-A", "O", "O"]])
    assert (half.precision, half.recall) == (1.0, 0.5) and half.f1 == pytest.approx(2 / 3)
    none = entity_scores([["B-A"]], [["O"]])
    assert (none.precision, none.recall, none.f1) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="pred: sentence 0 has 1 tags for 2"):
        entity_scores([["O", "O"]], [["O"]])


def test_token_metrics_by_hand():
    gold, pred = [["a", "a"], ["b", "c"]], [["a", "b"], ["b", "d"]]
    assert token_accuracy(gold, pred) == 0.5
    # a: p 1, r 1/2 -> 2/3; b: p 1/2, r 1 -> 2/3; c and d: 0 -> (2/3 + 2/3) / 4
    assert macro_f1(gold, pred) == pytest.approx(1 / 3)
    assert macro_f1(["x", "y", "y"], ["x", "y", "x"]) == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert math.isnan(token_accuracy([], []))


def random_tags(rng: random.Random, n: int) -> list[list[str]]:
    tags = ["O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-MISC"]
    return [[rng.choice(tags) for _ in range(rng.randint(1, 12))] for _ in range(n)]


def test_entity_scores_match_seqeval():
    metrics = pytest.importorskip("seqeval.metrics", reason="cross-check needs seqeval: pip install seqeval")
    rng = random.Random(0)
    for _ in range(60):
        gold = random_tags(rng, rng.randint(1, 6))
        pred = [[rng.choice([t, "O", "B-PER", "I-LOC"]) for t in sent] for sent in gold]
        ours = entity_scores(gold, pred)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # seqeval warns when there is no predicted or gold entity
            theirs = (
                metrics.precision_score(gold, pred),
                metrics.recall_score(gold, pred),
                metrics.f1_score(gold, pred),
            )
        assert (ours.precision, ours.recall, ours.f1) == pytest.approx(theirs)


def test_macro_f1_matches_scikit_learn():
    sk = pytest.importorskip("sklearn.metrics", reason="cross-check needs scikit-learn (seqeval installs it)")
    rng = random.Random(1)
    for _ in range(20):
        gold = [rng.choice("abcd") for _ in range(rng.randint(1, 30))]
        pred = [rng.choice("abcde") for _ in gold]
        assert macro_f1(gold, pred) == pytest.approx(
            sk.f1_score(gold, pred, average="macro", zero_division=0)
        )


# -- subword alignment --------------------------------------------------------------------------------------------


class PairTokenizer:
    """Splits a text into pieces of two characters; a piece's id is 3 + its length (so ids are checkable)."""

    pad_token_id = 0

    def encode(self, text: str) -> list[int]:
        return [3 + len(text[i : i + 2]) for i in range(0, len(text), 2)]


def test_align_first_and_last_subword():
    tok = PairTokenizer()
    # "ab" -> 1 piece; " cde" -> 2; " f" -> 1
    a = align_subwords(["ab", "cde", "f"], tok, max_len=10, label_ids=[7, 8, 9])
    assert a.ids == [5, 5, 5, 5] and a.positions == [0, 1, 3]
    assert a.labels == [7, 8, IGNORE_INDEX, 9]
    last = align_subwords(["ab", "cde", "f"], tok, max_len=10, label_ids=[7, 8, 9], subword="last")
    assert last.positions == [0, 2, 3] and last.labels == [7, IGNORE_INDEX, 8, 9]
    # no space after "ab": "cde" is encoded without the prefix (2 pieces: "cd", "e")
    joined = align_subwords(["ab", "cde"], tok, max_len=10, space_after=[False, True])
    assert joined.ids == [5, 5, 4] and joined.positions == [0, 1]


def test_align_truncates_and_marks_cut_words():
    tok = PairTokenizer()
    a = align_subwords(["ab", "cde", "f", "g"], tok, max_len=2, label_ids=[1, 2, 3, 4])
    assert a.ids == [5, 5] and a.labels == [1, 2] and a.positions == [0, 1, -1, -1]
    last = align_subwords(["ab", "cde"], tok, max_len=2, label_ids=[1, 2], subword="last")
    assert last.positions == [0, -1] and last.labels == [1, IGNORE_INDEX]
    with pytest.raises(ValueError, match="subword"):
        align_subwords(["a"], tok, max_len=2, subword="middle")


# -- fine-tuning ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    tk = pytest.importorskip("tokenizers")
    raw = tk.Tokenizer(tk.models.BPE())
    raw.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|eos|>", "<|pad|>"],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = KEYS + FILLER
    raw.train_from_iterator([" ".join(words)] * 50 + [w for w in words for _ in range(20)], trainer=trainer)
    return TokenizerWrapper(raw)


def tiny_model(vocab: int, seed: int = 0) -> PicoDecoder:
    torch.manual_seed(seed)
    cfg = PicoDecoderConfig(
        vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64
    )
    return PicoDecoder(cfg)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer.vocab_size)


def toy_tagging(n: int, seed: int) -> list[TaggedSentence]:
    """Tag ``B-KEY`` for a word of ``KEYS``, ``O`` otherwise: learnable from each word alone."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(KEYS if rng.random() < 0.3 else FILLER) for _ in range(rng.randint(3, 9))]
        out.append(TaggedSentence(words, ["B-KEY" if w in KEYS else "O" for w in words]))
    return out


def toy_texts(n: int, seed: int) -> list[LabelledText]:
    """``fruit`` when the text holds apple or river, ``rock`` when it holds stone or cloud."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(["fruit", "rock"])
        words = [rng.choice(FILLER) for _ in range(3)]
        words.insert(rng.randint(0, 3), rng.choice(KEYS[:2] if label == "fruit" else KEYS[2:]))
        out.append(LabelledText(" ".join(words), label))
    return out


def snapshot(model: torch.nn.Module) -> tuple[dict, dict, bool]:
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {k: p.requires_grad for k, p in model.named_parameters()},
        model.training,
    )


def assert_unchanged(model: torch.nn.Module, before: tuple[dict, dict, bool]) -> None:
    state, flags, training = before
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert flags == {k: p.requires_grad for k, p in model.named_parameters()}
    assert model.training == training and all(p.grad is None for p in model.parameters())


def test_head_only_tagging_learns_and_leaves_the_backbone_alone(tokenizer, model):
    train, test = toy_tagging(80, 0), toy_tagging(30, 1)
    before, rng = snapshot(model), torch.random.get_rng_state()
    res = finetune_tagger(model, tokenizer, train, test, mode="head", epochs=30, lr=0.05, seed=0)
    assert_unchanged(model, before)
    assert torch.equal(rng, torch.random.get_rng_state())  # the call's own generator: global RNG untouched
    assert isinstance(res, TaggingResult) and res.tags == ("B-KEY", "O")
    assert res.token_accuracy >= 0.95 and res.entity_f1 is not None and res.entity_f1 >= 0.9
    assert res.n_test_words == sum(len(s.tokens) for s in test) and res.n_unscored_words == 0
    assert [len(p) for p in res.predictions] == [len(s.tokens) for s in test]
    assert set(res.metrics("ner")) == {f"ner/{k}" for k in ("token_accuracy", "macro_f1")} | {
        f"ner/entity_{k}" for k in ("precision", "recall", "f1")
    }


def test_full_fine_tuning_learns_copies_and_is_deterministic(tokenizer, model):
    train, test = toy_tagging(48, 2), toy_tagging(20, 3)
    model.eval()
    model.layers[0].attention.q_proj.weight.requires_grad_(False)  # a caller's frozen tensor stays frozen
    try:
        before = snapshot(model)
        kwargs = dict(mode="full", epochs=6, lr=3e-3, batch_size=8, seed=5)
        rng = torch.random.get_rng_state()
        first = finetune_tagger(model, tokenizer, train, test, **kwargs)
        assert_unchanged(model, before)
        assert torch.equal(rng, torch.random.get_rng_state())
        second = finetune_tagger(model, tokenizer, train, test, **kwargs)
    finally:
        model.train()
        model.layers[0].attention.q_proj.weight.requires_grad_(True)
    assert first == second  # same seed: the same result, predictions and loss included
    assert first.token_accuracy >= 0.9
    other = finetune_tagger(model, tokenizer, train, test, **{**kwargs, "seed": 6})
    assert other.train_loss != first.train_loss  # another seed: another batch order


def test_tagging_edge_cases(tokenizer, model):
    train = toy_tagging(20, 4)
    upos = [TaggedSentence(s.tokens, ["NOUN" if t == "O" else "PROPN" for t in s.tags]) for s in train]
    res = finetune_tagger(model, tokenizer, upos, upos[:5], epochs=2, entity_f1=None)
    assert res.entity_f1 is None and res.entity_precision is None and "entity_f1" not in res.metrics()
    with pytest.warns(UserWarning, match="not BIO"):
        forced = finetune_tagger(model, tokenizer, upos, upos[:5], epochs=2, entity_f1=True)
    assert forced.entity_f1 is None
    no_entities = finetune_tagger(model, tokenizer, train, train[:5], epochs=2, entity_f1=False)
    assert no_entities.entity_f1 is None
    # words cut off by max_len are predicted "O" and still scored
    long = [TaggedSentence(["apple"] * 12, ["B-KEY"] * 12)]
    cut = finetune_tagger(model, tokenizer, train, long, epochs=2, max_len=4)
    cut_off = [p < 0 for p in align_subwords(long[0].tokens, tokenizer, max_len=4).positions]
    assert cut.n_unscored_words == sum(cut_off) >= 8
    assert all(tag == "O" for tag, off in zip(cut.predictions[0], cut_off, strict=True) if off)
    assert cut.token_accuracy <= 4 / 12
    # a test tag never seen in training can never be predicted, but is scored
    unseen = [TaggedSentence(["apple", "the"], ["B-FRUIT", "O"])]
    assert finetune_tagger(model, tokenizer, train, unseen, epochs=2).entity_recall == 0.0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mode": "partial"}, ValueError, r"mode: must be one of \['head', 'full'\]"),
        ({"epochs": 0}, ValueError, "epochs"),
        ({"lr": -1.0}, ValueError, "lr"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"max_len": 65}, ValueError, "max_len: 65 is longer than the model's 64"),
        ({"subword": "middle"}, ValueError, "subword"),
        ({"train": []}, ValueError, "train: must be a non-empty list"),
        ({"test": [("a", "O")]}, TypeError, "test: item 0 is a tuple"),
        ({"train": [TaggedSentence(["a"], ["O"])]}, ValueError, "at least two tags"),
        ({"train": [TaggedSentence([], [])]}, ValueError, "train: sentence 0 has no words"),
        ({"tokenizer": object()}, TypeError, "tokenizer"),
    ],
)
def test_tagger_argument_errors(tokenizer, model, kwargs, error, match):
    args = {"tokenizer": tokenizer, "train": toy_tagging(4, 0), "test": toy_tagging(2, 1), **kwargs}
    with pytest.raises(error, match=match):
        finetune_tagger(
            model, args.pop("tokenizer"), args.pop("train"), args.pop("test"), **{"epochs": 1, **args}
        )


def test_vocabulary_must_cover_the_tokenizer(tokenizer):
    small = tiny_model(64)
    with pytest.raises(ValueError, match="outside the model's vocabulary of 64"):
        finetune_tagger(small, tokenizer, toy_tagging(4, 0), toy_tagging(2, 1), epochs=1)


def test_k_shot_classification(tokenizer, model):
    pool, test = toy_texts(60, 0), toy_texts(40, 1)
    before = snapshot(model)
    res = finetune_classifier(model, tokenizer, pool, test, k_per_class=12, epochs=60, lr=0.05, seed=1)
    assert_unchanged(model, before)
    assert isinstance(res, ClassificationResult) and res.labels == ("fruit", "rock") and res.n_train == 24
    assert res.accuracy >= 0.85 and 0.0 <= res.macro_f1 <= 1.0 and len(res.predictions) == 40
    again = finetune_classifier(model, tokenizer, pool, test, k_per_class=12, epochs=60, lr=0.05, seed=1)
    assert again == res
    full = finetune_classifier(
        model, tokenizer, pool, test, k_per_class=8, mode="full", epochs=4, lr=1e-3, pooling="last", seed=2
    )
    assert_unchanged(model, before)
    assert full.n_train == 16 and full.mode == "full"
    with pytest.raises(
        ValueError, match=r"k_per_class: 40 is larger than the smallest class of train, '\w+'"
    ):
        finetune_classifier(model, tokenizer, pool, test, k_per_class=40)
    with pytest.raises(ValueError, match="at least two"):
        finetune_classifier(model, tokenizer, [LabelledText("a b", "x")], test)
    with pytest.raises(ValueError, match="pooling"):
        finetune_classifier(model, tokenizer, pool, test, pooling="mask")
    with pytest.raises(ValueError, match="k_per_class"):
        finetune_classifier(model, tokenizer, pool, test, k_per_class=0)


def test_finetune_eval_reports_mean_and_interval(tokenizer, model):
    train, test = toy_tagging(24, 5), toy_tagging(10, 6)
    summary = finetune_eval(model, tokenizer, train, test, seeds=[0, 1, 2], epochs=3, lr=0.05)
    assert summary.task == "tagging" and summary.mode == "head" and summary.seeds == (0, 1, 2)
    assert [r.seed for r in summary.runs] == [0, 1, 2]
    for name in ("token_accuracy", "macro_f1", "entity_f1"):
        mean, half = summary.metrics[name]
        values = [r.metrics()[name] for r in summary.runs]
        assert mean == pytest.approx(sum(values) / 3) and half >= 0.0
    assert "±" in summary.format() and json.loads(json.dumps(summary.to_dict()))["runs"][2]["seed"] == 2
    texts = finetune_eval(model, tokenizer, toy_texts(20, 2), toy_texts(10, 3), seeds=[4], k_per_class=3)
    assert texts.task == "classification" and math.isnan(texts.metrics["accuracy"][1])
    assert (
        json.dumps(texts.to_dict(), allow_nan=False) and texts.to_dict()["metrics"]["accuracy"]["ci"] is None
    )
    with pytest.raises(ValueError, match="seed: finetune_eval runs one fine-tune per seed"):
        finetune_eval(model, tokenizer, train, test, seed=0)
    with pytest.raises(ValueError, match="seeds: must be distinct"):
        finetune_eval(model, tokenizer, train, test, seeds=[1, 1])
    with pytest.raises(ValueError, match="seeds: must be a non-empty"):
        finetune_eval(model, tokenizer, train, test, seeds=[])
    with pytest.raises(ValueError, match="train: must be a non-empty list of TaggedSentence"):
        finetune_eval(model, tokenizer, ["text"], test)


def test_head_only_on_the_turkish_treebank(tokenizer):
    """Real UPOS tags from the UD Turkish Web Treebank (the ``turkish-treebanks`` package, Apache-2.0)."""
    try:
        files = importlib.metadata.files("turkish-treebanks") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the UD Turkish treebank is not installed: pip install turkish-treebanks")
    paths = [Path(str(f.locate())) for f in files if str(f).endswith("web.conllu")]
    if not paths or not paths[0].is_file():
        pytest.skip(
            "turkish-treebanks is installed without web.conllu: pip install --force-reinstall turkish-treebanks"
        )
    sents = read_conllu(paths[0], column="upos")
    train, test = sents[:40], sents[40:60]
    model = tiny_model(tokenizer.vocab_size)
    res = finetune_tagger(model, tokenizer, train, test, epochs=10, lr=0.02, max_len=64, seed=0)
    assert res.entity_f1 is None  # UPOS tags are not BIO
    assert res.n_test_words == sum(len(s.tokens) for s in test)
    assert 1 / len(res.tags) < res.token_accuracy <= 1.0 and 0.0 < res.macro_f1 <= 1.0
