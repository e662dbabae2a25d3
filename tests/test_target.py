"""target_sparsity: the λ controller, the closing threshold, and the callback reaching a requested sparsity."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ToyModel, trainer_kwargs
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_dwf import DWFCallback
from lightning_dwf.controller import SparsityController, closing_threshold


def test_reference_schedule_warmup_ramp_hold():
    c = SparsityController(target=0.9, total_steps=1000, lam=1e-3)
    assert c.reference(50) == 0.0 and c.reference(100) == 0.0
    assert 0 < c.reference(200) < c.reference(400) < 0.9
    assert c.reference(600) == pytest.approx(0.9) and c.reference(1000) == pytest.approx(0.9)


def test_controller_moves_lam_toward_the_schedule():
    c = SparsityController(target=0.9, total_steps=1000, lam=1e-3, lam_min=1e-6, lam_max=1.0)
    assert c.update(50, 0.0) == 1e-3  # warm-up: untouched
    up = c.update(700, 0.5)  # too dense -> λ rises, by at most max_step
    assert 1e-3 < up <= 1e-3 * math.exp(c.max_step) + 1e-12
    down = c.update(700, 0.99)  # too sparse -> λ falls, faster than it rose
    assert math.log(up / down) > math.log(up / 1e-3)
    clone = SparsityController(target=0.5, total_steps=1000, lam=1.0)
    clone.load_state_dict(c.state_dict())
    assert clone == c


def test_closing_threshold():
    w = [torch.tensor([1e-5, 2e-3, 0.1, 0.5]), torch.tensor([0.2, 3e-3, 1.0, 0.7])]
    assert closing_threshold(w, 0.125, 1e-3) == 1e-3  # already there
    t = closing_threshold(w, 0.5, 1e-3)
    assert sum(int((x.abs() < t).sum()) for x in w) == 4


def test_reaches_the_target_and_logs_the_controller(tmp_path):
    dwf = DWFCallback(depth=3, target_sparsity=0.98, verbose=False)
    logger = CSVLogger(tmp_path)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=25, callbacks=[dwf], logger=logger, enable_checkpointing=False))
    trainer.fit(ToyModel(lr=0.3, momentum=0.9, scheduler=True, n=512))
    assert abs(dwf.final_report.sparsity - 0.98) <= 0.005
    assert trainer.callback_metrics["val_acc"] > 0.85
    assert {"dwf/lam", "dwf/target_sparsity", "dwf/reference_sparsity"} <= set(trainer.callback_metrics)
    assert float(trainer.callback_metrics["dwf/target_sparsity"]) == pytest.approx(0.98)


def test_target_compression_is_the_same_dial():
    assert DWFCallback(target_compression=50).target_sparsity == pytest.approx(0.98)


def test_resume_restores_the_controller_exactly(tmp_path):
    class StopAfter(Callback):  # an interruption: the run plans 10 epochs but stops after 5
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = trainer.current_epoch == 4

    def run(stop, root, ckpt_path=None):
        torch.manual_seed(0)
        dwf = DWFCallback(depth=3, target_sparsity=0.95, verbose=False)
        ckpt = ModelCheckpoint(dirpath=tmp_path / root, save_last=True, every_n_epochs=1)
        callbacks = [dwf, ckpt] + ([StopAfter()] if stop else [])
        trainer = Trainer(**trainer_kwargs(tmp_path / root, max_epochs=10, callbacks=callbacks))
        model = ToyModel(lr=0.3, momentum=0.9, scheduler=True, t_max=160, n=512)
        trainer.fit(model, ckpt_path=ckpt_path)
        return model, dwf

    full, dwf_full = run(False, "full")
    run(True, "part")
    resumed, dwf_resumed = run(False, "part", ckpt_path=str(tmp_path / "part" / "last.ckpt"))
    assert dwf_resumed.lam == dwf_full.lam
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_unreachable_target_is_refused_early(tmp_path):
    with pytest.raises(MisconfigurationException, match="cannot be reached in"):
        Trainer(**trainer_kwargs(tmp_path, max_epochs=8, callbacks=[DWFCallback(depth=3, target_sparsity=0.9)])).fit(ToyModel(lr=1e-4))
    with pytest.raises(MisconfigurationException, match="at least 50 optimizer steps"):
        Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[DWFCallback(depth=3, target_sparsity=0.9)])).fit(ToyModel())
