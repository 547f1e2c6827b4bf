"""InnerLoop: the one adaptation engine, as a module whose parameters are the learned inner learning rates.

Two forms share one SGD implementation ([`picomaml.meta.engine.sgd_steps`][picomaml.meta.engine.sgd_steps]):

* **The general form** ``loop(model, (xs, ys), (xq, yq), loss=..., adapt=...)``: any ``nn.Module``, any
  differentiable loss, any selection of its tensors. Inputs and targets carry a leading task dim ``T``;
  the module's forward is vectorised over tasks (``torch.func.vmap`` of ``functional_call``) and each inner
  step is one ``autograd.grad`` over the task-stacked adapted tensors.
* **The head form** ``loop(head, support_feats, support_labels, query_feats, query_labels)``: the fast
  path for a [`MetaHead`][picomaml.meta.head.MetaHead] on pooled features (batched matrix products; a
  written-out gradient for a linear head), with the same numbers as the general form on the same head.

The loop is functional: it reads the adapted tensors into a dict, builds new tensors ``p - lr * g`` for
``steps`` SGD steps and evaluates the query loss under the adapted dict. No module is mutated, no
``.grad`` is written and no optimizer is stepped; one ``out.loss.backward()`` by the caller gives the whole
meta-gradient (initial weights, learned inner LRs, and whatever produced the inputs).

* Second order (default): the inner gradients keep their graph (``create_graph=True``).
* First order (``first_order=True``, FOMAML): inner gradients are computed on detached copies; the outer
  gradient is the query-loss gradient at the adapted weights, applied to the initial weights (and to the
  learned LRs through ``p - lr * g``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from picomaml.meta import engine
from picomaml.meta.engine import InnerLoopOutput
from picomaml.meta.functional import accuracy, closed_form_linear_grads, task_cross_entropy
from picomaml.meta.general import general_form
from picomaml.meta.head import adapted_names, check_head_inputs, head_logits, head_task_params
from picomaml.meta.selection import backbone_selection
from picomaml.params import Params, choices, hparam, short_repr

__all__ = ["InnerLoop", "InnerLoopConfig", "InnerLoopOutput", "Backend", "LearnLR", "BACKENDS", "LEARN_LR"]

Backend = Literal["torch"]
LearnLR = Literal["per_tensor", "per_step", "per_element"] | None
BACKENDS = ("torch",)
LEARN_LR = choices(LearnLR)
_REMOVED_BACKEND = (
    "is no longer an inner-loop backend: higher and learn2learn are now the test suite's independent references "
    "(tests/meta/test_references.py, benchmarks/inner_loop.py). Use backend='torch' (the default, the only "
    "value), which gives their numbers for the head, any module and any loss"
)


@dataclasses.dataclass
class InnerLoopConfig(Params):
    """Hyperparameters of [`InnerLoop`][picomaml.meta.inner_loop.InnerLoop] (YAML section ``inner_loop``)."""

    # bounds far beyond any published setting: a typo (10**9 steps, lr 1e30) is an error, not a hang or NaN
    steps: int = hparam(5, ge=0, le=10_000, doc="inner SGD steps on the support set (0 scores the initial head)")
    lr: float = hparam(0.1, gt=0, le=1e4, doc="inner learning rate (the initial value of learned ones)")
    first_order: bool = hparam(False, doc="first-order MAML instead of the exact second-order gradient")
    backend: Backend = hparam(
        "torch", doc="the engine (higher / learn2learn are now the test suite's references)",
        removed={"higher": _REMOVED_BACKEND, "learn2learn": _REMOVED_BACKEND},
    )  # fmt: skip
    learn_lr: LearnLR = hparam(
        None, doc="learned inner LRs: one per adapted tensor, per step and tensor, or per element (Meta-SGD)"
    )
    multi_step_loss: bool = hparam(False, doc="MAML++: mean of the query losses after every inner step")
    grad_clip: float | None = hparam(None, gt=0, doc="clip each task's inner-gradient norm; null: off")
    closed_form: bool | None = hparam(
        None, doc="written-out gradient of a linear head: null = when it applies, false = never, true = require"
    )




class InnerLoop(nn.Module):
    """Few-step SGD adaptation of any module's tensors, with exact second- or first-order meta-gradients.

    Args:
        steps: Inner SGD steps (0 evaluates the initial tensors).
        lr: Inner learning rate (the initial value of learned LRs).
        first_order: FOMAML instead of the exact second-order gradient.
        backend: ``"torch"``, the only engine; ``"higher"`` and ``"learn2learn"`` are refused with a message
            naming what replaces them (they are the test suite's references).
        learn_lr: ``None``, ``"per_tensor"`` (one learned LR per adapted tensor), ``"per_step"`` (one per step
            and tensor, MAML++) or ``"per_element"`` (one per element of every adapted tensor, Meta-SGD). Stored
            as raw LR values initialised at ``lr``: ``lrs`` of shape ``(n_tensors,)`` or ``(steps, n_tensors)``,
            or ``element_lrs``, one tensor per adapted tensor of its shape. They follow the adapted tensors'
            layout, so bind the loop (``head=`` here, or [`bind`][picomaml.meta.inner_loop.InnerLoop.bind])
            before building the outer optimizer.
        multi_step_loss: MAML++ multi-step loss: the mean of the query losses after each inner step.
        grad_clip: Clip each task's global inner-gradient norm to this value before each step.
        head: The module whose layout the learned LRs follow (see ``learn_lr`` and
            [`bind`][picomaml.meta.inner_loop.InnerLoop.bind]).
        closed_form: Head form only: ``None`` (use the written-out gradient of a linear head when it
            applies), ``False`` (always autograd) or ``True`` (require it).
    """

    def __init__(
        self,
        steps: int = InnerLoopConfig.steps,
        lr: float = InnerLoopConfig.lr,
        first_order: bool = InnerLoopConfig.first_order,
        backend: Backend = InnerLoopConfig.backend,
        learn_lr: LearnLR = InnerLoopConfig.learn_lr,
        multi_step_loss: bool = InnerLoopConfig.multi_step_loss,
        grad_clip: float | None = InnerLoopConfig.grad_clip,
        head: nn.Module | None = None,
        closed_form: bool | None = InnerLoopConfig.closed_form,
    ) -> None:
        super().__init__()
        config = InnerLoopConfig(
            steps=steps, lr=lr, first_order=first_order, backend=backend, learn_lr=learn_lr,
            multi_step_loss=multi_step_loss, grad_clip=grad_clip, closed_form=closed_form,
        )  # fmt: skip
        self.steps, self.lr, self.first_order = int(config.steps), float(config.lr), bool(config.first_order)
        self.backend = "torch"
        self.learn_lr, self.multi_step_loss, self.grad_clip = learn_lr, bool(multi_step_loss), config.grad_clip
        self.closed_form = closed_form
        self.param_names: tuple[str, ...] | None = None
        self.lrs: nn.Parameter | None = None
        self.element_lrs: nn.ParameterList | None = None
        if head is not None:
            self.bind(head)

    # -- learned learning rates ------------------------------------------------------------------------

    def bind(
        self, module: nn.Module, model: nn.Module | None = None, adapt_layers: int = 0, *, adapt: engine.Adapt = None
    ) -> InnerLoop:
        """Record the adapted tensors' layout and create the learned LRs (if any). Idempotent for one layout.

        Args:
            module: A [`MetaHead`][picomaml.meta.head.MetaHead] (its ``adapted_names`` adapt) or, for the
                general form, any module (``adapt`` selects its tensors, as in
                [`forward`][picomaml.meta.inner_loop.InnerLoop.forward]).
            model: With a head and ``adapt_layers > 0`` or ``adapt``: the backbone whose tensors adapt too
                (their learned LRs come after the head's).
            adapt_layers: Top blocks of ``model`` that adapt with the head (see
                [`picomaml.meta_loss`][picomaml.meta.objectives.meta_loss]).
            adapt: General form: the selection of ``module``'s tensors; with a head and ``model``: the
                selection of the backbone's tensors (see
                [`picomaml.meta_loss`][picomaml.meta.objectives.meta_loss]).
        """
        layout = self._layout(module, model, adapt_layers, adapt)
        names = tuple(n for n, _ in layout)
        if self.learn_lr is None:  # nothing is laid out by the names: a rebind is harmless
            self.param_names = names
            return self
        self._check_names(names)
        if self.param_names is None:
            self.param_names = names
            p0 = next(iter(module.parameters()), None)
            device = p0.device if p0 is not None else None
            if self.learn_lr == "per_element":
                self.element_lrs = nn.ParameterList(
                    nn.Parameter(torch.full(shape, self.lr, dtype=torch.float32, device=device)) for _, shape in layout
                )
            else:
                shape = (len(names),) if self.learn_lr == "per_tensor" else (self.steps, len(names))
                self.lrs = nn.Parameter(torch.full(shape, self.lr, dtype=torch.float32, device=device))
        return self

    @staticmethod
    def _layout(
        module: nn.Module, model: nn.Module | None, adapt_layers: int, adapt: engine.Adapt
    ) -> list[tuple[str, tuple[int, ...]]]:
        """``[(name, shape)]`` of the tensors a call with these arguments adapts, in the update order."""
        if getattr(module, "adapted_names", None) is None:  # the general form
            own = dict(module.named_parameters())
            return [(n, tuple(own[n].shape)) for n in engine.select_names(module, adapt)]
        shapes = getattr(module, "adapted_shapes", None)
        layout = [(n, tuple(shapes[i]) if shapes is not None else ()) for i, n in enumerate(module.adapted_names)]
        if adapt_layers or adapt is not None:
            if model is None:
                raise ValueError("model: bind(head, model, ...) needs the backbone when backbone tensors adapt")
            layout += list(backbone_selection(model, adapt_layers, adapt).layout)
        return layout

    def _check_names(self, names: tuple[str, ...]) -> None:
        if self.param_names is not None and self.param_names != names:
            n_bound, n_new = len(self.param_names), len(names)
            raise ValueError(
                f"InnerLoop is bound to {n_bound} adapted tensors ({short_repr(self.param_names)}), this call adapts "
                f"{n_new} ({short_repr(names)}); with learned LRs bind the loop once to what adapts "
                "(loop.bind(head), loop.bind(head, model, adapt_layers=k), loop.bind(head, model, adapt=...) or "
                "loop.bind(module, adapt=...); HybridLearner does it) before building the optimizer"
            )

    def lr_fn(self, names: Sequence[str]) -> engine.LrFn:
        """``(step, tensor_index) -> lr`` for a call that adapts ``names`` (checked against the bound layout).

        Raises:
            RuntimeError: learned LRs that were never bound; ValueError: another layout than the bound one.
        """
        if self.learn_lr is None:
            return lambda s, i: self.lr
        if self.lrs is None and self.element_lrs is None:
            raise RuntimeError(
                f"learn_lr={self.learn_lr!r} needs the adapted tensors' layout: construct InnerLoop(..., head=head) "
                "or call loop.bind(head) / loop.bind(head, model, adapt_layers=k) / loop.bind(module, adapt=...) "
                "before building the outer optimizer"
            )
        self._check_names(tuple(names))
        if self.element_lrs is not None:
            lrs = list(self.element_lrs)
            return lambda s, i: lrs[i]
        lrs = self.lrs
        if self.learn_lr == "per_tensor":
            return lambda s, i: lrs[i]
        return lambda s, i: lrs[s, i]

    def _use_closed_form(self, head: nn.Module) -> bool:
        applies = tuple(getattr(head, "hidden_dims", (None,))) == ()
        if self.closed_form and not applies:
            raise ValueError("closed_form=True needs a linear MetaHead (hidden_dims=())")
        return applies if self.closed_form is None else bool(self.closed_form)

    # -- the head form ---------------------------------------------------------------------------------

    def _run(
        self, head: nn.Module, xs: Tensor, ys: Tensor, keep_history: bool, first: list | None = None
    ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]], Tensor]:
        """Initial params, history of adapted params (T-dim) and grad norms ``(steps, T)`` of the head form;
        ``first`` receives the first step's support logits (detached) when they equal the initial ones."""
        lr_fn = self.lr_fn(adapted_names(head))
        outer_grad = torch.is_grad_enabled()
        create_graph = outer_grad and not self.first_order
        t = xs.shape[0]
        with torch.enable_grad():
            init = head_task_params(head, xs, ys)
            if self._use_closed_form(head):

                def grad_fn(leaves: dict[str, Tensor], s: int) -> list[Tensor]:
                    w, b = leaves["out.weight"], leaves["out.bias"]
                    x = xs if create_graph else xs.detach()
                    return list(closed_form_linear_grads(w, b, x, ys))

            else:
                x_in = xs if create_graph else xs.detach()
                # without dropout the first step's logits are the initial head's: the metrics reuse them
                plain = first is not None and not (head.training and getattr(head, "dropout", 0.0) > 0)

                def support_loss(leaves: dict[str, Tensor], s: int) -> Tensor:
                    logits = head_logits(head, leaves, x_in, dropout=True)
                    if s == 0 and plain:
                        first.append(logits.detach())
                    return task_cross_entropy(logits, ys).sum()

                grad_fn = engine.autograd_grads(support_loss, create_graph)
            history, norms = engine.sgd_steps(
                grad_fn, init, self.steps, lr_fn, n_tasks=t, create_graph=create_graph, grad_clip=self.grad_clip,
                keep_history=keep_history,
            )  # fmt: skip
        if not outer_grad:  # evaluation: hand back plain tensors
            history = [{k: v.detach() for k, v in h.items()} for h in history]
            init = history[0]
        return init, history, norms

    def adapt(
        self, module: nn.Module, support: Any, support_labels: Tensor | None = None, *,
        loss: Callable[[Any, Any], Tensor] | None = None, adapt: engine.Adapt = None,
    ) -> dict[str, Tensor]:  # fmt: skip
        """Adapted tensors after ``steps`` SGD steps on the support set.

        Args:
            module: A [`MetaHead`][picomaml.meta.head.MetaHead] (head form) or any module (general form).
            support: Head form: features ``(n, D)`` or ``(T, n, D)``. General form: ``(inputs, targets)``
                with a leading task dim ``T``.
            support_labels: Head form: ``(n,)`` or ``(T, n)`` long in ``[0, N)``.
            loss: General form: the per-task loss (see
                [`forward`][picomaml.meta.inner_loop.InnerLoop.forward]).
            adapt: General form: the tensors that adapt (see
                [`forward`][picomaml.meta.inner_loop.InnerLoop.forward]).

        Returns:
            ``name -> tensor`` (head form: with a leading ``T`` dim iff the input had one; general form:
            always ``(T, ...)``). Under ``torch.no_grad()`` it still adapts (it enables gradients for the
            inner steps) and returns detached tensors.
        """
        if isinstance(support, (tuple, list)):
            return general_form(self, module, support, None, loss, adapt)[1]
        xs, ys, _, _, single = check_head_inputs(module, support, support_labels, None, None, owner=self)
        _, history, _ = self._run(module, xs, ys, keep_history=False)
        return {k: v[0] if single else v for k, v in history[-1].items()}

    def forward(
        self,
        module: nn.Module,
        support: Any,
        query: Any,
        query_feats: Tensor | None = None,
        query_labels: Tensor | None = None,
        *,
        loss: Callable[[Any, Any], Tensor] | None = None,
        adapt: engine.Adapt = None,
    ) -> InnerLoopOutput:
        """Adapt on the support set and return the query loss and metrics (see
        [`InnerLoopOutput`][picomaml.meta.engine.InnerLoopOutput]).

        General form ``loop(model, (xs, ys), (xq, yq), loss=..., adapt=...)``:

        Args:
            module: Any ``nn.Module``; its forward takes one task's inputs ``xs[t]`` (a tensor, or a tuple
                of positional arguments).
            support: ``(xs, ys)``: inputs and targets with a leading task dim ``T``.
            query: ``(xq, yq)``, the same with the query rows.
            loss: ``loss(outputs, targets) -> scalar`` for one task (default: cross-entropy, outputs
                ``(n, C)`` or ``(n, ..., C)`` against class indices).
            adapt: ``None`` (every tensor with ``requires_grad``), names or ``fnmatch`` globs
                (``["fc.bias", "blocks.3.*"]``), or a predicate ``fn(name, tensor) -> bool``. Other tensors
                stay shared by every task (their meta-gradient is the plain gradient through the loss).

        Head form ``loop(head, support_feats, support_labels, query_feats, query_labels)``: ``head`` is a
        [`MetaHead`][picomaml.meta.head.MetaHead], or any module with its fast-path protocol:
        ``adapted_names``, ``initial_params(xs, ys) -> {name: tensor}`` (its own parameters, or tensors with a
        task dim), ``functional(params, x[, masks]) -> logits`` on ``(T, n, D)`` features, ``n_way``,
        ``in_dim`` and optionally ``dropout_masks(shape, device, dtype)`` (see
        [`head_logits`][picomaml.meta.head.head_logits]); features ``(n, D)`` or ``(T, n, D)``, labels
        ``(n,)`` or ``(T, n)`` long in ``[0, N)``.

        Buffers: a BatchNorm in training mode normalises each task by its own batch statistics; its
        running statistics are updated on per-task copies and discarded (the module is never changed).
        """
        if isinstance(support, (tuple, list)):
            if not isinstance(query, (tuple, list)) or query_feats is not None or query_labels is not None:
                raise TypeError("query: the general form is loop(module, (xs, ys), (xq, yq), loss=..., adapt=...)")
            return general_form(self, module, support, query, loss, adapt)[0]
        if loss is not None or adapt is not None:
            raise TypeError(
                "loss/adapt: the head form loop(head, xs, ys, xq, yq) adapts the head under cross-entropy; pass "
                "support and query as (inputs, targets) pairs for the general form"
            )
        support_labels = query
        for name, value in (("query_feats", query_feats), ("query_labels", query_labels)):
            if not isinstance(value, Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
        xs, ys, xq, yq, single = check_head_inputs(
            module, support, support_labels, query_feats, query_labels, owner=self
        )
        keep = self.multi_step_loss and self.steps > 1
        first: list[Tensor] = []
        init, history, norms = self._run(module, xs, ys, keep_history=keep, first=first)
        final = history[-1]
        q_logits = head_logits(module, final, xq, dropout=True)
        if keep:
            # every query loss sees the head as the final one does (dropout masks in training mode)
            per_step = [task_cross_entropy(head_logits(module, p, xq, dropout=True), yq) for p in history[1:-1]]
            loss_value = torch.stack([*per_step, task_cross_entropy(q_logits, yq)]).mean()
        else:
            loss_value = task_cross_entropy(q_logits, yq).mean()
        with torch.no_grad():
            s_before = first[0] if first else module.functional(init, xs)
            s_after = module.functional(final, xs) if self.steps else s_before
            q_before = module.functional(init, xq) if self.steps else q_logits
        metrics = self.metrics_from_logits(s_before, s_after, q_before, q_logits, ys, yq, loss_value, norms)
        params = {k: v[0] if single else v for k, v in final.items()}
        return InnerLoopOutput(
            loss=loss_value, metrics=metrics, params=params, query_logits=q_logits[0] if single else q_logits
        )

    def metrics_from_logits(
        self,
        s_before: Tensor,
        s_after: Tensor,
        q_before: Tensor,
        q_logits: Tensor,
        ys: Tensor,
        yq: Tensor,
        loss: Tensor,
        norms: Tensor,
    ) -> dict[str, Tensor]:
        """The head form's metrics ([`InnerLoopOutput`][picomaml.meta.engine.InnerLoopOutput]) from the logits
        ``(T, n, N)`` before and after adaptation, the labels ``(T, n)``, the loss and the inner gradient
        norms ``(steps, T)``: 0-dim float tensors on their device (no host sync)."""
        with torch.no_grad():
            pairs = {
                "support_loss_before": task_cross_entropy(s_before, ys).mean(),
                "support_loss_after": task_cross_entropy(s_after, ys).mean(),
                "support_acc_before": accuracy(s_before, ys),
                "support_acc_after": accuracy(s_after, ys),
                "query_loss": loss.detach(),
                "query_acc_before": accuracy(q_before, yq),
                "query_acc": accuracy(q_logits, yq),
                **self.norm_metrics(norms, ys.device),
            }
            pairs.update(self.lr_metrics(ys.device))
        return {k: v.detach().float().reshape(()) for k, v in pairs.items()}

    def norm_metrics(self, norms: Tensor, device: torch.device) -> dict[str, Tensor]:
        """``inner_grad_norm`` (mean) and ``inner_grad_norm_{s}`` from the norms ``(steps, T)``, as tensors."""
        out = {"inner_grad_norm": norms.mean() if self.steps else torch.zeros((), device=device)}
        out.update({f"inner_grad_norm_{s}": norms[s].mean() for s in range(self.steps)})
        return out

    def lr_metrics(self, device: torch.device) -> dict[str, Tensor]:
        """``inner_lr`` (the mean learned LR, or the fixed one) and ``inner_lr/{name}`` per learned tensor, as
        tensors on ``device`` (every metric of a call lives on one device: a logger stacks them to read)."""
        if self.lrs is not None:
            lrs = self.lrs.detach()
            per_tensor = list(lrs if lrs.dim() == 1 else lrs.mean(0))
        elif self.element_lrs is not None:
            per_tensor = [p.detach().mean() for p in self.element_lrs]
        else:
            return {"inner_lr": torch.tensor(self.lr, device=device)}
        out = {"inner_lr": torch.stack(per_tensor).mean()}
        out.update({f"inner_lr/{n}": per_tensor[i] for i, n in enumerate(self.param_names or ())})
        return out

    # -- the general form ------------------------------------------------------------------------------

    def extra_repr(self) -> str:
        return (
            f"steps={self.steps}, lr={self.lr}, first_order={self.first_order}, learn_lr={self.learn_lr!r}, "
            f"multi_step_loss={self.multi_step_loss}, grad_clip={self.grad_clip}"
        )
