"""How the next-token and the meta gradients relate on the shared backbone, and gradient surgery.

Hybrid training sums two objectives whose gradients meet in the backbone. Whether meta steps *interfere*
with next-token learning is measurable: [`gradient_conflict`][picomaml.meta.grad_conflict.gradient_conflict]
gives the cosine between the AR gradient and the meta gradient on the parameters both reach (overall and per
block) and their norm ratio, without touching ``.grad``. A negative cosine is a conflict: a meta step then
undoes part of what an AR step does.

[`pcgrad_term`][picomaml.meta.grad_conflict.pcgrad_term] is PCGrad-style surgery (Yu et al., 2020) for
weighted mode: when the two gradients conflict, the component of the meta gradient along the AR gradient is
removed. It is an extra loss term, linear in the shared parameters, whose gradient is exactly that correction,
so one ``backward()`` (and one DDP all-reduce) still gives the whole step; parameters only one objective
reaches are unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["shared_parameters", "gradient_conflict", "pcgrad_term"]

_BLOCK = re.compile(r"^(.*?layers\.\d+|.*?\.h\.\d+|.*?blocks\.\d+)\.")


def _module(model: nn.Module, getter: str, attr: str) -> nn.Module | None:
    get = getattr(model, getter, None)
    found = get() if callable(get) else getattr(model, attr, None)
    return found if isinstance(found, nn.Module) else None


def shared_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The backbone parameters both objectives reach: every trainable parameter except the vocabulary
    projection (``lm_head`` / ``get_output_embeddings()``), unless it is tied to the input embedding."""
    out, inp = _module(model, "get_output_embeddings", "lm_head"), _module(model, "get_input_embeddings", "embed_tokens")
    skip = {id(p) for p in out.parameters()} if out is not None else set()
    if inp is not None:  # a tied embedding is reached by the meta step through the input
        skip -= {id(p) for p in inp.parameters()}
    return {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in skip}


def _grads(loss: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params, strict=True)]


def _products(g_ar: list[Tensor], g_meta: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Per parameter, in float64: ``g_ar·g_meta``, ``|g_ar|²`` and ``|g_meta|²`` (three (P,) tensors)."""
    with torch.no_grad():
        dots = torch.stack([(a.double() * b.double()).sum() for a, b in zip(g_ar, g_meta, strict=True)])
        sq_ar = torch.stack([a.double().pow(2).sum() for a in g_ar])
        sq_meta = torch.stack([b.double().pow(2).sum() for b in g_meta])
    return dots, sq_ar, sq_meta


def gradient_conflict(ar_loss: Tensor, meta_loss: Tensor, params: dict[str, Tensor]) -> dict[str, float]:
    """Cosine and norm ratio of the AR and meta gradients on ``params`` (graphs kept, ``.grad`` untouched).

    Args:
        ar_loss: The next-token loss (scalar, attached to its graph).
        meta_loss: The meta loss (scalar, attached to its graph).
        params: Name -> parameter, e.g. [`shared_parameters`][picomaml.meta.grad_conflict.shared_parameters]
            of the backbone.

    Returns:
        ``grad_cos`` (overall cosine), ``grad_cos/<block>`` per transformer block (``layers.3``, ...) and
        ``grad_cos/other`` for the rest, ``grad_norm_ratio`` (``|g_meta| / |g_ar|``), ``grad_norm_ar``,
        ``grad_norm_meta``; NaN where a norm is 0.
    """
    names, tensors = list(params), list(params.values())
    g_ar, g_meta = _grads(ar_loss, tensors), _grads(meta_loss, tensors)
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        m = _BLOCK.match(name)
        groups.setdefault(m.group(1) if m else "other", []).append(i)
    dots, sq_ar, sq_meta = _products(g_ar, g_meta)
    with torch.no_grad():

        def cos(idx: list[int]) -> Tensor:
            d, na, nm = dots[idx].sum(), sq_ar[idx].sum().sqrt(), sq_meta[idx].sum().sqrt()
            return d / (na * nm) if bool(na * nm > 0) else torch.tensor(float("nan"), dtype=torch.float64)

        out = {"grad_cos": cos(list(range(len(names))))}
        out |= {f"grad_cos/{group}": cos(idx) for group, idx in groups.items()}
        n_ar, n_meta = sq_ar.sum().sqrt(), sq_meta.sum().sqrt()
        out["grad_norm_ar"], out["grad_norm_meta"] = n_ar, n_meta
        out["grad_norm_ratio"] = n_meta / n_ar if bool(n_ar > 0) else torch.tensor(float("nan"))
        keys, values = list(out), torch.stack([v.double() for v in out.values()]).tolist()  # one sync
    return dict(zip(keys, values, strict=True))


def pcgrad_term(ar_loss: Tensor, meta_loss: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, float]:
    """The extra loss term of PCGrad surgery on ``params``, and the cosine it acted on.

    With ``g_ar``, ``g_meta`` the two gradients on ``params`` and ``c = min(0, g_ar·g_meta) / |g_ar|²``,
    the term is ``-c Σ_p <g_ar,p, p>`` (``g_ar`` detached): its gradient is ``-c g_ar``, so adding
    ``w_meta`` times it to ``w_ar · ar + w_meta · meta`` turns the meta gradient into
    ``g_meta - c g_ar``, its projection off ``g_ar`` when they conflict (``c = 0`` otherwise). Parameters
    outside ``params`` (the head, the LM head) are untouched.

    Returns:
        ``(term, cosine)``: a scalar tensor (0 without conflict) and the cosine before surgery.
    """
    tensors = list(params)
    g_ar, g_meta = _grads(ar_loss, tensors), _grads(meta_loss, tensors)
    dot, sq_ar, sq_meta = (t.sum() for t in _products(g_ar, g_meta))
    with torch.no_grad():
        c = torch.where(sq_ar > 0, torch.clamp(dot, max=0.0) / sq_ar.clamp_min(1e-30), torch.zeros_like(dot))
        cosine = float(dot / (sq_ar.sqrt() * sq_meta.sqrt()).clamp_min(1e-30))
    term = sum((g.detach() * p).sum() for g, p in zip(g_ar, tensors, strict=True))
    return -c.to(term.dtype) * term, cosine
