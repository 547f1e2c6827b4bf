"""Confining the meta gradient to the top blocks of a backbone (``meta.grad_blocks``).

In hybrid training both losses update the whole backbone. Whether the meta loss helps or hurts may depend on
where its gradient lands: the upper blocks, which shape the pooled features, or the lower ones, which serve
next-token prediction as well. [`stop_gradient_below`][picomaml.meta.grad_blocks.stop_gradient_below] detaches
the hidden states entering block ``n - k`` for the duration of a meta forward, so the meta loss trains only the
top ``k`` blocks (and the final norm), the head and the inner loop; the forward values are unchanged. With
``k = 0`` the detach is at the final norm's input (or the last block's output), and only the head and inner
loop learn from the meta loss.

The detach is a forward hook on a block of the model's own layout
([`decoder_layout`][picomaml.meta.backbone.decoder_layout]), so it holds for every path a meta step takes
through the backbone (one forward, the split of ``adapt_layers``, or re-running it per task).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

from picomaml.meta.backbone import decoder_layout, unwrap_model
from picomaml.params import check_int

__all__ = ["check_grad_blocks", "stop_gradient_below"]


def check_grad_blocks(model: nn.Module, grad_blocks: Any) -> int:
    """``grad_blocks`` as an int in ``[0, n_blocks]`` of ``model``.

    Raises:
        ConfigError: Not an integer in range; the message names ``meta.grad_blocks`` and the model's blocks.
        TypeError: The model's blocks cannot be found.
    """
    n = len(decoder_layout(unwrap_model(model)).blocks)
    return check_int(f"meta.grad_blocks (the model has {n} blocks)", grad_blocks, ge=0, le=n)


def _detach_output(module: nn.Module, args: Any, output: Any) -> Any:
    if isinstance(output, Tensor):
        return output.detach()
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        return (output[0].detach(), *output[1:])
    return output


def _detach_input(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    if args and isinstance(args[0], Tensor):
        return (args[0].detach(), *args[1:]), kwargs
    for key in ("hidden_states", "x"):  # transformers blocks take their input by keyword too
        if isinstance(kwargs.get(key), Tensor):
            return args, {**kwargs, key: kwargs[key].detach()}
    return None


@contextlib.contextmanager
def stop_gradient_below(model: nn.Module, grad_blocks: int | None) -> Iterator[None]:
    """Within the block, gradients of ``model``'s outputs reach only its top ``grad_blocks`` blocks.

    Args:
        model: The backbone (wrapped ones are unwrapped to find the blocks).
        grad_blocks: Top blocks that keep their gradient; ``None`` or the number of blocks: no change.
    """
    if grad_blocks is None:
        yield
        return
    layout = decoder_layout(unwrap_model(model))
    n = len(layout.blocks)
    if grad_blocks >= n:
        yield
        return
    if grad_blocks > 0:
        handle = layout.blocks[n - grad_blocks].register_forward_pre_hook(_detach_input, with_kwargs=True)
    elif layout.norm is not None:
        handle = layout.norm.register_forward_pre_hook(_detach_input, with_kwargs=True)
    else:
        handle = layout.blocks[n - 1].register_forward_hook(_detach_output)
    try:
        yield
    finally:
        handle.remove()
