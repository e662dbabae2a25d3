"""Writing the collapsed checkpoint: where it goes by default, and an atomic write on every strategy."""

from __future__ import annotations

import os

import lightning.pytorch as pl
from torch import nn

from lightning_dwf.export.compressed import CompressionReport, save_compressed

#: File name of the collapsed checkpoint written at the end of ``fit``.
COLLAPSED_CKPT_NAME = "dwf-collapsed.ckpt"


def default_collapsed_ckpt_path(trainer: pl.Trainer) -> str:
    """``<ModelCheckpoint dirpath>/dwf-collapsed.ckpt``, else ``<log_dir or default_root_dir>/dwf-collapsed.ckpt``."""
    ckpt = trainer.checkpoint_callback
    directory = getattr(ckpt, "dirpath", None) or trainer.log_dir or trainer.default_root_dir
    return os.path.join(directory, COLLAPSED_CKPT_NAME)


def save_weights_atomically(trainer: pl.Trainer, path: str) -> str:
    """Write ``trainer``'s model as a weights-only checkpoint at ``path`` without ever leaving a partial file.

    Rank zero writes a temporary file and renames it into place; every rank waits for it. Remote paths (``s3://``)
    go through the strategy's CheckpointIO as they are. Returns ``path``.
    """
    if "://" in path:  # remote storage: the CheckpointIO plugin handles it
        trainer.save_checkpoint(path, weights_only=True)
        return path
    tmp = f"{path}.tmp-{os.getpid()}"
    if trainer.is_global_zero:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = trainer.strategy.broadcast(tmp)
    trainer.save_checkpoint(tmp, weights_only=True)  # writes on rank zero, then barrier
    if trainer.is_global_zero:
        os.replace(tmp, path)
    trainer.strategy.barrier("dwf_collapsed_checkpoint")
    return path


def export_compressed(trainer: pl.Trainer, module: nn.Module, path: str, bits: int | None) -> CompressionReport:
    """Write ``module`` (collapsed) with :func:`~lightning_dwf.save_compressed` on rank zero; every rank gets the
    report."""
    report = None
    if trainer.is_global_zero:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        report = save_compressed(module, path, bits=bits)
    return trainer.strategy.broadcast(report)
