"""Building blocks of [`PicoDecoder`][picomaml.model.decoder.PicoDecoder]: rotary embeddings and RMSNorm.

Functional core (``rope_tables``, ``apply_rope``, ``rope_heads``, ``rms_norm``) with a thin module
(``RMSNorm``) over it. Both follow ``transformers``' Llama conventions exactly (rotate-half RoPE, RMSNorm
in float32 with the gain applied last), so PicoDecoder weights map onto Llama with no permutation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["rope_tables", "apply_rope", "rope_heads", "rms_norm", "RMSNorm"]


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, dtype: torch.dtype = torch.float32, start: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary cos/sin tables for positions ``[start, max_seq_len)``, ``(max_seq_len - start, head_dim)``, both
    halves repeated (Llama layout).

    ``dtype=torch.float32`` computes them exactly as ``transformers``' Llama does; ``torch.float64`` computes
    every step in float64 (a float64 model is then float64 end to end, as finite-difference checks need).
    """
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(wide) / head_dim))
    freqs = torch.arange(start, max_seq_len, dtype=torch.int64).to(wide)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Reference rotation of ``x`` (B, L, H, D) by tables (L, D): ``x*cos + rotate_half(x)*sin``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def rope_heads(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rotate every head of ``x`` (B, L, n*head_dim) at once; equal to
    [`apply_rope`][picomaml.model.layers.apply_rope] bit for bit.

    Args:
        x: Heads laid side by side in the last dimension.
        cos: (L, n*head_dim) cosine table tiled over the n heads.
        sin_signed: (L, n*head_dim) sine table tiled over heads, first half of each head negated, so
            ``rotate_half(x) * sin == swap_halves(x) * sin_signed`` (negation is exact).

    Returns:
        (B, L, n*head_dim), contiguous.
    """
    b, n, width = x.shape
    # Tables span the whole contiguous last dim: elementwise ops run over long rows, not 8-wide heads.
    swapped = x.reshape(b, n, width // head_dim, head_dim).roll(head_dim // 2, dims=-1).view(b, n, width)
    return x * cos + swapped * sin_signed


class _RMSNormFunction(torch.autograd.Function):
    """``w * x / sqrt(mean(x^2) + eps)`` with a hand-written backward (fewer passes than autograd's).

    Returns ``(y, xhat, rstd)``; only ``y`` is differentiable. Under ``create_graph=True`` the backward
    recomputes ``xhat`` from ``x`` with differentiable ops, so double backward works too.
    """

    @staticmethod
    def forward(
        x: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rstd = torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)
        xhat = x * rstd
        return xhat * weight, xhat, rstd

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, weight, eps = inputs
        _, xhat, rstd = output
        ctx.save_for_backward(x, xhat, rstd, weight)
        ctx.eps = eps
        ctx.mark_non_differentiable(xhat, rstd)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _gx: Any, _gr: Any) -> tuple:
        x, xhat, rstd, weight = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: rebuild xhat as a function of x
            rstd = torch.rsqrt((x * x).mean(-1, keepdim=True) + ctx.eps)
            xhat = x * rstd
        grad_w = None
        if ctx.needs_input_grad[1]:
            rows = (grad * xhat).reshape(-1, xhat.shape[-1])
            if torch.compiler.is_compiling():
                # The column sum as a (1, N) @ (N, dim) matmul: inductor's CPU code for this reduction opens
                # one parallel region per 16 columns, whose barriers cost more than the sum on a busy machine.
                grad_w = rows.new_ones(1, rows.shape[0]).mm(rows)[0]
            else:
                grad_w = rows.sum(0)
        grad_x = None
        if ctx.needs_input_grad[0]:
            gw = grad * weight
            # d xhat / d x = rstd * (I - xhat xhat^T / dim): remove the component along xhat.
            grad_x = (gw - xhat * (gw * xhat).mean(-1, keepdim=True)) * rstd
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of ``x`` (..., dim) with gain ``weight`` (dim,); half precision is normalised in float32."""
    if x.dtype not in (torch.float16, torch.bfloat16) and weight.dtype == x.dtype:
        return _RMSNormFunction.apply(x, weight, eps)[0]
    normed = _RMSNormFunction.apply(x.float(), torch.ones(x.shape[-1], device=x.device), eps)[0]
    return weight * normed.to(x.dtype)  # Llama order: cast back, then scale


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (see [`rms_norm`][picomaml.model.layers.rms_norm])."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` (..., dim) over its last dimension."""
        return rms_norm(x, self.weight, self.eps)
