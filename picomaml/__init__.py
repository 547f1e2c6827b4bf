"""picomaml: composable MAML over Subset Masked Language Modeling Tasks for small-LM pretraining.

The public names are resolved lazily (PEP 562), so ``import picomaml`` is cheap and pulls in only the
core dependencies (torch, numpy, pyyaml); optional backends load when first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from picomaml._version import __version__

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # model
    "PicoDecoderConfig": "picomaml.model.config",
    "PicoDecoder": "picomaml.model.decoder",
    "KVCache": "picomaml.model.decoder",
    "export_hf": "picomaml.model.hf",
    # episodes and meta-learning
    "Episode": "picomaml.meta.episode",
    "EpisodeError": "picomaml.meta.episode",
    "SMLMTSampler": "picomaml.meta.sampler",
    "SamplingError": "picomaml.meta.smlmt",
    "MetaHead": "picomaml.meta.head",
    "InnerLoop": "picomaml.meta.inner_loop",
    "InnerLoopOutput": "picomaml.meta.inner_loop",
    "HybridScheduler": "picomaml.meta.hybrid",
    # objectives
    "lm_loss": "picomaml.meta.objectives",
    "meta_loss": "picomaml.meta.objectives",
    "pool_features": "picomaml.meta.objectives",
    "episode_features": "picomaml.meta.objectives",
    "HybridLearner": "picomaml.meta.learner",
    # data
    "load_default_corpus": "picomaml.data.corpus",
    "load_tokenizer": "picomaml.data.tokenizer",
    "PretokenizedStream": "picomaml.data.hub",
    "format_episode": "picomaml.data.display",
    # checkpoints and evaluation
    "save_checkpoint": "picomaml.train.checkpoint",
    "load_checkpoint": "picomaml.train.checkpoint",
    "find_latest": "picomaml.train.checkpoint",
    "capture_learning_dynamics": "picomaml.train.dynamics",
    "perplexity": "picomaml.eval.perplexity",
    "fewshot_eval": "picomaml.eval.fewshot",
    "FewShotResult": "picomaml.eval.fewshot",
    "run_suite": "picomaml.eval.suite",
    "downstream_eval": "picomaml.eval.downstream",
    "load_leopard_file": "picomaml.eval.leopard",
    "ar_step_flops": "picomaml.eval.flops",
    "meta_step_flops": "picomaml.eval.flops",
    # configuration
    "ConfigError": "picomaml.params",
    "ExperimentConfig": "picomaml.train.config",
    "load_config": "picomaml.train.config",
    # optional-dependency errors
    "MissingDependencyError": "picomaml._optional",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'picomaml' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from picomaml._optional import MissingDependencyError
    from picomaml.data.corpus import load_default_corpus
    from picomaml.data.display import format_episode
    from picomaml.data.hub import PretokenizedStream
    from picomaml.data.tokenizer import load_tokenizer
    from picomaml.eval.downstream import downstream_eval
    from picomaml.eval.fewshot import FewShotResult, fewshot_eval
    from picomaml.eval.flops import ar_step_flops, meta_step_flops
    from picomaml.eval.leopard import load_leopard_file
    from picomaml.eval.perplexity import perplexity
    from picomaml.eval.suite import run_suite
    from picomaml.meta.episode import Episode, EpisodeError
    from picomaml.meta.head import MetaHead
    from picomaml.meta.hybrid import HybridScheduler
    from picomaml.meta.inner_loop import InnerLoop, InnerLoopOutput
    from picomaml.meta.learner import HybridLearner
    from picomaml.meta.objectives import episode_features, lm_loss, meta_loss, pool_features
    from picomaml.meta.sampler import SMLMTSampler
    from picomaml.meta.smlmt import SamplingError
    from picomaml.model.config import PicoDecoderConfig
    from picomaml.model.decoder import KVCache, PicoDecoder
    from picomaml.model.hf import export_hf
    from picomaml.params import ConfigError
    from picomaml.train.checkpoint import find_latest, load_checkpoint, save_checkpoint
    from picomaml.train.config import ExperimentConfig, load_config
    from picomaml.train.dynamics import capture_learning_dynamics
