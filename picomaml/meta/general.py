"""The general form of the inner loop: any module, any loss, any selection of its tensors, all tasks at once.

``InnerLoop(...)(model, (xs, ys), (xq, yq), loss=..., adapt=...)`` lands here. The module's own tensors get
an explicit task dim ([`task_stack`][picomaml.meta.engine.task_stack]), its forward runs vectorised over tasks
under them ([`general_losses`][picomaml.meta.engine.general_losses]), and the one SGD implementation
([`sgd_steps`][picomaml.meta.engine.sgd_steps]) adapts them. Metrics stay tensors (no host sync).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from picomaml.meta import engine
from picomaml.meta.engine import InnerLoopOutput
from picomaml.meta.functional import accuracy

__all__ = ["general_form"]


def general_form(
    loop: Any, module: nn.Module, support: Any, query: Any, loss: Callable | None, adapt: engine.Adapt
) -> tuple[InnerLoopOutput | None, dict[str, Tensor]]:
    """The general form of [`InnerLoop`][picomaml.meta.inner_loop.InnerLoop]: ``(output, adapted tensors)``;
    ``query=None`` only adapts.

    Args:
        loop: The [`InnerLoop`][picomaml.meta.inner_loop.InnerLoop] (its ``steps``, ``first_order``,
            ``grad_clip``, ``multi_step_loss``, learned LRs and metric helpers).
        module: Any module; support / query: ``(inputs, targets)`` with a leading task dim ``T``.
        loss: ``loss(outputs, targets) -> scalar`` for one task; ``None``: cross-entropy.
        adapt: The selection of ``module``'s tensors ([`select_names`][picomaml.meta.engine.select_names]).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
    loss_fn = _default_loss if loss is None else loss
    if not callable(loss_fn):
        raise TypeError(f"loss: expected a callable loss(outputs, targets) -> scalar, got {type(loss).__name__}")
    xs, ys = _pair("support", support)
    t = _n_tasks("support", (xs, ys))
    if query is not None:
        xq, yq = _pair("query", query)
        if _n_tasks("query", (xq, yq)) != t:
            raise ValueError(f"query: has {_n_tasks('query', (xq, yq))} tasks, support has {t}")
    names = engine.select_names(module, adapt)
    lr_fn = loop.lr_fn(names)
    outer_grad = torch.is_grad_enabled()
    create_graph = outer_grad and not loop.first_order
    keep = query is not None and loop.multi_step_loss and loop.steps > 1
    first: list[Tensor] = []

    def support_loss(leaves: dict[str, Tensor], s: int) -> Tensor:
        losses = engine.general_losses(module, loss_fn, leaves, buffers, xs, ys)[0]
        if s == 0:
            first.append(losses.detach())
        return losses.sum()

    with torch.enable_grad():
        theta = engine.task_stack(module, names, t)
        buffers = engine.task_buffers(module, t)
        history, norms = engine.sgd_steps(
            engine.autograd_grads(support_loss, create_graph), theta, loop.steps, lr_fn, n_tasks=t,
            create_graph=create_graph, grad_clip=loop.grad_clip, keep_history=keep,
        )  # fmt: skip
    final = history[-1] if outer_grad else {k: v.detach() for k, v in history[-1].items()}
    if query is None:
        return None, final  # type: ignore[return-value]
    q_losses, q_out = engine.general_losses(module, loss_fn, final, buffers, xq, yq)
    if keep:
        per_step = [engine.general_losses(module, loss_fn, p, buffers, xq, yq)[0] for p in history[1:-1]]
        loss_value = torch.stack([*per_step, q_losses]).mean()
    else:
        loss_value = q_losses.mean()
    with torch.no_grad():
        q_before, q_out0 = engine.general_losses(module, loss_fn, {}, buffers, xq, yq) if loop.steps else (
            q_losses, q_out)  # fmt: skip
        metrics = {
            "support_loss_before": first[0].mean() if first else q_before.mean() * float("nan"),
            "query_loss_before": q_before.mean(),
            "query_loss": loss_value.detach(),
            **loop.norm_metrics(norms, loss_value.device),
            **loop.lr_metrics(loss_value.device),
        }
        if _are_labels(q_out, yq):
            metrics["query_acc_before"] = accuracy(q_out0, yq)
            metrics["query_acc"] = accuracy(q_out, yq)
    return InnerLoopOutput(loss=loss_value, metrics=metrics, params=final, query_logits=q_out), final


def _default_loss(outputs: Any, targets: Tensor) -> Tensor:
    """Cross-entropy of outputs ``(n, C)`` (or ``(n, ..., C)``) against class indices ``(n, ...)``."""
    logits = getattr(outputs, "logits", outputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _are_labels(outputs: Any, targets: Any) -> bool:
    """Whether ``targets`` are class indices of ``outputs`` (an accuracy is then reported)."""
    outputs = getattr(outputs, "logits", outputs)
    return (
        isinstance(outputs, Tensor) and isinstance(targets, Tensor) and not targets.is_floating_point()
        and outputs.dim() == targets.dim() + 1 and outputs.shape[:-1] == targets.shape
    )  # fmt: skip


def _pair(name: str, value: Any) -> tuple[Any, Any]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name}: expected (inputs, targets) with a leading task dim, got {type(value).__name__}")
    return value[0], value[1]


def _n_tasks(name: str, tree: Any) -> int:
    """The common leading dim ``T`` of every tensor in ``tree``."""
    sizes = {x.shape[0] if x.dim() else None for x in torch.utils._pytree.tree_leaves(tree) if isinstance(x, Tensor)}
    if not sizes:
        raise TypeError(f"{name}: holds no tensor")
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"{name}: every input and target needs the same leading task dim T (one task: unsqueeze(0)), got {sizes}"
        )
    return sizes.pop()
