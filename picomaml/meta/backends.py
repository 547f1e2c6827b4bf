"""Reference inner-loop backends on third-party libraries: ``higher`` and ``learn2learn``.

They run the same plain-SGD adaptation as the ``torch`` backend (:func:`picomaml.meta.functional.sgd_steps`)
through each library's own differentiable-optimizer machinery, one task at a time (they are references for
numbers and speed, not the fast path). Both work on a *shell*: an ``nn.Sequential`` with the head's layout
whose own weights are never used; the initial tensors (the head's parameters, or the prototype layer) are
fed in explicitly so the meta-gradient reaches the real head.

Install: ``pip install 'picomaml[higher]'`` (``higher==0.2.1``). learn2learn 0.2.0 pulls in vision and gym
packages this library does not need; install it without them::

    pip install cython
    pip install --no-deps --no-build-isolation --config-settings=--global-option=build_ext learn2learn==0.2.0

``import learn2learn`` then fails (it imports torchvision/gym), so :func:`load_learn2learn_maml` loads only
``learn2learn/algorithms/maml.py`` and the torch-only modules it needs, from the installed files.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import types
import weakref
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from picomaml._optional import MissingDependencyError, require
from picomaml.features import normalize_task_features, pool_features
from picomaml.meta.functional import LrFn, clip_grads, global_grad_norm, task_cross_entropy
from picomaml.meta.head import ACTIVATIONS
from picomaml.top_blocks import math_attention

__all__ = [
    "L2L_INSTALL",
    "load_learn2learn_maml",
    "head_shell",
    "higher_sgd_steps",
    "higher_block_steps",
    "learn2learn_sgd_steps",
]

L2L_INSTALL = (
    "pip install cython && pip install --no-deps --no-build-isolation "
    "--config-settings=--global-option=build_ext learn2learn==0.2.0"
)
_L2L_MAML: ModuleType | None = None
_SHELLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Activation(nn.Module):
    """The head's activation function as a parameter-free module (the shells are ``nn.Sequential``)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name, self.fn = name, ACTIVATIONS[name]

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def load_learn2learn_maml() -> ModuleType:
    """``learn2learn.algorithms.maml`` without executing ``learn2learn/__init__.py`` (vision, gym, ...).

    The package directory is found from the installed distribution's metadata; while the module loads,
    empty stand-ins for the parent packages sit in ``sys.modules`` and are removed afterwards, so a later
    real ``import learn2learn`` is unaffected.

    Raises:
        MissingDependencyError: learn2learn is not installed (the message gives the install command).
    """
    global _L2L_MAML
    if _L2L_MAML is not None:
        return _L2L_MAML
    if "learn2learn" in sys.modules and hasattr(sys.modules["learn2learn"], "__file__"):
        _L2L_MAML = importlib.import_module("learn2learn.algorithms.maml")  # already fully imported
        return _L2L_MAML
    try:
        pkg = Path(str(importlib.metadata.distribution("learn2learn").locate_file("learn2learn")))
    except importlib.metadata.PackageNotFoundError as exc:
        raise MissingDependencyError(
            f"The 'learn2learn' inner-loop backend needs learn2learn 0.2.0. Install it with: {L2L_INSTALL}"
        ) from exc
    if not (pkg / "algorithms" / "maml.py").is_file():
        raise MissingDependencyError(
            f"learn2learn is installed but {pkg}/algorithms/maml.py is missing; {L2L_INSTALL}"
        )
    touched = ["learn2learn", "learn2learn.algorithms", "learn2learn.algorithms.base_learner"]
    touched += ["learn2learn.algorithms.maml", "learn2learn.utils"]
    saved = {name: sys.modules.get(name) for name in touched}
    try:
        for name, path in (("learn2learn", pkg), ("learn2learn.algorithms", pkg / "algorithms")):
            stub = types.ModuleType(name)
            stub.__path__ = [str(path)]  # a package whose __init__ is never run
            sys.modules[name] = stub
        _L2L_MAML = importlib.import_module("learn2learn.algorithms.maml")
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return _L2L_MAML


def head_shell(head: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Sequential:
    """An ``nn.Sequential`` with the layout of a :class:`~picomaml.MetaHead` (cached per head/device/dtype).

    Its parameter order equals ``head.adapted_names``; its own weights are placeholders.
    """
    if head.training and getattr(head, "dropout", 0.0) > 0 and head.hidden_dims:
        raise NotImplementedError("dropout in the head is supported by the 'torch' inner-loop backend only")
    cache = _SHELLS.setdefault(head, {})
    key = (device, dtype)
    if key not in cache:
        dims = (head.in_dim, *head.hidden_dims)
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(a, b), _Activation(head.activation)]
        layers.append(nn.Linear(dims[-1], head.n_way))
        cache[key] = nn.Sequential(*layers).to(device=device, dtype=dtype).requires_grad_(True)
    return cache[key]


def _fo_leaves(params: list[Tensor]) -> list[Tensor]:
    return [p.detach().requires_grad_() for p in params]


def higher_sgd_steps(
    head: nn.Module,
    params: dict[str, Tensor],
    feats: Tensor,
    labels: Tensor,
    steps: int,
    lr_fn: LrFn,
    *,
    create_graph: bool,
    grad_clip: float | None,
    learned_lr: bool,
    keep_history: bool,
) -> tuple[list[dict[str, Tensor]], Tensor]:
    """Same contract as :func:`~picomaml.meta.functional.sgd_steps`, through ``higher.innerloop_ctx``.

    First order without learned LRs uses higher's own first-order mode (``track_higher_grads=False``, whose
    adapted weights are detached) and re-attaches them as ``theta_0 + (theta_S - theta_0).detach()``, which
    is exactly the FOMAML gradient path. With learned LRs, first order keeps higher's tape and detaches the
    gradients in ``grad_callback`` so the LRs still get their (first-order) gradient.
    """
    higher = require("higher", "higher", "the 'higher' inner-loop backend")
    names = list(params)
    shell = head_shell(head, feats.device, feats.dtype)
    native_fo = not create_graph and not learned_lr
    per_task: list[list[list[Tensor]]] = []
    norms = torch.zeros(steps, feats.shape[0], dtype=torch.float32, device=feats.device)
    for t in range(feats.shape[0]):
        theta0 = [params[k][t] for k in names]
        step_norms: list[Tensor] = []

        callback = _grad_callback(create_graph, grad_clip, step_norms)
        # one group per tensor; the lr of each group is set by `override` at every step
        opt = torch.optim.SGD([{"params": [p]} for p in shell.parameters()], lr=1.0)
        with higher.innerloop_ctx(
            shell, opt, copy_initial_weights=True, track_higher_grads=not native_fo
        ) as (
            fmodel,
            diffopt,
        ):
            x = feats[t].detach() if native_fo else feats[t]
            hist = _higher_task(
                lambda cur, x=x, y=labels[t]: task_cross_entropy(fmodel(x.unsqueeze(0), params=cur), y.unsqueeze(0)).sum(),
                diffopt, theta0, steps, lambda s: [lr_fn(s, i) for i in range(len(names))], callback, native_fo,
                keep_history,
            )  # fmt: skip
        per_task.append(hist)
        if steps:
            norms[:, t] = torch.stack(step_norms)[:, 0]
    return _stack_history(per_task, names), norms


def _higher_task(
    loss_fn: Any, diffopt: Any, theta0: list[Tensor], steps: int, lrs: Any, callback: Any, native_fo: bool,
    keep_history: bool,
) -> list[list[Tensor]]:  # fmt: skip
    """One task's inner steps through higher's differentiable optimizer: ``[theta_0, ..., theta_S]`` (or
    ``[theta_0, theta_S]``). higher's own first order detaches the adapted weights; they are re-attached
    as ``theta_0 + (theta_s - theta_0).detach()``, exactly the FOMAML gradient path."""
    cur = _fo_leaves(theta0) if native_fo else theta0
    hist = [theta0]
    for s in range(steps):
        cur = diffopt.step(loss_fn(cur), params=cur, override={"lr": lrs(s)}, grad_callback=callback)
        if keep_history or s == steps - 1:
            hist.append([p0 + (p - p0).detach() for p0, p in zip(theta0, cur, strict=True)] if native_fo else list(cur))
    return hist


def _grad_callback(create_graph: bool, grad_clip: float | None, step_norms: list[Tensor]) -> Any:
    """higher's ``grad_callback``: first-order detach, clipping as the torch backend, norms recorded."""

    def callback(grads: tuple[Tensor, ...]) -> list[Tensor]:
        grads = [g if create_graph else g.detach() for g in grads]
        batched = [g.unsqueeze(0) for g in grads]
        if grad_clip is not None:
            norm = global_grad_norm(batched)
            batched = clip_grads(batched, norm, grad_clip)
        else:
            with torch.no_grad():
                norm = global_grad_norm(batched)
        step_norms.append(norm.detach())
        return [g[0] for g in batched]

    return callback


class _BlocksAndHead(nn.Module):
    """The adapted blocks, final norm, pooling and a head shell as one module, for higher's functional copy.

    higher refreshes a patched module's tensors when *its* forward runs, and PicoDecoder's attention reads
    its children's weights directly (one fused q/k/v matmul), so the block tensors are registered on this
    root module itself (``p0, p1, ...``, always current) and the blocks run through ``functional_call``;
    the head shell runs as higher's patched submodule. Parameter order: the block tensors in
    :attr:`TopBlocks.names` order, then the head shell's.
    """

    def __init__(self, shell: nn.Sequential, top: Any) -> None:
        super().__init__()
        for i, tensor in enumerate(top.params().values()):
            self.register_parameter(f"p{i}", nn.Parameter(tensor.detach().clone()))
        self.shell = shell
        self.__dict__["_top"] = top  # not a submodule: the user's blocks stay out of higher's copy

    def forward(self, inp: Any, pool: tuple, pooling: str, feature_norm: str, dtype: torch.dtype) -> Tensor:
        top = self.__dict__["_top"]
        params = {name: getattr(self, f"p{i}") for i, name in enumerate(top.names)}
        x = top.run(params, inp)
        f = pool_features(x, pool[0], pooling, valid=pool[1]).to(dtype).unsqueeze(0)
        return self.shell(normalize_task_features(f, f[:, :0], feature_norm)[0])


def higher_block_steps(
    head: nn.Module,
    feats: Any,
    state: dict[str, Tensor],
    xs0: Tensor,
    labels: Tensor,
    steps: int,
    lr_fn: LrFn,
    *,
    create_graph: bool,
    grad_clip: float | None,
    learned_lr: bool,
    keep_history: bool,
) -> tuple[list[dict[str, Tensor]], Tensor]:
    """:func:`higher_sgd_steps` with the top blocks adapting too (``adapt_layers``), one task at a time.

    Args:
        feats: The tasks' captured rows (:class:`picomaml.meta.block_loop.BlockFeatures`).
        state: Initial tensors ``name -> (T, ...)``: the head's adapted tensors, then the blocks'.
        xs0: ``(T, N*K, D)`` initial support features (for the shapes of the norms only).
    """
    higher = require("higher", "higher", "the 'higher' inner-loop backend")
    loop_order = list(state)  # the learned LRs' order: head tensors, then blocks
    names = [*feats.top.names, *head.adapted_names]  # the module's parameter order
    lr_index = [loop_order.index(k) for k in names]
    net = _BlocksAndHead(head_shell(head, xs0.device, xs0.dtype), feats.top)
    native_fo = not create_graph and not learned_lr
    per_task: list[list[list[Tensor]]] = []
    norms = torch.zeros(steps, xs0.shape[0], dtype=torch.float32, device=xs0.device)
    for t, task in enumerate(feats.tasks):
        theta0 = [state[k][t] for k in names]
        step_norms: list[Tensor] = []
        callback = _grad_callback(create_graph, grad_clip, step_norms)
        opt = torch.optim.SGD([{"params": [p]} for p in net.parameters()], lr=1.0)
        inp = task.support._replace(hidden=task.support.hidden.detach()) if native_fo else task.support
        args = (inp, task.support_pool, feats.pooling, feats.feature_norm, feats.dtype)
        with (
            math_attention(create_graph),
            higher.innerloop_ctx(net, opt, copy_initial_weights=True, track_higher_grads=not native_fo) as (
                fnet,
                diffopt,
            ),
        ):
            hist = _higher_task(
                lambda cur, args=args, y=labels[t]: task_cross_entropy(fnet(*args, params=cur), y.unsqueeze(0)).sum(),
                diffopt, theta0, steps, lambda s: [lr_fn(s, i) for i in lr_index], callback, native_fo, keep_history,
            )  # fmt: skip
        per_task.append(hist)
        if steps:
            norms[:, t] = torch.stack(step_norms)[:, 0]
    history = _stack_history(per_task, names)
    return [{k: h[k] for k in loop_order} for h in history], norms


def learn2learn_sgd_steps(
    head: nn.Module,
    params: dict[str, Tensor],
    feats: Tensor,
    labels: Tensor,
    steps: int,
    lr: float,
    *,
    create_graph: bool,
    keep_history: bool,
) -> tuple[list[dict[str, Tensor]], Tensor]:
    """Same contract as :func:`~picomaml.meta.functional.sgd_steps`, through ``learn2learn``'s ``MAML``.

    Each task gets a ``MAML(shell).clone()`` whose parameter slots are filled with the task's initial
    tensors; ``learner.adapt(loss)`` then does learn2learn's own (first- or second-order) update.
    """
    maml_mod = load_learn2learn_maml()
    names = list(params)
    shell = head_shell(head, feats.device, feats.dtype)
    maml = maml_mod.MAML(shell, lr=lr, first_order=not create_graph, allow_unused=True, allow_nograd=True)
    slots = [(mod_name, p_name) for mod_name, mod in shell.named_modules() for p_name in mod._parameters]
    per_task: list[list[list[Tensor]]] = []
    norms = torch.zeros(steps, feats.shape[0], dtype=torch.float32, device=feats.device)
    for t in range(feats.shape[0]):
        learner = maml.clone()
        modules = dict(learner.module.named_modules())
        theta0 = [params[k][t] for k in names]
        for (mod_name, p_name), tensor in zip(slots, theta0, strict=True):
            # a fresh alias: l2l sets attributes on the tensors it updates
            modules[mod_name]._parameters[p_name] = tensor.view_as(tensor)
        hist = [theta0]
        for s in range(steps):
            before = [modules[m]._parameters[p] for m, p in slots]
            loss = task_cross_entropy(learner(feats[t].unsqueeze(0)), labels[t].unsqueeze(0)).sum()
            learner.adapt(loss)
            modules = dict(learner.module.named_modules())
            after = [modules[m]._parameters[p] for m, p in slots]
            # the step was p + (-lr * g): recover g for the norm metric only
            with torch.no_grad():
                g = [((b - a) / lr).unsqueeze(0) for a, b in zip(after, before, strict=True)]
                norms[s, t] = global_grad_norm(g)[0]
            if keep_history or s == steps - 1:
                hist.append(after)
        per_task.append(hist)
    return _stack_history(per_task, names), norms


def _stack_history(per_task: list[list[list[Tensor]]], names: list[str]) -> list[dict[str, Tensor]]:
    """``[task][step][tensor]`` -> ``[step] {name: (T, ...)}``."""
    return [
        {k: torch.stack([per_task[t][s][i] for t in range(len(per_task))]) for i, k in enumerate(names)}
        for s in range(len(per_task[0]))
    ]
