"""Build the Trainer every method runs in and run one seeded, timed fit."""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.models import Classifier
from examples.data import ImageData

#: SGD learning rate, momentum and seed of :func:`run_training` (the sweep's recipe).
LR, MOMENTUM, SEED = 0.1, 0.9, 0
#: Where and in what precision runs train; a config that names another accelerator/precision carries the key.
DEVICE_DEFAULTS = dict(accelerator="cpu", precision="32-true")


def train_loader(data: ImageData, batch_size: int, seed: int = SEED) -> DataLoader:
    """The shuffled training loader, in the same data order for every method (per seed).

    Args:
        data: The dataset.
        batch_size: Images per batch.
        seed: Seeds the shuffling.

    Returns:
        A loader over ``data``'s training images.
    """
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(data.train_x, data.train_y), batch_size=batch_size, shuffle=True, generator=g)


def make_trainer(epochs: int, callbacks: list[Callback], cfg: dict | None = None, **overrides: Any) -> Trainer:
    """The Trainer every method runs in: one device, no logger, checkpoints, progress bar or sanity check.

    Args:
        epochs: ``max_epochs``.
        callbacks: The method's callbacks.
        cfg: A config; its ``accelerator`` / ``precision`` keys, if any, replace :data:`DEVICE_DEFAULTS`.
        **overrides: Further Trainer arguments (e.g. ``limit_train_batches``, or a ``logger`` instead of none).

    Returns:
        The Trainer.
    """
    device = {k: (cfg or {}).get(k, v) for k, v in DEVICE_DEFAULTS.items()}
    quiet: dict[str, Any] = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False, num_sanity_val_steps=0)
    return Trainer(devices=1, max_epochs=epochs, callbacks=callbacks, **{**quiet, **device, **overrides})


def run_training(cfg: dict, data: ImageData, callbacks: list[Callback]) -> tuple[Classifier, float]:
    """Seed, then train ``cfg["model"]`` with SGD (:data:`LR`, :data:`MOMENTUM`) and ``callbacks``.

    Args:
        cfg: The config: ``model``, ``epochs``, ``batch_size``, optionally ``seed`` (default :data:`SEED`) and the
            device keys of :func:`make_trainer`.
        data: The dataset.
        callbacks: The method's callbacks.

    Returns:
        The trained module and the seconds ``fit`` took.
    """
    seed = cfg.get("seed", SEED)
    seed_everything(seed, verbose=False)
    module = Classifier(cfg["model"], lr=LR, momentum=MOMENTUM, num_classes=data.num_classes)
    start = time.perf_counter()
    make_trainer(cfg["epochs"], callbacks, cfg).fit(module, train_loader(data, cfg["batch_size"], seed))
    return module, time.perf_counter() - start


class TrainCurve(Callback):
    """Records the mean training loss of every epoch (the data loss ``training_step`` returns, without DWF's penalty):
    how soon a run fits its training set, read beside its test accuracy."""

    def __init__(self) -> None:
        self.epoch_losses: list[float] = []
        self._sum, self._count = 0.0, 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._sum += float(loss.detach())
        self._count += 1

    def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
        self.epoch_losses.append(round(self._sum / max(self._count, 1), 5))
        self._sum, self._count = 0.0, 0


def fit(cfg: dict[str, Any], module: Classifier, data: ImageData, callbacks: list[Callback]) -> float:
    """Train an already built (and seeded) ``module`` as ``cfg`` says.

    Args:
        cfg: The config: ``epochs``, ``batch_size``, ``seed``, optionally ``max_batches`` per epoch.
        module: The module to train.
        data: The dataset.
        callbacks: The method's callbacks.

    Returns:
        The seconds ``fit`` took.
    """
    trainer = make_trainer(cfg["epochs"], callbacks, limit_train_batches=cfg.get("max_batches") or 1.0)
    start = time.perf_counter()
    trainer.fit(module, train_loader(data, cfg["batch_size"], cfg["seed"]))
    return time.perf_counter() - start
