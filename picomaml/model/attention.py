"""Grouped-query self-attention with rotary embeddings for
[`PicoDecoder`][picomaml.model.decoder.PicoDecoder], and its KV cache.

[`KVCache`][picomaml.model.attention.KVCache] holds preallocated per-layer key/value buffers for incremental
decoding; [`Attention`][picomaml.model.attention.Attention] is the layer (q/k/v/o projections named as
``transformers``' Llama). On CPU, training attention over 64-512 positions runs through
`_chunked_causal_attention`, the same function as one causal ``scaled_dot_product_attention`` call, computed
in query chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from picomaml.model.config import PicoDecoderConfig
from picomaml.model.layers import rope_heads

__all__ = ["Attention", "KVCache"]


class KVCache:
    """Per-layer key/value buffers for incremental decoding.

    Buffers are preallocated to ``max_len`` positions: ``k[i]``/``v[i]`` are ``(B, n_kv_heads, max_len,
    head_dim)`` and ``length`` counts the positions already written. A forward call writes its new keys
    and values at ``[length, length + L)`` in every layer and then advances ``length`` by ``L``.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.length = 0
        self.max_len = max_len
        self.batch_size = batch_size

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty cache shaped for ``model``, a PicoDecoder (``max_len`` defaults to ``config.max_seq_len``)."""
        cfg = model.config
        ref = model.embed_tokens.weight
        return cls(
            cfg.n_layers,
            batch_size,
            cfg.n_kv_heads,
            cfg.head_dim,
            max_len or cfg.max_seq_len,
            dtype=ref.dtype,
            device=ref.device,
        )

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` (B, n_kv, L, D) after the cached positions; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"kv_cache: {end} positions exceed the cache's max_len {self.max_len}")
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reset(self) -> None:
        """Forget every cached position (the buffers are reused)."""
        self.length = 0


# ATen's CPU flash-attention kernel covers up to 512 keys with one key block, so for such lengths it computes
# (and masks) the whole upper triangle of the scores. Querying 64-row chunks against only the keys each can
# see skips that work: 1.14-1.47x faster attention forward + backward for L = 128-512 (torch 2.13, 2 threads,
# head_dim 8); from L = 1024 the kernel blocks the keys itself and chunking is slower, so it is not used.
# With grouped-query attention each chunk also stacks the r query heads that share a key/value head into one
# block of r * rows queries, so each key/value block is read once per group, not once per head: a further
# 5-17 % off attention forward + backward for L = 128-512 at head_dim 8-32, and 15-20 % at L = 64 (where it
# is the only chunk; below 64 the plain call is faster) with 12 query and 4 key/value heads.
_CPU_CHUNK, _CPU_CHUNK_MAX = 64, 512


def _chunked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA of ``q`` (B, H, L, D) over ``k``/``v`` (B, H_kv, L, D) in query chunks of ``_CPU_CHUNK``
    rows; the same function as one causal call with ``enable_gqa`` (every row's softmax sees the same keys).

    Query head ``h`` attends with key/value head ``h // (H // H_kv)`` (``enable_gqa``'s grouping); the
    ``r = H // H_kv`` heads of a group are queried as one block of ``r * rows`` rows.

    Returns:
        (B, H, L, D).
    """
    b, h, n, d = q.shape
    h_kv = k.shape[1]
    r = h // h_kv
    grouped = q.reshape(b, h_kv, r, n, d)  # head h = group * r + j, as enable_gqa pairs them
    outs = []
    for start in range(0, n, _CPU_CHUNK):
        end = min(start + _CPU_CHUNK, n)
        rows = end - start
        if start == 0 and r == 1:
            outs.append(F.scaled_dot_product_attention(q[:, :, :end], k[:, :, :end], v[:, :, :end], is_causal=True))
            continue
        # row i of the chunk (position start + i) sees keys 0 .. start + i, in each of the r stacked heads
        mask = torch.ones(rows, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
        block = grouped[:, :, :, start:end].reshape(b, h_kv, r * rows, d)
        out = F.scaled_dot_product_attention(block, k[:, :, :end], v[:, :, :end], attn_mask=mask.repeat(r, 1))
        outs.append(out.view(b, h, rows, d))
    return torch.cat(outs, dim=2)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings, no biases.

    ``fused``: the children applied to this module's input inside one matmul, whose own forward (and
    forward hooks) never run;
    [`picomaml.train.dynamics.capture_learning_dynamics`][picomaml.train.dynamics.capture_learning_dynamics]
    computes their outputs.
    """

    fused = ("q_proj", "k_proj", "v_proj")

    def __init__(self, cfg: PicoDecoderConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """Self-attention over ``x`` (B, L, d_model) -> (B, L, d_model).

        ``cos``/``sin`` are the (L, (n_heads + n_kv_heads) * head_dim) tables of
        [`rope_heads`][picomaml.model.layers.rope_heads] for the new positions. q/k/v run as one matmul over
        the concatenated weights (the modules stay separate so their weights map one-to-one onto Llama; their
        forward hooks do not fire).
        """
        b, n, _ = x.shape
        hd = self.head_dim
        qk_dim = (self.n_heads + self.n_kv_heads) * hd
        weight = torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))
        qk, v = F.linear(x, weight).split((qk_dim, self.n_kv_heads * hd), dim=-1)
        qk = rope_heads(qk, cos, sin, hd)
        q = qk[..., : self.n_heads * hd].view(b, n, self.n_heads, hd).transpose(1, 2)
        k = qk[..., self.n_heads * hd :].view(b, n, self.n_kv_heads, hd).transpose(1, 2)
        v = v.view(b, n, self.n_kv_heads, hd).transpose(1, 2)
        gqa = self.n_kv_heads != self.n_heads
        if cache is None or cache.length == 0:
            if cache is not None:
                cache.update(layer, k, v)
            # Causal over the new positions only: exactly the training path. (At exactly _CPU_CHUNK positions
            # there is one chunk, which only pays when it groups query heads.)
            if x.device.type == "cpu" and _CPU_CHUNK <= n <= _CPU_CHUNK_MAX and (gqa or n > _CPU_CHUNK):
                out = _chunked_causal_attention(q, k, v)
            else:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=n > 1, enable_gqa=gqa)
        else:
            start = cache.length
            k, v = cache.update(layer, k, v)
            mask = None
            if n > 1:  # chunked prefill: new query i sees cached positions and new positions <= i
                mask = torch.ones(n, start + n, dtype=torch.bool, device=x.device).tril(diagonal=start)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))
