"""PicoDecoder: a LLaMA-style decoder-only transformer (RMSNorm, RoPE, GQA, SwiGLU) and its config.

Module names follow ``transformers``' Llama (``embed_tokens``, ``layers.{i}.attention.{q,k,v,o}_proj``,
``layers.{i}.mlp.{gate,up,down}_proj``, ``norm``, ``lm_head``) and rotary embeddings use the same
rotate-half convention, so weights map one-to-one onto ``LlamaForCausalLM`` (see
[`picomaml.model.hf`][picomaml.model.hf]).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from picomaml.checks import check_values
from picomaml.model.attention import Attention, KVCache
from picomaml.model.config import PicoDecoderConfig
from picomaml.model.layers import RMSNorm, rope_tables

__all__ = ["PicoDecoder", "KVCache"]  # KVCache lives in picomaml.model.attention


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``; ``gate_proj`` and ``up_proj`` run fused (see
    `Attention.fused`)."""

    fused = ("gate_proj", "up_proj")

    def __init__(self, cfg: PicoDecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, L, d_model) -> (B, L, d_model); gate and up run as one matmul."""
        gate, up = F.linear(x, torch.cat((self.gate_proj.weight, self.up_proj.weight))).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: PicoDecoderConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None, layer: int
    ) -> torch.Tensor:
        """``x`` (B, L, d_model) -> (B, L, d_model)."""
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class PicoDecoder(nn.Module):
    """LLaMA-style decoder-only language model.

    Args:
        config: Architecture; see [`PicoDecoderConfig`][picomaml.model.config.PicoDecoderConfig].
        generator: Seeded ``torch.Generator`` for the weight init; ``None`` uses the global torch RNG.

    Examples:
        >>> model = PicoDecoder(PicoDecoderConfig(vocab_size=100))
        >>> logits, hidden = model(torch.zeros(2, 8, dtype=torch.long), return_hidden=True)
    """

    def __init__(self, config: PicoDecoderConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not isinstance(config, PicoDecoderConfig):
            raise TypeError(f"config: expected a PicoDecoderConfig, got {type(config).__name__}")
        self.config = config
        # torch's layers draw a default init from the global RNG; with our own generator that draw is
        # thrown away, so keep the global stream untouched (a seeded component never moves it)
        with torch.random.fork_rng(devices=[], enabled=generator is not None):
            self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
            self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
            self.norm = RMSNorm(config.d_model, config.norm_eps)
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = self._rope(0, config.max_seq_len, torch.float32)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters(generator)

    def _rope(self, start: int, end: int, dtype: torch.dtype, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin_signed)`` for positions ``[start, end)``, tiled over the q and k heads that
        [`rope_heads`][picomaml.model.layers.rope_heads] rotates together:
        ``(end - start, (n_heads + n_kv_heads) * head_dim)``."""
        cfg = self.config
        cos, sin = rope_tables(cfg.head_dim, end, cfg.rope_theta, dtype, start)
        half = cfg.head_dim // 2
        sin_signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        heads = cfg.n_heads + cfg.n_kv_heads
        return cos.repeat(1, heads).to(device), sin_signed.repeat(1, heads).to(device)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by 1/sqrt(2 n_layers); norms 1.

        Args:
            generator: Seeded generator for reproducible weights; ``None`` draws from the global RNG.
        """
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if module is self.lm_head and self.config.tie_embeddings:
                    continue  # shares the embedding weight, initialised once
                is_residual = name.endswith("attention.o_proj") or name.endswith("mlp.down_proj")
                nn.init.normal_(module.weight, 0.0, residual_std if is_residual else std, generator=generator)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def _check_input(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        """Raise on bad ``input_ids``; return them (under ``torch.compile``: with out-of-range ids zeroed)."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids: expected a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected shape (batch, seq), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.long, torch.int32):
            raise TypeError(f"input_ids: expected dtype torch.long (or int32), got {input_ids.dtype}")
        if input_ids.shape[0] == 0:
            raise ValueError(f"input_ids: the batch is empty (shape {tuple(input_ids.shape)}); pass at least one row")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids: the sequence is empty")
        end = start + input_ids.shape[1]
        if end > self.config.max_seq_len:
            raise ValueError(
                f"input_ids: sequence length {input_ids.shape[1]} (+{start} cached) = {end} exceeds "
                f"max_seq_len {self.config.max_seq_len}"
            )
        vocab = self.config.vocab_size
        if torch.compiler.is_compiling():
            # Under torch.compile the bounds are checked inside the graph: reading min/max back as Python
            # ints is data dependent and would break the graph. The assert is asynchronous (no host sync
            # on an accelerator) and names the range; the embedding reads id 0 for bad ids meanwhile, so
            # the failure is this message, not an out-of-bounds gather. On CPU a failing check inside a
            # parallel compiled kernel aborts the process, which is why picomaml.train.compile.compile_backbone
            # runs the eager check (the ValueError below) before each compiled call by default.
            ok = (input_ids >= 0) & (input_ids < vocab)
            torch._assert_async(ok.all(), f"input_ids: token ids must be in [0, {vocab})")
            return torch.where(ok, input_ids, 0)
        check_values(
            self, ("input_ids", tuple(input_ids.shape), str(input_ids.device)), (input_ids >= 0) & (input_ids < vocab),
            lambda: f"input_ids: token ids must be in [0, {vocab}), got min {int(input_ids.min())} and max "
            f"{int(input_ids.max())}",
            f"input_ids: token ids must be in [0, {vocab})",
        )  # read until it passed once for this shape, then queued without a host sync
        return input_ids

    def hidden_states(self, input_ids: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Final-norm hidden states, skipping the LM head.

        Args:
            input_ids: (B, L) token ids.
            kv_cache: Optional cache; the new positions follow the ``kv_cache.length`` cached ones and
                the cache is advanced by ``L``.

        Returns:
            (B, L, d_model) hidden states after the final RMSNorm.
        """
        start = 0 if kv_cache is None else kv_cache.length
        input_ids = self._check_input(input_ids, start)
        if kv_cache is not None and kv_cache.batch_size != input_ids.shape[0]:
            raise ValueError(
                f"kv_cache: built for batch size {kv_cache.batch_size}, input_ids has {input_ids.shape[0]}"
            )
        n = input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        if x.dtype == torch.float64:  # float64 end to end: the tables too, not float32 ones widened
            cos, sin = self._rope(start, start + n, torch.float64, x.device)
        else:
            cos = self.rope_cos[start : start + n].to(x.dtype)
            sin = self.rope_sin[start : start + n].to(x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length += n
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        return_hidden: bool = False,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits.

        Args:
            input_ids: (B, L) long token ids in ``[0, vocab_size)``, ``L <= max_seq_len``.
            return_hidden: Also return the final-norm hidden states the LM head consumes.
            kv_cache: Optional [`KVCache`][picomaml.model.attention.KVCache] for incremental decoding
                (advanced by ``L``).

        Returns:
            logits (B, L, vocab_size), or ``(logits, hidden)`` with hidden (B, L, d_model).
        """
        hidden = self.hidden_states(input_ids, kv_cache)
        logits = self.lm_head(hidden)
        return (logits, hidden) if return_hidden else logits

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty [`KVCache`][picomaml.model.attention.KVCache] for this model."""
        return KVCache.for_model(self, batch_size, max_len)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        do_sample: bool = False,
        generator: torch.Generator | None = None,
        eos_token_id: int | None = None,
    ) -> torch.Tensor:
        """Continue ``input_ids`` (B, L) with a KV cache; see
        [`picomaml.model.generate.generate`][picomaml.model.generate.generate]."""
        from picomaml.model.generate import generate

        return generate(
            self,
            input_ids,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            do_sample=do_sample,
            generator=generator,
            eos_token_id=eos_token_id,
        )

    def to_hf(self, **config_overrides: Any) -> Any:
        """Export to ``transformers.LlamaForCausalLM`` with equal weights (see
        [`picomaml.model.hf.to_hf`][picomaml.model.hf.to_hf])."""
        from picomaml.model.hf import to_hf

        return to_hf(self, **config_overrides)

    @classmethod
    def from_hf(cls, model_or_path: Any) -> PicoDecoder:
        """Import a ``LlamaForCausalLM`` or a saved Llama directory with equal logits.

        The weights keep the source dtype and device; see
        [`picomaml.model.hf.state_from_hf`][picomaml.model.hf.state_from_hf].
        """
        from picomaml.model.hf import state_from_hf

        config, state, dtype = state_from_hf(model_or_path)
        device = state["embed_tokens.weight"].device
        model = cls(config).to(device=device)
        model.load_state_dict(state)
        if dtype != torch.float32:
            # Parameters take the source dtype; the RoPE tables stay float32 (cast per forward).
            for param in model.parameters():
                param.data = param.data.to(dtype)
        return model

    @classmethod
    def from_pico_train(cls, path_or_state_dict: Any, config: Any = None) -> PicoDecoder:
        """Import a pico-train checkpoint (pico-lm/pico-train's ``PicoDecoder``) with equal logits.

        Nothing from the checkpoint is executed; the q/k rows are permuted from pico-train's
        adjacent-pair RoPE to rotate-half. See
        [`picomaml.model.pico_train.state_from_pico_train`][picomaml.model.pico_train.state_from_pico_train].

        Args:
            path_or_state_dict: A folder written by pico-train's ``convert_to_hf_model().save_pretrained``,
                a weights file, or a raw pico-train state dict.
            config: For a raw state dict: a [`PicoDecoderConfig`][picomaml.model.config.PicoDecoderConfig] or
                a dict of pico-train's model config keys; ``attention_n_heads`` is required, the sizes are
                inferred from the shapes.

        Returns:
            A PicoDecoder with the source weights' dtype and device.
        """
        from picomaml.model.pico_train import state_from_pico_train

        cfg, state, dtype = state_from_pico_train(path_or_state_dict, config=config)
        device = state["embed_tokens.weight"].device
        # A throwaway generator: the init is overwritten, and loading must not move the global RNG.
        model = cls(cfg, generator=torch.Generator()).to(device=device)
        model.load_state_dict(state)
        if dtype != torch.float32:
            # Parameters take the source dtype; the RoPE tables stay float32 (cast per forward).
            for param in model.parameters():
                param.data = param.data.to(dtype)
        return model
