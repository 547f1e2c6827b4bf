"""Import pico-train checkpoints (pico-lm/pico-train's ``PicoDecoder``) into a picomaml PicoDecoder.

pico-train's decoder is the same architecture as [`PicoDecoder`][picomaml.model.decoder.PicoDecoder] (pre-norm
RMSNorm in float32 with the gain applied last, RoPE on q and k, GQA through SDPA with the default
``1/sqrt(head_dim)`` scale, SwiGLU, no biases, untied
embeddings), with two differences that the import handles:

* **names**: ``embedding_proj``, ``swiglu.w_0/w_1/w_2``, ``swiglu_norm``, ``output_norm``,
  ``de_embedding_proj`` (see `PICO_TRAIN_KEYS`); its Hugging Face folders prefix every key with
  ``pico_decoder.`` (the attribute of its ``PicoDecoderHF`` wrapper).
* **RoPE layout**: pico-train rotates adjacent pairs ``(x[2j], x[2j+1])`` of each head (complex-number
  style); picomaml rotates halves ``(x[j], x[j + head_dim/2])`` (Llama's rotate-half), both by the angle
  ``pos * theta**(-2j/head_dim)``. Reordering each head's q and k projection rows as ``0, 2, 4, ..., 1, 3,
  5, ...`` ([`rope_pair_permutation`][picomaml.model.pico_train.rope_pair_permutation]) turns one
  rotation into the other. The same orthogonal permutation is applied to q and k, so every q.k score, and
  hence the attention output, is unchanged;
  v and o are not touched.

Nothing from the checkpoint is executed: ``config.json`` is read with `json` and the weights with
``safetensors`` or ``torch.load(weights_only=True)``; the ``pico_decoder.py`` that pico-train's
``save_pretrained`` copies into the folder is never imported.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from picomaml._optional import require
from picomaml.model.config import PicoDecoderConfig
from picomaml.params import ConfigError, check_int, check_number

__all__ = [
    "PICO_TRAIN_MODEL_TYPE",
    "PICO_TRAIN_CONFIG_KEYS",
    "PICO_TRAIN_KEYS",
    "is_pico_train_config",
    "pico_train_key",
    "rope_pair_permutation",
    "read_pico_train_folder",
    "state_from_pico_train",
]

# ``model_type`` of pico-train's ``PicoDecoderHFConfig``; its ``architectures`` / ``auto_map`` name these.
PICO_TRAIN_MODEL_TYPE = "pico_decoder"
_PICO_TRAIN_CLASSES = ("PicoDecoderHF", "PicoDecoderHFConfig")
_HF_PREFIX = "pico_decoder."

# pico-train ``ModelConfig`` key -> its default there (None: inferred from the tensor shapes, or required).
_MODEL_KEYS: dict[str, Any] = {
    "model_type": PICO_TRAIN_MODEL_TYPE,
    "d_model": None,
    "n_layers": None,
    "vocab_size": None,
    "batch_size": None,  # pico-train's Attention stores it and never uses it
    "max_seq_len": 2048,
    "attention_n_heads": None,  # no tensor shape tells it: required
    "attention_n_kv_heads": None,
    "activation_hidden_dim": None,
    "norm_eps": 1e-6,
    "position_emb_theta": 10000.0,
}
#: The keys of pico-train's ``ModelConfig`` (what its ``config.json`` and ``asdict(model_config)`` hold).
PICO_TRAIN_CONFIG_KEYS: tuple[str, ...] = tuple(_MODEL_KEYS)
_INT_KEYS = {k for k in _MODEL_KEYS if k not in ("model_type", "norm_eps", "position_emb_theta")}
_FLOAT_KEYS = {"norm_eps", "position_emb_theta"}
# Bookkeeping keys ``save_pretrained`` writes into config.json next to the model keys.
_HF_BOOKKEEPING = {
    "architectures",
    "auto_map",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "_name_or_path",
}

# pico-train per-layer submodule -> picomaml submodule (w_0 goes through SiLU: it is the gate).
_LAYER_KEYS = {
    "attention.q_proj": "attention.q_proj",
    "attention.k_proj": "attention.k_proj",
    "attention.v_proj": "attention.v_proj",
    "attention.o_proj": "attention.o_proj",
    "swiglu.w_0": "mlp.gate_proj",
    "swiglu.w_1": "mlp.up_proj",
    "swiglu.w_2": "mlp.down_proj",
    "attention_norm": "attention_norm",
    "swiglu_norm": "mlp_norm",
}
_TOP_KEYS = {
    "embedding_proj": "embed_tokens",
    "output_norm": "norm",
    "de_embedding_proj": "lm_head",
}
#: pico-train module name -> picomaml module name (``{i}`` is the layer index; every tensor is ``.weight``).
PICO_TRAIN_KEYS: dict[str, str] = {
    **_TOP_KEYS,
    **{f"layers.{{i}}.{k}": f"layers.{{i}}.{v}" for k, v in _LAYER_KEYS.items()},
}
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)\.weight")
_SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
_TORCH_BIN = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def is_pico_train_config(hf_config: Mapping[str, Any]) -> bool:
    """True when a ``config.json`` (as a dict) is pico-train's: its ``model_type`` is ``"pico_decoder"`` or
    its ``architectures`` / ``auto_map`` name ``PicoDecoderHF`` / ``PicoDecoderHFConfig``."""
    if hf_config.get("model_type") == PICO_TRAIN_MODEL_TYPE:
        return True
    names = list(hf_config.get("architectures") or [])
    auto_map = hf_config.get("auto_map") or {}
    if isinstance(auto_map, Mapping):
        names += [str(v).rpartition(".")[2] for v in auto_map.values()]
    return any(name in _PICO_TRAIN_CLASSES for name in names)


def pico_train_key(key: str) -> str:
    """Map a pico-train state-dict key (without the ``pico_decoder.`` prefix) to the picomaml key.

    Raises:
        ValueError: ``key`` is not a weight of pico-train's decoder (the message names it).
    """
    module, _, param = key.rpartition(".")
    if param == "weight":
        if module in _TOP_KEYS:
            return f"{_TOP_KEYS[module]}.weight"
        match = _LAYER_RE.fullmatch(key)
        if match and match.group(2) in _LAYER_KEYS:
            return f"layers.{match.group(1)}.{_LAYER_KEYS[match.group(2)]}.weight"
    raise ValueError(f"state dict: {key!r} is not a weight of pico-train's PicoDecoder")


def rope_pair_permutation(n_heads: int, head_dim: int) -> torch.Tensor:
    """Row order that turns pico-train's adjacent-pair RoPE into picomaml's rotate-half RoPE.

    For a q or k projection weight ``w`` of shape ``(n_heads * head_dim, d_model)`` from pico-train,
    ``w[perm]`` is the picomaml weight: within each head, the rows ``0, 2, 4, ...`` (pico-train's real
    parts) come first, then ``1, 3, 5, ...`` (its imaginary parts). pico-train rotates ``(x[2j], x[2j+1])``
    and picomaml ``(y[j], y[j + head_dim/2])`` by the same angle, so with ``y = x[perm]`` the rotated
    vectors are the same entries in another order, and q.k is unchanged when q and k share the order.

    Args:
        n_heads: Heads laid side by side in the rows (query heads for q, KV heads for k).
        head_dim: Width of one head (even).

    Returns:
        (n_heads * head_dim,) long index tensor.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim: {head_dim} must be even for rotary embeddings")
    within = torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))
    return (torch.arange(n_heads)[:, None] * head_dim + within).reshape(-1)


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of one weights file: safetensors, or a torch pickle read with ``weights_only=True``."""
    if path.suffix == ".safetensors":
        safetensors_torch = require("safetensors.torch", "hf", "read safetensors weights")
        return safetensors_torch.load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(
            f"{str(path)!r}: expected a state dict (a mapping of name -> tensor), got {type(state).__name__}"
        )
    return dict(state)


def _load_folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``save_pretrained`` folder (one file or shards with an index; safetensors first)."""
    for name in (*_SAFETENSORS, *_TORCH_BIN):
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return _load_weights(path)
        weight_map = json.loads(path.read_text()).get("weight_map") or {}
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(_load_weights(folder / shard))
        return state
    raise FileNotFoundError(
        f"{str(folder)!r}: no weights found; expected one of {', '.join(_SAFETENSORS + _TORCH_BIN)}"
    )


def read_pico_train_folder(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config, state_dict)`` of a pico-train Hugging Face folder, read without executing any of it.

    Args:
        path: A folder written by pico-train's ``convert_to_hf_model().save_pretrained(path)``.

    Returns:
        The ``config.json`` dict and the raw state dict (pico-train names, ``pico_decoder.`` prefix kept).

    Raises:
        FileNotFoundError: no such folder, no ``config.json`` or no weights file in it.
        ValueError: ``config.json`` is not pico-train's (the message names its ``model_type``).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"path: {str(path)!r} is not a directory")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(folder)!r}: no config.json; not a Hugging Face model folder")
    config = json.loads(config_path.read_text())
    if not isinstance(config, dict) or not is_pico_train_config(config):
        model_type = config.get("model_type") if isinstance(config, dict) else None
        raise ValueError(
            f"{str(config_path)!r}: not a pico-train checkpoint (model_type {model_type!r}; pico-train "
            f"writes {PICO_TRAIN_MODEL_TYPE!r} with architectures ['PicoDecoderHF'])"
        )
    return config, _load_folder_weights(folder)


def _config_values(config: Any, strict: bool) -> dict[str, Any]:
    """pico-train ``ModelConfig`` keys given by ``config`` (a dict, a dataclass or a PicoDecoderConfig)."""
    if isinstance(config, PicoDecoderConfig):
        if config.tie_embeddings:
            raise ValueError(
                "config: tie_embeddings=True, but pico-train's decoder never ties its embeddings "
                "(embedding_proj and de_embedding_proj are separate weights)"
            )
        return {
            "d_model": config.d_model,
            "n_layers": config.n_layers,
            "vocab_size": config.vocab_size,
            "max_seq_len": config.max_seq_len,
            "attention_n_heads": config.n_heads,
            "attention_n_kv_heads": config.n_kv_heads,
            "activation_hidden_dim": config.ffn_dim,
            "norm_eps": config.norm_eps,
            "position_emb_theta": config.rope_theta,
        }
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)  # pico-train's own ModelConfig
    if not isinstance(config, Mapping):
        raise TypeError(
            "config: expected a PicoDecoderConfig or a dict of pico-train's model config keys, "
            f"got {type(config).__name__}"
        )
    unknown = sorted(str(k) for k in config if k not in _MODEL_KEYS and k not in _HF_BOOKKEEPING)
    if strict and unknown:
        raise ValueError(
            f"config: unknown pico-train model config key(s) {unknown}; valid keys: {', '.join(_MODEL_KEYS)}"
        )
    model_type = config.get("model_type", PICO_TRAIN_MODEL_TYPE)
    if model_type != PICO_TRAIN_MODEL_TYPE:
        raise ValueError(f"config: model_type {model_type!r} is not pico-train's {PICO_TRAIN_MODEL_TYPE!r}")
    values = {k: config[k] for k in _MODEL_KEYS if k != "model_type" and config.get(k) is not None}
    for key in _INT_KEYS & values.keys():
        values[key] = check_int(f"config.{key}", values[key], ge=1)
    for key in _FLOAT_KEYS & values.keys():
        values[key] = check_number(f"config.{key}", values[key], gt=0)
    return values


def _strip_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the ``pico_decoder.`` prefix of an HF folder's keys (only when every key carries it)."""
    keys = list(state)
    if keys and all(isinstance(k, str) and k.startswith(_HF_PREFIX) for k in keys):
        return {k[len(_HF_PREFIX) :]: v for k, v in state.items()}
    return dict(state)


def _infer(values: dict[str, Any], state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Fill the architecture keys a config left out from the tensor shapes (all but the head count)."""
    values = dict(values)

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise ValueError(f"state dict: missing key {key!r} (needed to infer the architecture)")
        return tuple(state[key].shape)

    if "d_model" not in values or "vocab_size" not in values:
        embedding = shape("embedding_proj.weight")
        if len(embedding) != 2:
            raise ValueError(
                f"state dict: 'embedding_proj.weight' has shape {embedding}; expected (vocab_size, d_model)"
            )
        values.setdefault("vocab_size", embedding[0])
        values.setdefault("d_model", embedding[1])
    if "n_layers" not in values:
        layers = {
            int(m.group(1)) for k in state if (m := _LAYER_RE.fullmatch(k)) and m.group(2) in _LAYER_KEYS
        }
        if not layers:
            raise ValueError("state dict: no 'layers.{i}.*' keys, so n_layers cannot be inferred")
        values["n_layers"] = max(layers) + 1  # a gap shows up as missing keys below
    if "activation_hidden_dim" not in values:
        values["activation_hidden_dim"] = shape("layers.0.swiglu.w_0.weight")[0]
    if "attention_n_heads" not in values:
        raise ValueError(
            "config: attention_n_heads is needed (the number of heads cannot be inferred from tensor "
            "shapes); pass config={'attention_n_heads': ...} (pico-train's model config keys) or a "
            "PicoDecoderConfig"
        )
    if "attention_n_kv_heads" not in values:
        head_dim = values["d_model"] // values["attention_n_heads"]
        kv_rows = shape("layers.0.attention.k_proj.weight")[0]
        if head_dim == 0 or kv_rows % head_dim:
            raise ValueError(
                f"state dict: 'layers.0.attention.k_proj.weight' has {kv_rows} rows, not a multiple of "
                f"head_dim {head_dim} (d_model {values['d_model']} / attention_n_heads "
                f"{values['attention_n_heads']})"
            )
        values["attention_n_kv_heads"] = kv_rows // head_dim
    for key, default in _MODEL_KEYS.items():
        if default is not None:
            values.setdefault(key, default)
    return values


def _expected_shapes(cfg: PicoDecoderConfig) -> dict[str, tuple[int, ...]]:
    """pico-train key -> tensor shape for this architecture."""
    d, f, v = cfg.d_model, cfg.ffn_dim, cfg.vocab_size
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    layer = {
        "attention.q_proj": (q, d),
        "attention.k_proj": (kv, d),
        "attention.v_proj": (kv, d),
        "attention.o_proj": (d, q),
        "swiglu.w_0": (f, d),
        "swiglu.w_1": (f, d),
        "swiglu.w_2": (d, f),
        "attention_norm": (d,),
        "swiglu_norm": (d,),
    }
    shapes = {"embedding_proj.weight": (v, d)}
    for i in range(cfg.n_layers):
        shapes.update({f"layers.{i}.{name}.weight": s for name, s in layer.items()})
    shapes.update({"output_norm.weight": (d,), "de_embedding_proj.weight": (v, d)})
    return shapes


def _names(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def state_from_pico_train(
    path_or_state_dict: str | os.PathLike[str] | Mapping[str, torch.Tensor], config: Any = None
) -> tuple[PicoDecoderConfig, dict[str, torch.Tensor], torch.dtype]:
    """The config and PicoDecoder state dict of a pico-train checkpoint (RoPE permutation applied).

    [`picomaml.PicoDecoder.from_pico_train`][picomaml.model.decoder.PicoDecoder.from_pico_train] builds the
    model from these.

    Args:
        path_or_state_dict: A pico-train Hugging Face folder (``config.json`` plus ``model.safetensors`` or
            ``pytorch_model.bin``, sharded or not), a weights file holding a raw state dict, or the raw
            state dict itself (``pico_decoder.state_dict()``; keys may carry the ``pico_decoder.`` prefix).
        config: For a raw state dict only: a [`PicoDecoderConfig`][picomaml.model.config.PicoDecoderConfig] or
            a dict (or dataclass) of pico-train's model config keys. ``d_model``, ``n_layers``,
            ``vocab_size``, ``activation_hidden_dim`` and ``attention_n_kv_heads`` are inferred from the
            shapes when left out; ``attention_n_heads`` is required; ``max_seq_len``, ``norm_eps`` and
            ``position_emb_theta`` default to pico-train's defaults (2048, 1e-6, 10000.0).

    Returns:
        ``(config, state_dict, dtype)``: the state dict is keyed by PicoDecoder names, its q/k rows
        permuted to the rotate-half layout; ``dtype`` is the source embedding's dtype.

    Raises:
        ValueError: unknown or missing keys, shapes that disagree with the config, a missing head count,
            or a config that is not pico-train's (each message names the key).
        FileNotFoundError: a path that does not exist, or a folder without config.json or weights.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = Path(path_or_state_dict)
        if path.is_dir():
            if config is not None:
                raise ValueError(
                    "config: a pico-train folder carries its own config.json; config= is for raw state dicts"
                )
            folder_config, raw = read_pico_train_folder(path)
            values = _config_values(folder_config, strict=False)
        elif path.is_file():
            raw = _load_weights(path)
            values = _config_values(config, strict=True) if config is not None else {}
        else:
            raise FileNotFoundError(f"path_or_state_dict: {str(path)!r} does not exist")
    elif isinstance(path_or_state_dict, Mapping):
        raw = path_or_state_dict
        values = _config_values(config, strict=True) if config is not None else {}
    else:
        raise TypeError(
            "path_or_state_dict: expected a pico-train folder, a weights file or a state dict, "
            f"got {type(path_or_state_dict).__name__}"
        )

    state = _strip_prefix(raw)
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"state dict: key {key!r} is a {type(key).__name__}, not a str")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state dict: {key!r} holds a {type(value).__name__}, not a tensor")
    values = _infer(values, state)
    try:
        cfg = PicoDecoderConfig(
            vocab_size=values["vocab_size"],
            d_model=values["d_model"],
            n_layers=values["n_layers"],
            n_heads=values["attention_n_heads"],
            n_kv_heads=values["attention_n_kv_heads"],
            ffn_dim=values["activation_hidden_dim"],
            max_seq_len=values["max_seq_len"],
            rope_theta=float(values["position_emb_theta"]),
            norm_eps=float(values["norm_eps"]),
            tie_embeddings=False,  # pico-train has no tying: de_embedding_proj is its own weight
            **({"init_std": config.init_std} if isinstance(config, PicoDecoderConfig) else {}),
        )
    except ConfigError as exc:  # show the values under the names the checkpoint uses
        given = {k: values[k] for k in _MODEL_KEYS if k in values}
        raise ValueError(f"pico-train config {given} is not a valid PicoDecoder: {exc}") from exc

    shapes = _expected_shapes(cfg)
    unknown = [k for k in state if k not in shapes]
    if unknown:
        for key in unknown:  # a key that is no pico-train weight at all gets that message
            pico_train_key(key)
        raise ValueError(
            f"state dict: unexpected key(s) {_names(unknown)} for a pico-train decoder with "
            f"n_layers={cfg.n_layers}"
        )
    missing = [k for k in shapes if k not in state]
    if missing:
        raise ValueError(f"state dict: missing key(s) {_names(missing)}")
    for key, expected in shapes.items():
        got = tuple(state[key].shape)
        if got != expected:
            raise ValueError(
                f"state dict: {key!r} has shape {got} but the config (d_model={cfg.d_model}, "
                f"attention_n_heads={cfg.n_heads}, attention_n_kv_heads={cfg.n_kv_heads}, "
                f"activation_hidden_dim={cfg.ffn_dim}, vocab_size={cfg.vocab_size}) needs {expected}"
            )

    q_perm = rope_pair_permutation(cfg.n_heads, cfg.head_dim)
    k_perm = rope_pair_permutation(cfg.n_kv_heads, cfg.head_dim)
    out: dict[str, torch.Tensor] = {}
    for key in shapes:
        tensor = state[key]
        if key.endswith("attention.q_proj.weight"):
            tensor = tensor[q_perm.to(tensor.device)]
        elif key.endswith("attention.k_proj.weight"):
            tensor = tensor[k_perm.to(tensor.device)]
        out[pico_train_key(key)] = tensor
    return cfg, out, state["embedding_proj.weight"].dtype
