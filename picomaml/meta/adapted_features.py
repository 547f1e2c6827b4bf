"""Backbone tensors that adapt with the head: ``meta_loss(..., adapt=...)`` and ``adapt_layers=k``.

Any selection of a backbone's tensors (LoRA matrices of a peft model, norms, biases, named blocks) adapts
together with the [`MetaHead`][picomaml.meta.head.MetaHead] through the engine's one SGD step
([`picomaml.meta.engine.sgd_steps`][picomaml.meta.engine.sgd_steps]). Each inner step needs the pooled support
features under the task's current backbone tensors; they come from one of two featurisers:

* **split** ([`SplitFeatures`][picomaml.meta.adapted_features.SplitFeatures]): when every adapted tensor lies
  in the top blocks or the final norm ([`TopBlocks.covering`][picomaml.meta.top_blocks.TopBlocks.covering])
  and re-running those blocks reproduces the model's own hidden states at this call's window length, dtype and
  device ([`reproduces`][picomaml.meta.top_blocks.TopBlocks.reproduces]), everything below the lowest adapted
  block runs once and only the blocks from there up re-run per inner step;
* **full** ([`FullFeatures`][picomaml.meta.adapted_features.FullFeatures]): otherwise the whole backbone
  re-runs per inner step under the adapted tensors (``torch.func.functional_call`` of the caller's own
  featuriser, vectorised over tasks), which is the model's own forward by construction. Never a silent
  difference.

Nothing is mutated and no ``.grad`` is written; one ``loss.backward()`` by the caller is the meta-gradient,
exact second order by default (first order with ``first_order=True``), learned inner LRs included.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from picomaml.checks import check_values
from picomaml.meta import engine
from picomaml.meta.backbone import backbone_hidden
from picomaml.meta.features import EpisodeRows, normalize_task_features, pool_features
from picomaml.meta.functional import task_cross_entropy
from picomaml.meta.head import check_labels, head_logits, head_task_params
from picomaml.meta.inner_loop import InnerLoop, InnerLoopOutput
from picomaml.meta.selection import BackboneSelection, backbone_selection
from picomaml.meta.top_blocks import BlockInput, TopBlocks, math_attention

__all__ = [
    "BackboneSelection",  # re-exported from picomaml.meta.selection, with backbone_selection
    "backbone_selection",
    "SplitFeatures",
    "FullFeatures",
    "adapted_features",
    "adapted_inner_loop",
    "support_needs_graph",
]

logger = logging.getLogger(__name__)
_NONFINITE = "meta_loss: the backbone's hidden states hold NaN or Inf (nonfinite='raise')"


def support_needs_graph(loop: InnerLoop, head: nn.Module, feature_norm: str) -> bool:
    """Whether the loss depends on the support rows' initial forward: always second order; first order
    only through a prototype init or the support statistics of ``feature_norm``."""
    return not loop.first_order or getattr(head, "init", None) == "prototype" or feature_norm != "none"


class _Features:
    """Pooled ``(T, n, D)`` features of each task's support or query rows under adapted backbone tensors."""

    names: tuple[str, ...]
    pooling: str
    feature_norm: str
    dtype: torch.dtype

    def own_params(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def part(self, params: dict[str, Tensor], part: str, *, detach_input: bool = False) -> Tensor:
        raise NotImplementedError

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


class SplitFeatures(_Features):
    """Features from the top blocks re-run on captured inputs of the first re-run block.

    Args:
        top: The re-run blocks and the adapted names.
        captured: Per task, ``{"support": (BlockInput, (mask, valid)), "query": ...}``.
        pooling: As in [`picomaml.meta_loss`][picomaml.meta.objectives.meta_loss].
        feature_norm: As in [`picomaml.meta_loss`][picomaml.meta.objectives.meta_loss].
        dtype: The head's dtype; the pooled features are cast to it.
    """

    def __init__(self, top: TopBlocks, captured: list[dict], pooling: str, feature_norm: str, dtype: Any) -> None:
        self.top, self.captured, self.names = top, captured, top.names
        self.pooling, self.feature_norm, self.dtype = pooling, feature_norm, dtype

    def own_params(self) -> dict[str, Tensor]:
        return self.top.params()

    def part(self, params: dict[str, Tensor], part: str, *, detach_input: bool = False) -> Tensor:
        # the captured inputs differ per task (their own rows), so tasks run one after another
        out = []
        for t, task in enumerate(self.captured):
            inp, (mask, valid) = task[part]
            if detach_input:
                inp = inp._replace(hidden=inp.hidden.detach())
            hidden = self.top.run({k: v[t] for k, v in params.items()}, inp)
            out.append(pool_features(hidden, mask, self.pooling, valid=valid, owner=self.top.model).to(self.dtype))
        return torch.stack(out)


class _Featurize(nn.Module):
    """The caller's featuriser as a module over the backbone, so ``functional_call`` can swap its tensors."""

    def __init__(self, model: nn.Module, features: Callable | None) -> None:
        super().__init__()
        self.model = model
        self.__dict__["fn"] = features

    def forward(self, ids: Tensor) -> Tensor:
        return backbone_hidden(self.model, ids, self.__dict__["fn"])


class FullFeatures(_Features):
    """Features from the whole backbone re-run under the adapted tensors, vectorised over tasks.

    Args:
        selection: The adapted backbone tensors.
        rows: The episode's rows (``(T*(N*K+N*Q), W)``, support then query rows of each task).
        features: The caller's ``features=`` callable, if any.
        pooling: As in [`picomaml.meta_loss`][picomaml.meta.objectives.meta_loss].
        feature_norm: As in [`picomaml.meta_loss`][picomaml.meta.objectives.meta_loss].
        dtype: The head's dtype; the pooled features are cast to it.
    """

    def __init__(
        self, selection: BackboneSelection, rows: EpisodeRows, features: Callable | None, pooling: str,
        feature_norm: str, dtype: Any,
    ) -> None:  # fmt: skip
        self.model, self.names = selection.model, selection.names
        self.net = _Featurize(selection.model, features)
        self.pooling, self.feature_norm, self.dtype = pooling, feature_norm, dtype
        t, ns = rows.support_labels.shape
        nq = rows.query_labels.shape[1]

        def split(x: Tensor | None) -> dict[str, Tensor | None]:
            if x is None:
                return {"support": None, "query": None}
            x = x.view(t, ns + nq, *x.shape[1:])
            return {"support": x[:, :ns], "query": x[:, ns:]}

        self.ids, self.mask, self.valid = split(rows.ids), split(rows.mask), split(rows.valid)

    def own_params(self) -> dict[str, Tensor]:
        own = dict(self.model.named_parameters())
        return {k: own[k] for k in self.names}

    def part(self, params: dict[str, Tensor], part: str, *, detach_input: bool = False) -> Tensor:
        ids = self.ids[part]

        t, n = ids.shape[:2]
        # a BatchNorm in training mode updates per-task copies of its running statistics, never the model's
        buffers = {f"model.{k}": v for k, v in engine.task_buffers(self.model, t).items()}

        def one(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(self.net, {**{f"model.{k}": v for k, v in p.items()}, **b}, (x,))

        hidden = engine.task_map(self.model, one, (params, buffers, ids))  # (T, n, W, D)
        mask, valid = self.mask[part], self.valid[part]
        flat = pool_features(
            hidden.flatten(0, 1), None if mask is None else mask.flatten(0, 1), self.pooling,
            valid=None if valid is None else valid.flatten(0, 1), owner=self.model,
        )  # fmt: skip
        return flat.view(t, n, -1).to(self.dtype)


def adapted_features(
    selection: BackboneSelection, rows: EpisodeRows, features: Callable | None, pooling: str, feature_norm: str,
    dtype: Any, support_grad: bool, nonfinite: str,
) -> tuple[_Features, Tensor | bool]:  # fmt: skip
    """The featuriser for a meta step (split where it reproduces the model, else full) and whether the
    backbone's captured hidden states held NaN/Inf (a bool tensor, read by no one here: they are set to
    zero; ``nonfinite="raise"``: a ``ValueError``)."""
    top = selection.top
    if top is None or not top.reproduces(rows.ids):
        if top is not None:
            logger.info(
                "adapt: re-running the top %d blocks of %s does not reproduce its hidden states at window %d; "
                "the whole backbone re-runs per inner step", top.k, type(selection.model).__name__, rows.ids.shape[-1],
            )  # fmt: skip
        return FullFeatures(selection, rows, features, pooling, feature_norm, dtype), False
    t, ns = rows.support_labels.shape
    nq = rows.query_labels.shape[1]
    captured, bad = [], []
    for i in range(t):
        task = {}
        for part, lo, hi in (("support", i * (ns + nq), i * (ns + nq) + ns), ("query", i * (ns + nq) + ns, (i + 1) * (ns + nq))):
            with torch.set_grad_enabled(torch.is_grad_enabled() and (support_grad or part == "query")):
                inp: BlockInput = top.capture(rows.ids[lo:hi])  # every row passes the lower blocks once
            finite = torch.isfinite(inp.hidden).all()
            if nonfinite == "raise":
                check_values(
                    top.model, ("hidden", tuple(inp.hidden.shape)), finite, lambda: _NONFINITE, _NONFINITE
                )  # fmt: skip
            else:  # no sync: the zeros let the inner loop run, the caller turns the loss into NaN
                bad.append(~finite)
                inp = inp._replace(hidden=torch.where(torch.isfinite(inp.hidden), inp.hidden, 0.0))
            pool = tuple(None if x is None else x[lo:hi] for x in (rows.mask, rows.valid))
            task[part] = (inp, pool)
        captured.append(task)
    return SplitFeatures(top, captured, pooling, feature_norm, dtype), torch.stack(bad).any() if bad else False


def _split(params: dict[str, Tensor], names: tuple[str, ...]) -> dict[str, Tensor]:
    return {k: params[k] for k in names}


def adapted_inner_loop(
    loop: InnerLoop, head: nn.Module, feats: _Features, ys: Tensor, yq: Tensor
) -> InnerLoopOutput:
    """Adapt the head and the selected backbone tensors on every task's support rows; query loss, metrics.

    Args:
        loop: Its ``steps``, ``lr`` (or learned LRs bound to the head and the selection), ``first_order``,
            ``grad_clip`` and ``multi_step_loss``.
        head: The [`MetaHead`][picomaml.meta.head.MetaHead].
        feats: The featuriser ([`adapted_features`][picomaml.meta.adapted_features.adapted_features]).
        ys: ``(T, N*K)`` support labels; yq: ``(T, N*Q)`` query labels.

    Returns:
        [`InnerLoopOutput`][picomaml.meta.engine.InnerLoopOutput] with a task dim on ``params`` (head and
        backbone tensors, under the model's names) and ``query_logits``.
    """
    head_names, bb_names = tuple(head.adapted_names), feats.names
    lr_fn = loop.lr_fn(head_names + bb_names)
    outer_grad = torch.is_grad_enabled()
    create_graph = outer_grad and not loop.first_order
    t = ys.shape[0]
    keep = loop.multi_step_loss and loop.steps > 1
    check_labels(loop, "support", ys, head.n_way)
    check_labels(loop, "query", yq, head.n_way)
    with torch.enable_grad():
        own = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in feats.own_params().items()}
        theta = {k: v.expand(t, *v.shape) for k, v in own.items()}
        with torch.set_grad_enabled(support_needs_graph(loop, head, feats.feature_norm)), math_attention(create_graph):
            xs0 = feats.support(theta)
            # a head that builds tensors from the support features (a prototype layer) builds them from other
            # expands of the same backbone tensors, so each inner step's gradient with respect to theta is the
            # partial one (the head's tensors held fixed), as in first order
            stored = {n for n, _ in head.named_parameters()}
            builds = any(n not in stored for n in head.adapted_names)
            xs_init = feats.support({k: v.expand(t, *v.shape) for k, v in own.items()}) if builds else xs0
            init = head_task_params(head, xs_init, ys)

        def support_loss(leaves: dict[str, Tensor], s: int) -> Tensor:
            with math_attention(create_graph):
                # the first step's features are the initial ones (same tensors) unless first order detaches them
                if s == 0 and create_graph:
                    x = xs0
                else:
                    x = feats.support(_split(leaves, bb_names), detach_input=not create_graph)
                return task_cross_entropy(head_logits(head, _split(leaves, head_names), x, dropout=True), ys).sum()

        history, norms = engine.sgd_steps(
            engine.autograd_grads(support_loss, create_graph), {**init, **theta}, loop.steps, lr_fn, n_tasks=t,
            create_graph=create_graph, grad_clip=loop.grad_clip, keep_history=keep,
        )  # fmt: skip
        final = history[-1]
        xs_f, xq_f = feats.both(_split(final, bb_names))
        q_logits = head_logits(head, _split(final, head_names), xq_f, dropout=True)
        if keep:
            per_step = [
                task_cross_entropy(head_logits(head, _split(p, head_names), feats.both(_split(p, bb_names))[1], dropout=True), yq)
                for p in history[1:-1]
            ]
            loss = torch.stack([*per_step, task_cross_entropy(q_logits, yq)]).mean()
        else:
            loss = task_cross_entropy(q_logits, yq).mean()
    with torch.no_grad():
        if xs_f.shape[1] == 0:
            xs_f = feats.support(_split(final, bb_names))
        xq0 = feats.both(theta, xs0 if feats.feature_norm == "none" else None)[1]
        s_before = head.functional(_split(init, head_names), xs0)
        s_after = head.functional(_split(final, head_names), xs_f)
        q_before = head.functional(_split(init, head_names), xq0)
    metrics = loop.metrics_from_logits(s_before, s_after, q_before, q_logits, ys, yq, loss, norms)
    if not outer_grad:
        final = {k: v.detach() for k, v in final.items()}
    return InnerLoopOutput(loss=loss, metrics=metrics, params=final, query_logits=q_logits)
