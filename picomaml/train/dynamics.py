"""Learning-dynamics capture in the pico-analyze layout: activations, weights and gradients per layer.

On a fixed batch, for every module whose name ends with one of the configured suffixes (for a
[`picomaml.PicoDecoder`][picomaml.model.decoder.PicoDecoder]: ``"attention.o_proj"``, ``"mlp.down_proj"``,
``"attention.q_proj"``, ...):

* activations: the module output at one sequence position, ``(B, out_features)``;
* weights: a copy of ``module.weight``;
* gradients: the gradient of the LM loss on that batch with respect to ``module.weight``.

The gradients come from a separate forward and ``torch.autograd.grad``, never from ``.grad``, so a
capture between optimizer steps leaves the training state untouched (accumulated gradients, RNG,
train/eval mode). Files are written as ``learning_dynamics/{split}_{activations,weights,gradients}.pt``,
each a dict ``module name -> tensor`` (float32, CPU), the layout pico-analyze reads.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from picomaml.meta.backbone import unwrap_model
from picomaml.meta.objectives import lm_loss
from picomaml.params import Params, hparam
from picomaml.train.compile import eager_mode

__all__ = [
    "DynamicsConfig",
    "KINDS",
    "capture_learning_dynamics",
    "capture_splits",
    "save_learning_dynamics",
    "load_learning_dynamics",
    "learning_dynamics_writer",
    "next_token_loss",
    "select_modules",
    "unwrap_model",
]

KINDS = ("activations", "weights", "gradients")
SUBDIR = "learning_dynamics"


@dataclasses.dataclass
class DynamicsConfig(Params):
    """What a learning-dynamics capture records (YAML section ``checkpoint.dynamics``): the keyword
    arguments of [`capture_learning_dynamics`][picomaml.train.dynamics.capture_learning_dynamics] and the rows
    it runs on."""

    layers: tuple[str, ...] = hparam(
        ("attention.v_proj", "attention.o_proj", "mlp.down_proj"),
        doc="module-name suffixes to capture (default: the OV circuit and the MLP output, as pico-train)",
    )
    seq_idx: int = hparam(-1, doc="sequence position of the recorded activations (negative: from the end)")
    batch_size: int | None = hparam(
        None, ge=1, doc="rows of the fixed train and held-out batches; null: 2 x d_model (PWCCA needs > d_model)"
    )
    save_data: bool = hparam(False, doc="also save the rows' tokens as {split}_data/ (a datasets folder, as pico-train)")


def next_token_loss(model: nn.Module, batch: Tensor) -> Tensor:
    """The default ``loss_fn`` of
    [`capture_learning_dynamics`][picomaml.train.dynamics.capture_learning_dynamics]:
    [`picomaml.lm_loss`][picomaml.meta.objectives.lm_loss] on ``batch`` ``(B, L)`` with
    ``full_sequence=True``, so the recorded forward covers all ``L`` positions (the activations at ``seq_idx``
    index ``batch`` itself)."""
    return lm_loss(model, batch, full_sequence=True)


def select_modules(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    """Modules whose qualified name ends with one of ``layers`` (on a ``.`` boundary), in order.

    Raises:
        ValueError: no suffixes, or no module matches (the message lists some module names).
    """
    if isinstance(layers, str):
        layers = (layers,)
    if not layers:
        raise ValueError("layers must name at least one module suffix, e.g. ['attention.o_proj']")
    found = {
        name: module
        for name, module in model.named_modules()
        if name and any(name == s or name.endswith("." + s) for s in layers)
    }
    if not found:
        names = [n for n, _ in model.named_modules() if n][:12]
        raise ValueError(
            f"layers {list(layers)} match no module; module names look like {names}"
        )
    return found


def capture_learning_dynamics(
    model: nn.Module,
    batch: Tensor,
    layers: Sequence[str] = DynamicsConfig.layers,
    seq_idx: int = DynamicsConfig.seq_idx,
    loss_fn: Callable[[nn.Module, Tensor], Tensor] | None = None,
    eval_mode: bool = True,
) -> dict[str, dict[str, Tensor]]:
    """Activations, weights and LM-loss gradients of the selected layers on one batch.

    Args:
        model: The backbone (e.g. a [`picomaml.PicoDecoder`][picomaml.model.decoder.PicoDecoder], possibly
            wrapped by Fabric, DDP or ``torch.compile``: it is unwrapped first, see
            [`unwrap_model`][picomaml.meta.backbone.unwrap_model]); its ``.grad`` fields, parameters and
            train/eval mode are left as they were. Needs full (unsharded) weights, so call it on one rank with
            a non-FSDP model.
        batch: (B, L) long token ids, on the model's device.
        layers: Module-name suffixes to capture.
        seq_idx: Sequence position of the recorded activations (negative counts from the end).
        loss_fn: ``loss_fn(model, batch) -> scalar`` whose gradient is recorded; default
            [`next_token_loss`][picomaml.train.dynamics.next_token_loss].
        eval_mode: Run the forward in eval mode (no dropout), then restore the previous mode.

    Returns:
        ``{"activations": {name: (B, out)}, "weights": {name: weight}, "gradients": {name: weight-shaped}}``,
        float32 CPU tensors detached from the graph. Modules without a ``weight`` parameter get
        activations only.
    """
    if not isinstance(batch, Tensor) or batch.dim() != 2:
        raise ValueError(
            f"batch: expected a (B, L) tensor of token ids, got {getattr(batch, 'shape', type(batch))}"
        )
    length = batch.shape[1]
    if not -length <= seq_idx < length:
        raise ValueError(f"seq_idx: {seq_idx} is outside a sequence of length {length}")
    model = unwrap_model(model)
    modules = select_modules(model, layers)
    loss_fn = loss_fn or next_token_loss
    activations: dict[str, Tensor] = {}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            if out.dim() < 2:
                raise ValueError(f"{name}: output of shape {tuple(out.shape)} has no sequence dimension")
            # (B, L, ...) -> (B, ...) at seq_idx; flattened trailing dims keep pico-analyze's (B, d) shape
            activations[name] = out.detach()[:, seq_idx].reshape(out.shape[0], -1).float().cpu().clone()

        return hook

    weights = {
        name: m.weight for name, m in modules.items() if isinstance(getattr(m, "weight", None), Tensor)
    }
    was_training = model.training
    handles = [m.register_forward_hook(make_hook(name)) for name, m in modules.items()]
    handles += _fused_hooks(model, modules)
    try:
        if eval_mode:
            model.eval()
        # eagerly under compile_backbone: one batch per checkpoint does not pay for a graph with these hooks
        with torch.enable_grad(), eager_mode(model):
            loss = loss_fn(model, batch)
            trainable = {n: w for n, w in weights.items() if w.requires_grad}
            grads = (
                torch.autograd.grad(loss, list(trainable.values()), allow_unused=True) if trainable else ()
            )
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    silent = [name for name in modules if name not in activations]
    if silent:
        raise ValueError(
            f"layers: {silent[:5]} produced no activations in the forward (a module that is never called); "
            "choose modules the model runs"
        )
    gradients = {
        name: (g if g is not None else torch.zeros_like(trainable[name])).detach().float().cpu().clone()
        for name, g in zip(trainable, grads, strict=True)
    }
    return {
        "activations": activations,
        "weights": {n: w.detach().float().cpu().clone() for n, w in weights.items()},
        "gradients": gradients,
    }


def _fused_hooks(model: nn.Module, modules: Mapping[str, nn.Module]) -> list[Any]:
    """Pre-hooks on the parents of fused children (``parent.fused``, e.g. PicoDecoder's q/k/v and gate/up
    projections, applied inside one matmul): they run each requested child on the parent's input once,
    so its forward hook records the output the fused matmul computes."""
    parents = {name: m for name, m in model.named_modules()}
    by_parent: dict[str, list[nn.Module]] = {}
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        if child in getattr(parents.get(parent), "fused", ()):
            by_parent.setdefault(parent, []).append(module)
    handles = []
    for parent, children in by_parent.items():

        def pre_hook(_module: nn.Module, inputs: tuple, children: list[nn.Module] = children) -> None:
            with torch.no_grad():
                for child in children:
                    child(inputs[0])

        handles.append(parents[parent].register_forward_pre_hook(pre_hook))
    return handles


def save_learning_dynamics(
    directory: str | os.PathLike[str],
    split: str,
    data: Mapping[str, Mapping[str, Tensor]],
    subdir: str | None = SUBDIR,
) -> list[Path]:
    """Write ``directory/learning_dynamics/{split}_{kind}.pt`` for each kind in ``data``.

    Args:
        directory: A checkpoint directory (or any directory).
        split: ``"train"``, ``"val"`` or another name (letters, digits, ``_-``).
        data: What [`capture_learning_dynamics`][picomaml.train.dynamics.capture_learning_dynamics] returned.
        subdir: Subdirectory to write into (``None`` writes into ``directory`` itself, as a
            [`picomaml.train.checkpoint.save_checkpoint`][picomaml.train.checkpoint.save.save_checkpoint]
            writer does).

    Returns:
        The written files.
    """
    if not split or not all(c.isalnum() or c in "_-" for c in split):
        raise ValueError(f"split: expected a name like 'train' or 'val', got {split!r}")
    unknown = sorted(set(data) - set(KINDS))
    if unknown:
        raise ValueError(f"data: unknown kinds {unknown}; allowed: {list(KINDS)}")
    out = Path(directory) if subdir is None else Path(directory) / subdir
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, tensors in data.items():
        path = out / f"{split}_{kind}.pt"
        torch.save(dict(tensors), path)
        written.append(path)
    return written


def load_learning_dynamics(
    directory: str | os.PathLike[str], split: str, subdir: str | None = SUBDIR
) -> dict[str, dict[str, Tensor]]:
    """Read back what [`save_learning_dynamics`][picomaml.train.dynamics.save_learning_dynamics] wrote (the
    kinds present on disk)."""
    base = Path(directory) if subdir is None else Path(directory) / subdir
    result = {}
    for kind in KINDS:
        path = base / f"{split}_{kind}.pt"
        if path.exists():
            result[kind] = torch.load(path, map_location="cpu", weights_only=True)
    if not result:
        raise FileNotFoundError(f"no learning-dynamics files for split {split!r} under {base}")
    return result


def learning_dynamics_writer(
    splits: Mapping[str, Mapping[str, Mapping[str, Tensor]]],
) -> Callable[[Path], None]:
    """A [`picomaml.train.checkpoint.save_checkpoint`][picomaml.train.checkpoint.save.save_checkpoint] writer
    for captured dynamics.

    Examples:
        >>> save_checkpoint(root, step, state, writers={  # doctest: +SKIP
        ...     "learning_dynamics": learning_dynamics_writer({"train": train_data, "val": val_data})})
    """

    def write(directory: Path) -> None:
        for split, data in splits.items():
            save_learning_dynamics(directory, split, data, subdir=None)

    return write


def capture_splits(
    model: nn.Module, rows: Mapping[str, Tensor], config: DynamicsConfig
) -> dict[str, dict[str, dict[str, Tensor]]]:
    """[`capture_learning_dynamics`][picomaml.train.dynamics.capture_learning_dynamics] on each split's fixed
    rows (``{"train": (B, L), "val": ...}``) with the layers and position of ``config``; a split without rows
    is left out."""
    return {
        split: capture_learning_dynamics(model, batch, config.layers, config.seq_idx)
        for split, batch in rows.items()
        if batch.shape[0]
    }
