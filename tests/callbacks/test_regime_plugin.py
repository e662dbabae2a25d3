"""A regime defined outside the package runs through DWFCallback without any edit to it, and the public surface the
callback offers for it: results, the regime config argument, the deprecated quantization arguments."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from conftest import PLAIN_FACTOR_LR, ToyModel, trainer_kwargs
from lightning.pytorch import Callback, Trainer

from lightning_dwf import (
    CollapseConfig,
    DWFCallback,
    DWFDivergenceError,
    DWFError,
    DWFFileError,
    FixedLamConfig,
    QuantizeConfig,
    Regime,
    RunContext,
    TargetSparsityConfig,
    fix_support_,
    register_regime,
)
from lightning_dwf.training.regimes import FixedLam, QuantizedFinish, TargetSparsity, unregister_regime


@dataclass(frozen=True)
class RampConfig:
    """λ ramps linearly from 0 to ``lam`` over the run; a hard threshold at ``cut`` zeroes weights after each step."""

    lam: float
    cut: float = 0.0


class Ramp(Regime):
    def __init__(self, config: RampConfig) -> None:
        self.config, self.lam, self.total, self.starts = config, 0.0, 1.0, 0

    def start(self, ctx: RunContext) -> None:
        self.total, self.starts = ctx.total_steps, self.starts + 1

    def before_batch(self, ctx: RunContext) -> None:
        self.lam = self.config.lam * ctx.step / self.total

    def after_step(self, ctx: RunContext):
        if self.config.cut:
            fix_support_(ctx.module, self.config.cut, ctx.optimizers)
        return None

    def zero_threshold(self, floor: float) -> float:
        return max(floor, self.config.cut)

    def dead_layer_fix(self) -> str:
        return "lower the ramp's `lam`."

    def metrics(self, step: int) -> dict[str, float]:
        return {"dwf/ramp_progress": step / self.total}

    def state_dict(self) -> dict:
        return {"ramp_starts": self.starts}

    def load_state_dict(self, state: dict) -> None:
        self.starts = state.get("ramp_starts", 0)


@pytest.fixture
def ramp():
    register_regime(RampConfig)(Ramp)
    yield
    unregister_regime(RampConfig)


class LamRecorder(Callback):
    def __init__(self, dwf: DWFCallback) -> None:
        self.dwf, self.lams = dwf, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lams.append(self.dwf.current_lam)  # after DWFCallback in the list: λ as the regime set it


def test_a_toy_regime_runs_through_the_callback(tmp_path, ramp):
    dwf = DWFCallback(depth=3, regime=RampConfig(lam=0.05, cut=0.08), factor_lr=PLAIN_FACTOR_LR)
    rec = LamRecorder(dwf)
    model = ToyModel(lr=0.3, n=128)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=4, callbacks=[dwf, rec]))
    trainer.fit(model)
    steps = trainer.global_step
    assert rec.lams == pytest.approx([0.05 * s / steps for s in range(steps)])  # the regime set λ, the callback used it
    assert isinstance(dwf.regime, Ramp) and dwf.regime.starts == 1
    assert dwf.lam is None and dwf.target_sparsity is None and dwf.recovery is None and dwf.control_threshold is None
    assert "dwf/ramp_progress" in trainer.logged_metrics
    weights = [model.net[0].weight, model.net[2].weight]
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in model.net)  # collapsed
    assert dwf.final_report.threshold == 0.08 and dwf.final_report.sparsity > 0.02
    assert all(bool(((w == 0) | (w.abs() >= 0.08)).all()) for w in weights)  # the regime's cut decided the zeros
    assert dwf.state_dict()["ramp_starts"] == 1  # its state travels in the callback's


def test_an_unregistered_regime_config_is_refused_at_construction():
    with pytest.raises(TypeError, match="registered regime config .*got RampConfig.*register_regime"):
        DWFCallback(regime=RampConfig(lam=0.1))
    with pytest.raises(ValueError, match="exactly one of"):
        DWFCallback(lam=0.1, regime=FixedLamConfig(0.1))


@pytest.mark.parametrize(
    ("kwargs", "regime", "inner"),
    [
        (dict(lam=0.01), FixedLam, None),
        (dict(target_sparsity=0.9), TargetSparsity, None),
        (dict(regime=TargetSparsityConfig(0.9)), TargetSparsity, None),
        (dict(lam=0.01, quantize=QuantizeConfig(bits=4)), QuantizedFinish, FixedLam),
    ],
)
def test_the_built_in_regimes_are_chosen_by_their_config(tmp_path, kwargs, regime, inner):
    dwf = DWFCallback(depth=3, collapse=CollapseConfig(save=False), **kwargs)
    Trainer(**trainer_kwargs(tmp_path, max_epochs=30, callbacks=[dwf])).fit(ToyModel(n=64))  # 60 steps
    assert isinstance(dwf.regime, regime)
    assert inner is None or isinstance(dwf.regime.inner, inner)


def test_deprecated_quantization_arguments_still_work_with_a_future_warning():
    with pytest.warns(FutureWarning, match=r"quantize=QuantizeConfig\(bits=4\)"):
        old = DWFCallback(lam=0.01, quantize_bits=4)
    assert old.quantize == QuantizeConfig(bits=4, fraction=0.2)
    with pytest.warns(FutureWarning, match=r"QuantizeConfig\(fraction=\.\.\.\)"):
        collapse = CollapseConfig(quantize_fraction=0.5)
    with pytest.warns(FutureWarning):
        assert DWFCallback(lam=0.01, quantize_bits=8, collapse=collapse).quantize == QuantizeConfig(8, 0.5)
    with pytest.raises(ValueError, match="has no effect without"):
        DWFCallback(lam=0.01, collapse=collapse)
    with pytest.raises(ValueError, match="not both"):
        DWFCallback(lam=0.01, quantize=QuantizeConfig(), quantize_bits=8)
    with pytest.raises(ValueError, match="`bits` must be None"):
        QuantizeConfig(bits=2)


def test_results_are_public_and_read_only():
    dwf = DWFCallback(lam=0.01)
    assert (dwf.rollbacks, dwf.factor_lr_scale, dwf.factor_lr_multipliers, dwf.current_lam) == (0, 1.0, {}, 0.01)
    for name in ("rollbacks", "factor_lr_scale", "factor_lr_multipliers", "regime", "penalty"):
        with pytest.raises(AttributeError):
            setattr(dwf, name, None)
    assert not DWFCallback(lam=0.01).verbose  # quiet unless asked, like Lightning's own callbacks


def test_one_exception_family():
    assert issubclass(DWFDivergenceError, DWFError) and issubclass(DWFDivergenceError, RuntimeError)
    assert issubclass(DWFFileError, DWFError) and issubclass(DWFFileError, ValueError)


def test_the_plain_pytorch_modules_do_not_import_lightning():
    code = ("import sys; import lightning_dwf, lightning_dwf.core.factorize, lightning_dwf.core.collapse, "
            "lightning_dwf.training.run, lightning_dwf.training.regimes, lightning_dwf.observe.report, "
            "lightning_dwf.export, lightning_dwf.decompose; "
            "print(sorted(m for m in sys.modules if m == 'lightning' or m.startswith('lightning.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_regime_protocol_defaults_are_inert():
    class Minimal(Regime):
        def start(self, ctx):
            pass

        def zero_threshold(self, floor):
            return floor

        def dead_layer_fix(self):
            return ""

    regime = Minimal()
    assert (regime.lam, regime.warmup_start, regime.lr_check_steps(7), regime.warns_dead_layers) == (0.0, 0, 7, True)
    assert regime.metrics(3) == {} and regime.state_dict() == {} and math.isfinite(regime.zero_threshold(1e-7))
