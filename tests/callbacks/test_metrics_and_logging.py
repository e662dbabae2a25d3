"""What DWF logs and what monitors see: the logged values against the factors and the collapsed model, the logging
cadence, per-layer metrics, a W&B offline run, and ``dwf/sparsity`` monitored by EarlyStopping and ModelCheckpoint. The
values, the cadence and the monitoring tests pin the behaviour: they compare exact values (or float32-exact ones) so
that a change of behaviour, not only a crash, fails."""

from __future__ import annotations

import glob
import json
import math
import os

import pytest
import torch
from conftest import PLAIN_FACTOR_LR, ToyModel, trainer_kwargs, wandb_run_records
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import Logger, WandbLogger

from lightning_dwf import (
    CollapseConfig,
    DWFCallback,
    FactorizeConfig,
    FixedLamConfig,
    factor_parameters,
    factorized_tensors,
)
from lightning_dwf.core.collapse import has_factors

from .helpers import LINEAR_WEIGHTS, zero_fraction


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((step, dict(metrics)))

    def rows(self, key: str) -> list[tuple[int | None, dict[str, float]]]:
        return [(step, m) for step, m in self.calls if key in m]


class FactorProbe(Callback):
    """After DWFCallback (callbacks run in list order): the metrics recomputed from the factors at every optimizer
    step."""

    def __init__(self, lam: float, depth: int, threshold: float) -> None:
        self.lam, self.depth, self.threshold = lam, depth, threshold
        self.at: dict[int, dict[str, float]] = {}

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        tensors = factorized_tensors(pl_module)
        weights = {t.name: t.factors[0] * t.factors[1] * t.factors[2] for t in tensors}
        numel = sum(w.numel() for w in weights.values())
        zeros = sum(int((w.abs() < self.threshold).sum()) for w in weights.values())
        self.at[trainer.global_step] = {
            "dwf/factor_penalty": self.lam
            / self.depth
            * sum(float(f.double().pow(2).sum()) for t in tensors for f in t.factors),
            "dwf/penalty": self.lam * sum(float(w.double().abs().pow(2 / self.depth).sum()) for w in weights.values()),
            "dwf/sparsity": zeros / numel,
            **{f"dwf/sparsity/{n}": int((w.abs() < self.threshold).sum()) / w.numel() for n, w in weights.items()},
        }


def f32(x: float) -> float:
    """``x`` as ``LightningModule.log`` hands it on (a float32 tensor)."""
    return float(torch.tensor(x, dtype=torch.float32))


def test_logged_values_match_the_factors_and_the_collapsed_model(tmp_path):
    lam, depth, threshold = 0.05, 3, 0.05
    logger = RecordingLogger()
    probe = FactorProbe(lam, depth, threshold)
    dwf = DWFCallback(
        depth=depth,
        regime=FixedLamConfig(lam, recovery=0),
        verbose=False,
        collapse=CollapseConfig(threshold=threshold),
        factor_lr=PLAIN_FACTOR_LR,
    )
    model = ToyModel(lr=0.3, n=128, batch_size=16)
    trainer = Trainer(
        **trainer_kwargs(tmp_path, max_epochs=2, logger=logger, callbacks=[dwf, probe], enable_checkpointing=False)
    )
    trainer.fit(model)
    assert trainer.global_step == 16

    rows = logger.rows("dwf/sparsity")
    # the row at step s holds DWF's values after s optimizer steps (the loggers get them directly, at global_step)
    assert [step for step, _ in rows] == list(range(1, 17))
    for step, row in rows:
        expected = probe.at[step]
        assert set(k for k in row if k.startswith("dwf/")) == set(expected) | {
            "dwf/misalignment",
            "dwf/compression_ratio",
            "dwf/lam",
            "dwf/rollbacks",
            "dwf/factor_lr_scale",
        }
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)
        assert row["dwf/lam"] == lam  # the loggers get the exact values
        sparsity = row["dwf/sparsity"]
        assert row["dwf/compression_ratio"] == (
            math.inf if sparsity == 1 else pytest.approx(1 / (1 - sparsity), rel=1e-5)
        )
        assert 0 <= row["dwf/misalignment"] <= 1
    assert 0 < rows[-1][1]["dwf/sparsity"] < 1  # the numbers are not trivial

    # the collapsed model: exact zeros exactly where the last logged sparsity said (nothing changes after the last step)
    weights = [model.net[0].weight.detach(), model.net[2].weight.detach()]
    numel, zeros = sum(w.numel() for w in weights), sum(int((w == 0).sum()) for w in weights)
    assert rows[-1][1]["dwf/sparsity"] == pytest.approx(zeros / numel, rel=1e-12)
    final_rows = logger.rows("dwf/final/sparsity")
    assert len(final_rows) == 1
    step, final = final_rows[0]
    assert step == trainer.global_step
    assert set(final) == {
        f"dwf/final/{k}"
        for k in (
            "sparsity",
            "compression_ratio",
            "misalignment",
            "penalty",
            "factor_penalty",
            "compression_ratio_all_params",
            "threshold",
        )
    }
    assert final["dwf/final/sparsity"] == pytest.approx(zeros / numel, abs=1e-12)
    assert final["dwf/final/compression_ratio"] == pytest.approx(numel / (numel - zeros), rel=1e-12)
    params = list(model.parameters())
    assert final["dwf/final/compression_ratio_all_params"] == pytest.approx(
        sum(p.numel() for p in params) / sum(int(p.count_nonzero()) for p in params), rel=1e-12
    )
    assert final["dwf/final/threshold"] == threshold
    assert final["dwf/final/factor_penalty"] == pytest.approx(probe.at[16]["dwf/factor_penalty"], rel=1e-5)
    assert final["dwf/final/penalty"] == pytest.approx(probe.at[16]["dwf/penalty"], rel=1e-5)
    assert final["dwf/final/misalignment"] == rows[-1][1]["dwf/misalignment"]
    assert dwf.final_report.nonzero == numel - zeros


@pytest.mark.parametrize(
    "dwf_every, trainer_every, accumulate, expected",
    [
        (3, 1, 1, [3, 6, 8, 9, 12, 15, 16]),  # multiples of 3, plus each epoch's last batch
        (None, 5, 1, [5, 8, 10, 15, 16]),  # None: the Trainer's log_every_n_steps
        (None, 2, 1, [2, 4, 6, 8, 10, 12, 14, 16]),
        (5, 2, 1, [5, 8, 10, 15, 16]),  # the callback's value wins over the Trainer's
        (
            1,
            1,
            2,
            [0, 1, 2, 3, 4, 5, 6, 7, 8],
        ),  # accumulation: once per step (step 0 = the first batch, before any step)
        (3, 1, 2, [0, 3, 4, 6, 8]),
    ],
)
def test_log_cadence(tmp_path, dwf_every, trainer_every, accumulate, expected):
    """DWF logs when ``global_step % every == 0 or trainer.is_last_batch``, at most once per step, at that step
    (checked at the logger)."""
    logger = RecordingLogger()
    model = ToyModel(lr=0.1, n=256, batch_size=32)  # 8 batches per epoch, 2 epochs
    dwf = DWFCallback(
        depth=3, regime=FixedLamConfig(0.01, recovery=0),
        verbose=False, log_every_n_steps=dwf_every, factor_lr=PLAIN_FACTOR_LR
    )
    trainer = Trainer(
        **trainer_kwargs(
            tmp_path,
            max_epochs=2,
            log_every_n_steps=trainer_every,
            accumulate_grad_batches=accumulate,
            callbacks=[dwf],
            enable_checkpointing=False,
            logger=logger,
        )
    )
    trainer.fit(model)
    assert [step for step, _ in logger.rows("dwf/sparsity")] == expected


@pytest.mark.parametrize("per_layer", [True, False])
def test_log_per_layer(tmp_path, per_layer):
    logger = RecordingLogger()
    dwf = DWFCallback(
        depth=3,
        regime=FixedLamConfig(0.01, recovery=0),
        verbose=False,
        log_per_layer=per_layer,
        factor_lr=PLAIN_FACTOR_LR,
        factorize=FactorizeConfig(param_names=("weight", "bias"), exclude=["net.2"]),
    )
    trainer = Trainer(
        **trainer_kwargs(tmp_path, max_epochs=1, logger=logger, callbacks=[dwf], enable_checkpointing=False)
    )
    trainer.fit(ToyModel(n=64, batch_size=32))
    keys = {k for _, m in logger.calls for k in m if k.startswith("dwf/") and not k.startswith("dwf/final/")}
    base = {"dwf/sparsity", "dwf/compression_ratio", "dwf/misalignment", "dwf/penalty", "dwf/factor_penalty", "dwf/lam",
            "dwf/rollbacks", "dwf/factor_lr_scale"}
    assert keys == base | ({"dwf/sparsity/net.0.weight", "dwf/sparsity/net.0.bias"} if per_layer else set())
    final_keys = {k for _, m in logger.calls for k in m if k.startswith("dwf/final/")}
    assert not any(k.startswith("dwf/final/sparsity/") for k in final_keys)  # never per layer at the end


def test_wandb_offline_run_gets_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), project="dwf-test", offline=True)
    trainer = Trainer(
        **trainer_kwargs(
            tmp_path,
            max_epochs=1,
            logger=logger,
            callbacks=[DWFCallback(depth=3, regime=FixedLamConfig(0.01, recovery=0), factor_lr=PLAIN_FACTOR_LR)],
        )
    )
    trainer.fit(ToyModel())
    logger.experiment.finish()
    runs = glob.glob(os.path.join(tmp_path, "wandb", "offline-run-*"))
    assert len(runs) == 1
    blob = wandb_run_records(runs[0], b"dwf/sparsity", b"dwf/final/compression_ratio")
    assert b"dwf/sparsity" in blob and b"dwf/final/compression_ratio" in blob
    summary = glob.glob(os.path.join(runs[0], "files", "wandb-summary.json"))
    if summary:
        assert "dwf/final/sparsity" in json.load(open(summary[0]))


class EpochSparsity(Callback):
    """Each epoch's last logged ``dwf/sparsity`` (what monitors see), checked against the factors at the DWF
    threshold."""

    def __init__(self, threshold: float, inflate_at: int | None = None) -> None:
        self.threshold, self.inflate_at, self.values = threshold, inflate_at, []

    @torch.no_grad()
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.inflate_at:  # make the sparsity drop: the best epoch is then not the last one
            for f in factor_parameters(pl_module):
                f.mul_(1.5)

    @torch.no_grad()
    def on_train_epoch_end(self, trainer, pl_module):
        value = float(trainer.callback_metrics["dwf/sparsity"])
        weights = [t.product() for t in factorized_tensors(pl_module)]
        assert value == f32(
            sum(int((w.abs() < self.threshold).sum()) for w in weights) / sum(w.numel() for w in weights)
        )
        self.values.append(value)


def test_early_stopping_on_sparsity_threshold_stops_the_run(tmp_path):
    """Zero loss: the weights shrink steadily, so the sparsity at |w| < 0.05 rises epoch by epoch until the
    threshold stops fit."""
    record = EpochSparsity(0.05)
    stop = EarlyStopping(monitor="dwf/sparsity", mode="max", stopping_threshold=0.3, patience=1000)
    dwf = DWFCallback(
        depth=3, regime=FixedLamConfig(0.15, recovery=0),
        verbose=False, collapse=CollapseConfig(threshold=0.05), factor_lr=PLAIN_FACTOR_LR
    )
    trainer = Trainer(
        **trainer_kwargs(tmp_path, max_epochs=20, callbacks=[dwf, record, stop], enable_checkpointing=False)
    )
    trainer.fit(ToyModel(lr=0.1, zero_loss=True, n=64, batch_size=8))
    first = next(i for i, v in enumerate(record.values) if v > 0.3)
    assert first >= 2  # not stopped on the first check
    assert len(record.values) == first + 1 < 20  # stopped at the first epoch above the threshold
    assert trainer.should_stop and stop.stopped_epoch == first
    # Lightning stops on the threshold before it updates best_score: best_score is the epoch before
    assert float(stop.best_score) == record.values[-2]


def test_checkpoint_keeps_the_sparsest_epoch(tmp_path):
    record = EpochSparsity(0.05, inflate_at=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="dwf/sparsity", mode="max", save_top_k=1)
    dwf = DWFCallback(
        depth=3, regime=FixedLamConfig(0.15, recovery=0),
        verbose=False, collapse=CollapseConfig(threshold=0.05), factor_lr=PLAIN_FACTOR_LR
    )
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=4, callbacks=[dwf, record, ckpt]))
    trainer.fit(ToyModel(lr=0.1, zero_loss=True, n=64, batch_size=8))
    best = max(range(4), key=lambda i: record.values[i])
    assert best == 1 and record.values[1] > record.values[2]  # the sparsity dropped after the inflation
    assert float(ckpt.best_model_score) == record.values[best]
    assert os.path.basename(ckpt.best_model_path) == f"epoch={best}-step={8 * (best + 1)}.ckpt"
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["dwf-collapsed.ckpt", os.path.basename(ckpt.best_model_path)]
    state = torch.load(ckpt.best_model_path, weights_only=False)["state_dict"]
    assert not has_factors(state)  # collapsed at the DWF threshold: its zeros are the monitored sparsity
    assert f32(zero_fraction(state[k] for k in LINEAR_WEIGHTS)) == float(ckpt.best_model_score)


def test_checkpoint_and_early_stopping_monitor_sparsity(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="dwf/sparsity", mode="max", save_top_k=1)
    stop = EarlyStopping(monitor="dwf/sparsity", mode="max", patience=50, check_on_train_epoch_end=True)
    trainer = Trainer(
        **trainer_kwargs(
            tmp_path,
            max_epochs=2,
            callbacks=[DWFCallback(depth=3, regime=FixedLamConfig(0.02, recovery=0),
            factor_lr=PLAIN_FACTOR_LR), ckpt, stop],
        )
    )
    trainer.fit(ToyModel(lr=0.3))
    assert ckpt.best_model_score is not None and ckpt.best_model_path
    assert stop.best_score is not None and torch.isfinite(stop.best_score)
