"""Factor learning-rate multipliers: the warm-up ramp and the plan from the config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_dwf import FactorLRConfig, FactorPenalty, factor_parameters, factorize_
from lightning_dwf.core.functional import DECOUPLED_AUTO_MULTIPLIER
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
    apply_multipliers(penalty, net, {"0.weight": 3.0}, step=5, start=0, total=10, warmup=1.0)
    factors0 = [getattr(net[0].parametrizations.weight, f"original{d}") for d in range(3)]
    assert [penalty.multiplier_of(f) for f in factors0] == pytest.approx([2.0] * 3)  # halfway up the ramp to 3
    factors1 = [getattr(net[1].parametrizations.weight, f"original{d}") for d in range(3)]
    assert [penalty.multiplier_of(f) for f in factors1] == pytest.approx([1.0] * 3)  # not planned: 1
