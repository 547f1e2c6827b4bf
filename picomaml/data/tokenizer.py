"""A small, uniform view of a tokenizer: Hugging Face ``transformers`` tokenizers or raw ``tokenizers`` JSON.

Everything else in [`picomaml`][picomaml] talks to tokenizers through
[`TokenizerWrapper`][picomaml.data.tokenizer.TokenizerWrapper], which exposes the handful of things a
pretraining and SMLMT pipeline needs: ``encode``/``decode``, the vocabulary size the model's embedding must
cover, and the ids of the end-of-sequence, padding and mask tokens. SMLMT masks class tokens, so a mask token
is required: when the tokenizer has none, one is added as a special token and the vocabulary grows by one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from picomaml._optional import require

__all__ = [
    "DEFAULT_MASK_TOKEN",
    "TokenizerWrapper",
    "load_tokenizer",
    "padded_vocab_size",
]

DEFAULT_MASK_TOKEN = "<|mask|>"
# Names looked up (in order) when a raw ``tokenizers`` file does not say which token plays which role.
_EOS_NAMES = ("<|eos|>", "<|endoftext|>", "</s>", "<eos>", "[SEP]")
_PAD_NAMES = ("<|pad|>", "<|padding|>", "<pad>", "[PAD]")
_MASK_NAMES = ("<|mask|>", "[MASK]", "<mask>")


def padded_vocab_size(n: int, multiple: int = 64) -> int:
    """Round a vocabulary size up to a multiple (OLMo pads 50,280 tokens to 50,304 = 786 * 64).

    Args:
        n: The tokenizer's vocabulary size (``TokenizerWrapper.vocab_size``).
        multiple: Round up to a multiple of this (64 suits tensor-core matmuls).

    Returns:
        The smallest multiple of ``multiple`` that is ``>= n``.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"padded_vocab_size: n must be a positive int, got {n!r}")
    if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
        raise ValueError(f"padded_vocab_size: multiple must be a positive int, got {multiple!r}")
    return -(-n // multiple) * multiple


class TokenizerWrapper:
    """One interface over a ``transformers`` tokenizer or a raw ``tokenizers.Tokenizer``.

    Build it with [`load_tokenizer`][picomaml.data.tokenizer.load_tokenizer] or
    [`from_object`][picomaml.data.tokenizer.TokenizerWrapper.from_object]. Special-token ids are resolved
    once, at construction, after the mask token has been added if it was missing.

    Args:
        backend: A ``transformers.PreTrainedTokenizerBase`` or a ``tokenizers.Tokenizer``. A missing mask token
            is added to it in place.
        mask_token: Text of the mask token to add when the tokenizer has none.
        add_mask_token: Add ``mask_token`` when no mask token exists (otherwise ``mask_token_id`` is None).
        eos_token: Override the end-of-sequence token (text) for raw tokenizers whose roles are not recorded.
        pad_token: Override the padding token (text), likewise.
    """

    def __init__(
        self,
        backend: Any,
        *,
        mask_token: str = DEFAULT_MASK_TOKEN,
        add_mask_token: bool = True,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ) -> None:
        self._backend = backend
        self._is_hf = hasattr(backend, "convert_ids_to_tokens") and hasattr(backend, "add_special_tokens")
        if not self._is_hf and not hasattr(backend, "get_vocab_size"):
            raise TypeError(
                "TokenizerWrapper: backend must be a transformers tokenizer or a tokenizers.Tokenizer, "
                f"got {type(backend).__name__}"
            )
        self.added_mask_token = False
        self._hf_len, self._hf_size = -1, 0  # cache of the HF vocabulary size (get_vocab() builds a dict)
        if self._is_hf:
            self.eos_token_id = self._hf_role("eos", eos_token)
            self.pad_token_id = self._hf_role("pad", pad_token)
            self.mask_token_id = self._hf_role("mask", None)
            if self.mask_token_id is None and add_mask_token:
                backend.add_special_tokens({"mask_token": mask_token})
                self.mask_token_id = backend.mask_token_id
                self.added_mask_token = True
        else:
            self.eos_token_id = self._raw_role(_EOS_NAMES, eos_token)
            self.pad_token_id = self._raw_role(_PAD_NAMES, pad_token)
            self.mask_token_id = self._raw_role(_MASK_NAMES, None)
            if self.mask_token_id is None and add_mask_token:
                tokenizers = require("tokenizers", "data", "raw tokenizer files")
                backend.add_special_tokens(
                    [tokenizers.AddedToken(mask_token, special=True, normalized=False)]
                )
                self.mask_token_id = backend.token_to_id(mask_token)
                self.added_mask_token = True

    # -- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_object(cls, tokenizer: Any, **kwargs: Any) -> TokenizerWrapper:
        """Wrap an already-loaded tokenizer (returned unchanged when it is already a wrapper)."""
        if isinstance(tokenizer, TokenizerWrapper):
            return tokenizer
        return cls(tokenizer, **kwargs)

    def _hf_role(self, role: str, override: str | None) -> int | None:
        if override is not None:
            tid = self._backend.convert_tokens_to_ids(override)
            if tid is None or tid == getattr(self._backend, "unk_token_id", object()):
                raise ValueError(f"TokenizerWrapper: {role}_token {override!r} is not in the vocabulary")
            return int(tid)
        tid = getattr(self._backend, f"{role}_token_id", None)
        return None if tid is None else int(tid)

    def _raw_role(self, names: Sequence[str], override: str | None) -> int | None:
        if override is not None:
            tid = self._backend.token_to_id(override)
            if tid is None:
                raise ValueError(f"TokenizerWrapper: token {override!r} is not in the vocabulary")
            return int(tid)
        for name in names:
            tid = self._backend.token_to_id(name)
            if tid is not None:
                return int(tid)
        return None

    # -- the interface ------------------------------------------------------------------------------------

    @property
    def backend(self) -> Any:
        """The wrapped tokenizer object."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of ids the model's embedding must cover: the largest id plus one, added tokens included."""
        if self._is_hf:
            n = len(self._backend)
            if n != self._hf_len:  # tokens were added since the last look: recompute the largest id
                vocab = self._backend.get_vocab()
                self._hf_len = n
                self._hf_size = max(n, max(vocab.values()) + 1 if vocab else 0)
            return self._hf_size
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    @property
    def special_token_ids(self) -> tuple[int, ...]:
        """Sorted, distinct ids of the eos, pad and mask tokens that exist."""
        ids = {self.eos_token_id, self.pad_token_id, self.mask_token_id}
        return tuple(sorted(i for i in ids if i is not None))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without any added BOS/EOS."""
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be str, got {type(text).__name__}")
        if self._is_hf:
            return list(self._backend.encode(text, add_special_tokens=False))
        return list(self._backend.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of several texts (raw tokenizers encode them in parallel)."""
        if self._is_hf:
            return [self.encode(t) for t in texts]
        return [list(e.ids) for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list, tuple or 1-D tensor); special tokens are kept unless told otherwise."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        """The vocabulary string of each id (byte-level tokens show their byte characters, e.g. ``Ġthe``)."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if self._is_hf:
            return list(self._backend.convert_ids_to_tokens(ids))
        return [self._backend.id_to_token(i) for i in ids]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Save: a raw tokenizer to a JSON file, a ``transformers`` tokenizer to a directory."""
        if self._is_hf:
            self._backend.save_pretrained(str(path))
        else:
            self._backend.save(str(path))

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Save as a ``transformers`` tokenizer directory (``AutoTokenizer.from_pretrained`` loads it).

        A raw ``tokenizers`` backend is wrapped in ``PreTrainedTokenizerFast`` with its eos, pad and mask
        tokens, so an HF export of a model trained on the embedded corpus ships a usable tokenizer.
        """
        if self._is_hf:
            self._backend.save_pretrained(str(path))
            return
        transformers = require("transformers", "hf", "saving a tokenizer in the Hugging Face format")
        roles = {}
        for role in ("eos", "pad", "mask"):
            token_id = getattr(self, f"{role}_token_id")
            if token_id is not None:
                roles[f"{role}_token"] = self._backend.id_to_token(token_id)
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=self._backend, **roles)
        fast.save_pretrained(str(path))

    def __repr__(self) -> str:
        kind = type(self._backend).__name__
        return (
            f"TokenizerWrapper({kind}, vocab_size={self.vocab_size}, eos={self.eos_token_id}, "
            f"pad={self.pad_token_id}, mask={self.mask_token_id})"
        )


def load_tokenizer(
    name_or_path: str | os.PathLike[str],
    *,
    mask_token: str = DEFAULT_MASK_TOKEN,
    add_mask_token: bool = True,
    eos_token: str | None = None,
    pad_token: str | None = None,
    **hf_kwargs: Any,
) -> TokenizerWrapper:
    """Load a tokenizer by hub name, local directory, or raw ``tokenizers`` JSON file, and wrap it.

    A path to a ``.json`` file is read with ``tokenizers.Tokenizer.from_file``; anything else goes to
    ``transformers.AutoTokenizer.from_pretrained`` (hub names such as ``allenai/OLMo-7B-0724-hf`` or a
    directory written by ``save_pretrained``).

    Args:
        name_or_path: Hub name, directory, or ``.json`` file.
        mask_token: Mask token to add when the tokenizer has none.
        add_mask_token: Whether to add it.
        eos_token: Override for the end-of-sequence token of raw JSON tokenizers.
        pad_token: Override for the padding token of raw JSON tokenizers.
        **hf_kwargs: Passed to ``AutoTokenizer.from_pretrained`` (e.g. ``revision``).

    Returns:
        The wrapped tokenizer.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ValueError(
            f"load_tokenizer: name_or_path must be a non-empty str or path, got {name_or_path!r}"
        )
    path = Path(name_or_path)
    opts = {"mask_token": mask_token, "add_mask_token": add_mask_token}
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"load_tokenizer: tokenizer file {str(path)!r} does not exist")
        tokenizers = require("tokenizers", "data", "raw tokenizer files")
        backend = tokenizers.Tokenizer.from_file(str(path))
        return TokenizerWrapper(backend, eos_token=eos_token, pad_token=pad_token, **opts)
    transformers = require("transformers", "hf", "loading Hugging Face tokenizers")
    backend = transformers.AutoTokenizer.from_pretrained(str(name_or_path), **hf_kwargs)
    return TokenizerWrapper(backend, eos_token=eos_token, pad_token=pad_token, **opts)
