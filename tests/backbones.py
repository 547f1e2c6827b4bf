"""Small backbones of several kinds for the tests: transformers causal LMs, a nanoGPT-style module, episodes."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import picomaml as pm

warnings.filterwarnings("ignore", message=".*bos_token_id.*|.*eos_token_id.*")

V, W, N, D = 64, 12, 3, 16


def hf_model(family: str) -> nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    small = dict(vocab_size=V, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64)
    if family == "llama":
        cfg = transformers.LlamaConfig(hidden_size=D, intermediate_size=32, num_key_value_heads=1, **small)
        return transformers.LlamaForCausalLM(cfg).eval()
    if family == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=D, intermediate_size=32, num_key_value_heads=1, **small)
        return transformers.Qwen2ForCausalLM(cfg).eval()
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=V, n_embd=D, n_layer=2, n_head=2, n_positions=64)
        return transformers.GPT2LMHeadModel(cfg).eval()
    raise ValueError(family)


FAMILIES = ["llama", "qwen2", "gpt2"]


def episode(n_tasks: int = 1):
    rows = torch.randint(3, V, (64, 128), generator=torch.Generator().manual_seed(1))
    sampler = pm.SMLMTSampler(n_way=N, k_shot=2, n_query=2, mask_token_id=2, window_len=W, seed=0)
    return sampler.sample(rows, n_tasks=n_tasks) if n_tasks > 1 else sampler.sample(rows)


class NanoGPT(nn.Module):
    """A nanoGPT-style model: forward returns (logits, loss), only the last position without targets."""

    def __init__(self) -> None:
        super().__init__()
        self.wte, self.mix, self.lm_head = nn.Embedding(V, D), nn.Linear(D, D), nn.Linear(D, V)

    def trunk(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mix(self.wte(ids)))

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None):
        x = self.trunk(ids)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        return self.lm_head(x), None


