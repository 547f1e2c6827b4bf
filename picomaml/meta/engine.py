"""The functional core of the one inner-loop engine: SGD on task-stacked tensors, and the general form.

Every adaptation in the library is [`sgd_steps`][picomaml.meta.engine.sgd_steps]: a dict ``name -> (T, ...)``
of tensors with an explicit leading task dimension ``T``, a function that returns their gradients, and
``steps`` updates ``p - lr * g`` that build new tensors (nothing is mutated, no ``.grad`` is written). The
callers differ only in how they compute the gradient:

* the head fast path ([`picomaml.meta.inner_loop`][picomaml.meta.inner_loop]): batched matrix products of a
  [`MetaHead`][picomaml.meta.head.MetaHead], or the written-out gradient of a linear head;
* the backbone path ([`picomaml.meta.adapted_features`][picomaml.meta.adapted_features]): pooled features of
  adapted backbone tensors;
* the general form ([`general_losses`][picomaml.meta.engine.general_losses]): any ``nn.Module`` under any
  loss, its forward vectorised over tasks with ``torch.func.vmap`` of ``functional_call``.

Each step is one ``torch.autograd.grad`` over the task-stacked tensors: tasks are independent, so the
gradient of the *sum* of the per-task losses is, slice by slice, each task's own gradient. The gradient
is taken *outside* ``vmap`` on purpose: ``vmap(grad(...))`` gives wrong second-order gradients through
``layer_norm``/``batch_norm`` (pytorch/functorch#534).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from picomaml.meta.functional import clip_and_norm

__all__ = [
    "Adapt",
    "GradFn",
    "LrFn",
    "select_names",
    "make_leaves",
    "autograd_grads",
    "sgd_steps",
    "task_stack",
    "task_buffers",
    "task_map",
    "general_losses",
    "InnerLoopOutput",
]

logger = logging.getLogger(__name__)

Adapt = None | str | Sequence[str] | Callable[[str, Tensor], bool]
LrFn = Callable[[int, int], "float | Tensor"]
GradFn = Callable[[dict, int], list]

# modules whose batched forward failed under vmap (e.g. data-dependent control flow): run task by task
_NO_VMAP: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def select_names(module: nn.Module, adapt: Adapt, *, what: str = "adapt") -> tuple[str, ...]:
    """Names of ``module``'s parameters that ``adapt`` selects, in the module's order.

    Args:
        module: The module whose tensors adapt.
        adapt: ``None`` (every tensor with ``requires_grad``), a name or ``fnmatch`` glob, a sequence of
            them (each must match at least one tensor), or a predicate ``fn(name, tensor) -> bool``.
        what: The argument's name in error messages.

    Raises:
        ValueError: a pattern that matches nothing (the message shows some names), or an empty selection.
        TypeError: ``adapt`` of another type.
    """
    named = dict(module.named_parameters())
    if adapt is None:
        names = [n for n, p in named.items() if p.requires_grad]
    elif callable(adapt):
        names = [n for n, p in named.items() if adapt(n, p)]
    elif isinstance(adapt, str) or (isinstance(adapt, Sequence) and all(isinstance(a, str) for a in adapt)):
        patterns = [adapt] if isinstance(adapt, str) else list(adapt)
        chosen: set[str] = set()
        for pat in patterns:
            hits = [n for n in named if n == pat or fnmatch.fnmatchcase(n, pat)]
            if not hits:
                some = list(named)[:6]
                raise ValueError(
                    f"{what}: {pat!r} matches no parameter of {type(module).__name__} (names look like {some}"
                    f"{', ...' if len(named) > 6 else ''}; use names or fnmatch globs such as '*lora_A*')"
                )
            chosen.update(hits)
        names = [n for n in named if n in chosen]
    else:
        raise TypeError(
            f"{what}: expected None, a name or glob, a list of them, or a predicate fn(name, tensor) -> bool; "
            f"got {type(adapt).__name__}"
        )
    if not names:
        raise ValueError(f"{what}: selects no tensor of {type(module).__name__} (nothing would adapt)")
    return tuple(names)


def make_leaves(params: dict[str, Tensor], create_graph: bool) -> dict[str, Tensor]:
    """The tensors an inner gradient is taken with respect to.

    Second order keeps each tensor's history (a tensor without one, e.g. under ``no_grad`` or of a frozen
    module, becomes a fresh leaf); first order differentiates detached copies, so no inner gradient has a
    graph and the update ``p - lr * g`` reaches the meta-parameters only through ``p`` and ``lr``.
    """
    if create_graph:
        return {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in params.items()}
    return {k: v.detach().requires_grad_() for k, v in params.items()}


def autograd_grads(loss_fn: Callable[[dict, int], Tensor], create_graph: bool) -> GradFn:
    """A `GradFn` from ``loss_fn(leaves, step) -> scalar`` (the sum of the per-task losses)."""

    def grad_fn(leaves: dict[str, Tensor], step: int) -> list[Tensor]:
        loss = loss_fn(leaves, step)
        return list(torch.autograd.grad(loss, list(leaves.values()), create_graph=create_graph, materialize_grads=True))

    return grad_fn


def sgd_steps(
    grad_fn: GradFn,
    params: dict[str, Tensor],
    steps: int,
    lr_fn: LrFn,
    *,
    n_tasks: int,
    create_graph: bool,
    grad_clip: float | None = None,
    keep_history: bool = False,
) -> tuple[list[dict[str, Tensor]], Tensor]:
    """Plain SGD on the support loss, every task at once: the library's one inner SGD step.

    Args:
        grad_fn: ``(leaves, step) -> [grad (T, ...)]`` in the order of ``params`` (leaves from
            [`make_leaves`][picomaml.meta.engine.make_leaves];
            [`autograd_grads`][picomaml.meta.engine.autograd_grads] builds one from a loss).
        params: ``name -> (T, ...)`` initial tensors (their graph reaches the meta-parameters).
        steps: Number of SGD steps.
        lr_fn: ``(step, tensor_index) -> lr``: a float, a 0-dim tensor (a learned LR) or a tensor of the
            tensor's shape without ``T`` (per-element LRs, Meta-SGD).
        n_tasks: ``T`` (for the shape of the norms when ``steps == 0``).
        create_graph: Second order: keep the graph of each inner gradient. ``False`` is first order.
        grad_clip: Clip each task's global inner-gradient norm to this value (the clip is in the graph).
        keep_history: Return the tensors after every step, not only the last.

    Returns:
        ``(history, grad_norms)``: ``[params_0, ..., params_S]`` (or ``[params_0, params_S]``), and the
        per-task inner-gradient norms ``(steps, T)`` before clipping, detached.
    """
    names = list(params)
    history, norms = [params], []
    for s in range(steps):
        grads = grad_fn(make_leaves(params, create_graph), s)
        grads, norm = clip_and_norm(grads, grad_clip)
        norms.append(norm)
        params = {k: _step(params[k], g, lr_fn(s, i)) for i, (k, g) in enumerate(zip(names, grads, strict=True))}
        if keep_history:
            history.append(params)
    if not keep_history and steps > 0:
        history.append(params)
    if norms:
        return history, torch.stack(norms)
    device = next(iter(params.values())).device if params else None
    return history, torch.zeros((0, n_tasks), dtype=torch.float32, device=device)


def _step(p: Tensor, g: Tensor, lr: float | Tensor) -> Tensor:
    """``p - lr * g`` (one fused op for a plain-number LR; a learned LR keeps its own graph). Per-element LRs
    are cast to the tensor's dtype, so a bfloat16 tensor stays bfloat16 (a 0-dim LR never promotes)."""
    if isinstance(lr, (int, float)):
        return torch.add(p, g, alpha=-lr)
    return p - (lr.to(p.dtype) if lr.dim() else lr) * g


def task_stack(module: nn.Module, names: Sequence[str], n_tasks: int) -> dict[str, Tensor]:
    """``name -> (T, ...)``: the module's own tensors with an explicit task dim (an ``expand``: no copy,
    and the meta-gradient reaches the module's parameters)."""
    own = dict(module.named_parameters())
    return {k: own[k].expand(n_tasks, *own[k].shape) for k in names}


def task_buffers(module: nn.Module, n_tasks: int) -> dict[str, Tensor]:
    """Per-task copies ``(T, ...)`` of the running statistics of norm layers in training mode.

    A BatchNorm in training mode normalises by batch statistics and updates its running statistics in
    place; each task gets its own copy, so the update lands there and the module's buffers are never
    changed (the updates are discarded, as in a cloned learner). Other buffers are shared unbatched.
    """
    out: dict[str, Tensor] = {}
    for prefix, mod in module.named_modules():
        if isinstance(mod, nn.modules.batchnorm._NormBase) and mod.training and mod.track_running_stats:
            for name, buf in mod.named_buffers(recurse=False):
                if buf is not None:
                    out[f"{prefix}.{name}" if prefix else name] = buf.unsqueeze(0).repeat(n_tasks, *[1] * buf.dim())
    return out


def task_map(module: nn.Module, fn: Callable[..., Any], batched: tuple) -> Any:
    """``fn`` over the tasks of ``batched`` (pytrees whose tensors have a leading ``T``), stacked back.

    Runs ``vmap(fn)`` (one batched forward for all tasks, randomness differing per task); a module whose
    forward ``vmap`` cannot batch (data-dependent control flow, ``.item()``, in-place writes to shared
    tensors) runs task by task instead, and is remembered, so later calls go there directly.
    """
    if not _NO_VMAP.get(module, False):
        try:
            return vmap(fn, randomness="different")(*batched)
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            text = str(exc).lower()
            if not any(w in text for w in ("vmap", "batching rule", "batchedtensor", "batched tensor", "functorch")):
                raise  # the module's own error, not one of vmap's
            logger.info("task_map: %s does not run under vmap (%s); tasks run one at a time", type(module).__name__, exc)
            _NO_VMAP[module] = True
    n = _first_tensor(batched).shape[0]
    outs = [fn(*_index(batched, t)) for t in range(n)]
    return torch.utils._pytree.tree_map(lambda *xs: torch.stack(xs), *outs)


def _first_tensor(tree: Any) -> Tensor:
    leaves = [x for x in torch.utils._pytree.tree_leaves(tree) if isinstance(x, Tensor)]
    if not leaves:
        raise ValueError("task_map: no tensor with a task dim among the inputs")
    return leaves[0]


def _index(tree: Any, t: int) -> Any:
    return torch.utils._pytree.tree_map(lambda x: x[t] if isinstance(x, Tensor) else x, tree)


def general_losses(
    module: nn.Module,
    loss: Callable[[Any, Any], Tensor],
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    inputs: Any,
    targets: Any,
) -> tuple[Tensor, Any]:
    """Per-task losses ``(T,)`` and outputs of ``module`` under task-stacked ``params``.

    Args:
        module: Any module; tensors not in ``params``/``buffers`` are its own (shared by every task).
        loss: ``loss(outputs, targets) -> scalar`` for one task.
        params: ``name -> (T, ...)`` adapted tensors; buffers: ``name -> (T, ...)`` per-task buffers.
        inputs: ``(T, ...)`` tensor, or a tuple of them (the forward's positional arguments).
        targets: ``(T, ...)`` tensor (or any pytree of them).
    """
    args = inputs if isinstance(inputs, tuple) else (inputs,)

    def one(p: dict, b: dict, a: tuple, y: Any) -> tuple[Tensor, Any]:
        out = functional_call(module, {**p, **b}, a)
        value = loss(out, y)
        if not isinstance(value, Tensor) or value.dim() != 0:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"loss: must return a scalar tensor per task (a mean over its rows), got {shape}")
        return value, out

    return task_map(module, one, (params, buffers, args, targets))


@dataclasses.dataclass
class InnerLoopOutput:
    """What [`InnerLoop`][picomaml.meta.inner_loop.InnerLoop] returns.

    Attributes:
        loss: Scalar query loss after adaptation (mean over tasks; with ``multi_step_loss`` the mean over
            the query losses after each inner step). ``loss.backward()`` is the meta-gradient.
        metrics: 0-dim float tensors on the loss's device, read by no one here (no host sync; ``float(v)``
            when logging). Head form: ``support_loss_before``/``_after``, ``support_acc_before``/``_after``,
            ``query_loss``, ``query_acc`` (after adaptation), ``query_acc_before``, ``inner_grad_norm`` (mean
            over steps and tasks), ``inner_grad_norm_{s}`` per step, ``inner_lr`` (mean LR) and, with learned
            LRs, ``inner_lr/{name}`` per tensor (mean over steps and elements). General form:
            ``support_loss_before``, ``query_loss_before``, ``query_loss``, the inner-gradient norms and LRs,
            and ``query_acc_before``/``query_acc`` when the targets are class labels of the outputs.
        params: Adapted tensors ``name -> tensor`` (leading ``T`` dim when the input had one).
        query_logits: Head form: ``([T,] n_query, N)`` logits of the adapted head. General form: the
            module's query outputs ``(T, ...)``.
    """

    loss: Tensor
    metrics: dict[str, Tensor]
    params: dict[str, Tensor]
    query_logits: Any
