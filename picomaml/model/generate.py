"""Autoregressive generation with a KV cache: greedy decoding and temperature / top-k sampling."""

from __future__ import annotations

import torch
from torch import nn

from picomaml.params import check_int

__all__ = ["generate", "next_token"]


def next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    do_sample: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from ``logits`` (B, V): argmax, or a sample from softmax(logits / T) over the top k.

    Returns:
        (B,) long token ids.
    """
    if not do_sample:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    do_sample: bool = False,
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """Continue ``input_ids`` for up to ``max_new_tokens`` tokens, one forward per new token.

    The prompt is run once (prefill) into a [`KVCache`][picomaml.model.attention.KVCache]; every further step
    feeds only the newest token. A row that has produced ``eos_token_id`` keeps emitting it; generation
    stops early once every row has.

    Args:
        model: The decoder (its train/eval mode is left as is; call ``model.eval()`` for dropout-free use).
        input_ids: (B, L) prompt token ids.
        max_new_tokens: Tokens to add (>= 0); ``L + max_new_tokens`` must fit ``max_seq_len``.
        temperature: Softmax temperature when sampling (> 0).
        top_k: Sample only among the ``top_k`` most likely tokens (>= 1); ``None`` = all.
        do_sample: Sample instead of taking the argmax.
        generator: Seeded ``torch.Generator`` for reproducible sampling.
        eos_token_id: Optional end-of-sequence id.

    Returns:
        (B, L + n) long tensor with ``n <= max_new_tokens`` (fewer only when every row hit EOS).
    """
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, ge=0)
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature: must be > 0 when sampling, got {temperature}")
    if top_k is not None:
        top_k = check_int("top_k", top_k, ge=1)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids: expected a (batch, seq) tensor of token ids")
    cfg = model.config
    total = input_ids.shape[1] + max_new_tokens
    if total > cfg.max_seq_len:
        raise ValueError(
            f"max_new_tokens: prompt length {input_ids.shape[1]} + {max_new_tokens} new tokens = {total} "
            f"exceeds max_seq_len {cfg.max_seq_len}"
        )
    if max_new_tokens == 0:
        return input_ids.clone()
    input_ids = input_ids.long()
    cache = model.new_cache(input_ids.shape[0], max_len=total)
    logits = model(input_ids, kv_cache=cache)[:, -1]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    out = [input_ids]
    for step in range(max_new_tokens):
        token = next_token(logits, temperature, top_k, do_sample, generator)
        if eos_token_id is not None:
            token = token.masked_fill(done, eos_token_id)
            done |= token == eos_token_id
        out.append(token[:, None])
        if step + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
            break
        logits = model(token[:, None], kv_cache=cache)[:, -1]
    return torch.cat(out, dim=1)
