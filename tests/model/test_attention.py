"""Attention: the CPU training path's chunked causal attention equals one causal SDPA call."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from picomaml.meta.top_blocks import math_attention
from picomaml.model.attention import _chunked_causal_attention


@pytest.mark.parametrize("heads,kv_heads,n", [(4, 2, 150), (6, 2, 129), (4, 4, 129), (3, 1, 64)])
def test_chunked_attention_equals_one_causal_call(heads, kv_heads, n):
    """The CPU training path queries 64-row chunks (grouped query heads, ragged last chunk, MHA, one chunk):
    same values and gradients as one causal call, and a double backward under the math kernel (what
    adapted blocks use) still works."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, n, heads, 8, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_()  # strided
    k, v = (torch.randn(2, kv_heads, n, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in "kv")
    for kernel in (False, True):
        with math_attention(kernel):
            got = _chunked_causal_attention(q, k, v)
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads != kv_heads)
            torch.testing.assert_close(got, ref)
            weights = torch.randn(ref.shape, generator=g, dtype=torch.float64)
            dgot = torch.autograd.grad((got * weights).sum(), (q, k, v), create_graph=kernel)
            dref = torch.autograd.grad((ref * weights).sum(), (q, k, v), create_graph=kernel)
            for a, b in zip(dgot, dref, strict=True):
                torch.testing.assert_close(a, b)
        if kernel:
            torch.testing.assert_close(
                torch.autograd.grad(sum(d.square().sum() for d in dgot), q)[0],
                torch.autograd.grad(sum(d.square().sum() for d in dref), q)[0],
            )
