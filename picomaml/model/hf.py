"""Export a [`PicoDecoder`][picomaml.model.decoder.PicoDecoder] to ``transformers``' Llama and import it back.

The two models share the architecture exactly (pre-norm RMSNorm, rotate-half RoPE, GQA, SwiGLU, no
biases), so the conversion is a renaming of state-dict keys with no permutation. ``transformers`` is
imported lazily (``pip install 'picomaml[hf]'``).

Import reads a folder's ``config.json`` first: ``model_type`` ``"llama"`` loads with ``transformers``
(never trusting remote code), a pico-train folder goes to
[`picomaml.model.pico_train`][picomaml.model.pico_train] (read without executing its code), and anything else
is refused, so no folder ever triggers a ``trust_remote_code`` prompt.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from picomaml._optional import require
from picomaml.model.config import PicoDecoderConfig
from picomaml.model.pico_train import (
    PICO_TRAIN_CONFIG_KEYS,
    PICO_TRAIN_MODEL_TYPE,
    is_pico_train_config,
    state_from_pico_train,
)

__all__ = ["to_hf", "state_from_hf", "export_hf", "hf_config", "pico_config_from_hf", "pico_to_hf_key", "pico_state_keys"]

# PicoDecoder submodule name -> LlamaForCausalLM submodule name, per layer.
_LAYER_NAMES = {
    "attention.q_proj": "self_attn.q_proj",
    "attention.k_proj": "self_attn.k_proj",
    "attention.v_proj": "self_attn.v_proj",
    "attention.o_proj": "self_attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
}


def pico_to_hf_key(key: str) -> str:
    """Map a PicoDecoder state-dict key to the LlamaForCausalLM key holding the same tensor."""
    if key.startswith("lm_head."):
        return key
    if key.startswith("layers."):
        _, idx, rest = key.split(".", 2)
        module, _, param = rest.rpartition(".")
        if module not in _LAYER_NAMES:
            raise KeyError(f"no Llama counterpart for PicoDecoder key {key!r}")
        return f"model.layers.{idx}.{_LAYER_NAMES[module]}.{param}"
    return f"model.{key}"


def pico_state_keys(config: PicoDecoderConfig) -> list[str]:
    """The state-dict keys of a PicoDecoder of this architecture (its persistent tensors)."""
    layers = [f"layers.{i}.{m}.weight" for i in range(config.n_layers) for m in _LAYER_NAMES]
    return ["embed_tokens.weight", *layers, "norm.weight", "lm_head.weight"]


def hf_config(config: PicoDecoderConfig, **overrides: Any) -> Any:
    """The ``transformers.LlamaConfig`` of the same architecture (``overrides`` go to LlamaConfig)."""
    transformers = require("transformers", "hf", "export to Hugging Face Llama")
    kwargs: dict[str, Any] = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
        tie_word_embeddings=config.tie_embeddings,
        initializer_range=config.init_std,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        attn_implementation="sdpa",
    )
    kwargs.update(overrides)
    return transformers.LlamaConfig(**kwargs)


def to_hf(model: Any, **config_overrides: Any) -> Any:
    """Build a ``transformers.LlamaForCausalLM`` with ``model``'s weights (same dtype; CPU-built, then moved).

    Args:
        model: The decoder to export.
        **config_overrides: Extra ``LlamaConfig`` keyword arguments (e.g. ``bos_token_id``).

    Returns:
        ``LlamaForCausalLM`` in eval mode whose logits equal ``model``'s.
    """
    transformers = require("transformers", "hf", "export to Hugging Face Llama")
    if not isinstance(getattr(model, "config", None), PicoDecoderConfig) or not hasattr(model, "state_dict"):
        raise TypeError(f"model: expected a PicoDecoder, got {type(model).__name__}")
    ref = model.embed_tokens.weight
    hf = transformers.LlamaForCausalLM(hf_config(model.config, **config_overrides))
    hf.to(dtype=ref.dtype, device=ref.device)
    state = {pico_to_hf_key(k): v for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if model.config.tie_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise RuntimeError(f"weight mapping mismatch: missing {missing}, unexpected {unexpected}")
    if (
        model.config.tie_embeddings
        and hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr()
    ):
        hf.tie_weights()
    return hf.eval()


def pico_config_from_hf(hf_cfg: Any) -> PicoDecoderConfig:
    """The [`PicoDecoderConfig`][picomaml.model.config.PicoDecoderConfig] of a ``LlamaConfig``; rejects
    features PicoDecoder lacks.

    Raises:
        ValueError: not a Llama config, biases, a non-SiLU activation, rope scaling, or a head_dim that
            differs from ``hidden_size // num_attention_heads``.
    """
    model_type = getattr(hf_cfg, "model_type", None)
    if model_type != "llama":
        raise ValueError(f"model: only Llama models can be imported, got model_type {model_type!r}")
    if getattr(hf_cfg, "attention_bias", False) or getattr(hf_cfg, "mlp_bias", False):
        raise ValueError(
            "model: attention_bias / mlp_bias are not supported by PicoDecoder (it has no biases)"
        )
    if getattr(hf_cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"model: hidden_act {hf_cfg.hidden_act!r} is not supported; PicoDecoder uses 'silu'")
    rope = dict(getattr(hf_cfg, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"model: rope scaling {rope_type!r} is not supported; only 'default' RoPE")
    theta = rope.get("rope_theta", getattr(hf_cfg, "rope_theta", 10000.0))
    head_dim = getattr(hf_cfg, "head_dim", None)
    if head_dim is not None and head_dim != hf_cfg.hidden_size // hf_cfg.num_attention_heads:
        raise ValueError(
            f"model: head_dim {head_dim} != hidden_size / num_attention_heads; PicoDecoder derives head_dim"
        )
    return PicoDecoderConfig(
        vocab_size=hf_cfg.vocab_size,
        d_model=hf_cfg.hidden_size,
        n_layers=hf_cfg.num_hidden_layers,
        n_heads=hf_cfg.num_attention_heads,
        n_kv_heads=hf_cfg.num_key_value_heads or hf_cfg.num_attention_heads,
        ffn_dim=hf_cfg.intermediate_size,
        max_seq_len=hf_cfg.max_position_embeddings,
        rope_theta=float(theta),
        norm_eps=float(hf_cfg.rms_norm_eps),
        tie_embeddings=bool(hf_cfg.tie_word_embeddings),
        init_std=float(getattr(hf_cfg, "initializer_range", 0.02) or 0.02),
    )


def _folder_model_type(folder: Path) -> tuple[Any, dict[str, Any]]:
    """``(model_type, config)`` of a ``save_pretrained`` folder, read as JSON (no code runs)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"model_or_path: {str(folder)!r} has no config.json; not a Hugging Face model folder"
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"model_or_path: {str(config_path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"model_or_path: {str(config_path)!r} does not hold a JSON object")
    return config.get("model_type"), config


def state_from_hf(model_or_path: Any) -> tuple[PicoDecoderConfig, dict[str, torch.Tensor], torch.dtype]:
    """The config and PicoDecoder state dict of a ``LlamaForCausalLM``, a ``save_pretrained`` directory, or
    a pico-train checkpoint.

    [`picomaml.PicoDecoder.from_hf`][picomaml.model.decoder.PicoDecoder.from_hf] builds the model from these;
    this module never imports the model class, so the model and its converters import in one direction only. A
    directory's ``config.json`` is read first: ``model_type`` ``"llama"`` loads with
    ``AutoModelForCausalLM.from_pretrained`` (remote code never trusted), a pico-train folder (``model_type``
    ``"pico_decoder"``, or ``architectures`` / ``auto_map`` naming ``PicoDecoderHF``) goes to
    [`state_from_pico_train`][picomaml.model.pico_train.state_from_pico_train], anything else is refused.

    Args:
        model_or_path: A loaded Llama causal-LM model (or pico-train ``PicoDecoderHF``), or a directory.

    Returns:
        ``(config, state_dict, dtype)``: the state dict is keyed by PicoDecoder names (tied weights under
        both names) and ``dtype`` is the source weights' dtype.

    Raises:
        FileNotFoundError: not a directory, or no config.json in it.
        ValueError: a model type other than Llama or pico-train (the message names it), or a Llama
            feature PicoDecoder lacks.
    """
    transformers = require("transformers", "hf", "import from Hugging Face Llama")
    hf = model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        folder = Path(model_or_path)
        if not folder.is_dir():
            raise FileNotFoundError(f"model_or_path: {str(model_or_path)!r} is not a directory")
        model_type, folder_config = _folder_model_type(folder)
        if model_type != "llama" and is_pico_train_config(folder_config):
            return state_from_pico_train(folder)
        if model_type != "llama":
            raise ValueError(
                f"model_or_path: {str(folder)!r} has model_type {model_type!r}; PicoDecoder imports "
                f"'llama' (transformers' LlamaForCausalLM) and {PICO_TRAIN_MODEL_TYPE!r} (pico-train's "
                "PicoDecoderHF) folders"
            )
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=False)
    if type(hf).__name__ == "PicoDecoderHF" and hasattr(hf, "pico_decoder"):
        # pico-train's wrapper, already loaded by the caller: its weights and config, none of its code.
        return state_from_pico_train(hf.state_dict(), config=_pico_train_model_config(hf.config))
    if not isinstance(hf, transformers.LlamaForCausalLM):
        raise ValueError(
            f"model_or_path: expected a LlamaForCausalLM or a directory holding one, got {type(hf).__name__}"
        )
    cfg = pico_config_from_hf(hf.config)
    source = hf.state_dict()
    state = {}
    for key in pico_state_keys(cfg):
        tied = cfg.tie_embeddings and key == "lm_head.weight"
        state[key] = source["model.embed_tokens.weight" if tied else pico_to_hf_key(key)]
    return cfg, state, source["model.embed_tokens.weight"].dtype


def _pico_train_model_config(hf_cfg: Any) -> dict[str, Any]:
    """The pico-train model config keys of a loaded ``PicoDecoderHFConfig``."""
    return {k: getattr(hf_cfg, k) for k in PICO_TRAIN_CONFIG_KEYS if getattr(hf_cfg, k, None) is not None}


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' own progress bars on or off for a block, restored after.

    ``save_pretrained`` shows a "Writing model shards" bar even for one shard; a trainer that exports at
    every save would print it into its own progress bar each time.
    """
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if was == enabled:
        yield
        return
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def export_hf(model: Any, path: str | os.PathLike[str], tokenizer: Any = None, *, progress: bool = False) -> Path:
    """Save ``model.to_hf()`` with ``save_pretrained`` (and the tokenizer beside it, when given).

    The tokenizer's ``bos_token_id``, ``eos_token_id`` and ``pad_token_id`` (those it has) go into the
    exported ``config.json`` and ``generation_config.json``, so ``generate`` stops at the end-of-text token.

    Needs ``transformers`` (``pip install 'picomaml[hf]'``). Usable as a checkpoint writer:
    ``save_checkpoint(..., writers={"hf": lambda d: export_hf(model, d, tokenizer)})``.

    Args:
        model: A [`picomaml.PicoDecoder`][picomaml.model.decoder.PicoDecoder] (anything with ``to_hf()``).
        path: Output directory (created).
        tokenizer: Optional object with ``save_pretrained(path)`` (a ``transformers`` tokenizer).
        progress: Show transformers' "Writing model shards" progress bar (off: a save inside a training
            loop would print one per checkpoint).
    """
    require("transformers", "hf", "Hugging Face export")
    if not callable(getattr(model, "to_hf", None)):
        raise TypeError(f"model: expected an object with to_hf() (a PicoDecoder), got {type(model).__name__}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    special = {
        f"{role}_token_id": tid
        for role in ("bos", "eos", "pad")
        if isinstance(tid := getattr(tokenizer, f"{role}_token_id", None), int) and not isinstance(tid, bool)
    }
    with _progress_bars(progress):
        model.to_hf(**special).save_pretrained(path)
    if tokenizer is not None:
        if not callable(getattr(tokenizer, "save_pretrained", None)):
            raise TypeError(
                f"tokenizer: expected an object with save_pretrained(), got {type(tokenizer).__name__}"
            )
        tokenizer.save_pretrained(str(path))
    return path
