"""The DWF initialization (``lightning_dwf.core.init``): truncated variance matching keeps each weight within (0.25σ,
2σ) with a light tail, where untruncated matching would give a kurtosis of 3^D."""

from __future__ import annotations

import pytest
import torch
from conftest import DEPTHS

from lightning_dwf import dwf_init_
from lightning_dwf.core.functional import hadamard_product


@pytest.mark.parametrize("depth", DEPTHS)
def test_dwf_init_bounds_and_variance(depth):
    sigma, eps_ratio = 0.05, 0.25
    factors = [torch.empty(200_000) for _ in range(depth)]
    dwf_init_(factors, sigma, eps_ratio)
    w = hadamard_product(factors)
    assert w.abs().min() > eps_ratio * sigma * (1 - 1e-5)
    assert w.abs().max() < 2 * sigma * (1 + 1e-5)
    high = min(1.0, (2 * sigma) ** (1 / depth))
    for f in factors:
        assert f.abs().max() <= high + 1e-6 and f.abs().min() >= (eps_ratio * sigma) ** (1 / depth) - 1e-6
        assert abs(float((f > 0).float().mean()) - 0.5) < 0.01  # symmetric signs
    ratio = float(w.std()) / sigma  # truncation trades 14-22% of the variance for a light-tailed distribution
    assert 0.7 < ratio < 0.95, ratio
    kurtosis = float((w**4).mean() / (w**2).mean() ** 2)
    assert kurtosis < 2.0  # untruncated variance matching would give 3**depth


def test_untruncated_variance_matching_has_kurtosis_3_to_the_d():
    for depth in (2, 3):
        w = hadamard_product([torch.randn(400_000) for _ in range(depth)])
        assert float((w**4).mean() / (w**2).mean() ** 2) == pytest.approx(3**depth, rel=0.15)
