"""Pictures in the loggers during a fit: weight histograms at their cadence and the summary figure at fit end
(TensorBoard, W&B offline), none when off or for other loggers, and training unchanged by them."""

from __future__ import annotations

import glob
import os

import pytest
import torch
from conftest import PLAIN_FACTOR_LR, ToyModel, trainer_kwargs, wandb_run_records
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from lightning_dwf import DWFCallback
from lightning_dwf.observe.pictures import FIGURE_TAG, HISTOGRAM_TAG

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _fit(tmp_path, logger, log_pictures=True, max_epochs=2) -> tuple[DWFCallback, ToyModel]:
    dwf = DWFCallback(depth=3, lam=0.01, factor_lr=PLAIN_FACTOR_LR, log_pictures=log_pictures)
    model = ToyModel()
    Trainer(**trainer_kwargs(tmp_path, max_epochs=max_epochs, logger=logger, callbacks=[dwf])).fit(model)
    return dwf, model


def _events(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"histograms": 0, "images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_tensorboard_gets_histograms_and_figure(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    dwf, _ = _fit(tmp_path, logger)  # 16 optimizer steps, metrics every step: histograms at steps 10 (default ×10)
    tags = _events(logger.log_dir).Tags()
    expected = {f"{HISTOGRAM_TAG}/net.0.weight", f"{HISTOGRAM_TAG}/net.2.weight"}
    assert expected <= set(tags["histograms"])
    acc = _events(logger.log_dir)
    assert [e.step for e in acc.Histograms(f"{HISTOGRAM_TAG}/net.0.weight")] == [10]
    assert FIGURE_TAG in tags["images"]
    (image,) = acc.Images(FIGURE_TAG)
    assert image.step == 16 and image.width > 100 and image.height > 100
    assert len(dwf.sparsity_curve) == 16


def test_int_cadence_and_training_unchanged(tmp_path):
    """An explicit cadence is in optimizer steps; pictures change nothing about training."""
    torch.manual_seed(0)
    logger = TensorBoardLogger(tmp_path, name="tb")
    _, with_pictures = _fit(tmp_path / "a", logger, log_pictures=4)
    steps = [e.step for e in _events(logger.log_dir).Histograms(f"{HISTOGRAM_TAG}/net.0.weight")]
    assert steps == [4, 8, 12, 16]
    # a cadence that is not a multiple of the metric cadence: histograms still every 3 steps
    logger = TensorBoardLogger(tmp_path, name="tb_3")
    dwf = DWFCallback(depth=3, lam=0.01, factor_lr=PLAIN_FACTOR_LR, log_pictures=3)
    Trainer(**trainer_kwargs(tmp_path / "c", max_epochs=1, logger=logger, log_every_n_steps=4, callbacks=[dwf])).fit(
        ToyModel()
    )
    assert [e.step for e in _events(logger.log_dir).Histograms(f"{HISTOGRAM_TAG}/net.0.weight")] == [3, 6]
    torch.manual_seed(0)
    _, without = _fit(tmp_path / "b", TensorBoardLogger(tmp_path, name="tb_off"), log_pictures=False)
    for a, b in zip(with_pictures.state_dict().values(), without.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_log_pictures_false_writes_none(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    _fit(tmp_path, logger, log_pictures=False)
    tags = _events(logger.log_dir).Tags()
    assert not tags["histograms"] and not tags["images"]
    assert "dwf/sparsity" in tags["scalars"]


def test_other_loggers_are_skipped(tmp_path):
    dwf, _ = _fit(tmp_path, CSVLogger(tmp_path, name="csv"), max_epochs=1)
    assert dwf.final_report is not None


def test_wandb_offline_run_gets_the_figure(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), project="dwf-test", offline=True)
    _fit(tmp_path, logger)
    logger.experiment.finish()
    (run,) = glob.glob(os.path.join(tmp_path, "wandb", "offline-run-*"))
    images = glob.glob(os.path.join(run, "files", "media", "images", "**", "*.png"), recursive=True)
    assert images, os.listdir(run)
    assert HISTOGRAM_TAG.encode() in wandb_run_records(run, HISTOGRAM_TAG.encode())
