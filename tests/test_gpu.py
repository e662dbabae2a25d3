"""CUDA-only checks: mixed precision with a GradScaler and target mode on a GPU (skipped without one; CI has none).

Run them where a GPU is: ``pytest tests/test_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import PLAIN_FACTOR_LR, FactorSnapshot, ToyModel, trainer_kwargs
from lightning.pytorch import Trainer

from lightning_dwf import CollapseConfig, DWFCallback, factor_parameters

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpu_kwargs(tmp_path, **overrides):
    return trainer_kwargs(tmp_path, accelerator="gpu", **overrides)


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed"])
def test_penalty_step_is_exact_under_mixed_precision(tmp_path, precision):
    """With a zero data loss every factor shrinks by exactly (1 − lr·2λ/D) per optimizer step. Under 16-mixed the
    GradScaler's scale (65,536 at the start) multiplies the loss gradient: the penalty must be added after unscaling,
    or the shrink would be 65,536 times too small."""
    lam, lr, depth = 0.5, 0.2, 3
    model = ToyModel(lr=lr, zero_loss=True, n=64, batch_size=16)
    dwf = DWFCallback(
        depth=depth, lam=lam, factor_lr=PLAIN_FACTOR_LR, collapse=CollapseConfig(on_fit_end=False)
    )
    snap = FactorSnapshot()
    trainer = Trainer(
        **gpu_kwargs(tmp_path, max_epochs=1, precision=precision, callbacks=[dwf, snap], enable_checkpointing=False)
    )
    trainer.fit(model)
    assert trainer.global_step == 4
    if precision == "16-mixed":
        assert trainer.precision_plugin.scaler.get_scale() == 65536.0  # no step was skipped for inf/NaN
    shrink = (1 - lr * 2 * lam / depth) ** trainer.global_step
    for end, start in zip(factor_parameters(model), snap.factors):
        assert end.dtype == torch.float32  # the factors stay float32 under mixed precision
        torch.testing.assert_close(end.cpu(), start.cpu() * shrink)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_target_mode_on_gpu(tmp_path, precision, kind):
    """Target mode on a GPU with mixed precision: the target exactly, finite factors, a collapsed checkpoint that
    loads on CPU."""
    dwf = DWFCallback(depth=3, target_sparsity=0.9, verbose=False)
    model = ToyModel(kind=kind, lr=0.1, momentum=0.9, scheduler=True, n=512)
    trainer = Trainer(
        **gpu_kwargs(tmp_path, max_epochs=10, precision=precision, callbacks=[dwf], enable_checkpointing=False)
    )
    trainer.fit(model)
    report = dwf.final_report
    assert report.finite and abs(report.sparsity - 0.9) <= 0.005, report.metrics(per_layer=False)
    assert trainer.callback_metrics["val_acc"] > 0.8
    loaded = ToyModel.load_from_checkpoint(dwf.collapsed_checkpoint_path, map_location="cpu")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value.cpu())
