"""Target mode through the callback: reaching the requested sparsity (SGD and Adam-type optimizers, low targets, no
recovery), the controller's logged values, gain and control threshold, resuming the controller exactly, early refusal of
an unreachable target, zero weights, and global cuts that leave every layer alive unless asked not to."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
from conftest import PLAIN_FACTOR_LR, ToyModel, trainer_kwargs
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_dwf import (
    CollapseConfig,
    DWFCallback,
    DWFDeadLayerWarning,
    FactorizeConfig,
    FactorLRConfig,
    ScheduleConfig,
)
from lightning_dwf.core.factorize import factorized_tensors
from lightning_dwf.training.controller import default_control_threshold

from .helpers import OptToy, _fit


class WeightRMS(Callback):
    """Records the RMS of all factorized weights at train start (what the default control threshold scales with)."""

    def on_train_start(self, trainer, pl_module):
        weights = [t.product().detach() for t in factorized_tensors(pl_module)]
        self.rms = math.sqrt(sum(float(w.pow(2).sum()) for w in weights) / sum(w.numel() for w in weights))
        self.steps = int(trainer.estimated_stepping_batches)


def test_reaches_the_target_and_logs_the_controller(tmp_path, caplog, monkeypatch):
    # Lightning stops its logger propagating to the root logger (where caplog listens) when the root had no handler
    # at import time, which depends on the pytest version
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)
    dwf, rms = DWFCallback(depth=3, target_sparsity=0.98, verbose=False), WeightRMS()
    logger = CSVLogger(tmp_path)
    trainer = Trainer(
        **trainer_kwargs(tmp_path, max_epochs=25, callbacks=[dwf, rms], logger=logger, enable_checkpointing=False)
    )
    with caplog.at_level(logging.INFO):
        # lr 0.1: at 0.3 this toy task sits at the factors' stability edge (seeds 1-5: 2 of 5 diverged, 3 ended below
        # 85 %)
        trainer.fit(ToyModel(lr=0.1, momentum=0.9, scheduler=True, n=512))
    assert (
        "sparsity pattern fixed. The penalty had brought" in caplog.text
        and "below the control threshold" in caplog.text
    )
    assert dwf.control_threshold == pytest.approx(default_control_threshold(rms.rms, rms.steps))
    assert abs(dwf.final_report.sparsity - 0.98) <= 0.005
    assert (
        dwf.final_report.threshold == dwf.collapse.threshold
    )  # the recovery phase kept exact zeros: no cut at fit end
    assert trainer.callback_metrics["val_acc"] > 0.85
    assert {"dwf/lam", "dwf/target_sparsity", "dwf/reference_sparsity"} <= set(trainer.callback_metrics)
    assert float(trainer.callback_metrics["dwf/target_sparsity"]) == pytest.approx(0.98)
    assert float(trainer.callback_metrics["dwf/lam"]) == 0.0  # λ released in the recovery phase


@pytest.mark.parametrize("target, recovery", [(0.3, 0.4), (0.9, 0.0)])
def test_low_targets_and_no_recovery_end_exactly_at_the_target(tmp_path, target, recovery):
    """A target below what the dynamics reach for free is met by keeping the largest sub-threshold weights."""
    dwf = DWFCallback(depth=3, target_sparsity=target, verbose=False, schedule=ScheduleConfig(recovery=recovery))
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=10, callbacks=[dwf], enable_checkpointing=False))
    trainer.fit(ToyModel(lr=0.3, momentum=0.9, scheduler=True, n=512))
    assert abs(dwf.final_report.sparsity - target) <= 0.005


@pytest.mark.parametrize("opt", ["adamw", "adam", "rmsprop"])
@pytest.mark.parametrize("depth", [2, 3])
def test_adam_type_target_mode_reaches_exact_zeros(tmp_path, opt, depth):
    """Defaults only: the target is met exactly, in exact zeros, with no layer emptied, and the net still learns."""
    model = OptToy(opt, lr=3e-3, n=512)
    dwf = DWFCallback(depth=depth, target_sparsity=0.9, verbose=False, collapse=CollapseConfig(save=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DWFDeadLayerWarning)
        trainer = _fit(tmp_path, model, dwf, max_epochs=10)
    report = dwf.final_report
    weights = [model.net[0].weight, model.net[2].weight]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == report.numel - report.nonzero
    assert abs(zeros / report.numel - 0.9) <= 1 / report.numel
    assert all(bool(w.any()) for w in weights)
    assert trainer.callback_metrics["val_acc"] > 0.7


class LamTrace(Callback):
    def __init__(self) -> None:
        self.lams: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        dwf = next(c for c in trainer.callbacks if isinstance(c, DWFCallback))
        self.lams.append(dwf.current_lam)


@pytest.mark.parametrize("gain", [0.0, 0.2])
def test_schedule_gain_reaches_the_controller(tmp_path, gain):
    """gain=0 is the ablation the benchmarks run: λ stays at its start value until the recovery point."""
    trace = LamTrace()
    dwf = DWFCallback(depth=3, target_sparsity=0.9, schedule=ScheduleConfig(gain=gain, recovery=0.3), verbose=False)
    Trainer(**trainer_kwargs(tmp_path, max_epochs=8, callbacks=[dwf, trace])).fit(ToyModel())
    before_recovery = trace.lams[: int(0.7 * len(trace.lams)) - 1]
    assert len(set(before_recovery)) == (1 if gain == 0 else len(set(before_recovery)))
    if gain:
        assert len(set(before_recovery)) > 5
    assert trace.lams[-1] == 0.0 and abs(dwf.final_report.sparsity - 0.9) < 0.01


def test_explicit_control_threshold_is_used(tmp_path):
    dwf = DWFCallback(depth=3, target_sparsity=0.9, verbose=False, schedule=ScheduleConfig(control_threshold=2e-3))
    Trainer(**trainer_kwargs(tmp_path, max_epochs=10, callbacks=[dwf], enable_checkpointing=False)).fit(
        ToyModel(lr=0.1, momentum=0.9, n=512, scheduler=True)
    )
    assert dwf.control_threshold == 2e-3
    with pytest.raises(ValueError, match="control_threshold"):
        DWFCallback(target_sparsity=0.9, schedule=ScheduleConfig(control_threshold=0.0))


@pytest.mark.parametrize("fixed_pattern", ["factors", "dense"])
@pytest.mark.parametrize("stop_epoch", [2, 7], ids=["during-ramp", "during-recovery"])
def test_resume_restores_the_controller_exactly(tmp_path, stop_epoch, fixed_pattern):
    class StopAfter(Callback):  # an interruption: the run plans 10 epochs but stops after `stop_epoch` + 1
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = trainer.current_epoch == stop_epoch

    class LamTrace(Callback):  # after DWFCallback in the list: λ as the controller left it after each step
        def __init__(self, dwf):
            self.dwf, self.lam = dwf, {}

        def on_train_batch_end(self, trainer, *args):
            self.lam[trainer.global_step] = self.dwf.current_lam

    def run(stop, root, ckpt_path=None):
        torch.manual_seed(0)
        dwf = DWFCallback(
            depth=3,
            target_sparsity=0.95,
            verbose=False,
            schedule=ScheduleConfig(recovery=0.4),
            factor_lr=FactorLRConfig(multiplier=2.0, warmup=0.2, fixed_pattern=fixed_pattern),
        )
        ckpt = ModelCheckpoint(dirpath=tmp_path / root, save_last=True, every_n_epochs=1)
        trace = LamTrace(dwf)
        callbacks = [dwf, trace, ckpt] + ([StopAfter()] if stop else [])
        trainer = Trainer(**trainer_kwargs(tmp_path / root, max_epochs=10, callbacks=callbacks))
        model = ToyModel(lr=0.15, momentum=0.9, scheduler=True, t_max=160, n=512)  # factors: 0.3 after the warm-up
        trainer.fit(model, ckpt_path=ckpt_path)
        return model, dwf, trace.lam

    def controller_state(root):
        callbacks = torch.load(tmp_path / root / "last.ckpt", weights_only=False)["callbacks"]
        return next(state for key, state in callbacks.items() if "DWFCallback" in key)["controller"]

    full, dwf_full, lam_full = run(False, "full")
    run(True, "part")
    resumed, dwf_resumed, lam_resumed = run(False, "part", ckpt_path=str(tmp_path / "part" / "last.ckpt"))
    # λ after every step of the resumed part equals the uninterrupted run's; it is 0 from the recovery point (step 96)
    # on, so the ramp case compares the 47 non-zero values before it, the recovery case the restored recovery step
    resume_step = 16 * (stop_epoch + 1)
    assert sorted(lam_resumed) == list(range(resume_step + 1, 161))
    assert lam_resumed == {step: lam_full[step] for step in lam_resumed}
    assert all((lam > 0) == (step < 96) for step, lam in lam_full.items())
    assert controller_state("part") == controller_state("full")
    assert controller_state("full")["recovery_step"] == 96 and controller_state("full")["lam_min"] > 0
    assert dwf_resumed.current_lam == dwf_full.current_lam
    # the default control threshold depends on the weights at the start: a resume keeps the one the run started with
    assert dwf_resumed.control_threshold == dwf_full.control_threshold
    assert full.state_dict().keys() == resumed.state_dict().keys()
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_unreachable_target_is_refused_early(tmp_path):
    """With one cut at the recovery point (``gradual=False``) the penalty alone must get there: refused up front. The
    default gradual cuts reach the target exactly in the same short run."""
    schedule = ScheduleConfig(control_threshold=1e-3, gradual=False)
    with pytest.raises(MisconfigurationException, match="cannot be reached in"):
        Trainer(
            **trainer_kwargs(
                tmp_path, max_epochs=8, callbacks=[DWFCallback(depth=3, target_sparsity=0.9, schedule=schedule)]
            )
        ).fit(ToyModel(lr=1e-4))
    dwf = DWFCallback(depth=3, target_sparsity=0.9, verbose=False, collapse=CollapseConfig(save=False))
    Trainer(**trainer_kwargs(tmp_path, max_epochs=8, callbacks=[dwf], enable_checkpointing=False)).fit(
        ToyModel(lr=1e-4)
    )
    assert abs(dwf.final_report.sparsity - 0.9) <= 1 / dwf.final_report.numel
    with pytest.raises(MisconfigurationException, match="at least 50 optimizer steps"):
        Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[DWFCallback(depth=3, target_sparsity=0.9)])).fit(
            ToyModel()
        )


def test_all_zero_weights_do_not_break_the_default_control_threshold(tmp_path):
    """Weights of RMS 0 (a zero pretrained model) give a positive control threshold instead of a log(0) crash."""
    model = ToyModel(lr=0.3, momentum=0.9, n=512)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    dwf = DWFCallback(depth=3, target_sparsity=0.9, verbose=False, factorize=FactorizeConfig(init="balanced"))
    with pytest.warns(
        DWFDeadLayerWarning, match="no non-zero weight.*lower the target, or keep these layers dense"
    ):  # zero weights get no gradient: the net stays dead
        Trainer(**trainer_kwargs(tmp_path, max_epochs=10, callbacks=[dwf], enable_checkpointing=False)).fit(model)
    assert dwf.control_threshold == dwf.collapse.threshold and dwf.final_report.sparsity == 1.0


def _fit_with_a_tiny_classifier(tmp_path, scale: float, target: float, schedule: ScheduleConfig) -> DWFCallback:
    """Target mode on a toy whose 64-weight classifier is ``scale`` times smaller than it was initialized, far below
    the 1,024-weight hidden layer: a pure global magnitude cut takes it first."""
    model = ToyModel(lr=0.1, momentum=0.9, n=256)
    with torch.no_grad():
        model.net[2].weight.mul_(scale)
    dwf = DWFCallback(
        depth=3,
        target_sparsity=target,
        verbose=False,
        factorize=FactorizeConfig(init="balanced"),
        factor_lr=PLAIN_FACTOR_LR,
        schedule=schedule,
        collapse=CollapseConfig(save=False),
    )
    Trainer(**trainer_kwargs(tmp_path, max_epochs=8, callbacks=[dwf], enable_checkpointing=False)).fit(model)
    return dwf


@pytest.mark.parametrize("gradual", [True, False])
def test_no_layer_is_emptied_by_the_global_cut(tmp_path, gradual):
    """A layer far smaller in scale than the rest would lose every weight to a pure global magnitude cut; each layer
    keeps at least a tenth of its share, and the global target is still met within one weight."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DWFDeadLayerWarning)
        dwf = _fit_with_a_tiny_classifier(tmp_path, 1e-3, 0.9, ScheduleConfig(gradual=gradual))
    report = dwf.final_report
    assert not report.dead_layers
    classifier = {layer.name: layer for layer in report.layers}["net.2.weight"]
    assert classifier.nonzero >= math.ceil(0.1 * 0.1 * 64)
    assert abs(report.sparsity - 0.9) <= 1 / report.numel


def test_a_layer_emptied_by_the_global_cut_is_named(tmp_path):
    """Asked for (``min_layer_share=0``: a pure global magnitude cut), a layer far smaller than the rest can lose
    every weight; the callback says so."""
    with pytest.warns(
        DWFDeadLayerWarning, match=r"no non-zero weight in \['net.2.weight'\].*target_sparsity=0.1 left nothing"
    ):
        dwf = _fit_with_a_tiny_classifier(tmp_path, 1e-6, 0.1, ScheduleConfig(min_layer_share=0.0))
    assert dwf.final_report.dead_layers == ["net.2.weight"] and abs(dwf.final_report.sparsity - 0.1) < 0.01
