"""Checkpoint I/O: collapsed weights in every checkpoint with the factors aside, the collapsed checkpoint (where it goes
by default, an atomic write on every strategy) and the compressed export."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from torch import nn

from lightning_dwf.core.collapse import collapse_state_dict, has_factors
from lightning_dwf.errors import PLAIN_CHECKPOINT_MESSAGE
from lightning_dwf.export import CompressionReport, save_compressed

#: Where checkpoints written during fit keep the factors (their ``state_dict`` holds the collapsed weights).
FACTORIZED_STATE_KEY = "dwf_factorized_state_dict"

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


def collapse_checkpoint(checkpoint: dict[str, Any], threshold: float) -> None:
    """Make ``checkpoint`` loadable into the plain class: collapsed weights (zero below ``threshold``, absolute) in
    ``state_dict``, the factors under :data:`FACTORIZED_STATE_KEY` for an exact resume.

    ``ModelCheckpoint(save_weights_only=True)`` files skip the hook that calls this and stay factorized;
    ``collapse_state_dict`` converts them.
    """
    state = checkpoint.get("state_dict", {})
    if has_factors(state):
        checkpoint[FACTORIZED_STATE_KEY] = state
        checkpoint["state_dict"] = collapse_state_dict(state, threshold)


def restore_factors(module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
    """On resume, load the exact factors kept by :func:`collapse_checkpoint`.

    Raises:
        ValueError: the checkpoint holds no factors (a plain or collapsed one), with how to start from it instead.
    """
    factorized = checkpoint.get(FACTORIZED_STATE_KEY)
    if factorized is not None:
        module.load_state_dict(factorized, strict=module.strict_loading)
    elif not has_factors(checkpoint.get("state_dict", {})):
        raise ValueError(PLAIN_CHECKPOINT_MESSAGE)
