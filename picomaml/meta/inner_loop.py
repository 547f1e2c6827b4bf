"""InnerLoop: adapt a MetaHead on support features, score it on query features, return a differentiable loss.

The loop is functional: it reads the head's parameters into a dict, builds new tensors ``p - lr * g`` for
``steps`` SGD steps and evaluates the query loss under the adapted dict. The head is never mutated, no
``.grad`` is written and no optimizer is stepped; one ``out.loss.backward()`` by the caller gives the whole
meta-gradient (head initial weights, learned inner LRs, and the features, hence the backbone).

* Second order (default): the inner gradients keep their graph (``create_graph=True``), so the query loss
  differentiates through every inner step. Because only the head adapts, this graph is tiny.
* First order (``first_order=True``, FOMAML): inner gradients are computed on detached copies; the outer
  gradient is the query-loss gradient at the adapted weights, applied to the initial weights (and to the
  learned LRs through ``p - lr * g``, and to the features through the query forward and a prototype init).

Several tasks: features ``(T, n, D)`` adapt ``T`` independent copies of the head with batched matrix
products (one ``autograd.grad`` per step for all tasks); the loss is the mean of the per-task losses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from picomaml._optional import require
from picomaml.meta import backends as _backends
from picomaml.meta.functional import accuracy, sgd_steps, task_cross_entropy
from picomaml.params import ConfigError, Params, choices, hparam, short_repr
from picomaml.top_blocks import TopBlocks

__all__ = ["InnerLoop", "InnerLoopConfig", "InnerLoopOutput", "Backend", "LearnLR", "BACKENDS", "LEARN_LR"]

Backend = Literal["torch", "higher", "learn2learn"]
LearnLR = Literal["per_tensor", "per_step"] | None
BACKENDS = choices(Backend)
LEARN_LR = choices(LearnLR)


@dataclasses.dataclass
class InnerLoopConfig(Params):
    """Hyperparameters of :class:`InnerLoop` (YAML section ``inner_loop``)."""

    steps: int = hparam(5, ge=0, doc="inner SGD steps on the support set (0 scores the initial head)")
    lr: float = hparam(0.1, gt=0, doc="inner learning rate (the initial value of learned ones)")
    first_order: bool = hparam(False, doc="first-order MAML instead of the exact second-order gradient")
    backend: Backend = hparam("torch", doc="torch (batched over tasks) or the higher / learn2learn references")
    learn_lr: LearnLR = hparam(None, doc="learned inner LRs: one per head tensor, or per step and tensor")
    multi_step_loss: bool = hparam(False, doc="MAML++: mean of the query losses after every inner step")
    grad_clip: float | None = hparam(None, gt=0, doc="clip each task's inner-gradient norm; null: off")
    closed_form: bool | None = hparam(
        None, doc="written-out gradient of a linear head: null = when it applies, false = never, true = require"
    )

    def validate(self) -> None:
        if self.closed_form and self.backend != "torch":
            raise ConfigError(f"closed_form: true needs backend 'torch', got backend {self.backend!r}")


@dataclasses.dataclass
class InnerLoopOutput:
    """What :class:`InnerLoop` returns.

    Attributes:
        loss: Scalar query loss of the adapted head (mean over tasks; with ``multi_step_loss`` the mean over
            the query losses after each inner step). ``loss.backward()`` is the meta-gradient.
        metrics: Floats: ``support_loss_before``/``_after``, ``support_acc_before``/``_after``,
            ``query_loss``, ``query_acc`` (after adaptation), ``query_acc_before``, ``inner_grad_norm``
            (mean over steps and tasks), ``inner_grad_norm_{s}`` per step, ``inner_lr`` (mean LR) and, with
            learned LRs, ``inner_lr/{name}`` per tensor (mean over steps).
        params: Adapted parameters ``name -> tensor`` (leading ``T`` dim when the input had one).
        query_logits: ``([T,] n_query, N)`` logits of the adapted head.
    """

    loss: Tensor
    metrics: dict[str, float]
    params: dict[str, Tensor]
    query_logits: Tensor


class InnerLoop(nn.Module):
    """Few-step SGD adaptation of a head, with exact second- or first-order meta-gradients.

    Args:
        steps: Inner SGD steps (0 evaluates the initial head).
        lr: Inner learning rate (the initial value of learned LRs).
        first_order: FOMAML instead of the exact second-order gradient.
        backend: ``"torch"`` (default, batched over tasks), ``"higher"`` or ``"learn2learn"`` (references,
            one task at a time; see :mod:`picomaml.meta.backends` for their install).
        learn_lr: ``None``, ``"per_tensor"`` (one learned LR per head tensor, Meta-SGD style per tensor) or
            ``"per_step"`` (one per step and tensor, MAML++). Stored as the raw LR values (not log) in the
            parameter ``lrs`` of shape ``(n_tensors,)`` or ``(steps, n_tensors)``, initialised at ``lr``;
            the tensor order is ``head.adapted_names``. They need the head's layout, so pass ``head=`` here
            or call :meth:`bind` before building the outer optimizer.
        multi_step_loss: MAML++ multi-step loss: the mean of the query losses after each inner step.
        grad_clip: Clip each task's global inner-gradient norm to this value before each step.
        head: The head whose layout the learned LRs follow (see ``learn_lr``).
        closed_form: ``None`` (auto: use the written-out gradient of a linear head with the ``torch``
            backend), ``False`` (always the general autograd path) or ``True`` (require it).
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
        steps, lr, grad_clip = config.steps, config.lr, config.grad_clip
        if backend == "learn2learn" and (learn_lr is not None or grad_clip is not None):
            raise NotImplementedError(
                "backend='learn2learn' supports neither learn_lr nor grad_clip (learn2learn's MAML has one fixed "
                "scalar LR and no gradient hook); use backend='torch' or 'higher'"
            )
        if backend == "higher":
            require("higher", "higher", "the 'higher' inner-loop backend")
        elif backend == "learn2learn":
            _backends.load_learn2learn_maml()
        self.steps, self.lr, self.first_order = int(steps), float(lr), bool(first_order)
        self.backend = backend
        self.learn_lr, self.multi_step_loss, self.grad_clip = learn_lr, bool(multi_step_loss), grad_clip
        self.closed_form = closed_form
        self.param_names: tuple[str, ...] | None = None
        self.lrs: nn.Parameter | None = None
        if head is not None:
            self.bind(head)

    # -- learned learning rates ------------------------------------------------------------------------

    def bind(self, head: nn.Module, model: nn.Module | None = None, adapt_layers: int = 0) -> InnerLoop:
        """Record the adapted tensors' names and create the learned LRs (if any). Idempotent for one layout.

        Args:
            head: The head whose tensors adapt.
            model: With ``adapt_layers > 0``: the backbone whose top blocks adapt too (their tensors get
                learned LRs of their own, after the head's).
            adapt_layers: Number of top blocks of ``model`` that adapt (see :func:`picomaml.meta_loss`).
        """
        names = tuple(_adapted_names(head))
        if adapt_layers:
            if model is None:
                raise ValueError("model: bind(head, model, adapt_layers) needs the backbone when adapt_layers > 0")
            names += TopBlocks(model, adapt_layers).names
        if self.learn_lr is None:  # nothing is laid out by the names: a rebind is harmless
            self.param_names = names
            return self
        self._check_names(names)
        if self.param_names is None:
            self.param_names = names
            shape = (len(names),) if self.learn_lr == "per_tensor" else (self.steps, len(names))
            p0 = next(iter(head.parameters()), None)
            device = p0.device if p0 is not None else None
            self.lrs = nn.Parameter(torch.full(shape, self.lr, dtype=torch.float32, device=device))
        return self

    def _check_names(self, names: tuple[str, ...]) -> None:
        if self.param_names is not None and self.param_names != names:
            n_bound, n_new = len(self.param_names), len(names)
            raise ValueError(
                f"InnerLoop is bound to {n_bound} adapted tensors ({short_repr(self.param_names)}), this call adapts "
                f"{n_new} ({short_repr(names)}); with learned LRs and adapt_layers=k, bind the loop once with "
                "loop.bind(head, model, adapt_layers=k) (HybridLearner does) before building the optimizer"
            )

    def _lr_fn(self, head: nn.Module, extra_names: tuple[str, ...] = ()):
        if self.learn_lr is None:
            return lambda s, i: self.lr
        if self.lrs is None:
            raise RuntimeError(
                f"learn_lr={self.learn_lr!r} needs the head's layout: construct InnerLoop(..., head=head) or "
                "call loop.bind(head) (loop.bind(head, model, adapt_layers=k) with adapted blocks) before building "
                "the outer optimizer"
            )
        self._check_names(tuple(_adapted_names(head)) + tuple(extra_names))
        lrs = self.lrs
        if self.learn_lr == "per_tensor":
            return lambda s, i: lrs[i]
        return lambda s, i: lrs[s, i]

    def _use_closed_form(self, head: nn.Module) -> bool:
        applies = self.backend == "torch" and tuple(getattr(head, "hidden_dims", (None,))) == ()
        if self.closed_form and not applies:
            raise ValueError("closed_form=True needs backend='torch' and a linear MetaHead (hidden_dims=())")
        return applies if self.closed_form is None else bool(self.closed_form)

    # -- the loop --------------------------------------------------------------------------------------

    def _run(
        self, head: nn.Module, xs: Tensor, ys: Tensor, keep_history: bool
    ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]], Tensor, Any]:
        """Initial params, history of adapted params (T-dim), grad norms ``(steps, T)``, LR function."""
        lr_fn = self._lr_fn(head)
        outer_grad = torch.is_grad_enabled()
        create_graph = outer_grad and not self.first_order
        t = xs.shape[0]
        with torch.enable_grad():
            init = head.initial_params(xs, ys)
            init = {k: v if v.dim() == _base_dim(k) + 1 else v.expand(t, *v.shape) for k, v in init.items()}
            if self.backend == "torch":
                history, norms = sgd_steps(
                    head.functional,
                    init,
                    xs,
                    ys,
                    self.steps,
                    lr_fn,
                    create_graph=create_graph,
                    grad_clip=self.grad_clip,
                    closed_form=self._use_closed_form(head),
                    masks_fn=lambda: head.dropout_masks(xs.shape, xs.device, xs.dtype),
                    keep_history=keep_history,
                )
            elif self.backend == "higher":
                history, norms = _backends.higher_sgd_steps(
                    head, init, xs, ys, self.steps, lr_fn, create_graph=create_graph, grad_clip=self.grad_clip,
                    learned_lr=self.learn_lr is not None, keep_history=keep_history,
                )  # fmt: skip
            else:
                _backends.head_shell(head, xs.device, xs.dtype)  # dropout check
                history, norms = _backends.learn2learn_sgd_steps(
                    head,
                    init,
                    xs,
                    ys,
                    self.steps,
                    self.lr,
                    create_graph=create_graph,
                    keep_history=keep_history,
                )
        if not outer_grad:  # evaluation: hand back plain tensors
            history = [{k: v.detach() for k, v in h.items()} for h in history]
            init = history[0]
        return init, history, norms, lr_fn

    def adapt(self, head: nn.Module, support_feats: Tensor, support_labels: Tensor) -> dict[str, Tensor]:
        """Adapted head parameters after ``steps`` SGD steps on the support set.

        Args:
            head: A :class:`~picomaml.MetaHead` (anything with ``initial_params``, ``functional``,
                ``adapted_names``, ``n_way`` and ``in_dim``).
            support_feats: ``(n, D)`` or ``(T, n, D)``.
            support_labels: ``(n,)`` or ``(T, n)`` long in ``[0, N)``.

        Returns:
            ``name -> tensor`` (with a leading ``T`` dim iff the input had one). Under ``torch.no_grad()`` it
            still adapts (it enables gradients for the inner steps) and returns detached tensors.
        """
        xs, ys, _, _, single = _check_inputs(head, support_feats, support_labels, None, None)
        _, history, _, _ = self._run(head, xs, ys, keep_history=False)
        return {k: v[0] if single else v for k, v in history[-1].items()}

    def forward(
        self,
        head: nn.Module,
        support_feats: Tensor,
        support_labels: Tensor,
        query_feats: Tensor,
        query_labels: Tensor,
    ) -> InnerLoopOutput:
        """Adapt on the support set and return the query loss and metrics (see :class:`InnerLoopOutput`).

        Args:
            head: The head to adapt (see :meth:`adapt`).
            support_feats: ``(n_s, D)`` or ``(T, n_s, D)``; support_labels: ``(n_s,)`` or ``(T, n_s)``.
            query_feats: ``(n_q, D)`` or ``(T, n_q, D)``; query_labels: ``(n_q,)`` or ``(T, n_q)``.
        """
        for name, value in (("query_feats", query_feats), ("query_labels", query_labels)):
            if not isinstance(value, Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
        xs, ys, xq, yq, single = _check_inputs(head, support_feats, support_labels, query_feats, query_labels)
        keep = self.multi_step_loss and self.steps > 1
        init, history, norms, lr_fn = self._run(head, xs, ys, keep_history=keep)
        final = history[-1]
        q_logits = head.functional(final, xq, head.dropout_masks(xq.shape, xq.device, xq.dtype))
        if keep:
            per_step = [task_cross_entropy(head.functional(p, xq), yq) for p in history[1:-1]]
            loss = torch.stack([*per_step, task_cross_entropy(q_logits, yq)]).mean()
        else:
            loss = task_cross_entropy(q_logits, yq).mean()
        metrics = self._metrics(head, init, final, xs, ys, xq, yq, q_logits, loss, norms, lr_fn)
        params = {k: v[0] if single else v for k, v in final.items()}
        return InnerLoopOutput(
            loss=loss, metrics=metrics, params=params, query_logits=q_logits[0] if single else q_logits
        )

    def _metrics(self, head, init, final, xs, ys, xq, yq, q_logits, loss, norms, lr_fn) -> dict[str, float]:
        with torch.no_grad():
            s_before = head.functional(init, xs)
            s_after = head.functional(final, xs) if self.steps else s_before
            q_before = head.functional(init, xq) if self.steps else q_logits
        return self.metrics_from_logits(s_before, s_after, q_before, q_logits, ys, yq, loss, norms)

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
    ) -> dict[str, float]:
        """The metrics of :class:`InnerLoopOutput` from the logits ``(T, n, N)`` before and after adaptation,
        the labels ``(T, n)``, the loss and the inner gradient norms ``(steps, T)`` (one device sync)."""
        names, values = [], []
        with torch.no_grad():
            pairs = {
                "support_loss_before": task_cross_entropy(s_before, ys).mean(),
                "support_loss_after": task_cross_entropy(s_after, ys).mean(),
                "support_acc_before": accuracy(s_before, ys),
                "support_acc_after": accuracy(s_after, ys),
                "query_loss": loss.detach(),
                "query_acc_before": accuracy(q_before, yq),
                "query_acc": accuracy(q_logits, yq),
                "inner_grad_norm": norms.mean() if self.steps else torch.zeros((), device=ys.device),
            }
            pairs.update({f"inner_grad_norm_{s}": norms[s].mean() for s in range(self.steps)})
            if self.lrs is not None:
                lrs = self.lrs.detach()
                pairs["inner_lr"] = lrs.mean()
                per_tensor = lrs if lrs.dim() == 1 else lrs.mean(0)
                pairs.update({f"inner_lr/{n}": per_tensor[i] for i, n in enumerate(self.param_names or ())})
            for k, v in pairs.items():
                names.append(k)
                values.append(v.float().reshape(()))
            out = torch.stack(values).tolist()  # one device sync for all metrics
        metrics = dict(zip(names, out, strict=True))
        if self.lrs is None:
            metrics["inner_lr"] = self.lr
        return metrics

    def extra_repr(self) -> str:
        return (
            f"steps={self.steps}, lr={self.lr}, first_order={self.first_order}, backend={self.backend!r}, "
            f"learn_lr={self.learn_lr!r}, multi_step_loss={self.multi_step_loss}, grad_clip={self.grad_clip}"
        )


def _adapted_names(head: nn.Module) -> Sequence[str]:
    names = getattr(head, "adapted_names", None)
    if names is None:
        raise TypeError(f"the head must be a MetaHead (or provide adapted_names), got {type(head).__name__}")
    return names


def _base_dim(name: str) -> int:
    return 2 if name.endswith("weight") else 1


def _check_inputs(
    head: nn.Module, xs: Tensor, ys: Tensor, xq: Tensor | None, yq: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, bool]:
    """Validate shapes, dtypes, label range and finiteness; return everything with a task dim."""
    for name in ("initial_params", "functional", "n_way", "in_dim"):
        if not hasattr(head, name):
            raise TypeError(f"head must be a MetaHead (missing {name!r}), got {type(head).__name__}")
    for name, value in (("support_feats", xs), ("support_labels", ys)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if xs.dim() not in (2, 3):
        raise ValueError(f"support_feats must be (n, D) or (T, n, D), got shape {tuple(xs.shape)}")
    single = xs.dim() == 2
    head_param = next(iter(head.parameters()), None) if isinstance(head, nn.Module) else None
    # a mixed dtype is a matmul error, except under autocast, where the matmuls cast for themselves
    autocast = torch.is_autocast_enabled(xs.device.type)
    head_dtype = head_param.dtype if head_param is not None and not autocast else None
    parts = [("support", xs, ys)] + ([("query", xq, yq)] if xq is not None else [])
    for part, x, y in parts:
        if x.dim() != xs.dim():
            raise ValueError(
                f"{part}_feats has shape {tuple(x.shape)} but support_feats has {tuple(xs.shape)}"
            )
        if x.shape[-1] != head.in_dim:
            raise ValueError(
                f"{part}_feats has feature size {x.shape[-1]}, the head expects in_dim={head.in_dim}"
            )
        if y.shape != x.shape[:-1]:
            raise ValueError(
                f"{part}_labels has shape {tuple(y.shape)}, expected {tuple(x.shape[:-1])} (one per row)"
            )
        if x.shape[-2] == 0:
            raise ValueError(f"{part} set is empty (shape {tuple(x.shape)})")
        if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise ValueError(f"{part}_labels must be an integer tensor, got {y.dtype}")
        if not x.is_floating_point():
            raise ValueError(f"{part}_feats must be floating point, got {x.dtype}")
        if head_dtype is not None and x.dtype != head_dtype:
            raise ValueError(
                f"{part}_feats has dtype {x.dtype} but the head's parameters are {head_dtype}; cast the "
                f"features with .to({head_dtype})"
            )
    if xq is not None and not single and xq.shape[0] != xs.shape[0]:
        raise ValueError(f"query_feats has {xq.shape[0]} tasks, support_feats has {xs.shape[0]}")
    n = head.n_way
    flags = []
    for _, x, y in parts:  # one sync for all value checks
        flags += [torch.isfinite(x).all(), (y >= 0).all() & (y < n).all()]
    ok = torch.stack(flags).tolist()
    for i, (part, _, y) in enumerate(parts):
        if not ok[2 * i]:
            raise ValueError(f"{part}_feats contains NaN or Inf")
        if not ok[2 * i + 1]:
            raise ValueError(
                f"{part}_labels must be in [0, {n}) (n_way of the head), got min {int(y.min())} max {int(y.max())}"
            )
    lift = (lambda z: z.unsqueeze(0)) if single else (lambda z: z)
    out = [lift(xs), lift(ys).long(), *(lift(z) if z is not None else None for z in (xq, yq))]
    if out[3] is not None:
        out[3] = out[3].long()
    return out[0], out[1], out[2], out[3], single
