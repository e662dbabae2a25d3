"""Factor learning-rate multipliers: the warm-up ramp and the plan from the config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_dwf import FactorizeConfig, FactorLRConfig, FactorPenalty, factor_parameters, factorize_
from lightning_dwf.core.factorize import sparse_tensors
from lightning_dwf.core.functional import DECOUPLED_AUTO_MULTIPLIER, GATED_DECOUPLED_AUTO_MULTIPLIER
from lightning_dwf.training.factor_lr import apply_multipliers, plan_multipliers, warmup_multiplier


def test_warmup_ramps_linearly_from_one_and_restarts_at_its_start():
    assert warmup_multiplier(0, 0, 1000, 0.1, 10.0) == 1.0
    assert warmup_multiplier(100, 0, 1000, 0.1, 10.0) == 10.0
    assert warmup_multiplier(550, 500, 1000, 0.1, 10.0) == pytest.approx(5.5)  # restarted at step 500
    assert warmup_multiplier(5, 0, float("inf"), 0.1, 10.0) == 10.0  # open-ended run: full multiplier
    assert warmup_multiplier(5, 0, 1000, 0.0, 10.0) == 10.0


@pytest.mark.parametrize(("opt", "auto"), [(torch.optim.AdamW, DECOUPLED_AUTO_MULTIPLIER), (torch.optim.SGD, None)])
def test_plan_and_apply(opt, auto):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 2))
    factorize_(net, depth=3)
    penalty = FactorPenalty(factor_parameters(net), lam=0.1, depth=3)
    penalty.bind([opt(net.parameters(), lr=0.01)])
    planned = plan_multipliers(net, FactorLRConfig(), 3, penalty)
    assert set(planned) == {"0.weight", "1.weight"}
    if auto is not None:
        assert set(planned.values()) == {auto}
    else:  # SGD: by each tensor's RMS, so the smaller-scale layer gets the larger multiplier
        assert planned["0.weight"] != planned["1.weight"]
    assert plan_multipliers(net, FactorLRConfig(multiplier=3.0), 3, penalty) == {"0.weight": 3.0, "1.weight": 3.0}
    apply_multipliers(penalty, sparse_tensors(net), {"0.weight": 3.0}, step=5, start=0, total=10, warmup=1.0)
    factors0 = [getattr(net[0].parametrizations.weight, f"original{d}") for d in range(3)]
    assert [penalty.multiplier_of(f) for f in factors0] == pytest.approx([2.0] * 3)  # halfway up the ramp to 3
    factors1 = [getattr(net[1].parametrizations.weight, f"original{d}") for d in range(3)]
    assert [penalty.multiplier_of(f) for f in factors1] == pytest.approx([1.0] * 3)  # not planned: 1


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_auto_gives_a_gated_layers_weights_the_dense_step_within_their_group_under_sgd(depth):
    """At balance one SGD step at the planned multiplier moves a gated weight across its group (the part of the
    dense step orthogonal to the group's row, through ω alone) as far as dense SGD would, and the row's norm D times
    as far (ω and the D − 1 gates all scale it)."""
    torch.manual_seed(0)
    # float64 to see a small step exactly; no bias, which would belong to its row's group (scaled by the same gates)
    net = nn.Linear(32, 6, bias=False, dtype=torch.float64)
    factorize_(net, depth, FactorizeConfig(structure="outputs"))  # balanced factors of a fresh init
    dense = net.weight.detach().clone()
    omega, *gates = factor_parameters(net)
    sgd = torch.optim.SGD([omega, *gates], lr=1e-5)
    penalty = FactorPenalty([omega, *gates], lam=0.0, depth=depth)
    penalty.bind([sgd])
    m = plan_multipliers(net, FactorLRConfig(), depth, penalty)["weight"]
    norms = dense.norm(dim=1)
    assert m == pytest.approx(float(norms.pow(2).mean().sqrt()) ** -(2 - 2 / depth), rel=1e-5)
    for group in sgd.param_groups:  # the factor LR: the optimizer's times the planned multiplier
        group["lr"] = 1e-5 * m
    x, y = torch.randn(64, 32, dtype=torch.float64), torch.randn(64, 6, dtype=torch.float64)
    torch.nn.functional.mse_loss(net(x), y).backward()
    sgd.step()
    moved = net.weight.detach() - dense
    dense_w = dense.clone().requires_grad_(True)
    torch.nn.functional.mse_loss(torch.nn.functional.linear(x, dense_w), y).backward()
    dense_step = -1e-5 * dense_w.grad
    unit = dense / norms[:, None]
    def split(step):  # per row: along the row (its norm) and across it
        along = (step * unit).sum(dim=1, keepdim=True) * unit
        return along, step - along
    along, across = split(moved)
    dense_along, dense_across = split(dense_step)
    gain = (norms ** (2 - 2 / depth)) * m  # 1 at the RMS norm; the rows' norms spread a little around it
    torch.testing.assert_close(across, dense_across * gain[:, None], rtol=1e-3, atol=1e-15)
    torch.testing.assert_close(along, depth * dense_along * gain[:, None], rtol=1e-3, atol=1e-15)


def test_auto_under_adam_gives_gated_tensors_their_own_constant_and_plain_ones_theirs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 2))
    factorize_(net, 3, FactorizeConfig(structure="outputs", include=["0"]))
    factorize_(net, 3, FactorizeConfig(include=["1"]))
    penalty = FactorPenalty(factor_parameters(net), lam=0.1, depth=3)
    penalty.bind([torch.optim.AdamW(net.parameters(), lr=1e-3)])
    assert plan_multipliers(net, FactorLRConfig(), 3, penalty) == {
        "0.weight": GATED_DECOUPLED_AUTO_MULTIPLIER, "1.weight": DECOUPLED_AUTO_MULTIPLIER}
