"""Models, inputs and checks shared by the decomposition tests."""

from __future__ import annotations

import torch
from torch import nn

from lightning_dwf.core.functional import quantize_to_grid

KINDS = ["linear", "conv1d", "conv2d"]
CONFIG = dict(rank_ratio=0.5, density=0.5, steps=60, min_size=0)


def build(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":
        return nn.Sequential(nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 10))
    if kind == "conv1d":
        return nn.Sequential(nn.Conv1d(4, 16, 5), nn.ReLU(), nn.Conv1d(16, 8, 3))
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3, bias=False))


def inputs(kind: str, n: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = {"linear": (n, 40), "conv1d": (n, 4, 12), "conv2d": (n, 3, 7, 7)}[kind]
    return torch.randn(shape, generator=g)


def low_rank_plus_noise(rows: int = 48, cols: int = 64, rank: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g) / rank**0.5 + 0.1 * torch.randn(
        rows, cols, generator=g
    )


def assert_on_grid(x: torch.Tensor, bits: int) -> None:
    """Every row of ``x`` is an integer multiple of ``rowmax / qmax`` within float rounding, |q| <= qmax."""
    qmax = 2 ** (bits - 1) - 1
    x = x.detach().double()
    scale = x.abs().amax(dim=1, keepdim=True) / qmax
    q = x / torch.where(scale > 0, scale, torch.ones_like(scale))
    assert torch.allclose(q, q.round(), rtol=0, atol=1e-4)
    assert int(q.round().abs().max()) <= qmax
    assert torch.equal(quantize_to_grid(x, bits).ne(0), x.ne(0))  # re-rounding keeps the pattern
