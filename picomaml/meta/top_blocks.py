"""The top ``k`` blocks of a decoder as a function of their parameters, for ``adapt_layers``.

[`TopBlocks.capture`][picomaml.meta.top_blocks.TopBlocks.capture] runs the embeddings and the blocks below the
top ``k`` once, and records the inputs of the first adapted block: the hidden states and the other arguments
the decoder passes its blocks (rotary tables, masks, position ids). The forward stops there, so the adapted
blocks are not run by it. [`TopBlocks.run`][picomaml.meta.top_blocks.TopBlocks.run] then evaluates the top
blocks and the final norm under *any* parameter dict with ``torch.func.functional_call``: the inner loop calls
it once per step with the adapted tensors, and the module's own parameters are never touched.

The recorded arguments belong to one batch of rows, so a batch of rows is captured per part (support or
query) and task: every row still passes the lower blocks exactly once.

Autograd of the fused attention kernels (flash, memory-efficient) has no double backward; while a graph
of inner gradients is built, [`math_attention`][picomaml.meta.top_blocks.math_attention] selects the composite
SDPA kernel, which has one.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from picomaml.meta.backbone import (
    DecoderLayout,
    backbone_hidden,
    decoder_layout,
    eager_forward,
    eager_hidden_states,
    is_compiled,
    is_transformers_model,
    no_cache_kwargs,
)
from picomaml.params import check_int

__all__ = ["TopBlocks", "BlockInput", "math_attention", "check_adapt_layers"]

# model -> {(first block, window, dtype, device)}: the call shapes at which a split re-run was checked
_VERIFIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Stop(Exception):
    """Raised by the capture hook to end the forward at the first adapted block."""


class BlockInput(NamedTuple):
    """The inputs of the first adapted block for one batch of rows.

    Attributes:
        hidden: ``(B, W, D)`` output of the lower blocks (attached to their graph).
        args: The block's other positional arguments, as the decoder passed them.
        kwargs: Its keyword arguments (rotary tables, masks, ...).
    """

    hidden: Tensor
    args: tuple
    kwargs: dict[str, Any]


@contextlib.contextmanager
def math_attention(enabled: bool = True) -> Iterator[None]:
    """Use the composite (math) SDPA kernel inside, which supports double backward; no-op if not ``enabled``."""
    if not enabled:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def check_adapt_layers(adapt_layers: Any, n_blocks: int | None = None) -> int:
    """``adapt_layers`` as an int in ``[0, n_blocks]``, or a ``ValueError``/``TypeError`` naming it."""
    k = check_int("adapt_layers", adapt_layers, ge=0)
    if n_blocks is not None and k > n_blocks:
        raise ValueError(f"adapt_layers: must be in [0, {n_blocks}] (the model's number of blocks), got {k}")
    return k


class TopBlocks:
    """The top ``k`` blocks (and the final norm) of a decoder, evaluated functionally.

    Args:
        model: A [`PicoDecoder`][picomaml.model.decoder.PicoDecoder], a ``transformers`` decoder or any module
            whose blocks [`decoder_layout`][picomaml.meta.backbone.decoder_layout] finds.
        k: Number of top blocks re-run per inner step, ``1 <= k <= n_blocks``.
        names: The tensors that adapt, a subset of those blocks' and the final norm's (default: all of
            them); the others keep the model's own values.
        features: The ``features=`` callable the caller featurises with (the capture runs it).

    Attributes:
        names: The adapted tensors' names in the model (``"layers.3.attention.q_proj.weight"``, ...), blocks
            bottom-up then the final norm; the order of [`params`][picomaml.meta.top_blocks.TopBlocks.params].
        layout: The model's [`DecoderLayout`][picomaml.meta.backbone.DecoderLayout].

    Raises:
        TypeError: the model's blocks are not recognised.
        ValueError: ``k`` is not in ``[1, n_blocks]``, or a name outside the top ``k`` blocks and the norm.
    """

    def __init__(
        self, model: nn.Module, k: int, names: tuple[str, ...] | None = None, features: Any = None
    ) -> None:
        self.layout: DecoderLayout = decoder_layout(model)
        n = len(self.layout.blocks)
        self.k = check_adapt_layers(k, n)
        if self.k == 0:
            raise ValueError("adapt_layers: TopBlocks needs at least one block (0 adapts the head only)")
        self.model, self.features = model, features
        self.first = n - self.k
        self._modules: list[tuple[str, nn.Module]] = [
            (f"{self.layout.prefix}.{i}", self.layout.blocks[i]) for i in range(self.first, n)
        ]
        if self.layout.norm is not None:
            self._modules.append((self.layout.norm_prefix, self.layout.norm))
        every = tuple(f"{p}.{n}" for p, m in self._modules for n, _ in m.named_parameters())
        if names is not None:
            outside = [x for x in names if x not in every]
            if outside:
                raise ValueError(f"adapt: {outside[:3]} are not tensors of the top {self.k} blocks or the final norm")
        self.names = every if names is None else tuple(names)

    @classmethod
    def covering(cls, model: nn.Module, names: tuple[str, ...], features: Any = None) -> TopBlocks | None:
        """The fewest top blocks that hold every one of ``names`` (blocks or final norm), adapting only
        those; ``None`` when the blocks are not found or a name lies elsewhere (e.g. the embeddings)."""
        try:
            layout = decoder_layout(model)
        except TypeError:
            return None
        n, lowest = len(layout.blocks), None
        for name in names:
            if layout.norm_prefix and name.startswith(layout.norm_prefix + "."):
                index = n - 1
            elif name.startswith(layout.prefix + "."):
                index = int(name[len(layout.prefix) + 1 :].split(".", 1)[0])
            else:
                return None
            lowest = index if lowest is None else min(lowest, index)
        return None if lowest is None else cls(model, n - lowest, names, features)

    def params(self) -> dict[str, Tensor]:
        """The module's own adapted tensors ``name -> parameter`` (live: gradients reach them)."""
        every = {f"{p}.{n}": t for p, m in self._modules for n, t in m.named_parameters()}
        return {k: every[k] for k in self.names}

    def capture(self, ids: Tensor) -> BlockInput:
        """Run ``ids`` ``(B, W)`` through the embeddings and lower blocks; the inputs of the first adapted one."""
        record: dict[str, Any] = {}

        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            record["args"], record["kwargs"] = args, dict(kwargs)
            raise _Stop

        handle = self.layout.blocks[self.first].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            _run_base(self.model, self.layout, ids, self.features)
        except _Stop:
            pass
        finally:
            handle.remove()
        if "args" not in record:
            raise RuntimeError(
                f"adapt_layers: {type(self.model).__name__}'s forward never called block {self.first}; its blocks "
                "are not run in order by the base model"
            )
        args, kwargs = record["args"], record["kwargs"]
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        return BlockInput(hidden, rest, kwargs)

    def run(self, params: dict[str, Tensor], inp: BlockInput) -> Tensor:
        """The final hidden states ``(B, W, D)`` of the captured rows under ``params`` (``name -> tensor``)."""
        x = inp.hidden
        for prefix, module in self._modules[: self.k]:
            out = functional_call(module, _sub(params, prefix), (x, *inp.args), dict(inp.kwargs))
            x = out[0] if isinstance(out, (tuple, list)) else out
        if self.layout.norm is not None:
            x = functional_call(self.layout.norm, _sub(params, self.layout.norm_prefix), (x,))
        return x

    def reproduces(self, ids: Tensor) -> bool:
        """Whether [`run`][picomaml.meta.top_blocks.TopBlocks.run] under the model's own tensors gives its
        hidden states for rows like ``ids``.

        Checked on two rows in eval mode without gradients, once per model, first adapted block, window
        length, dtype and device (every call with a ``features=`` callable): a re-run that matched at one
        window may not at another (sliding-window attention), and a model may change what follows its blocks
        (a projection after the final norm). Training-only control flow (e.g. layer drop) is not seen.
        """
        key = (self.first, ids.shape[-1], next(self.model.parameters()).dtype, ids.device)
        # a features= callable is the caller's: any one may compute something else, so it is checked every call
        seen = _VERIFIED.setdefault(self.model, {}) if self.features is None else {}
        if key not in seen:
            modes = {m: m.training for m in self.model.modules()}
            try:
                self.model.eval()
                with torch.no_grad():
                    rows = ids[:2]
                    ref = _run_base(self.model, self.layout, rows, self.features)
                    got = self.run(self.params(), self.capture(rows))
            finally:
                for m, mode in modes.items():
                    m.training = mode
            tol = 1e-3 if ref.dtype in (torch.float16, torch.bfloat16) else 1e-5
            seen[key] = ref.shape == got.shape and torch.allclose(got.float(), ref.float(), rtol=tol, atol=tol)
        return seen[key]

    def verify(self, ids: Tensor) -> None:
        """[`reproduces`][picomaml.meta.top_blocks.TopBlocks.reproduces], or a ``RuntimeError`` naming the
        model."""
        if not self.reproduces(ids):
            raise RuntimeError(
                f"adapt_layers: re-running the top {self.k} blocks of {type(self.model).__name__} does not reproduce "
                "its hidden states (its blocks are not applied as x = block(x, ...) followed by the final norm)"
            )


def _sub(params: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``params`` under ``prefix.``, with the prefix removed."""
    cut = len(prefix) + 1
    return {name[cut:]: t for name, t in params.items() if name.startswith(prefix + ".")}


def _run_base(model: nn.Module, layout: DecoderLayout, ids: Tensor, features: Any = None) -> Tensor:
    """The final hidden states of the whole backbone (the capture hook may stop it early), as the caller's
    featuriser computes them.

    A backbone compiled by
    [`picomaml.train.compile.compile_backbone`][picomaml.train.compile.compile_backbone] runs its eager
    original here: the capture hook raises to stop the forward at the first adapted block, which a compiled
    graph cannot do.
    """
    if features is not None:
        return features(ids)
    hidden_states = eager_hidden_states(model)
    if callable(hidden_states):
        return hidden_states(ids)
    if not is_transformers_model(model):
        return backbone_hidden(model, ids)
    base = layout.base
    run = eager_forward(base) if is_compiled(base) else base
    return run(input_ids=ids, **no_cache_kwargs(base)).last_hidden_state
