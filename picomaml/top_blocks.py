"""The top ``k`` blocks of a decoder as a function of their parameters, for ``adapt_layers``.

:meth:`TopBlocks.capture` runs the embeddings and the blocks below the top ``k`` once, and records the
inputs of the first adapted block: the hidden states and the other arguments the decoder passes its blocks
(rotary tables, masks, position ids). The forward stops there, so the adapted blocks are not run by it.
:meth:`TopBlocks.run` then evaluates the top blocks and the final norm under *any* parameter dict with
``torch.func.functional_call``: the inner loop calls it once per step with the adapted tensors, and the
module's own parameters are never touched.

The recorded arguments belong to one batch of rows, so a batch of rows is captured per part (support or
query) and task: every row still passes the lower blocks exactly once.

Autograd of the fused attention kernels (flash, memory-efficient) has no double backward; while a graph
of inner gradients is built, :func:`math_attention` selects the composite SDPA kernel, which has one.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from picomaml.backbone import DecoderLayout, decoder_layout, is_transformers_model, no_cache_kwargs
from picomaml.params import check_int

__all__ = ["TopBlocks", "BlockInput", "math_attention", "check_adapt_layers"]

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
        model: A :class:`~picomaml.PicoDecoder` or a ``transformers`` decoder (see
            :func:`~picomaml.backbone.decoder_layout`).
        k: Number of top blocks to adapt, ``1 <= k <= n_blocks``.

    Attributes:
        names: The adapted tensors' names in the model (``"layers.3.attention.q_proj.weight"``, ...), blocks
            bottom-up then the final norm; the order of :meth:`params`.
        layout: The model's :class:`~picomaml.backbone.DecoderLayout`.

    Raises:
        TypeError: the model's blocks are not recognised.
        ValueError: ``k`` is not in ``[1, n_blocks]``.
    """

    def __init__(self, model: nn.Module, k: int) -> None:
        self.layout: DecoderLayout = decoder_layout(model)
        n = len(self.layout.blocks)
        self.k = check_adapt_layers(k, n)
        if self.k == 0:
            raise ValueError("adapt_layers: TopBlocks needs at least one block (0 adapts the head only)")
        self.model = model
        self.first = n - self.k
        self._modules: list[tuple[str, nn.Module]] = [
            (f"{self.layout.prefix}.{i}", self.layout.blocks[i]) for i in range(self.first, n)
        ]
        if self.layout.norm is not None:
            self._modules.append((self.layout.norm_prefix, self.layout.norm))
        self.names = tuple(f"{p}.{n}" for p, m in self._modules for n, _ in m.named_parameters())

    def params(self) -> dict[str, Tensor]:
        """The module's own adapted tensors ``name -> parameter`` (live: gradients reach them)."""
        return {f"{p}.{n}": t for p, m in self._modules for n, t in m.named_parameters()}

    def capture(self, ids: Tensor) -> BlockInput:
        """Run ``ids`` ``(B, W)`` through the embeddings and lower blocks; the inputs of the first adapted one."""
        record: dict[str, Any] = {}

        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            record["args"], record["kwargs"] = args, dict(kwargs)
            raise _Stop

        handle = self.layout.blocks[self.first].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            _run_base(self.model, self.layout, ids)
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

    def verify(self, ids: Tensor) -> None:
        """Check once per model that :meth:`run` under the model's own parameters reproduces its hidden states.

        PicoDecoders are checked by the test suite; other models once, on the first rows they see, in eval
        mode (no dropout) and without gradients.

        Raises:
            RuntimeError: the recomputed hidden states differ from the base model's.
        """
        if not is_transformers_model(self.model) or _VERIFIED.get(self.model) == self.first:
            return
        modes = {m: m.training for m in self.model.modules()}
        try:
            self.model.eval()
            with torch.no_grad():
                rows = ids[:2]
                ref = _run_base(self.model, self.layout, rows)
                got = self.run(self.params(), self.capture(rows))
        finally:
            for m, mode in modes.items():
                m.training = mode
        tol = 1e-3 if ref.dtype in (torch.float16, torch.bfloat16) else 1e-5
        if ref.shape != got.shape or not torch.allclose(got.float(), ref.float(), rtol=tol, atol=tol):
            raise RuntimeError(
                f"adapt_layers: re-running the top {self.k} blocks of {type(self.model).__name__} does not reproduce "
                "its hidden states (its blocks are not applied as x = block(x, ...) followed by the final norm); "
                "use adapt_layers=0 for this model"
            )
        _VERIFIED[self.model] = self.first


def _sub(params: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``params`` under ``prefix.``, with the prefix removed."""
    cut = len(prefix) + 1
    return {name[cut:]: t for name, t in params.items() if name.startswith(prefix + ".")}


def _run_base(model: nn.Module, layout: DecoderLayout, ids: Tensor) -> Tensor:
    """The final hidden states of the whole decoder (the capture hook may stop it early).

    A backbone compiled by :func:`picomaml.compile.compile_backbone` runs its eager original here: the
    capture hook raises to stop the forward at the first adapted block, which a compiled graph cannot do.
    """
    from picomaml.compile import eager_forward, eager_hidden_states, is_compiled

    hidden_states = eager_hidden_states(model)
    if callable(hidden_states):
        return hidden_states(ids)
    base = layout.base
    run = eager_forward(base) if is_compiled(base) else base
    return run(input_ids=ids, **no_cache_kwargs(base)).last_hidden_state
