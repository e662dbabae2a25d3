"""Hand the callback's metrics to the Trainer: its loggers, and the dicts that ``ModelCheckpoint``, ``EarlyStopping``
and user code read (``trainer.callback_metrics``, ``trainer.logged_metrics``).

Why not ``LightningModule.log_dict``: Lightning keeps every key logged through it in its result collection, costs
about 0.6 ms a key a call, and walks every kept key again at every later batch. For the callback's ~17 keys that was
about 5 % of a fit of LeNet-300-100 on two CPU cores (``docs/findings/cost.md``). The metrics are rank-local values
that are equal on every rank (no ``sync_dist`` is needed), logged at the callback's own cadence, so they go straight to
the loggers, as Lightning's ``LearningRateMonitor`` sends its own.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
import torch


def publish_metrics(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Log ``metrics`` to every logger (rank zero: the loggers are rank-zero only) at ``step``, the number of optimizer
    steps taken (``trainer.global_step``: the step the callback's pictures and final numbers are logged at too; W&B
    plots it as ``trainer/global_step``; Lightning logs a batch's own metrics one lower, at the steps taken before the
    batch), and put them into ``trainer.callback_metrics`` and ``trainer.logged_metrics`` as float32 tensors, as
    ``LightningModule.log`` would, on every rank (so a monitor decides alike everywhere). The loggers get the
    Python floats (``LightningModule.log`` rounded them to float32 first)."""
    if not metrics:
        return
    numbers = {name: float(value) for name, value in metrics.items()}
    tensors = {name: torch.tensor(value) for name, value in numbers.items()}
    trainer.callback_metrics.update(tensors)
    trainer.logged_metrics.update(tensors)
    for logger in trainer.loggers:
        logger.log_metrics(numbers, step=step)
