"""Non-finite weights: without rollbacks the run stops with no checkpoint written; the defaults at batch 32 do not
diverge; a forced divergence rolls back to the last finite state, halves the factor LR and finishes; the rollback state
and the auto multipliers survive a resume exactly."""

from __future__ import annotations

import glob
import math
import os
import warnings

import pytest
import torch
from conftest import ToyModel, trainer_kwargs
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_dwf import CollapseConfig, DWFCallback, DWFRollbackWarning, FactorLRConfig, factor_parameters

from .helpers import OptToy, _fit


def test_divergence_is_caught_and_no_checkpoint_written(tmp_path):
    dwf = DWFCallback(depth=3, lam=1e-3, factor_lr=FactorLRConfig(multiplier=1.0, warmup=0.0, check="off", rollbacks=0))
    with pytest.raises(RuntimeError, match="became NaN/Inf") as err:
        Trainer(**trainer_kwargs(tmp_path, max_epochs=3, callbacks=[dwf])).fit(ToyModel(lr=1e4, momentum=0.9))
    step = int(str(err.value).split(" at step ")[1].split(" ")[0])
    assert step <= 3  # the first non-finite loss (the batch after the factors overflow) stops the run
    assert not glob.glob(os.path.join(tmp_path, "**", "dwf-collapsed.ckpt*"), recursive=True)


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_batch_32_defaults_do_not_diverge(tmp_path, opt):
    """SGD lr 0.1 momentum 0.9 (the setting whose ×10 recipe diverged at batch 64) and AdamW at batch 32: no NaN, no
    rollback, the target met."""
    model = OptToy(opt, lr=0.1 if opt == "sgd" else 1e-2, n=1024, batch_size=32)
    dwf = DWFCallback(depth=3, target_sparsity=0.95, verbose=False, collapse=CollapseConfig(save=False))
    trainer = _fit(tmp_path, model, dwf, max_epochs=6)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert dwf.rollbacks == 0
    assert abs(dwf.final_report.sparsity - 0.95) <= 1 / dwf.final_report.numel
    assert trainer.callback_metrics["val_acc"] > 0.7


class PoisonOnce(Callback):
    """Throws one factor entry to Inf before the optimizer step ``at``, once (a forced divergence)."""

    def __init__(self, at: int) -> None:
        self.at, self.done = at, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at and not self.done:
            self.done = True
            with torch.no_grad():
                factor_parameters(pl_module)[0].view(-1)[0] = math.inf


@pytest.mark.parametrize("mode", [dict(lam=0.02), dict(target_sparsity=0.9)])
def test_forced_divergence_rolls_back_and_finishes(tmp_path, mode):
    model = ToyModel(lr=0.1, momentum=0.9, scheduler=True, n=512)
    dwf = DWFCallback(depth=3, verbose=False, collapse=CollapseConfig(save=False), **mode)
    poison = PoisonOnce(at=30)
    logged: list[tuple[int, float, float]] = []

    class Log(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            if "dwf/rollbacks" in m:
                logged.append((trainer.global_step, float(m["dwf/rollbacks"]), float(m["dwf/factor_lr_scale"])))

    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=8, callbacks=[dwf, poison, Log()],
                                       enable_checkpointing=False))
    with pytest.warns(DWFRollbackWarning, match=r"NaN/Inf at step 31.*back to the state of step 30"):
        trainer.fit(model)
    assert poison.done and dwf.rollbacks == 1 and dwf.factor_lr_scale == 0.5
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert dwf.final_report is not None and trainer.global_step == 8 * 16
    assert logged[-1][1:] == (1.0, 0.5)
    if "target_sparsity" in mode:
        assert abs(dwf.final_report.sparsity - 0.9) <= 1 / dwf.final_report.numel


class StopAfter(Callback):
    """An interruption: the run plans its epochs but stops after epoch ``epoch``."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = trainer.current_epoch == self.epoch


def test_rollback_scale_and_auto_multipliers_survive_resume(tmp_path):
    """The factor LR multipliers chosen at the start and the rollback state are checkpointed: resuming is exact."""

    def run(extra, ckpt_path=None, root="a"):
        torch.manual_seed(0)
        model = OptToy("sgd", lr=0.1, n=512)
        ckpt = ModelCheckpoint(dirpath=tmp_path / root, save_last=True, every_n_epochs=1, save_top_k=-1)
        dwf = DWFCallback(depth=3, target_sparsity=0.9, verbose=False, collapse=CollapseConfig(save=False))
        trainer = Trainer(**trainer_kwargs(tmp_path / root, max_epochs=8, callbacks=[dwf, ckpt, *extra]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DWFRollbackWarning)
            trainer.fit(model, ckpt_path=ckpt_path)
        return model, dwf

    full, dwf_full = run([PoisonOnce(at=5)], root="full")
    run([PoisonOnce(at=5), StopAfter(3)], root="part")
    resumed, dwf_resumed = run([], ckpt_path=str(tmp_path / "part" / "last.ckpt"), root="part")
    multipliers = dwf_full.factor_lr_multipliers
    assert multipliers == dwf_resumed.factor_lr_multipliers and len(multipliers) == 2
    assert dwf_resumed.factor_lr_scale == dwf_full.factor_lr_scale == 0.5
    assert dwf_resumed.rollbacks == dwf_full.rollbacks == 1
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
