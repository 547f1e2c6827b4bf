"""Capture and restore the global random number generators, so a resumed run draws what the original would.

Library components own seeded ``torch.Generator`` objects; these functions cover the rest of a training
process (weight init, dropout on the default generator, Python ``random``, NumPy), which a checkpoint
saves as ``rng.pt`` and restores on resume.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["capture_rng_state", "restore_rng_state"]

logger = logging.getLogger(__name__)


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states: torch CPU, CUDA (when initialised), Python ``random``, NumPy (if installed).

    The result holds only tensors, ints, floats, strings, lists and tuples, so it loads with
    ``torch.load(weights_only=True)``.
    """
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # numpy is optional
        pass
    else:
        np_state = np.random.get_state(legacy=False)
        state["numpy"] = {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        }
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what [`capture_rng_state`][picomaml.train.rng_state.capture_rng_state] returned (missing parts
    are left alone)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            logger.warning("checkpoint holds a NumPy RNG state but NumPy is not installed; skipped")
        else:
            s = state["numpy"]
            np.random.set_state(
                {
                    "bit_generator": s["bit_generator"],
                    "state": {"key": s["key"].numpy().astype(np.uint32), "pos": s["pos"]},
                    "has_gauss": s["has_gauss"],
                    "gauss": s["gauss"],
                }
            )
