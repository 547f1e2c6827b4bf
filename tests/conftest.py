"""Shared test setup: small thread count (CI has 2 cores) and deterministic defaults."""

from __future__ import annotations

import warnings

import torch

torch.set_num_threads(2)
# Lightning 2.6 on torch 2.13 warns about LeafSpec at import; it is not ours to fix.
warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
