"""The architecture of a [`PicoDecoder`][picomaml.model.decoder.PicoDecoder]: sizes, presets and parameter
count.

Kept apart from the model so that configs can be read, validated and compared without torch; it
imports only [`picomaml.params`][picomaml.params], which imports no other picomaml module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from picomaml.params import ConfigError, Params, check, hparam

__all__ = ["PicoDecoderConfig", "PRESET_WIDTHS"]

# name -> d_model; every preset has 12 layers, 12 heads, 4 KV heads, FFN 4 x d_model (pico-decoder suite).
PRESET_WIDTHS = {"tiny": 96, "small": 384, "medium": 768, "large": 1536}


@dataclasses.dataclass
class PicoDecoderConfig(Params):
    """Architecture of a [`PicoDecoder`][picomaml.model.decoder.PicoDecoder] (YAML section ``model``).

    Attributes:
        vocab_size: Number of token ids.
        d_model: Residual stream width.
        n_layers: Number of transformer blocks.
        n_heads: Query heads.
        n_kv_heads: Key/value heads (grouped-query attention); divides ``n_heads``.
        ffn_dim: Hidden width of the SwiGLU MLP.
        max_seq_len: Longest sequence (prompt plus generated tokens) the model accepts.
        rope_theta: Base of the rotary embedding frequencies.
        norm_eps: Epsilon of every RMSNorm.
        tie_embeddings: Share the LM head weight with the token embedding.
        init_std: Std of the normal init of every linear and embedding weight.
    """

    # upper bounds far beyond any trained model (a typo such as n_layers=100000 is an error, not minutes of
    # allocation until the machine runs out of memory)
    vocab_size: int = hparam(50304, ge=1, le=2**24, doc="number of token ids (the tokenizer's, padded)")
    d_model: int = hparam(64, ge=1, le=2**16, doc="residual stream width")
    n_layers: int = hparam(2, ge=1, le=1024, doc="transformer blocks")
    n_heads: int = hparam(4, ge=1, doc="query heads")
    n_kv_heads: int = hparam(2, ge=1, doc="key/value heads (grouped-query attention); divides n_heads")
    ffn_dim: int = hparam(256, ge=1, le=2**18, doc="hidden width of the SwiGLU MLP")
    max_seq_len: int = hparam(128, ge=1, le=2**22, doc="longest sequence the model accepts (prompt + generated)")
    rope_theta: float = hparam(10000.0, gt=0, doc="base of the rotary embedding frequencies")
    norm_eps: float = hparam(1e-6, gt=0, doc="epsilon of every RMSNorm")
    tie_embeddings: bool = hparam(False, doc="share the LM head weight with the token embedding")
    init_std: float = hparam(0.02, gt=0, doc="std of the normal init of linear and embedding weights")

    def validate(self) -> None:
        check(
            self.d_model % self.n_heads == 0,
            "d_model",
            f"{self.d_model} is not divisible by n_heads {self.n_heads}",
        )
        check(
            self.n_heads % self.n_kv_heads == 0,
            "n_heads",
            f"{self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}",
        )
        check(
            self.head_dim % 2 == 0,
            "d_model",
            f"head_dim = d_model / n_heads = {self.head_dim} must be even for rotary embeddings",
        )

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``d_model // n_heads``."""
        return self.d_model // self.n_heads

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> PicoDecoderConfig:
        """A pico-decoder preset (``tiny``/``small``/``medium``/``large``) with optional field overrides.

        Raises:
            ValueError: ``name`` is not a preset (the message lists the valid names).
            ConfigError: an override is unknown or out of range.
        """
        if name not in PRESET_WIDTHS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESET_WIDTHS)}")
        d = PRESET_WIDTHS[name]
        base: dict[str, Any] = dict(
            vocab_size=50304, d_model=d, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=4 * d, max_seq_len=2048
        )
        valid = {f.name for f in dataclasses.fields(cls)}
        for key in overrides:
            if key not in valid:
                raise ConfigError(
                    f"unknown key '{key}' for preset {name!r}; valid keys: {', '.join(sorted(valid))}"
                )
        base.update(overrides)
        return cls(**base)

    def num_parameters(self) -> int:
        """Trainable parameter count, computed from the config alone (tied weights counted once)."""
        d, kv = self.d_model, self.n_kv_heads * self.head_dim
        attn = 2 * d * d + 2 * d * kv  # q, o: d x d; k, v: d x kv
        mlp = 3 * d * self.ffn_dim
        per_layer = attn + mlp + 2 * d  # + two RMSNorm weights
        embed = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return embed + self.n_layers * per_layer + d + head
