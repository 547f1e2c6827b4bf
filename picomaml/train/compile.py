"""``torch.compile`` for a backbone: compiled graphs for the AR step and the meta step's backbone forward.

[`compile_backbone`][picomaml.train.compile.compile_backbone] replaces the model's ``forward`` (and a
PicoDecoder's ``hidden_states``; a ``transformers`` model's base-model ``forward``) with instance attributes
that run compiled graphs, so everything that calls ``model(ids)`` or ``model.hidden_states(ids)``
([`lm_loss`][picomaml.meta.objectives.lm_loss], [`meta_loss`][picomaml.meta.objectives.meta_loss],
[`HybridLearner`][picomaml.meta.learner.HybridLearner]) uses them without a change. The eager originals stay
reachable ([`eager_forward`][picomaml.meta.backbone.eager_forward],
[`eager_hidden_states`][picomaml.meta.backbone.eager_hidden_states],
[`eager_mode`][picomaml.train.compile.eager_mode]). For a model whose config gives ``vocab_size`` it also
compiles [`next_token_loss`][picomaml.meta.backbone.next_token_loss], the forward and the cross-entropy as one
graph ([`compiled_loss`][picomaml.meta.backbone.compiled_loss]), which
[`lm_loss`][picomaml.meta.objectives.lm_loss] runs: the loss fuses with the vocabulary projection instead of
reading the ``(B, L, V)`` logits back eagerly.

What stays eager, and why:

- **Second order.** Compiled graphs (AOTAutograd) have no double backward: PyTorch raises ("does not
  currently support double backward") when a ``create_graph=True`` gradient has to pass through one. The
  MAML inner loop therefore never differentiates through the compiled backbone: with ``adapt_layers=0``
  it adapts the head on the backbone's features (the compiled graph is differentiated once, by the outer
  backward); with ``adapt_layers=k`` [`TopBlocks`][picomaml.meta.top_blocks.TopBlocks] runs the lower blocks
  with the *eager* ``hidden_states`` (its capture hook raises to stop the forward, which a compiled graph
  cannot do) and re-runs the adapted blocks eagerly, so a meta step with adapted blocks runs its backbone
  eagerly.
- **Learning dynamics.** [`capture_learning_dynamics`][picomaml.train.dynamics.capture_learning_dynamics] runs
  inside [`eager_mode`][picomaml.train.compile.eager_mode]: its forward hooks would otherwise compile a graph
  of their own.
- **KV-cache decoding.** A call with a [`KVCache`][picomaml.model.attention.KVCache] (``generate``) runs
  eagerly: its Python-int cache positions would recompile the graph for every length.
- **Buffers.** [`compile_backbone`][picomaml.train.compile.compile_backbone] turns off AOTAutograd's donated
  buffers for the process (``torch._functorch.config.donated_buffer = False``), so ``retain_graph=True`` works
  through a compiled graph (PCGrad, gradient-conflict metrics); a double backward still raises.
- **Input checks.** A PicoDecoder's eager ``_check_input`` runs before each compiled call
  (``check_inputs=True``, the default), so bad token ids raise the eager ``ValueError``; inside the graph
  the range check is an in-graph assert, which on CPU aborts the process when it fails.

The compile time (the first call of each compiled function, and every later call that compiled a new
graph: a new shape, grad mode or train/eval mode) is logged at INFO level on this module's logger.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from picomaml.meta.backbone import (  # the marks compile_backbone leaves, read by the meta objective
    EAGER_ATTR as _EAGER,
)
from picomaml.meta.backbone import (
    LOSS_ATTR as _LOSS,
)
from picomaml.meta.backbone import (
    compiled_loss,
    eager_forward,
    eager_hidden_states,
    is_compiled,
    is_transformers_model,
    next_token_loss,
    vocab_size,
)

__all__ = [
    "compile_backbone",
    "compiled_loss",
    "is_compiled",
    "eager_forward",
    "eager_hidden_states",
    "eager_mode",
]

log = logging.getLogger(__name__)



def _graphs() -> int:
    """Graphs compiled so far in this process (dynamo's counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def _uses_cache(args: tuple, kwargs: dict) -> bool:
    """True for a decoding call: a PicoDecoder ``KVCache``, or ``past_key_values``/``use_cache=True``."""
    from picomaml.model.attention import KVCache

    if any(isinstance(a, KVCache) for a in (*args, *kwargs.values())):
        return True
    return kwargs.get("past_key_values") is not None or kwargs.get("use_cache") is True


def _wrap(label: str, eager: Callable, compiled: Callable, check: Callable | None) -> Callable:
    """``eager``'s signature; runs ``compiled`` except inside another compiled graph or with a KV cache.

    ``check(input_ids)``, when given, runs eagerly before the compiled graph (the eager error messages).
    """
    first = [True]

    @functools.wraps(eager)
    def call(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return eager(*args, **kwargs)  # traced inline into the calling graph (forward -> hidden_states)
        if _uses_cache(args, kwargs):
            return eager(*args, **kwargs)
        if check is not None:
            check(args[0] if args else kwargs.get("input_ids"))
        before, t0 = _graphs(), time.perf_counter()
        out = compiled(*args, **kwargs)
        if first[0] or _graphs() != before:
            what = "first call" if first[0] else "recompiled"
            log.info("compile: %s %s in %.1f s (compile + one run)", label, what, time.perf_counter() - t0)
            first[0] = False
        return out

    call.__wrapped_compiled__ = compiled  # type: ignore[attr-defined]
    return call


def _install(
    module: nn.Module, name: str, label: str, compile_kwargs: dict, check: Callable | None, eager: Callable | None = None
) -> None:
    if eager is None:
        eager = getattr(type(module), name).__get__(module)  # the class's method, bound: never a wrapper
    compiled = torch.compile(eager, **compile_kwargs)
    originals = module.__dict__.setdefault(_EAGER, {})
    originals[name] = eager
    setattr(module, name, _wrap(label, eager, compiled, check))


def compile_backbone(model: nn.Module, *, check_inputs: bool = True, **compile_kwargs: Any) -> nn.Module:
    """Compile ``model``'s forward passes in place with ``torch.compile``; returns ``model``.

    Args:
        model: A [`PicoDecoder`][picomaml.model.decoder.PicoDecoder] (``forward`` and ``hidden_states`` are
            compiled), a ``transformers`` model (its ``forward`` and its base model's ``forward``) or any
            module (its ``forward``).
        check_inputs: Run a PicoDecoder's eager input checks before each compiled call, so bad token ids
            raise the eager ``ValueError`` (one host sync per call, as in eager mode). ``False`` leaves
            only the in-graph assert: no sync, but on CPU a failing assert inside a parallel kernel
            aborts the process.
        **compile_kwargs: Passed to ``torch.compile`` (``mode``, ``dynamic``, ``fullgraph``, ``backend``...).

    Returns:
        The same module; its parameters, buffers and state dict are untouched. Compiling twice is a no-op.

    The first call of each compiled function compiles it (tens of seconds on CPU for a small model) and
    logs the time. See the module docstring for the paths that stay eager.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if is_compiled(model):
        log.info("compile: %s is already compiled; left as it is", type(model).__name__)
        return model
    cls = type(model).__name__
    # No donated buffers (process-wide; they only save memory): a backward graph that donates its saved
    # tensors refuses retain_graph=True, which PCGrad and the gradient-conflict metrics need (two gradients
    # of one graph). AOTAutograd reads the flag when a graph compiles and again at each backward.
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False
    check = None
    if check_inputs and callable(getattr(type(model), "_check_input", None)):  # a PicoDecoder
        check = functools.partial(_check_ids, model)
    _install(model, "forward", f"{cls}.forward", compile_kwargs, check)
    if callable(getattr(type(model), "hidden_states", None)):
        _install(model, "hidden_states", f"{cls}.hidden_states", compile_kwargs, check)
    if vocab_size(model) is not None:  # lm_loss runs forward + cross-entropy as one graph (fused with lm_head)
        loss = functools.partial(next_token_loss, model)
        _install(model, _LOSS, f"{cls} forward + cross-entropy", compile_kwargs, check, eager=loss)
    if is_transformers_model(model):
        base = getattr(model, "base_model", model)
        if isinstance(base, nn.Module) and base is not model and not is_compiled(base):
            _install(
                base, "forward", f"{cls}.base_model ({type(base).__name__}).forward", compile_kwargs, None
            )
    log.info("compile: %s compiles on first use (torch.compile %s)", cls, compile_kwargs or "defaults")
    return model


def _check_ids(model: nn.Module, input_ids: Any) -> None:
    model._check_input(input_ids, 0)  # type: ignore[operator]


@contextlib.contextmanager
def eager_mode(*modules: nn.Module) -> Iterator[None]:
    """Run compiled ``modules`` eagerly inside (e.g. while forward hooks capture activations)."""
    saved = []
    for m in modules:
        for name in m.__dict__.get(_EAGER, {}):
            fn = m.__dict__.pop(name, None)  # None: an enclosing eager_mode took it already
            if fn is not None:
                saved.append((m, name, fn))
    try:
        yield
    finally:
        for m, name, fn in saved:
            setattr(m, name, fn)
