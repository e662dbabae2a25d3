"""The built-in regimes as plain objects: registry, state, the fixed-λ proximal bookkeeping, the quantized wrapper."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_dwf import FactorizeConfig, FixedLamConfig, QuantizeConfig, TargetSparsityConfig, factorize_
from lightning_dwf.training.regimes import (
    FixedLam,
    QuantizedFinish,
    RunContext,
    TargetSparsity,
    build_regime,
    regime_for,
)


def _ctx(module: nn.Module, step: int = 0, total: float = 100) -> RunContext:
    return RunContext(module, [], step, total, depth=3, floor=1e-7, info=lambda message: None)


def test_configs_pick_their_regime_and_validate():
    assert regime_for(FixedLamConfig(0.1)) is FixedLam and regime_for(TargetSparsityConfig(0.5)) is TargetSparsity
    assert isinstance(build_regime(TargetSparsityConfig(0.5), QuantizeConfig()), QuantizedFinish)
    with pytest.raises(ValueError, match="`lam` must be a finite float >= 0"):
        FixedLamConfig(-1.0)
    with pytest.raises(ValueError, match="target_sparsity"):
        TargetSparsityConfig(1.0)
    with pytest.raises(TypeError, match="ScheduleConfig"):
        TargetSparsityConfig(0.5, schedule={"recovery": 0.3})
    assert TargetSparsityConfig(0.995).recovery == 0.4


def test_fixed_lam_applies_the_noted_thresholds_once_and_forgets_them_on_rollback():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8))
    factorize_(net, depth=3)
    regime, ctx = FixedLam(FixedLamConfig(0.1, min_layer_share=0.0)), _ctx(net)
    regime.before_step(ctx, None, lambda **_: {"0.weight": 10.0})  # every |w| < 10: all would go
    regime.on_rollback()
    regime.after_step(ctx)
    assert bool((net[0].weight != 0).all())  # the rolled-back step's thresholds were dropped
    regime.before_step(ctx, None, lambda **_: {"0.weight": 10.0})
    regime.after_step(ctx)
    assert bool((net[0].weight == 0).all())
    assert regime.zero_threshold(1e-7) == 1e-7 and "lower `lam`" in regime.dead_layer_fix()
    regime.lam = 0.0
    assert "zero from the start" in regime.dead_layer_fix()


def test_fixed_lam_guard_keeps_each_layers_largest():
    """The proximal step keeps ``ceil(min_layer_share · d · n)`` (at least one) of a layer's largest weights."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    factorize_(net, depth=3)
    largest = net[1].weight.detach().abs().flatten().topk(1).values
    regime, ctx = FixedLam(FixedLamConfig(0.1)), _ctx(net)
    regime.before_step(ctx, None, lambda **_: {"0.weight": 0.0, "1.weight": 10.0})  # layer 1 would be emptied
    regime.after_step(ctx)
    kept = net[1].weight.detach()
    assert int((kept != 0).sum()) == math.ceil(0.1 * (128 / 192) * 64)  # d: 128 of 192 weights are left
    assert float(kept.abs().max()) == float(largest)  # its largest weights stay
    assert bool((net[0].weight != 0).all())  # the other layer is untouched


def test_fixed_lam_ramp_and_release():
    """``recovery``: λ ramps linearly from 0 over the first ``1 − recovery`` of the run, the proximal thresholds are
    asked for every optimizer, and at the release point the pattern is fixed and λ = 0 for good (kept in the state)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8))
    factorize_(net, depth=3)
    regime = FixedLam(FixedLamConfig(0.1, recovery=0.5))
    regime.start(_ctx(net, total=100))
    assert regime.lam == 0.0 and regime.check_lam == 0.1  # the LR check at train start sees the largest λ
    assert regime.lr_check_steps(100) == 0
    asked = []
    for step, lam in [(0, 0.0), (25, 0.05), (48, 0.096)]:
        ctx = _ctx(net, step=step)
        regime.before_batch(ctx)
        assert regime.lam == pytest.approx(lam)
        regime.before_step(ctx, None, lambda **kw: asked.append(kw) or {})
        regime.after_step(_ctx(net, step=step + 1))
    assert asked == [{"gradient": True}] * 2 and regime.state_dict() == {"fixed_released": False}  # none at λ = 0
    net[0].parametrizations.weight.original0.data[0, 0] = 1e-9  # below the collapse threshold
    regime.after_step(_ctx(net, step=50))
    assert regime.state_dict() == {"fixed_released": True} and float(net[0].weight[0, 0]) == 0.0
    resumed = FixedLam(FixedLamConfig(0.1, recovery=0.5))
    resumed.load_state_dict(regime.state_dict())
    resumed.start(_ctx(net, step=60, total=100))
    resumed.before_batch(_ctx(net, step=60))
    assert resumed.lam == 0.0
    with pytest.raises(ValueError, match="no step budget"):
        FixedLam(FixedLamConfig(0.1, recovery=0.5)).start(_ctx(net, total=math.inf))
    with pytest.raises(ValueError, match="`recovery`"):
        FixedLamConfig(0.1, recovery=0.9)
    with pytest.raises(ValueError, match="`min_layer_share`"):
        FixedLamConfig(0.1, min_layer_share=-0.1)


def test_target_state_round_trips_and_reads_0_1_states():
    regime = TargetSparsity(TargetSparsityConfig(0.9))
    assert regime.state_dict() == {} and regime.warmup_start == 0 and not regime.warns_dead_layers
    old = {"controller": {"target": 0.9, "total_steps": 100, "lam": 0.02, "threshold": 1e-3, "recovering": True}}
    regime.load_state_dict(old)  # a 0.1 checkpoint: `recovering` instead of `recovery_step`
    assert regime.lam == 0.02 and regime.state_dict() == old
    assert regime.lr_check_steps(500) == 0


def test_quantized_finish_delegates_and_starts_on_time():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8))
    factorize_(net, depth=3)
    regime = QuantizedFinish(QuantizeConfig(bits=4, fraction=0.25), FixedLam(FixedLamConfig(0.1, recovery=0)))
    regime.start(_ctx(net, step=0, total=100))
    assert regime.quantize_step == 75 and not regime.quantizing and regime.lam == 0.1
    regime.before_batch(_ctx(net, step=74))
    assert not regime.quantizing
    regime.before_batch(_ctx(net, step=75))
    assert regime.quantizing and regime.lam == 0.0 and regime.inner.lam == 0.0  # the inner regime released λ
    with pytest.raises(ValueError, match="no step budget"):
        QuantizedFinish(QuantizeConfig(), FixedLam(FixedLamConfig(0.1))).start(_ctx(net, total=math.inf))


@pytest.mark.parametrize(
    ("opt", "total", "restored", "expected"),
    [
        ("sgd", 100, None, 0.5),  # the ramp and the proximal step's per-layer guard, under every optimizer
        ("asgd", 100, None, 0.5),
        ("adamw", 100, None, 0.5),
        ("sgd-gated", 100, None, 0.5),  # structured DWF too
        ("adamw-gated", 100, None, 0.5),
        ("sgd", math.inf, None, 0.0),  # no step budget: nothing to ramp over
        ("adamw", math.inf, None, 0.0),
        ("sgd", 100, {}, 0.0),  # a checkpoint from before the default: it trained with a constant λ
        ("sgd", 100, {"fixed_recovery": 0.0}, 0.0),  # a resume keeps what the run started with
        ("adamw", 100, {"fixed_recovery": 0.0}, 0.0),
        ("adamw", 100, {"fixed_recovery": 0.5}, 0.5),
    ],
)
def test_fixed_lam_default_recovery(opt, total, restored, expected):
    """``FixedLamConfig(lam)`` (``recovery=None``) resolves at train start: 0.5 in a run with a step budget, under
    every optimizer and with gated tensors, else 0; the resolved value is kept in the state and wins on a resume; an
    explicit value always wins."""
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    gated = opt.endswith("-gated")
    opt = opt.removesuffix("-gated")
    factorize_(net, depth=3, config=FactorizeConfig(structure="outputs", include=["0"]) if gated else None)
    make = {"sgd": torch.optim.SGD, "asgd": torch.optim.ASGD, "adamw": torch.optim.AdamW}[opt]
    ctx = RunContext(net, [make(net.parameters(), lr=0.01)], 0, total, depth=3, floor=1e-7, info=lambda m: None)
    regime = FixedLam(FixedLamConfig(0.1))
    if restored is not None:
        regime.load_state_dict(restored)
    regime.start(ctx)
    assert regime.recovery == expected and regime.ramped == (expected > 0)
    assert regime.state_dict()["fixed_recovery"] == expected
    assert regime.lam == (0.0 if expected else 0.1)  # the ramp starts at 0
    explicit = FixedLam(FixedLamConfig(0.1, recovery=0))
    explicit.start(ctx)
    assert explicit.recovery == 0 and "fixed_recovery" not in explicit.state_dict()
