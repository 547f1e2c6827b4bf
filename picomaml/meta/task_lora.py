"""Per-task LoRA factors that only the inner loop adapts: ``meta.lora_rank`` (``HybridLearner(lora_rank=)``).

[`TaskLoRA`][picomaml.meta.task_lora.TaskLoRA] gives chosen linear layers of a backbone (by default every
block's ``q_proj`` and ``v_proj``) low-rank factors ``A`` ``(r, in)`` and ``B`` ``(out, r)``, so that inside a
meta step the layer computes ``W x + (alpha / r) B A x``. Each task starts from the same factors, ``A`` a
seeded Gaussian and ``B`` zero, and the inner loop adapts them together with the head
([`picomaml.meta.adapted_features`][picomaml.meta.adapted_features], whole backbone re-run per inner step);
the meta-gradient reaches the backbone through the adapted factors, as the papers' adapter variants adapt only
adapter tensors per task (Meta-Adapters; here the adapter init is fixed, not meta-learned).

The factors enter as merged weights ``W + (alpha / r) B A``, swapped in with ``torch.func.functional_call`` for
the call of [`TaskLoRA.hidden_states`][picomaml.meta.task_lora.TaskLoRA.hidden_states] only; so fused
projections (a PicoDecoder runs q/k/v and gate/up as one matmul over the concatenated weights) take them as
any other layer, and the backbone is never modified. Because ``B`` starts at zero, the backbone computes
exactly its own function outside the inner loop: AR steps, evaluation, checkpoints and exports see a plain
model (the factors are not parameters of the backbone, not in its ``state_dict`` and not trained by the outer
optimizer).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from picomaml.meta.backbone import backbone_hidden, decoder_layout

__all__ = ["TaskLoRA", "lora_targets", "lora_params", "target_shapes"]


def lora_targets(model: nn.Module, targets: Sequence[str]) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` modules of ``model`` whose last name part matches one of ``targets`` (names or
    ``fnmatch`` globs, e.g. ``"q_proj"``, ``"*_proj"``), in module order; inside the blocks of a recognised
    decoder only.

    Raises:
        ValueError: ``targets`` is empty, or a pattern matches no linear layer (the message lists some).
    """
    if isinstance(targets, str) or not targets:
        raise ValueError(f"lora_targets: a non-empty list of layer names or globs, got {targets!r}")
    try:  # a decoder's blocks only: never the LM head (tied to the embedding) or anything outside them
        inside = decoder_layout(model).prefix + "."
    except TypeError:
        inside = ""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(inside)]
    for pattern in targets:
        if not any(fnmatch.fnmatchcase(n.rsplit(".", 1)[-1], pattern) for n, _ in linears):
            some = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})[:8]
            raise ValueError(f"lora_targets: {pattern!r} matches no linear layer of {type(model).__name__} (its linear "
                             f"layers are named {some})")  # fmt: skip
    return [(n, m) for n, m in linears if any(fnmatch.fnmatchcase(n.rsplit(".", 1)[-1], p) for p in targets)]


def target_shapes(model_config: Any, targets: Sequence[str] = ("q_proj", "v_proj")) -> list[tuple[int, int]]:
    """``(in, out)`` of each linear layer of one [`PicoDecoder`][picomaml.model.decoder.PicoDecoder] block of
    ``model_config`` (a config or a dict of its fields) that ``targets`` match, in block order."""
    get = model_config.get if isinstance(model_config, dict) else lambda k: getattr(model_config, k)
    d, f = int(get("d_model")), int(get("ffn_dim"))
    kv = int(get("n_kv_heads")) * (d // int(get("n_heads")))
    shapes = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
              "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}  # fmt: skip
    return [s for name, s in shapes.items() if any(fnmatch.fnmatchcase(name, p) for p in targets)]


def lora_params(model_config: Any, rank: int, targets: Sequence[str] = ("q_proj", "v_proj")) -> int:
    """Entries of the factors, ``n_layers * sum r (in + out)``, that ``TaskLoRA`` adds to a
    [`PicoDecoder`][picomaml.model.decoder.PicoDecoder] of ``model_config``."""
    layers = int(model_config["n_layers"] if isinstance(model_config, dict) else model_config.n_layers)
    return layers * sum(rank * (i + o) for i, o in target_shapes(model_config, targets))


class _Hidden(nn.Module):
    """``forward(ids)`` = the backbone's hidden states, so ``functional_call`` can swap the backbone's weights."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        return backbone_hidden(self.model, ids)


class TaskLoRA(nn.Module):
    """A view of ``model`` whose target linear layers carry per-task LoRA factors.

    Pass it as the ``model`` of [`meta_loss`][picomaml.meta.objectives.meta_loss] with ``adapt=lora.names``;
    the backbone itself is held, not registered, so this module's parameters are the factors only.

    Args:
        model: The backbone (hidden states through
            [`backbone_hidden`][picomaml.meta.backbone.backbone_hidden]).
        rank: Rank ``r`` of each factor pair, ``>= 1``.
        targets: Linear layers by name or glob of their last name part (default every block's ``q_proj``
            and ``v_proj``).
        alpha: Scale of the low-rank term is ``alpha / rank`` (default ``rank``: a scale of 1).
        seed: Seed of ``A``'s Gaussian init (``std = 1 / sqrt(in)``).

    Attributes:
        names: The factors' parameter names (``factors.<layer>_A`` / ``_B``), the ``adapt`` selection.

    Raises:
        ValueError: a bad ``rank``, ``alpha`` or ``targets``.
    """

    def __init__(
        self, model: nn.Module, rank: int, targets: Sequence[str] = ("q_proj", "v_proj"), alpha: float | None = None,
        seed: int = 0,
    ) -> None:  # fmt: skip
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank: must be an integer >= 1, got {rank!r}")
        if alpha is not None and not alpha > 0:
            raise ValueError(f"alpha: must be > 0 or None, got {alpha!r}")
        object.__setattr__(self, "_hidden", _Hidden(model))  # held, not a submodule: its tensors are not ours
        self.config = getattr(model, "config", None)  # the hidden size, for the head's width check
        self.rank, self.scale = rank, (rank if alpha is None else alpha) / rank
        gen = torch.Generator().manual_seed(seed)
        self.factors = nn.ParameterDict()
        self._layers: list[tuple[nn.Linear, str, str]] = []  # (layer, its weight's name in the backbone, factors' key)
        for name, layer in lora_targets(model, tuple(targets)):
            key, w = name.replace(".", "_"), layer.weight
            a = torch.randn(rank, layer.in_features, generator=gen) / layer.in_features**0.5
            # fixed inits (not trained by the outer optimizer): the inner loop adapts copies of them per task
            self.factors[f"{key}_A"] = nn.Parameter(a.to(w.device, w.dtype), requires_grad=False)
            self.factors[f"{key}_B"] = nn.Parameter(w.new_zeros(layer.out_features, rank), requires_grad=False)
            self._layers.append((layer, f"{name}.weight", key))
        self.names = tuple(f"factors.{k}" for k in self.factors)

    @property
    def backbone(self) -> nn.Module:
        return self._hidden.model

    def merged_weights(self) -> dict[str, Tensor]:
        """``W + scale * B A`` of every target layer, under its name in the backbone (``layers.0....weight``)."""
        return {
            name: layer.weight + self.scale * (self.factors[f"{key}_B"] @ self.factors[f"{key}_A"])
            for layer, name, key in self._layers
        }  # fmt: skip

    def hidden_states(self, ids: Tensor) -> Tensor:
        """``(B, L, D)`` final hidden states of ``ids`` ``(B, L)`` under the merged weights."""
        merged = {f"model.{k}": v for k, v in self.merged_weights().items()}
        return functional_call(self._hidden, merged, (ids,))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, layers={len(self._layers)}"
