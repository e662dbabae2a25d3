"""A fixed-λ fit end to end on tiny Linear and Conv+BatchNorm models (Lightning's test style): the metrics and the
collapsed checkpoint, exact zeros and a model that still learns at a useful λ, and the dead-network warnings at a λ far
too large."""

from __future__ import annotations

import csv
import glob
import logging
import os
import warnings

import pytest
import torch
from conftest import PLAIN_FACTOR_LR, ToyModel, toy_data, trainer_kwargs
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_dwf import DWFCallback, DWFDeadLayerWarning, FixedLamConfig, factorized_tensors


class OutputsBeforeCollapse(Callback):
    """Records the (factorized) model's outputs on fixed inputs at train end, before DWF collapses it."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.outputs: torch.Tensor | None = None

    def on_train_end(self, trainer, pl_module):
        assert factorized_tensors(pl_module)
        pl_module.eval()
        with torch.no_grad():
            self.outputs = pl_module(self.x).clone()
        pl_module.train()


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_fit_logs_metrics_and_writes_collapsed_checkpoint(tmp_path, depth, kind):
    model = ToyModel(kind=kind, lr=0.5, scheduler=True)
    dwf = DWFCallback(depth=depth, regime=FixedLamConfig(0.02, recovery=0), factor_lr=PLAIN_FACTOR_LR)
    x = toy_data(16, kind, seed=3).tensors[0]
    probe = OutputsBeforeCollapse(x)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=3, logger=logger, callbacks=[dwf, probe]))
    trainer.fit(model)

    for key in (
        "dwf/sparsity",
        "dwf/compression_ratio",
        "dwf/misalignment",
        "dwf/penalty",
        "dwf/sparsity/net.0.weight",
    ):
        assert key in trainer.callback_metrics, key
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert any(row.get("dwf/sparsity") for row in rows)
    assert any(row.get("dwf/final/compression_ratio") for row in rows)

    # the model is plain again, and the collapsed checkpoint loads into the plain class, strict, with no callback
    assert not factorized_tensors(model) and type(model.net[0]) in (nn.Linear, nn.Conv2d)
    path = dwf.collapsed_checkpoint_path
    assert path and os.path.isfile(path) and os.path.dirname(path) == trainer.checkpoint_callback.dirpath
    assert not glob.glob(path + ".tmp*")
    loaded = ToyModel.load_from_checkpoint(path)
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), probe.outputs, rtol=1e-4, atol=1e-5)
    assert dwf.final_report is not None
    nonzero = sum(int(m.weight.count_nonzero()) for m in loaded.net if hasattr(m, "weight") and m.weight.dim() > 1)
    assert nonzero == dwf.final_report.nonzero


def test_training_produces_exact_zeros(tmp_path):
    """The whole mechanism works: penalty + LR above the floor gives exact zeros and a compressed model that still
    learns."""
    model = ToyModel(lr=0.3, momentum=0.9, scheduler=True, n=512)
    # above the LR floor (λ = 0.01 is below it: CR ~1.4), below the cliff: λ = 0.03 killed the net for one init of
    # eight on torch 2.11 (all weights zero), λ = 0.02 kept 84-100 % accuracy at CR 120-272 on torch 2.11 and 2.13
    dwf = DWFCallback(depth=3, regime=FixedLamConfig(0.02, recovery=0))
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=25, callbacks=[dwf], enable_checkpointing=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model)
    assert not [w for w in caught if "below the floor" in str(w.message) or issubclass(w.category, DWFDeadLayerWarning)]
    report = dwf.final_report
    assert report.compression_ratio > 5, report.metrics(per_layer=False)
    assert not report.dead_layers
    assert trainer.callback_metrics["val_acc"] > 0.75  # chance is 0.5; 64 validation samples
    assert os.path.isfile(os.path.join(tmp_path, "dwf-collapsed.ckpt"))


def test_default_ramps_and_keeps_every_layer_at_a_lam_far_too_large(tmp_path, caplog, monkeypatch):
    """``lam=`` under SGD ramps λ, the proximal step makes exact zeros and its guard keeps every layer its share, where
    the same λ held constant empties the net (as 1.0 does in the test below); the choice is reported at train start."""
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)  # as in test_target_mode
    model = ToyModel(lr=0.1, momentum=0.9, n=256)
    dwf = DWFCallback(depth=3, lam=0.3, factor_lr=PLAIN_FACTOR_LR)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=20, callbacks=[dwf], enable_checkpointing=False))
    with warnings.catch_warnings(), caplog.at_level(logging.INFO):
        warnings.simplefilter("error", DWFDeadLayerWarning)
        trainer.fit(model)
    assert "λ ramps from 0" in caplog.text and "(the default; FixedLamConfig(lam, recovery=0)" in caplog.text
    assert dwf._run.regime.recovery == 0.5 and dwf.final_report.dead_layers == []
    assert dwf.final_report.sparsity > 0.9  # far too large: only the guard's share is left
    for layer in (model.net[0], model.net[2]):
        assert 0 < int((layer.weight != 0).sum()) < layer.weight.numel()  # exact zeros, and every layer kept some


@pytest.mark.parametrize("depth", [2, 3])
def test_dead_network_is_warned_during_training_and_at_collapse(tmp_path, depth):
    """A constant λ far above the cliff zeroes every weight: the callback says so (once while training, again at
    collapse)."""
    model = ToyModel(lr=0.1, momentum=0.9, n=256)
    dwf = DWFCallback(
        depth=depth, regime=FixedLamConfig(1.0, recovery=0), factor_lr=PLAIN_FACTOR_LR
    )  # each factor shrinks by ~10 % per step: 160 steps kill the net
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=20, callbacks=[dwf], enable_checkpointing=False))
    with pytest.warns(DWFDeadLayerWarning) as caught:
        trainer.fit(model)
    messages = [str(w.message) for w in caught if issubclass(w.category, DWFDeadLayerWarning)]
    assert len(messages) == 2, messages
    assert "at step" in messages[0] and "net.0.weight" in messages[0] and "lower `lam`" in messages[0]
    assert "collapsed model has no non-zero weight" in messages[1]
    assert dwf.final_report.dead_layers == ["net.0.weight", "net.2.weight"]
    assert os.path.isfile(os.path.join(tmp_path, "dwf-collapsed.ckpt"))  # written as trained, with the warning
