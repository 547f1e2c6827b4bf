"""What picomaml needs from a backbone, and how it gets it from each kind of model.

A backbone gives *logits* for the next-token loss and *hidden states* (before the vocabulary projection)
for the meta objective. Three kinds are recognised, in this order:

1. ``features=``: a callable ``ids (B, L) long -> hidden (B, L, D)`` passed by the caller (e.g. a method of
   the user's model that runs it without its output layer). Always wins.
2. A [`PicoDecoder`][picomaml.model.decoder.PicoDecoder] (anything with a ``hidden_states(ids)`` method), or a
   module whose ``forward`` takes ``return_hidden=True`` and returns ``(logits, hidden)``.
3. A ``transformers`` model: a causal LM is run through its base model (``model.base_model``, which returns
   ``last_hidden_state``) so the vocabulary projection is never computed; a bare base model is run as is.

[`lm_logits`][picomaml.meta.backbone.lm_logits] accepts any module whose output is logits ``(B, L, V)``: a
tensor, a tuple whose first item they are, or an object with ``.logits`` (a ``transformers`` ``ModelOutput``).
For ``transformers`` models ``use_cache=False`` is passed, so no KV cache is built during training.

[`decoder_layout`][picomaml.meta.backbone.decoder_layout] finds the block list and final norm of a decoder for
``adapt_layers`` ([`picomaml.meta.top_blocks`][picomaml.meta.top_blocks]): PicoDecoder, Llama-style
(``model.layers``, ``model.norm``) and GPT-2-style (``transformer.h``, ``transformer.ln_f``) ``transformers``
models, and other families with the same names.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FEATURES_CONTRACT",
    "DecoderLayout",
    "backbone_hidden",
    "decoder_layout",
    "hidden_size",
    "is_transformers_model",
    "lm_logits",
    "next_token_ce",
    "next_token_loss",
    "no_cache_kwargs",
    "unwrap_model",
    "find_ddp",
    "ddp_step",
    "strip_wrapper_prefix",
    "vocab_size",
    "compiled_loss",
    "is_compiled",
    "eager_forward",
    "eager_hidden_states",
]

FEATURES_CONTRACT = (
    "pass features=: a callable ids (B, L) long -> hidden (B, L, D) float, e.g. a method of your model that runs "
    "it without its output layer (a PicoDecoder, a transformers model or a module whose forward takes "
    "return_hidden=True needs none)"
)
_BLOCK_LISTS = ("layers", "h", "blocks", "block")
_FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f", "final_norm")


def is_transformers_model(model: Any) -> bool:
    """True for a ``transformers`` ``PreTrainedModel`` (checked by its base classes, no import)."""
    return any(
        cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers")
        for cls in type(model).__mro__
    )


# wrapper class name -> the attribute holding the wrapped module
_WRAPPERS = {
    "_FabricModule": "module",
    "DistributedDataParallel": "module",
    "DataParallel": "module",
    "OptimizedModule": "_orig_mod",
}
# what the wrappers put in front of the wrapped module's parameter names
_WRAPPER_PREFIXES = ("_forward_module.", "module.", "_orig_mod.", "base_model.model.")


def _layers(model: nn.Module) -> list[nn.Module]:
    """``model`` and every module its wrappers hold, outermost first (wrappers nest at most a few deep)."""
    layers = [model]
    for _ in range(8):
        if type(model).__name__.startswith("Peft") and callable(getattr(model, "get_base_model", None)):
            inner = model.get_base_model()
        else:
            attr = _WRAPPERS.get(type(model).__name__)
            inner = getattr(model, attr, None) if attr else None
        if not isinstance(inner, nn.Module) or inner is model:
            break
        layers.append(inner)
        model = inner
    return layers


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside Lightning Fabric, DDP / DataParallel, ``torch.compile`` and peft wrappers.

    The meta objective runs the unwrapped module: it re-runs parts of it functionally (which a compiled
    graph cannot) and names its tensors without the wrappers' prefixes. A peft ``PeftModel`` unwraps to
    its base model, which holds the injected adapter tensors (``...q_proj.lora_A.default.weight``). A DDP
    wrapper's gradient all-reduce is kept by [`ddp_step`][picomaml.meta.backbone.ddp_step].
    """
    return _layers(model)[-1]


def find_ddp(model: nn.Module) -> nn.Module | None:
    """The ``DistributedDataParallel`` wrapper among ``model``'s wrappers, or ``None``."""
    return next((m for m in _layers(model) if type(m).__name__ == "DistributedDataParallel"), None)


@contextlib.contextmanager
def ddp_step(ddp: nn.Module) -> Iterator[Callable[[Tensor], Tensor]]:
    """Frame a computation on a DDP-wrapped module as DDP's own forward frames the module's call.

    The meta objective calls the wrapped module's methods (``hidden_states``, its blocks), never DDP's
    ``forward``; without that frame the backward would not all-reduce the gradients. Inside, DDP has
    prepared its reducer (and synced buffers) as before a forward; the yielded function hands DDP the loss,
    as it would the forward's output, and returns the tensor to back-propagate. Uses DDP's ``_pre_forward``
    / ``_post_forward`` (the two halves of ``DistributedDataParallel.forward``).
    """
    if not (callable(getattr(ddp, "_pre_forward", None)) and callable(getattr(ddp, "_post_forward", None))):
        raise TypeError(
            "model: this torch's DistributedDataParallel has no _pre_forward/_post_forward; wrap the module that "
            "calls meta_loss (HybridLearner) in DDP instead of the backbone"
        )
    ddp._pre_forward()
    yield ddp._post_forward


def strip_wrapper_prefix(name: str) -> str:
    """A parameter name of a wrapped model as the unwrapped model names it (see
    [`unwrap_model`][picomaml.meta.backbone.unwrap_model])."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def _hf_base(model: nn.Module) -> nn.Module:
    """The base model of a ``transformers`` model (itself for a bare base model)."""
    base = getattr(model, "base_model", model)
    return base if isinstance(base, nn.Module) else model


def no_cache_kwargs(module: nn.Module) -> dict[str, bool]:
    """``{"use_cache": False}`` for a module whose config has ``use_cache`` (a ``transformers`` model), else
    ``{}``: a training forward builds no KV cache."""
    return {"use_cache": False} if hasattr(getattr(module, "config", None), "use_cache") else {}


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def backbone_hidden(
    model: nn.Module | None, ids: Tensor, features: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """Final hidden states ``(B, L, D)`` of ``ids`` ``(B, L)``, never computing the vocabulary projection.

    Args:
        model: The backbone (see the module docstring for the kinds recognised); may be ``None`` with
            ``features``.
        ids: ``(B, L)`` long token ids.
        features: ``ids -> (B, L, D)``, used instead of ``model``.

    Returns:
        ``(B, L, D)`` hidden states (the input of the LM head: after the final norm).

    Raises:
        TypeError: ``model`` is of no recognised kind; the message states the ``features=`` contract.
    """
    if features is not None:
        return features(ids)
    if model is None:
        raise TypeError(f"model: None gives no hidden states; {FEATURES_CONTRACT}")
    if callable(getattr(model, "hidden_states", None)):
        return model.hidden_states(ids)  # a PicoDecoder: skips the LM head
    if is_transformers_model(model):
        base = _hf_base(model)
        out = base(input_ids=ids, **no_cache_kwargs(base))
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            raise TypeError(
                f"model: the base model of {type(model).__name__} ({type(base).__name__}) returned "
                f"{type(out).__name__} without last_hidden_state; {FEATURES_CONTRACT}"
            )
        return hidden
    if _accepts(model.forward, "return_hidden"):
        out = model(ids, return_hidden=True)
        if isinstance(out, tuple) and len(out) >= 2 and isinstance(out[1], Tensor):
            return out[1]
    raise TypeError(
        f"model: {type(model).__name__} has neither hidden_states(ids) nor forward(ids, return_hidden=True) and "
        f"is not a transformers model; {FEATURES_CONTRACT}"
    )


def lm_logits(model: nn.Module, ids: Tensor) -> Tensor:
    """Next-token logits ``(B, L, V)`` of ``ids`` ``(B, L)`` from any language model.

    Raises:
        TypeError: the output holds no logits tensor.
        ValueError: the logits are not ``(B, L, V)`` for these ids (e.g. a forward that returns only the
            last position's logits at inference, as nanoGPT does without targets).
    """
    if is_transformers_model(model):
        out = model(input_ids=ids, **no_cache_kwargs(model))
    else:
        out = model(ids)
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) and out else out
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(
            f"model: {type(model).__name__}(ids) returned {type(out).__name__}; lm_loss needs logits (B, L, V): a "
            "float tensor, a tuple whose first item they are, or an object with .logits"
        )
    if logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise ValueError(
            f"model: logits of shape {tuple(logits.shape)} for ids {tuple(ids.shape)}; lm_loss needs one row of "
            "logits per position, (B, L, V) (a forward that returns only the last position needs its "
            "training mode, e.g. targets)"
        )
    return logits


# On CPU a PicoDecoder's vocabulary projection and loss run over row chunks of at most this many bytes of
# float32 logits: glibc serves blocks above its largest mmap threshold (32 MiB) with fresh pages every step,
# and faulting in the (B*L, V) logits and their gradient cost about 7 % of a compiled tiny-preset step at
# V = 8192 (36k page faults a step, against 4-13k in 16 MiB chunks). At most _LOSS_MAX_CHUNKS chunks, so
# the compiled graph stays small.
_LOSS_CHUNK_BYTES, _LOSS_MAX_CHUNKS = 16 * 2**20, 16


def next_token_loss(model: nn.Module, ids: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of [`lm_logits`][picomaml.meta.backbone.lm_logits] ``(B, L, V)`` of ``ids`` against
    ``targets`` ``(B, L)``.

    No target checks ([`picomaml.lm_loss`][picomaml.meta.objectives.lm_loss] makes them): the function that
    [`picomaml.train.compile.compile_backbone`][picomaml.train.compile.compile_backbone] compiles whole, so
    the loss fuses with the vocabulary projection. Half-precision logits are upcast to float32 first. For a
    PicoDecoder on CPU the projection and the loss run over chunks of rows (at most 16 MiB of logits each),
    the same loss: the model is called through ``hidden_states`` and ``lm_head`` (its own forward hooks do not
    run, the head's run once per chunk).
    """
    rows = _loss_chunk_rows(model, ids)
    if rows is None:
        return next_token_ce(lm_logits(model, ids), targets, ignore_index)
    hidden, flat_targets = model.hidden_states(ids).flatten(0, 1), targets.reshape(-1)
    head = model.lm_head
    total = sum(
        _ce_sum(head(h), t, ignore_index) for h, t in zip(hidden.split(rows), flat_targets.split(rows), strict=True)
    )
    return total / (flat_targets != ignore_index).sum()


def _loss_chunk_rows(model: nn.Module, ids: Tensor) -> int | None:
    """Rows per chunk of [`next_token_loss`][picomaml.meta.backbone.next_token_loss] for a PicoDecoder on CPU;
    ``None``: one chunk."""
    from picomaml.model.decoder import PicoDecoder

    if not isinstance(model, PicoDecoder) or ids.device.type != "cpu":
        return None
    n = ids.numel()
    rows = max(-(-n // _LOSS_MAX_CHUNKS), _LOSS_CHUNK_BYTES // (4 * model.config.vocab_size), 1)
    return rows if rows < n else None


def next_token_ce(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of logits ``(B, L, V)`` against ``targets`` ``(B, L)``, in float32 or wider.

    Targets equal to ``ignore_index`` are left out of the mean (all ignored: NaN, as ``F.cross_entropy``).
    """
    flat, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if torch.compiler.is_compiling():
        return _ce_sum(flat, flat_targets, ignore_index) / (flat_targets != ignore_index).sum()
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    return F.cross_entropy(flat, flat_targets, ignore_index=ignore_index)


def _ce_sum(logits: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    """Summed cross-entropy of ``logits`` ``(N, V)`` against ``targets`` ``(N,)`` over the counted targets."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if not torch.compiler.is_compiling():
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    # The same loss as logsumexp - the target's logit. Inductor's CPU code for F.cross_entropy's backward
    # re-derives each row's gradient sum from the one-hot targets in a scalar loop over the vocabulary (6 %
    # of a compiled tiny-preset step at V = 8192); this form's backward needs no such sum.
    keep = targets != ignore_index
    hit = torch.arange(logits.shape[-1], device=logits.device) == targets.unsqueeze(1)  # no hit if ignored
    picked = torch.where(hit, logits, 0).sum(-1)
    return torch.where(keep, torch.logsumexp(logits, dim=-1) - picked, 0).sum()


def vocab_size(model: Any) -> int | None:
    """The vocabulary size ``V`` from ``model.config.vocab_size``, or ``None`` when the model does not say."""
    value = getattr(getattr(model, "config", None), "vocab_size", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def hidden_size(model: Any) -> int | None:
    """The width ``D`` of the hidden states, from ``model.config`` (``d_model``, ``hidden_size`` or
    ``n_embd``), or ``None`` when the model does not say."""
    config = getattr(model, "config", None)
    for key in ("d_model", "hidden_size", "n_embd"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


class DecoderLayout(NamedTuple):
    """Where a decoder keeps its blocks.

    Attributes:
        base: The module that runs embeddings, blocks and the final norm (the model itself for a
            PicoDecoder, ``model.base_model`` for a ``transformers`` model).
        blocks: The transformer blocks in order (an ``nn.ModuleList``).
        norm: The final norm after the last block, or ``None`` when the decoder has none.
        prefix: The dotted name of ``blocks`` inside the model (``"layers"``, ``"model.layers"``,
            ``"transformer.h"``, ...), so adapted tensors carry the model's own parameter names.
        norm_prefix: The dotted name of ``norm`` inside the model (``""`` when there is none).
    """

    base: nn.Module
    blocks: nn.ModuleList
    norm: nn.Module | None
    prefix: str
    norm_prefix: str


def decoder_layout(model: nn.Module) -> DecoderLayout:
    """Find the block list and final norm of a decoder or encoder (for ``adapt_layers`` and ``adapt``).

    The blocks are the ``nn.ModuleList`` named one of ``layers``/``h``/``blocks``/``block`` on the base
    model (PicoDecoder, Llama-, GPT-2-, GPT-NeoX-style), else the ``nn.ModuleList`` holding the most
    parameters anywhere in it (OPT's ``decoder.layers``, BERT's ``encoder.layer``, a nanoGPT-style
    ``transformer.h``); the final norm is an attribute named like ``norm``/``ln_f``/``final_layer_norm`` of
    the module that holds the blocks. Whether re-running them reproduces the model is checked separately
    ([`picomaml.meta.top_blocks.TopBlocks.reproduces`][picomaml.meta.top_blocks.TopBlocks.reproduces]).

    Raises:
        TypeError: the model holds no ``nn.ModuleList``; the message names ``adapt_layers``.
    """
    base = _hf_base(model) if is_transformers_model(model) else model
    names = {id(m): n for n, m in model.named_modules()}
    parent, blocks = base, None
    for attr in _BLOCK_LISTS:
        found = getattr(base, attr, None)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            blocks = found
            break
    if blocks is None:
        lists = [
            (sum(p.numel() for p in m.parameters()), name, m)
            for name, m in base.named_modules()
            if isinstance(m, nn.ModuleList) and len(m) > 0
        ]
        if not lists:
            raise TypeError(
                f"adapt_layers: cannot find the blocks of {type(model).__name__}: it holds no nn.ModuleList of "
                "blocks; use adapt_layers=0 (head only) or adapt=[...] to name the tensors that adapt"
            )
        _, name, blocks = max(lists, key=lambda x: x[0])
        parent = base.get_submodule(name.rsplit(".", 1)[0]) if "." in name else base
    norm = next((getattr(parent, n) for n in _FINAL_NORMS if isinstance(getattr(parent, n, None), nn.Module)), None)
    norm_prefix = names.get(id(norm), "") if norm is not None else ""
    return DecoderLayout(base, blocks, norm, names[id(blocks)], norm_prefix)


# -- the marks picomaml.train.compile.compile_backbone leaves on a model (read here, so the objectives need not
# import the compile layer) ------------------------------------------------------------------------------

EAGER_ATTR = "_picomaml_eager"  # instance attribute: method name -> eager bound method
LOSS_ATTR = "_picomaml_next_token_loss"  # instance attribute: the compiled forward + cross-entropy


def compiled_loss(model: nn.Module) -> Callable | None:
    """The compiled ``(ids, targets, ignore_index) -> loss`` of a model compiled by
    [`compile_backbone`][picomaml.train.compile.compile_backbone]
    ([`picomaml.meta.backbone.next_token_loss`][picomaml.meta.backbone.next_token_loss] as one graph), or
    ``None``: not compiled, a model whose config gives no ``vocab_size``, or inside
    [`eager_mode`][picomaml.train.compile.eager_mode]. [`picomaml.lm_loss`][picomaml.meta.objectives.lm_loss]
    uses it."""
    fn = model.__dict__.get(LOSS_ATTR)
    return fn if callable(fn) else None


def is_compiled(module: nn.Module) -> bool:
    """True when [`compile_backbone`][picomaml.train.compile.compile_backbone] has compiled ``module``'s
    forward."""
    return "forward" in module.__dict__.get(EAGER_ATTR, {})


def eager_forward(module: nn.Module) -> Callable:
    """The eager ``forward`` of a module compiled by
    [`compile_backbone`][picomaml.train.compile.compile_backbone] (``module.forward`` otherwise).

    Calling it skips the module's own hooks (not its submodules'), as calling ``forward`` always does.
    """
    return module.__dict__.get(EAGER_ATTR, {}).get("forward") or module.forward


def eager_hidden_states(model: nn.Module) -> Callable | None:
    """The eager ``hidden_states`` of a compiled model, ``model.hidden_states`` otherwise (``None`` if none)."""
    eager = model.__dict__.get(EAGER_ATTR, {}).get("hidden_states")
    return eager if eager is not None else getattr(model, "hidden_states", None)
