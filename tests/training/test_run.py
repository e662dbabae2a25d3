"""TrainingRun drives a regime in a plain PyTorch loop, without Lightning: the same mechanics the callback uses."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_dwf import FactorLRConfig, FixedLamConfig, TargetSparsityConfig, TrainingRun, collapse_, factorize_
from lightning_dwf.errors import DWFDivergenceError
from lightning_dwf.training.regimes import build_regime


def _loop(regime_config, opt_cls, lr: float, steps: int = 200, factor_lr: FactorLRConfig | None = None):
    torch.manual_seed(0)
    x = torch.randn(256, 20)
    y = x[:, :3].sum(dim=1, keepdim=True)
    net = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 1))
    factorize_(net, depth=3)
    opt = opt_cls(net.parameters(), lr=lr)
    run = TrainingRun(build_regime(regime_config), depth=3, factor_lr=factor_lr or FactorLRConfig(check="off"))
    run.bind(net, [opt], step=0, total_steps=steps)
    run.start(net, [opt], step=0, total_steps=steps)
    for step in range(steps):
        run.before_batch(net, [opt], step, steps)
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        run.before_step(net, opt)
        opt.step()
        opt.zero_grad()
        run.after_batch(net, [opt], step + 1, bool(loss.isfinite()))
    run.close()
    report, threshold = run.finish(net, [opt], steps, steps)
    collapse_(net, threshold)
    return net, report, run


@pytest.mark.parametrize(("recovery", "final_lam"), [(0.0, 0.5), (None, 0.0)])
def test_fixed_lam_under_adamw_makes_exact_zeros_in_a_plain_loop(recovery, final_lam):
    """A constant λ, and the default ramp (λ released for the second half), make exact zeros in a loop without
    Lightning."""
    net, report, run = _loop(FixedLamConfig(lam=0.5, recovery=recovery), torch.optim.AdamW, lr=1e-2)
    w = net[0].weight
    zeros = sum(int((m.weight == 0).sum()) for m in (net[0], net[2]))
    assert report.sparsity > 0.5 and zeros == report.numel - report.nonzero  # exact zeros, as the report counts
    assert bool((w[:, 3:] == 0).float().mean() > (w[:, :3] == 0).float().mean())  # the ignored inputs go first
    assert run.metrics(200)["dwf/lam"] == final_lam and run.rollback.count == 0


def test_target_sparsity_is_met_exactly_in_a_plain_loop():
    net, report, _ = _loop(TargetSparsityConfig(0.9), torch.optim.SGD, lr=0.05, steps=120)
    assert report.sparsity == pytest.approx(0.9, abs=1 / report.numel)
    assert sum(int((m.weight == 0).sum()) for m in (net[0], net[2])) >= math.floor(0.9 * report.numel)


def test_divergence_is_a_named_exception_after_the_rollbacks():
    with pytest.raises(DWFDivergenceError, match="NaN/Inf"):
        _loop(FixedLamConfig(lam=1e-3), torch.optim.SGD, lr=1e4, steps=30,
              factor_lr=FactorLRConfig(check="off", rollbacks=2))


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.ASGD])
def test_relative_lam_gives_every_layer_the_same_relative_threshold(opt_cls):
    """``FixedLamConfig(lam, relative=True)``: each tensor's λ makes its proximal threshold at the peak factor step
    the same multiple of its RMS, whatever its scale and LR multiplier; the λs are kept across a resume."""
    from lightning_dwf.training.regimes.fixed import relative_threshold

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        net[2].weight.mul_(10.0)  # a layer ten times larger than the other
    factorize_(net, depth=3)
    rms = {f"{i}.weight": float(net[i].weight.pow(2).mean().sqrt()) for i in (0, 2)}
    opt = opt_cls(net.parameters(), lr=0.05)
    run = TrainingRun(build_regime(FixedLamConfig(0.03, relative=True, recovery=0)), depth=3,
                      factor_lr=FactorLRConfig(check="off", warmup=0.0))
    run.bind(net, [opt], step=0, total_steps=10)
    run.start(net, [opt], step=0, total_steps=10)
    run.before_batch(net, [opt], 0, 10)
    nn.functional.mse_loss(net(torch.randn(8, 20)), torch.zeros(8, 4)).backward()
    run.before_step(net, opt)  # notes the proximal thresholds of this step (at the peak LR)
    noted = run.regime._pending
    assert set(noted) == set(rms)
    for name, tau in noted.items():
        assert tau / rms[name] == pytest.approx(relative_threshold(0.03, 3), rel=1e-4)
    # the LR check: the largest λ_t·η_t of any tensor, over the largest η_t (here the same tensor's or not)
    steps = run.ctx.factor_steps
    assert run.regime.check_lam * max(steps.values()) == pytest.approx(
        max(run.regime.lam * run.regime.lam_scales()[n] * steps[n] for n in steps))
    state = run.regime.state_dict()["fixed_relative"]
    assert max(state["scales"].values()) == 1.0 and len(state["scales"]) == 2
    resumed = build_regime(FixedLamConfig(0.03, relative=True, recovery=0))
    resumed.load_state_dict(run.regime.state_dict())
    assert resumed.lam_scales() == run.regime.lam_scales()
    with pytest.raises(ValueError, match="`relative`"):
        FixedLamConfig(0.03, relative="yes")


def test_relative_lam_is_refused_under_adam_type_optimizers():
    net = nn.Sequential(nn.Linear(4, 4))
    factorize_(net, depth=3)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    run = TrainingRun(build_regime(FixedLamConfig(0.03, relative=True)), depth=3, factor_lr=FactorLRConfig(check="off"))
    run.bind(net, [opt], step=0, total_steps=10)
    with pytest.raises(ValueError, match="SGD-type optimizers.*absolute `lam`"):
        run.start(net, [opt], step=0, total_steps=10)
