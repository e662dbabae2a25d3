"""DWF initialization: variance matching with absolute-value truncation (method doc §2.2).

Each factor entry is drawn from N(0, σ_w^(2/D)) restricted to
``(eps_ratio·σ_w)^(1/D) < |ω| < min(1, (2σ_w)^(1/D))`` with an independent random sign, so every
collapsed initial weight satisfies ``eps_ratio·σ_w < |w| < 2σ_w``: no weight starts near zero or in
the heavy tail that plain variance matching (kurtosis 3^D) would give.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

#: How σ_w (the target std of the collapsed weight) is chosen: ``"kaiming"`` = sqrt(2 / fan_in),
#: ``"current"`` = std of the weight the module holds now, or a float.
InitStd = Literal["kaiming", "current"] | float

#: Lower truncation bound of the collapsed weight, relative to σ_w (value of the reference reimplementation).
DEFAULT_EPS_RATIO = 0.25


def fan_in(weight: Tensor) -> int:
    """Inputs per output unit: ``shape[1] * prod(shape[2:])`` for Linear/Conv weights."""
    if weight.dim() < 2:
        raise ValueError(f"fan_in needs a weight with >= 2 dims, got shape {tuple(weight.shape)}.")
    return weight.shape[1] * math.prod(weight.shape[2:])


def resolve_init_std(weight: Tensor, init_std: InitStd) -> float:
    """σ_w for ``weight``: Kaiming-normal for ReLU nets, the current std, or a given float."""
    if init_std == "kaiming":
        return math.sqrt(2.0 / fan_in(weight))
    if init_std == "current":
        std = float(weight.detach().float().std()) if weight.numel() > 1 else 0.0
        if not std > 0:
            raise ValueError(
                "init_std='current' needs a weight with non-zero spread; pass init_std='kaiming' or a float."
            )
        return std
    return float(init_std)


@torch.no_grad()
def dwf_init_(
    factors: Sequence[Tensor],
    std: float,
    eps_ratio: float = DEFAULT_EPS_RATIO,
    generator: torch.Generator | None = None,
) -> None:
    """Fill ``factors`` in place with the truncated variance-matched DWF initialization.

    Args:
        factors: the D factor tensors of one weight (all of the same shape).
        std: σ_w, the standard deviation the collapsed weight would have without truncation.
        eps_ratio: lower bound of ``|w|`` relative to σ_w (must be < 2).
        generator: optional RNG for reproducible draws.
    """
    depth = len(factors)
    if not 0 < eps_ratio < 2:
        raise ValueError(f"`eps_ratio` must lie in (0, 2) (|w| is drawn from (eps_ratio·σ_w, 2·σ_w)), got {eps_ratio}.")
    if not std > 0:
        raise ValueError(f"`std` (σ_w) must be > 0, got {std}.")
    factor_std = std ** (1.0 / depth)
    low = (eps_ratio * std) ** (1.0 / depth)
    high = min(1.0, (2.0 * std) ** (1.0 / depth))
    if low >= high:
        raise ValueError(f"σ_w={std:.3g} is too large for the DWF init (empty interval {low:.3g} < |ω| < {high:.3g}).")
    for f in factors:
        magnitude = torch.empty_like(f, dtype=torch.float32)
        torch.nn.init.trunc_normal_(magnitude, mean=0.0, std=factor_std, a=low, b=high, generator=generator)
        sign = torch.randint(0, 2, f.shape, generator=generator, device=f.device).mul_(2).sub_(1)
        f.copy_(magnitude * sign)
