"""Which backbone tensors adapt with the head: ``adapt=`` (names, globs, a predicate) or ``adapt_layers=k``.

[`backbone_selection`][picomaml.meta.selection.backbone_selection] resolves either against the unwrapped model
(a compiled, peft, DDP or Fabric wrapper is looked through, and names of the wrapped model are accepted), and
finds the top blocks that hold every adapted tensor, if there are such
([`TopBlocks.covering`][picomaml.meta.top_blocks.TopBlocks.covering]). The inner loop binds learned LRs to the
selection's layout; [`picomaml.meta.adapted_features`][picomaml.meta.adapted_features] runs it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import nn

from picomaml.meta import engine
from picomaml.meta.backbone import strip_wrapper_prefix, unwrap_model
from picomaml.meta.top_blocks import TopBlocks

__all__ = ["BackboneSelection", "backbone_selection"]


class BackboneSelection(NamedTuple):
    """The backbone tensors that adapt with the head.

    Attributes:
        model: The unwrapped backbone ([`unwrap_model`][picomaml.meta.backbone.unwrap_model]).
        names: The adapted tensors' names in ``model``, in its parameter order (``adapt_layers``: blocks
            bottom-up, then the final norm).
        layout: ``(name, shape)`` of each, the order of learned inner LRs after the head's.
        top: The top blocks that hold every adapted tensor, or ``None`` when no split is possible.
    """

    model: nn.Module
    names: tuple[str, ...]
    layout: tuple[tuple[str, tuple[int, ...]], ...]
    top: TopBlocks | None


def backbone_selection(
    model: nn.Module, adapt_layers: int = 0, adapt: engine.Adapt = None, features: Any = None
) -> BackboneSelection:
    """Resolve ``adapt_layers=k`` (the top ``k`` blocks and the final norm) or ``adapt`` (names, globs or a
    predicate, see [`select_names`][picomaml.meta.engine.select_names]; names of the wrapped model are
    accepted).

    Raises:
        ValueError: both given, a pattern that matches nothing, ``k`` above the number of blocks.
        TypeError: ``adapt_layers`` with a model that holds no block list.
    """
    if adapt_layers and adapt is not None:
        raise ValueError("adapt: pass adapt_layers=k or adapt=[...], not both (adapt_layers=k is a shorthand)")
    model = unwrap_model(model)
    if adapt_layers:
        top: TopBlocks | None = TopBlocks(model, adapt_layers, features=features)
        names = top.names
    else:
        if isinstance(adapt, str):
            adapt = strip_wrapper_prefix(adapt)
        elif not callable(adapt) and adapt is not None:
            adapt = [strip_wrapper_prefix(a) if isinstance(a, str) else a for a in adapt]
        names = engine.select_names(model, adapt)
        top = TopBlocks.covering(model, names, features)
    own = dict(model.named_parameters())
    return BackboneSelection(model, names, tuple((n, tuple(own[n].shape)) for n in names), top)


