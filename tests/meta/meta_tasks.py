"""Small meta-learning tasks shared by the engine's tests: the MAML paper's sinusoid regression, an MLP, a
BatchNorm CNN and its image classification episodes (float64, a leading task dim ``T``)."""

from __future__ import annotations

import torch
from torch import nn

T = 3


def sinusoid(seed: int = 0, k: int = 10):
    """The MAML paper's regression tasks: y = a sin(x + b), ``k`` points in [-5, 5] per set."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(T, 1, 1, generator=g, dtype=torch.float64) * 4.9 + 0.1
    b = torch.rand(T, 1, 1, generator=g, dtype=torch.float64) * torch.pi
    xs, xq = (torch.rand(T, k, 1, generator=g, dtype=torch.float64) * 10 - 5 for _ in range(2))
    return (xs, a * torch.sin(xs + b)), (xq, a * torch.sin(xq + b))


def mlp(hidden: int = 40, norm: bool = False) -> nn.Module:
    """The paper's 1-40-40-1 ReLU MLP (``norm``: a LayerNorm before the output layer, tanh activations)."""
    torch.manual_seed(0)
    act = nn.Tanh if norm else nn.ReLU
    mid = nn.LayerNorm(hidden) if norm else act()
    return nn.Sequential(nn.Linear(1, hidden), act(), nn.Linear(hidden, hidden), mid, nn.Linear(hidden, 1)).double()


def cnn() -> nn.Module:
    """A conv - BatchNorm - ReLU - linear classifier of 8x8 images into 3 classes."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).double()


def images(seed: int = 0):
    """3-way 2-shot episodes of random 8x8 images for :func:`cnn`."""
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(T, 6, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    y = [torch.stack([torch.randperm(3, generator=g).repeat(2) for _ in range(T)]) for _ in range(2)]
    return (x[0], y[0]), (x[1], y[1])
