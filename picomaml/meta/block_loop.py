"""The inner loop when the top blocks of the backbone adapt together with the head (``adapt_layers=k``).

The lower blocks run once per meta step (:meth:`~picomaml.top_blocks.TopBlocks.capture`, per task and
part); every inner step re-runs only the ``k`` adapted blocks, the final norm and the head on the support
rows, under the task's current tensors. Each step is one ``torch.autograd.grad`` over the head's and the
blocks' tensors of every task (tasks are independent, so the gradient of the summed losses is each task's
own). As for the head alone, nothing is mutated and no ``.grad`` is written: every update builds new
tensors ``p - lr * g``, and one ``loss.backward()`` by the caller is the meta-gradient, exact second order
by default (first order with ``first_order=True``), learned inner LRs included.

Tensors of the blocks carry a leading task dim ``T`` from the start (an ``expand`` of the model's own
parameters: no copy until the first update).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from picomaml.features import normalize_task_features, pool_features
from picomaml.meta import backends as _backends
from picomaml.meta.functional import clip_and_norm, task_cross_entropy
from picomaml.meta.inner_loop import InnerLoop, InnerLoopOutput
from picomaml.top_blocks import BlockInput, TopBlocks, math_attention

__all__ = ["BlockTask", "BlockFeatures", "block_inner_loop", "support_needs_graph"]


class BlockTask(NamedTuple):
    """One task's rows at the first adapted block.

    Attributes:
        support: Captured inputs of the ``N*K`` support rows; query: of the ``N*Q`` query rows.
        support_pool: ``(mask, valid)`` of the support rows for :func:`~picomaml.pool_features`.
        query_pool: The same for the query rows.
    """

    support: BlockInput
    query: BlockInput
    support_pool: tuple[Tensor | None, Tensor | None]
    query_pool: tuple[Tensor | None, Tensor | None]


class BlockFeatures:
    """Pooled features of the tasks' rows under given block tensors.

    Args:
        top: The adapted blocks.
        tasks: One :class:`BlockTask` per task.
        pooling: See :func:`~picomaml.pool_features`.
        feature_norm: See :func:`~picomaml.normalize_task_features`.
        dtype: The head's dtype (the features are cast to it).
    """

    def __init__(self, top: TopBlocks, tasks: list[BlockTask], pooling: str, feature_norm: str, dtype: Any) -> None:
        self.top, self.tasks, self.pooling, self.feature_norm, self.dtype = top, tasks, pooling, feature_norm, dtype

    def part(self, params: dict[str, Tensor], part: str, *, detach_input: bool = False) -> Tensor:
        """``(T, n, D)`` features of every task's ``part`` (``"support"``/``"query"``) rows under ``params``
        (``name -> (T, ...)``), not normalised."""
        out = []
        for t, task in enumerate(self.tasks):
            inp: BlockInput = getattr(task, part)
            if detach_input:
                inp = inp._replace(hidden=inp.hidden.detach())
            hidden = self.top.run({k: v[t] for k, v in params.items()}, inp)
            mask, valid = getattr(task, f"{part}_pool")
            out.append(pool_features(hidden, mask, self.pooling, valid=valid).to(self.dtype))
        return torch.stack(out)

    def support(self, params: dict[str, Tensor], *, detach_input: bool = False) -> Tensor:
        """``(T, N*K, D)`` support features, normalised by their own statistics."""
        xs = self.part(params, "support", detach_input=detach_input)
        return normalize_task_features(xs, xs[:, :0], self.feature_norm)[0]

    def both(self, params: dict[str, Tensor], xs: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Normalised ``(support, query)`` features; the raw support features ``xs`` may be passed in (with
        ``feature_norm="none"`` they are not needed and not computed)."""
        xq = self.part(params, "query")
        if self.feature_norm == "none":
            return (xs if xs is not None else xq[:, :0]), xq
        if xs is None:
            xs = self.part(params, "support")
        return normalize_task_features(xs, xq, self.feature_norm)


def support_needs_graph(loop: InnerLoop, head: nn.Module, feature_norm: str) -> bool:
    """Whether the loss depends on the support rows' initial forward: always second order; first order
    only through a prototype init or the support statistics of ``feature_norm`` (otherwise their graph
    would be kept for nothing)."""
    return not loop.first_order or getattr(head, "init", None) == "prototype" or feature_norm != "none"


def _split(params: dict[str, Tensor], names: tuple[str, ...]) -> dict[str, Tensor]:
    return {k: params[k] for k in names}


def block_inner_loop(
    loop: InnerLoop, head: nn.Module, feats: BlockFeatures, ys: Tensor, yq: Tensor
) -> InnerLoopOutput:
    """Adapt the head and the top blocks on every task's support rows; the query loss and metrics.

    Args:
        loop: Its ``steps``, ``lr`` (or learned LRs, bound with ``loop.bind(head, model, adapt_layers)``),
            ``first_order``, ``grad_clip``, ``multi_step_loss`` and ``backend`` (``"torch"`` or ``"higher"``).
        head: The :class:`~picomaml.MetaHead`.
        feats: The tasks' captured rows (see :class:`BlockFeatures`).
        ys: ``(T, N*K)`` support labels; yq: ``(T, N*Q)`` query labels.

    Returns:
        :class:`~picomaml.InnerLoopOutput` with a task dim on ``params`` (head and block tensors) and
        ``query_logits``.
    """
    if loop.backend == "learn2learn":
        raise NotImplementedError("adapt_layers > 0 needs backend='torch' or 'higher', got backend='learn2learn'")
    head_names, block_names = tuple(head.adapted_names), feats.top.names
    lr_fn = loop._lr_fn(head, block_names)
    outer_grad = torch.is_grad_enabled()
    create_graph = outer_grad and not loop.first_order
    t = len(feats.tasks)
    keep = loop.multi_step_loss and loop.steps > 1
    with torch.enable_grad():
        theta = {
            k: (v if v.requires_grad else v.detach().requires_grad_()).expand(t, *v.shape)
            for k, v in feats.top.params().items()
        }
        with torch.set_grad_enabled(support_needs_graph(loop, head, feats.feature_norm)), math_attention(create_graph):
            xs0 = feats.support(theta)
        init = head.initial_params(xs0, ys)
        init = {k: v if v.dim() == (2 if k.endswith("weight") else 1) + 1 else v.expand(t, *v.shape) for k, v in init.items()}
        state = {**init, **theta}
        if loop.backend == "higher":
            history, norms = _backends.higher_block_steps(
                head, feats, state, xs0, ys, loop.steps, lr_fn, create_graph=create_graph,
                grad_clip=loop.grad_clip, learned_lr=loop.learn_lr is not None, keep_history=keep,
            )  # fmt: skip
        else:
            history, norms = _torch_steps(loop, head, feats, state, xs0, ys, lr_fn, create_graph, keep)
        final = history[-1]
        xs_f, xq_f = feats.both(_split(final, block_names))
        q_logits = head.functional(_split(final, head_names), xq_f)
        if keep:
            per_step = [
                task_cross_entropy(head.functional(_split(p, head_names), feats.both(_split(p, block_names))[1]), yq)
                for p in history[1:-1]
            ]
            loss = torch.stack([*per_step, task_cross_entropy(q_logits, yq)]).mean()
        else:
            loss = task_cross_entropy(q_logits, yq).mean()
    with torch.no_grad():
        if xs_f.shape[1] == 0:
            xs_f = feats.support(_split(final, block_names))
        xq0 = feats.both(theta, xs0 if feats.feature_norm == "none" else None)[1]
        s_before = head.functional(_split(init, head_names), xs0)
        s_after = head.functional(_split(final, head_names), xs_f)
        q_before = head.functional(_split(init, head_names), xq0)
    metrics = loop.metrics_from_logits(s_before, s_after, q_before, q_logits, ys, yq, loss, norms)
    if not outer_grad:
        final = {k: v.detach() for k, v in final.items()}
    return InnerLoopOutput(loss=loss, metrics=metrics, params=final, query_logits=q_logits)


def _torch_steps(
    loop: InnerLoop,
    head: nn.Module,
    feats: BlockFeatures,
    state: dict[str, Tensor],
    xs0: Tensor,
    ys: Tensor,
    lr_fn: Any,
    create_graph: bool,
    keep: bool,
) -> tuple[list[dict[str, Tensor]], Tensor]:
    """Plain SGD on the support loss over head and block tensors, every task at once (``sgd_steps``' contract)."""
    head_names, block_names = tuple(head.adapted_names), feats.top.names
    names = head_names + block_names
    history, norms = [state], []
    for s in range(loop.steps):
        if create_graph:
            leaves = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in state.items()}
        else:
            leaves = {k: v.detach().requires_grad_() for k, v in state.items()}
        with math_attention(create_graph):
            # the first step's features are the initial ones (same tensors) unless first order detaches them
            x = xs0 if s == 0 and create_graph else feats.support(_split(leaves, block_names), detach_input=not create_graph)
            masks = head.dropout_masks(x.shape, x.device, x.dtype)
            loss = task_cross_entropy(head.functional(_split(leaves, head_names), x, masks), ys).sum()
            grads = list(
                torch.autograd.grad(loss, [leaves[k] for k in names], create_graph=create_graph, materialize_grads=True)
            )
        grads, norm = clip_and_norm(grads, loop.grad_clip)
        norms.append(norm)
        state = {k: state[k] - lr_fn(s, i) * g for i, (k, g) in enumerate(zip(names, grads, strict=True))}
        if keep:
            history.append(state)
    if not keep and loop.steps > 0:
        history.append(state)
    grad_norms = torch.stack(norms) if norms else xs0.new_zeros((0, xs0.shape[0]), dtype=torch.float32)
    return history, grad_norms
