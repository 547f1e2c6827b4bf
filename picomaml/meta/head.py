"""MetaHead: the small N-way classifier that the inner loop adapts, used functionally on a parameter dict.

The head is an MLP ``in_dim -> hidden_dims... -> n_way``. Its parameters live in the module (they are the
meta-learned initial weights) but adaptation never touches them:
[`MetaHead.initial_params`][picomaml.meta.head.MetaHead.initial_params] returns a dict ``name -> tensor`` that
the inner loop replaces step by step, and [`MetaHead.functional`][picomaml.meta.head.MetaHead.functional]
evaluates the head on any such dict. Every parameter may carry a leading task dimension ``T`` (one copy per
task), so several tasks run as batched matrix products.

``init="prototype"`` (ProtoMAML) has no stored output layer: for each episode the last layer is built from
the support class means ``c_k`` of its input (the features after the hidden layers, under the current
parameters): weight ``2 c_k``, bias ``-||c_k||^2``. The means are ordinary differentiable tensor ops, so the
meta-gradient flows through them into the hidden layers and the features.

The pico-maml setting (4 linear layers, 128 hidden units, xavier init) is
``MetaHead(d_model, n_way, hidden_dims=(128, 128, 128), init="xavier")``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from picomaml.checks import check_values
from picomaml.params import Params, check_int, choices, hparam, short_repr

__all__ = [
    "MetaHead", "HeadConfig", "Activation", "HeadInit", "ACTIVATIONS", "INITS", "prototype_layer", "head_logits",
    "head_task_params", "adapted_names", "check_head_inputs", "check_labels",
]

Activation = Literal["relu", "gelu", "silu", "tanh"]
HeadInit = Literal["xavier", "kaiming", "normal", "zeros", "prototype"]
ACTIVATIONS = dict(zip(choices(Activation), (F.relu, F.gelu, F.silu, torch.tanh), strict=True))
INITS = choices(HeadInit)


@dataclasses.dataclass
class HeadConfig(Params):
    """Hyperparameters of [`MetaHead`][picomaml.meta.head.MetaHead] (YAML section ``head``); ``in_dim``,
    ``n_way`` and ``seed`` come from the model, the sampler and the experiment."""

    hidden_dims: tuple[int, ...] = hparam((), ge=1, le=2**18, doc="sizes of the hidden layers; [] is a linear head")
    activation: Activation = hparam("relu", doc="non-linearity after each hidden layer")
    dropout: float = hparam(0.0, ge=0.0, lt=1.0, doc="dropout on hidden activations")
    init: HeadInit = hparam(
        "zeros", doc="initial weights (zeros learns from scratch); prototype builds the output layer from class means"
    )


def prototype_layer(feats: Tensor, labels: Tensor, n_way: int) -> tuple[Tensor, Tensor]:
    """ProtoMAML output layer from support class means (differentiable).

    Args:
        feats: ``(T, n, h)`` support features entering the last layer.
        labels: ``(T, n)`` long labels in ``[0, n_way)``.
        n_way: Number of classes ``N``.

    Returns:
        ``(weight (T, N, h), bias (T, N))`` with ``weight = 2 c_k`` and ``bias = -||c_k||^2``; a class with no
        support row gets ``c_k = 0``.
    """
    onehot = F.one_hot(labels, n_way).to(feats.dtype)  # (T, n, N)
    counts = onehot.sum(1).clamp_min(1.0)  # (T, N)
    means = torch.bmm(onehot.transpose(1, 2), feats) / counts.unsqueeze(-1)  # (T, N, h)
    return 2.0 * means, -(means * means).sum(-1)


class MetaHead(nn.Module):
    """An N-way MLP classifier over pooled features, evaluated functionally.

    Args:
        in_dim: Feature size ``D`` (the backbone's ``d_model``).
        n_way: Number of classes ``N`` of an episode.
        hidden_dims: Sizes of the hidden layers; ``()`` is a linear head.
        activation: ``"relu"``, ``"gelu"``, ``"silu"`` or ``"tanh"``, applied after each hidden layer.
        dropout: Probability of zeroing a hidden activation while the head is in training mode. Masks are
            drawn from the head's own seeded ``torch.Generator`` (never the global RNG); it has no effect on a
            linear head.
        init: ``"zeros"`` (default: a zero output layer, so every class starts equal, as task labels are
            permuted per episode and no init can know them; hidden layers, if any, xavier), ``"xavier"``
            (uniform), ``"kaiming"`` (uniform, fan-in), ``"normal"`` (std 0.02) or ``"prototype"`` (hidden layers xavier, output layer from support
            class means per episode; the module then stores no output layer). Biases start at zero.
        seed: Seed of the generator used for weight init and dropout masks.

    Parameter names are ``hidden.{i}.weight``/``hidden.{i}.bias`` and ``out.weight``/``out.bias``; these are
    the keys of the dicts the inner loop adapts (see
    [`adapted_names`][picomaml.meta.head.MetaHead.adapted_names]).
    """

    def __init__(
        self,
        in_dim: int,
        n_way: int,
        hidden_dims: Sequence[int] = HeadConfig.hidden_dims,
        activation: Activation = HeadConfig.activation,
        dropout: float = HeadConfig.dropout,
        init: HeadInit = HeadConfig.init,
        seed: int = 0,
    ) -> None:
        super().__init__()
        in_dim, n_way = check_int("in_dim", in_dim, ge=1), check_int("n_way", n_way, ge=2)
        config = HeadConfig(hidden_dims=tuple(hidden_dims), activation=activation, dropout=dropout, init=init)
        self.in_dim, self.n_way, self.hidden_dims = in_dim, n_way, config.hidden_dims
        self.activation, self.dropout, self.init = config.activation, config.dropout, config.init
        self.seed = check_int("seed", seed)
        self._act = ACTIVATIONS[activation]
        self._generator = torch.Generator().manual_seed(seed)
        dims = (in_dim, *hidden_dims)
        with torch.random.fork_rng(devices=[]):  # torch's default init (overwritten below) uses the global RNG
            self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
            self.out = None if self.init == "prototype" else nn.Linear(dims[-1], n_way)
        self.reset_parameters()

    @property
    def adapted_names(self) -> tuple[str, ...]:
        """Names of the tensors the inner loop adapts, in order (includes ``out.*`` for prototype init)."""
        names = [f"hidden.{i}.{p}" for i in range(len(self.hidden_dims)) for p in ("weight", "bias")]
        return (*names, "out.weight", "out.bias")

    @property
    def adapted_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Shapes of the [`adapted_names`][picomaml.meta.head.MetaHead.adapted_names] tensors without a task
        dim (per-element learned LRs follow them)."""
        dims = (self.in_dim, *self.hidden_dims)
        shapes = [s for a, b in zip(dims[:-1], dims[1:], strict=True) for s in ((b, a), (b,))]
        return (*shapes, (self.n_way, dims[-1]), (self.n_way,))

    def reset_parameters(self) -> None:
        """(Re)initialise all stored weights from the head's generator; biases start at zero."""
        with torch.no_grad():
            for lin in [*self.hidden, *([self.out] if self.out is not None else [])]:
                # zeros and prototype heads have xavier hidden layers: all-zero hidden layers never move
                kind = "xavier" if self.init == "prototype" or (self.init == "zeros" and lin is not self.out) else self.init
                w = lin.weight
                fan_out, fan_in = w.shape
                if kind == "xavier":
                    bound = math.sqrt(6.0 / (fan_in + fan_out))
                elif kind == "kaiming":
                    bound = math.sqrt(6.0 / fan_in)  # He uniform for ReLU gain sqrt(2)
                else:
                    bound = 0.0
                cpu = torch.empty(w.shape, dtype=torch.float32)
                if kind == "normal":
                    cpu.normal_(0.0, 0.02, generator=self._generator)
                else:
                    cpu.uniform_(-bound, bound, generator=self._generator) if bound else cpu.zero_()
                w.copy_(cpu)
                lin.bias.zero_()

    # -- functional core -------------------------------------------------------------------------------

    def initial_params(
        self, support_feats: Tensor | None = None, support_labels: Tensor | None = None
    ) -> dict:
        """The dict the inner loop starts from: the stored parameters, plus the prototype layer if any.

        Args:
            support_feats: ``(T, n, D)`` support features (needed for prototype init only).
            support_labels: ``(T, n)`` labels (needed for prototype init only).

        Returns:
            ``name -> tensor``; stored parameters are returned as they are (no copy, so gradients reach them),
            prototype ``out.*`` tensors have a leading ``T`` dimension.
        """
        params: dict[str, Tensor] = {}
        for i, lin in enumerate(self.hidden):
            params[f"hidden.{i}.weight"], params[f"hidden.{i}.bias"] = lin.weight, lin.bias
        if self.out is not None:
            params["out.weight"], params["out.bias"] = self.out.weight, self.out.bias
        else:
            if support_feats is None or support_labels is None:
                raise ValueError(
                    "init='prototype' needs support_feats and support_labels to build the output layer"
                )
            h = self.features(params, support_feats)  # no dropout: the prototypes are class means
            params["out.weight"], params["out.bias"] = prototype_layer(h, support_labels, self.n_way)
        return params

    def features(self, params: dict, x: Tensor, masks: Sequence[Tensor] | None = None) -> Tensor:
        """Input of the output layer: ``x`` after the hidden layers.

        Args:
            params: ``name -> tensor``; each tensor may have a leading task dimension ``T``.
            x: ``(T, n, D)`` or ``(n, D)`` features.
            masks: Optional dropout masks, one per hidden layer, broadcastable to its activation (already
                scaled by ``1 / (1 - p)``).
        """
        for i in range(len(self.hidden_dims)):
            x = self._act(_linear(x, params[f"hidden.{i}.weight"], params[f"hidden.{i}.bias"]))
            if masks is not None:
                x = x * masks[i]
        return x

    def functional(self, params: dict, x: Tensor, masks: Sequence[Tensor] | None = None) -> Tensor:
        """Logits of the head under ``params``: ``(T, n, D) -> (T, n, N)`` (or ``(n, D) -> (n, N)``)."""
        h = self.features(params, x, masks)
        return _linear(h, params["out.weight"], params["out.bias"])

    def dropout_masks(
        self, shape: Sequence[int], device: torch.device, dtype: torch.dtype
    ) -> list[Tensor] | None:
        """Fresh dropout masks for one forward of ``shape[:-1]`` rows, or ``None`` when dropout is off.

        Drawn on the CPU from the head's generator (so results do not depend on the device), then moved.
        """
        if self.dropout == 0.0 or not self.training or not self.hidden_dims:
            return None
        keep = 1.0 - self.dropout
        masks = []
        for h in self.hidden_dims:
            m = torch.rand((*shape[:-1], h), generator=self._generator) < keep
            masks.append((m.to(dtype) / keep).to(device))
        return masks

    def forward(
        self, x: Tensor, support_feats: Tensor | None = None, support_labels: Tensor | None = None
    ) -> Tensor:
        """Logits under the stored (initial) parameters: ``(..., n, D) -> (..., n, N)``.

        For prototype init, pass the support set the output layer is built from. Works with
        ``torch.func.functional_call(head, params, (x,))``.

        Raises:
            TypeError / ValueError: ``x`` or ``support_feats`` is not a tensor of ``in_dim``-wide rows in the
                dtype of the head's parameters.
        """
        self.check_features("x", x)
        if support_feats is not None:
            self.check_features("support_feats", support_feats)
        if self.out is None:
            if support_feats is None:
                raise ValueError("init='prototype' needs support_feats and support_labels in forward()")
            squeeze = support_feats.dim() == 2
            sf = support_feats.unsqueeze(0) if squeeze else support_feats
            sl = support_labels.unsqueeze(0) if squeeze else support_labels
            params = self.initial_params(sf, sl)
            if squeeze:
                params["out.weight"], params["out.bias"] = params["out.weight"][0], params["out.bias"][0]
        else:
            params = self.initial_params()
        masks = self.dropout_masks(x.shape, x.device, x.dtype)
        return self.functional(params, x, masks)

    def check_features(self, name: str, x: Tensor) -> None:
        """Raise naming ``name`` unless ``x`` is a float tensor ``(..., in_dim)`` in the head's dtype."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor of features, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_dim:
            raise ValueError(f"{name}: expected (..., in_dim={self.in_dim}) features, got shape {tuple(x.shape)}")
        param = next(self.parameters(), None)
        # under autocast the matmuls cast for themselves; elsewhere a mixed dtype is a matmul error
        dtype = param.dtype if param is not None and not torch.is_autocast_enabled(x.device.type) else None
        if not x.is_floating_point() or (dtype is not None and x.dtype != dtype):
            raise ValueError(f"{name}: dtype {x.dtype}, expected the head's {dtype or 'floating point'}")

    # -- generator state travels with state_dict() ----------------------------------------------------

    def get_extra_state(self) -> dict:
        return {"generator": self._generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        own = self._generator.get_state()
        gen = state.get("generator") if isinstance(state, dict) else None
        if not isinstance(gen, torch.Tensor) or gen.dtype != own.dtype or gen.shape != own.shape:
            raise ValueError(
                f"MetaHead: saved '_extra_state' holds {short_repr(gen)}, not a {own.dtype} generator state of "
                f"shape {tuple(own.shape)}"
            )
        self._generator.set_state(gen)

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, n_way={self.n_way}, hidden_dims={self.hidden_dims}, "
            f"activation={self.activation!r}, dropout={self.dropout}, init={self.init!r}"
        )


def _linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``x @ W^T + b`` where ``W (.., out, in)``/``b (.., out)`` may carry a leading task dim like ``x``."""
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    return torch.baddbmm(bias.unsqueeze(-2), x, weight.transpose(-1, -2))


# -- the inner loop's head form: the protocol a head (a MetaHead or a duck-typed module) offers it --------


def head_logits(head: nn.Module, params: dict[str, Tensor], x: Tensor, *, dropout: bool = False) -> Tensor:
    """``head.functional(params, x)``; with ``dropout``, fresh masks from ``head.dropout_masks`` when the head
    has that method and it returns masks (a [`MetaHead`][picomaml.meta.head.MetaHead] in training mode with
    dropout)."""
    make = getattr(head, "dropout_masks", None) if dropout else None
    masks = make(x.shape, x.device, x.dtype) if callable(make) else None
    return head.functional(params, x) if masks is None else head.functional(params, x, masks)


def head_task_params(head: nn.Module, xs: Tensor, ys: Tensor) -> dict[str, Tensor]:
    """The head's initial tensors ``name -> (T, ...)`` for ``xs`` ``(T, n, D)``.

    The task dim is explicit: a tensor that is one of the head's own parameters (shared by every task) is
    expanded to ``T`` copies; any other tensor ``initial_params`` returns (a prototype layer built from each
    task's support set) already has one.
    """
    t = xs.shape[0]
    own = {id(p) for p in head.parameters()}
    init = head.initial_params(xs, ys)
    out = {}
    for k in adapted_names(head):
        v = init[k]
        if id(v) in own:
            out[k] = v.expand(t, *v.shape)
        elif v.shape[:1] != (t,):
            raise ValueError(f"head.initial_params: {k!r} is not a head parameter and has no task dim {t}: {tuple(v.shape)}")
        else:
            out[k] = v
    return out


def adapted_names(head: nn.Module) -> Sequence[str]:
    names = getattr(head, "adapted_names", None)
    if names is None:
        raise TypeError(f"the head must be a MetaHead (or provide adapted_names), got {type(head).__name__}")
    return names


def check_labels(owner: Any, part: str, labels: Tensor, n_way: int) -> None:
    """``{part}_labels`` in ``[0, n_way)``, or a ``ValueError`` naming them (read until it passed once for
    ``owner`` and this shape, then queued without a host sync:
    [`check_values`][picomaml.checks.check_values])."""
    check_values(
        owner, ("labels", part, tuple(labels.shape), str(labels.device), n_way), (labels >= 0) & (labels < n_way),
        lambda: f"{part}_labels must be in [0, {n_way}) (n_way of the head), got min {int(labels.min())} max "
        f"{int(labels.max())}",
        f"{part}_labels must be in [0, {n_way}) (n_way of the head)",
    )  # fmt: skip


def check_head_inputs(
    head: nn.Module, xs: Tensor, ys: Tensor, xq: Tensor | None, yq: Tensor | None, owner: Any = None
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, bool]:
    """Validate shapes, dtypes, label range and finiteness; return everything with a task dim.

    The value checks (finite features, labels in range) read their result on the first call with these
    shapes for ``owner`` and are queued without a host sync afterwards
    ([`check_values`][picomaml.checks.check_values]).
    """
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
    for part, x, y in parts:
        key = ("inputs", part, tuple(x.shape), x.dtype, str(x.device), n)
        check_values(owner, key + ("finite",), torch.isfinite(x), lambda part=part: f"{part}_feats contains NaN or Inf",
                     f"{part}_feats contains NaN or Inf")  # fmt: skip
        check_labels(owner, part, y, n)
    lift = (lambda z: z.unsqueeze(0)) if single else (lambda z: z)
    out = [lift(xs), lift(ys).long(), *(lift(z) if z is not None else None for z in (xq, yq))]
    if out[3] is not None:
        out[3] = out[3].long()
    return out[0], out[1], out[2], out[3], single
