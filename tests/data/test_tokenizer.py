from __future__ import annotations

import copy

import pytest

from picomaml.data.tokenizer import TokenizerWrapper, load_tokenizer, padded_vocab_size

TEXT = "the cat sat on the mat, hello world"


def test_padded_vocab_size():
    assert padded_vocab_size(50280) == 50304  # OLMo
    assert padded_vocab_size(64) == 64
    assert padded_vocab_size(65) == 128
    assert padded_vocab_size(8193, multiple=8) == 8200
    with pytest.raises(ValueError, match="n must be"):
        padded_vocab_size(0)
    with pytest.raises(ValueError, match="multiple"):
        padded_vocab_size(10, multiple=0)


def test_raw_json_adds_mask(tmp_path, small_raw_tokenizer):
    path = tmp_path / "tok.json"
    small_raw_tokenizer.save(str(path))
    before = small_raw_tokenizer.get_vocab_size(with_added_tokens=True)
    tok = load_tokenizer(path)
    assert tok.added_mask_token
    assert tok.vocab_size == before + 1
    assert tok.mask_token_id == before  # the new token takes the next id
    assert tok.eos_token_id == small_raw_tokenizer.token_to_id("<|endoftext|>")
    assert tok.pad_token_id is None
    assert tok.convert_ids_to_tokens([tok.mask_token_id]) == ["<|mask|>"]
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    # the mask is one token in text and is kept by decode
    assert tok.encode("a <|mask|> b").count(tok.mask_token_id) == 1
    assert "<|mask|>" in tok.decode([*ids[:2], tok.mask_token_id])


def test_hf_directory_adds_mask(tmp_path, small_raw_tokenizer):
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=copy.deepcopy(small_raw_tokenizer), eos_token="<|endoftext|>"
    )
    fast.save_pretrained(str(tmp_path / "hf"))
    before = len(fast)
    tok = load_tokenizer(tmp_path / "hf", mask_token="[MASK]")
    assert tok.added_mask_token and tok.vocab_size == before + 1
    assert tok.convert_ids_to_tokens([tok.mask_token_id]) == ["[MASK]"]
    assert tok.eos_token_id == fast.eos_token_id
    ids = tok.encode(TEXT)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == TEXT
    assert tok.special_token_ids == tuple(sorted({tok.eos_token_id, tok.mask_token_id}))


def test_existing_mask_is_kept(small_raw_tokenizer):
    tk = pytest.importorskip("tokenizers")
    raw = tk.Tokenizer.from_str(small_raw_tokenizer.to_str())
    raw.add_special_tokens(["[MASK]", "<pad>"])
    n = raw.get_vocab_size(with_added_tokens=True)
    tok = TokenizerWrapper(raw)
    assert not tok.added_mask_token
    assert tok.vocab_size == n
    assert tok.mask_token_id == raw.token_to_id("[MASK]")
    assert tok.pad_token_id == raw.token_to_id("<pad>")
    assert TokenizerWrapper.from_object(tok) is tok


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="name_or_path"):
        load_tokenizer("")
    with pytest.raises(TypeError, match="backend"):
        TokenizerWrapper(object())
