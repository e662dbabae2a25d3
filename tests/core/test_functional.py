"""The pure tensor math of ``lightning_dwf.core.functional``: the AM–GM penalty identity, the λ ↔ weight-decay
conversion, the LR floor that predicts exact zeros, the proximal threshold of the collapsed penalty, and the fake
quantizer of the export grid."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEPTHS

from lightning_dwf import FactorPenalty
from lightning_dwf.core.functional import (
    ONE_NODE_MIN_NUMEL,
    balanced_factors,
    channel_scales,
    factor_penalty,
    fake_quantize,
    hadamard_product,
    l2d_quasinorm,
    lam_to_weight_decay,
    lr_floor,
    misalignment,
    prox_threshold,
    quantize_to_grid,
    weight_decay_to_lam,
)


@pytest.mark.parametrize("depth", [2, 3, 4, 5])
@pytest.mark.parametrize("frozen", [None, 0, -1])
@pytest.mark.parametrize("large", [True, False])
def test_hadamard_product_has_the_chains_bits(depth, frozen, large):
    """With autograd recording, factors of at least ``ONE_NODE_MIN_NUMEL`` elements are multiplied in one graph node,
    smaller ones by the chain; either way the value and gradients equal, bit for bit, those of the chain
    ``((ω1·ω2)·ω3)…`` (a factor without ``requires_grad`` gets none). A second derivative through the one node is an
    error, not a silent zero."""
    torch.manual_seed(depth)
    shape = (ONE_NODE_MIN_NUMEL // 64, 64) if large else (6, 5)
    factors = [torch.randn(shape, requires_grad=i != (frozen if frozen is None else frozen % depth))
               for i in range(depth)]
    grad = torch.randn(shape)
    out = hadamard_product(factors)
    assert (type(out.grad_fn).__name__ == "_HadamardProductBackward") is large  # one node, or the chain's last
    fused = torch.autograd.grad(out, [f for f in factors if f.requires_grad], grad)
    chain = factors[0]
    for f in factors[1:]:
        chain = chain * f
    assert torch.equal(out, chain)
    for a, b in zip(fused, torch.autograd.grad(chain, [f for f in factors if f.requires_grad], grad), strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert hadamard_product(factors).grad_fn is None
    if large:
        trained = next(f for f in factors if f.requires_grad)
        (first,) = torch.autograd.grad(hadamard_product(factors).sum(), [trained], create_graph=True)
        with pytest.raises(RuntimeError, match="does not require grad"):  # no silent second derivative
            first.sum().backward()


@pytest.mark.parametrize("depth", DEPTHS)
def test_am_gm_identity(depth):
    """(λ/D)Σ||ω_d||² ≥ λΣ|w|^(2/D), with equality exactly for the balanced factorization."""
    factors = [torch.randn(50) for _ in range(depth)]
    w = hadamard_product(factors)
    lam = 0.3
    assert factor_penalty(factors, lam) >= lam * l2d_quasinorm(w, depth) - 1e-6
    assert misalignment(factors) >= -1e-6
    balanced = balanced_factors(w, depth)
    torch.testing.assert_close(hadamard_product(balanced), w, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(factor_penalty(balanced, lam), lam * l2d_quasinorm(w, depth), rtol=1e-5, atol=1e-6)
    assert abs(float(misalignment(balanced))) < 1e-4
    if depth == 2:  # Hoff's identity: the lasso
        torch.testing.assert_close(l2d_quasinorm(w, 2), w.abs().sum())


def test_weight_decay_conversion():
    assert lam_to_weight_decay(1e-3, 3) == pytest.approx(2e-3 / 3)
    assert weight_decay_to_lam(lam_to_weight_decay(0.07, 4), 4) == pytest.approx(0.07)


@pytest.mark.parametrize("depth", [2, 3])
def test_lr_floor_predicts_exact_zeros(depth):
    """An unsupported weight under the penalty alone reaches the threshold iff η0 is above the floor (cosine
    schedule)."""
    lam, steps, std, threshold = 0.01, 400, 0.05, 1.19e-7
    floor = lr_floor(lam, steps, std, threshold)

    def final_magnitude(eta0):
        factors = [torch.full((1,), std ** (1 / depth), requires_grad=True) for _ in range(depth)]
        opt = torch.optim.SGD(factors, lr=eta0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        pen = FactorPenalty(factors, lam, depth)
        pen.bind([opt])
        for _ in range(steps):
            opt.zero_grad()
            hadamard_product(factors).sum().mul(0.0).backward()
            pen.before_step(opt)
            opt.step()
            sched.step()
        return float(hadamard_product(factors).abs())

    assert final_magnitude(1.3 * floor) < threshold
    assert final_magnitude(0.7 * floor) > threshold
    assert math.isinf(lr_floor(0.0, steps, std, threshold))


@pytest.mark.parametrize("depth", DEPTHS)
def test_prox_threshold_is_where_the_proximal_map_of_the_l2d_penalty_jumps_to_zero(depth):
    """argmin_x ½(x − z)² + t·|x|^(2/D), by brute force on a fine grid: 0 just below the threshold, not 0 above."""
    step, lam = 0.01, 0.5
    tau = prox_threshold(step, lam, depth)
    x = torch.linspace(0, 1, 1_000_001, dtype=torch.float64)
    for z, zero in ((0.99 * tau, True), (1.01 * tau, False)):
        objective = 0.5 * (x - z) ** 2 + step * lam * x.abs() ** (2.0 / depth)
        assert (float(x[objective.argmin()]) == 0.0) == zero, (depth, z)
    assert prox_threshold(step, 0.0, depth) == 0.0 and prox_threshold(step, lam, 1) == 0.0


@pytest.mark.parametrize("bits", [8, 4])
def test_fake_quantize_is_on_the_grid_with_a_straight_through_gradient(bits):
    w = torch.randn(6, 5, 3) * torch.rand(6, 1, 1)
    w[0, 0, 0] = 0.0
    w.requires_grad_(True)
    q = fake_quantize(w, bits)
    scale = channel_scales(w, bits)
    codes = q.detach() / scale.view(-1, 1, 1)
    torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)  # every value is an integer multiple of scale
    assert codes.abs().max() <= 2 ** (bits - 1) - 1 + 1e-4
    assert ((q.detach() - w.detach()).abs() <= scale.view(-1, 1, 1) / 2 + 1e-7).all()
    assert q[0, 0, 0] == 0
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    assert torch.equal(quantize_to_grid(q.detach(), bits), q.detach())  # idempotent: on the grid it stays
