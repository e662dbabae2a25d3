"""Mixed precision on CPU: bf16-mixed trains and collapses, fused SGD under 16-mixed (bf16-mixed on CPU, no grad scaler)
gets the exact penalty, one penalty step under bf16-mixed is exactly the optimizer's float32 step, and a multiplied
Adam-type factor step is the same under 16-bit AMP with a gradient scaler as at 32 bits. The fused-SGD and
the one-step tests pin the behaviour: they compare exact values (or float32-exact ones) so that a change of behaviour,
not only a crash, fails."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import PLAIN_FACTOR_LR, FactorSnapshot, ToyModel, trainer_kwargs
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_dwf import (
    CollapseConfig,
    DWFCallback,
    FactorLRConfig,
    FixedLamConfig,
    factor_parameters,
    factorized_tensors,
)

from .helpers import DEPTH, LAM, LR, SHRINK, InitialWeights


def test_bf16_mixed_on_cpu(tmp_path):
    dwf = DWFCallback(depth=3, regime=FixedLamConfig(0.02, recovery=0), verbose=False, factor_lr=PLAIN_FACTOR_LR)
    Trainer(**trainer_kwargs(tmp_path, max_epochs=2, precision="bf16-mixed", callbacks=[dwf])).fit(ToyModel(lr=0.3))
    assert dwf.final_report.finite
    ToyModel.load_from_checkpoint(dwf.collapsed_checkpoint_path)


def test_fused_sgd_on_cpu_16_mixed_trains(tmp_path):
    """On CPU, Lightning turns 16-mixed into bf16-mixed (no grad scaler): fused SGD then trains with the exact
    penalty."""

    class Fused(ToyModel):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, fused=True)

    snap = InitialWeights()
    model = Fused(lr=LR, zero_loss=True, n=16, batch_size=16)
    dwf = DWFCallback(
        depth=DEPTH,
        regime=FixedLamConfig(LAM, recovery=0),
        verbose=False,
        factor_lr=PLAIN_FACTOR_LR,
        collapse=CollapseConfig(on_fit_end=False),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(
            **trainer_kwargs(
                tmp_path, max_epochs=1, precision="16-mixed", callbacks=[dwf, snap], enable_checkpointing=False
            )
        )
    assert trainer.precision == "bf16-mixed" and getattr(trainer.precision_plugin, "scaler", None) is None
    trainer.fit(model)
    for t in factorized_tensors(model):
        torch.testing.assert_close(t.product(), snap.weights[t.name] * SHRINK**DEPTH)


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_one_penalty_step_is_exact_under_bf16_mixed(tmp_path, precision):
    """Zero loss, plain SGD, one step: every float32 factor becomes ω − lr·(2λ/D)·ω, as the optimizer computes it."""
    snap = FactorSnapshot()
    model = ToyModel(lr=LR, zero_loss=True, n=16, batch_size=16)
    dwf = DWFCallback(
        depth=DEPTH,
        regime=FixedLamConfig(LAM, recovery=0),
        verbose=False,
        factor_lr=PLAIN_FACTOR_LR,
        collapse=CollapseConfig(on_fit_end=False),
    )
    trainer = Trainer(
        **trainer_kwargs(tmp_path, max_epochs=1, precision=precision, callbacks=[dwf, snap], enable_checkpointing=False)
    )
    trainer.fit(model)
    assert trainer.global_step == 1
    factors = factor_parameters(model)
    assert len(factors) == len(snap.factors) == 6
    coef = 2 * LAM / DEPTH
    for end, start in zip(factors, snap.factors):
        assert end.dtype == torch.float32
        grad = torch.zeros_like(start).add_(start, alpha=coef)  # FactorPenalty: grad += 2λ/D·ω on a zero data gradient
        assert torch.equal(end.detach(), start.add(grad, alpha=-LR))  # SGD: ω ← ω − lr·grad
        torch.testing.assert_close(end.detach(), start * SHRINK, rtol=1.3e-6, atol=0)


class _AdamWToy(ToyModel):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.1)


@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="a CPU gradient scaler needs torch >= 2.3")
@pytest.mark.parametrize("scaler", [False, True], ids=["32-true", "16-mixed-scaler"])
def test_multiplied_decoupled_step_is_the_same_with_a_grad_scaler(tmp_path, scaler):
    """Zero loss, AdamW with weight decay, factor LR multiplier m, one step: every factor becomes ω·(1 − m·lr·m·2λ/D)
    (the shrink at ``m × lr``, scaled by m with the rest of the update; the user's decay cancelled) whether Lightning
    runs the penalty inside the optimizer's closure (32 bits) or before ``scaler.step`` (16-bit AMP with a gradient
    scaler, here on CPU). Before 2026-12-07 the scaler's order gave ω·(1 − lr·m·2λ/D)·(1 − m·lr·wd)/(1 − lr·wd)."""
    lam, lr, m = 0.3, 0.01, 5.0
    snap = FactorSnapshot()
    dwf = DWFCallback(depth=3, regime=FixedLamConfig(lam, recovery=0), verbose=False,
                      factor_lr=FactorLRConfig(multiplier=m, warmup=0.0, check="off", pattern_step_cap=None),
                      collapse=CollapseConfig(on_fit_end=False))
    plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))] if scaler else []
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=1, callbacks=[dwf, snap], enable_checkpointing=False,
                                       plugins=plugins))
    trainer.fit(_AdamWToy(lr=lr, zero_loss=True, n=16, batch_size=16))
    assert trainer.global_step == 1
    assert (getattr(trainer.precision_plugin, "scaler", None) is not None) == scaler
    kept = 1 - m * lr * m * 2 * lam / 3
    for end, start in zip(factor_parameters(trainer.lightning_module), snap.factors, strict=True):
        survived = end != 0  # the proximal step after it zeroes the smallest
        assert survived.any()
        torch.testing.assert_close(end.detach()[survived], start[survived] * kept, rtol=1e-6, atol=0)


@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="a CPU gradient scaler needs torch >= 2.3")
def test_a_step_the_grad_scaler_skips_leaves_the_factors_alone(tmp_path):
    """Zero loss, AdamW with weight decay, multiplier m, 16-bit AMP with a gradient scaler; the first step's
    gradients are made non-finite (the loss stays finite, as when float16 gradients overflow), so the scaler skips
    it: after two steps every factor is ω·(1 − m·lr·m·2λ/D), one penalty step. Before 2026-12-07 the skipped step
    left its shrink (at ``m × lr``, unscaled) and its neutralized decay behind."""
    lam, lr, m = 0.3, 0.01, 5.0
    snap = FactorSnapshot()
    dwf = DWFCallback(depth=3, regime=FixedLamConfig(lam, recovery=0), verbose=False,
                      factor_lr=FactorLRConfig(multiplier=m, warmup=0.0, check="off", pattern_step_cap=None),
                      collapse=CollapseConfig(on_fit_end=False))
    scaler = torch.amp.GradScaler("cpu")
    initial = scaler.get_scale()  # it halves at a skipped step
    model = _AdamWToy(lr=lr, zero_loss=True, n=32, batch_size=16)
    bias = next(p for n, p in model.named_parameters() if n.endswith("bias"))
    bias.register_hook(lambda g: g + float("inf") if scaler.get_scale() == initial else g)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=2, callbacks=[dwf, snap], enable_checkpointing=False,
                                       plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]))
    trainer.fit(model)
    assert scaler.get_scale() < initial  # the first step was skipped
    kept = 1 - m * lr * m * 2 * lam / 3
    for end, start in zip(factor_parameters(trainer.lightning_module), snap.factors, strict=True):
        survived = end != 0
        assert survived.any()
        torch.testing.assert_close(end.detach()[survived], start[survived] * kept, rtol=1e-6, atol=0)
