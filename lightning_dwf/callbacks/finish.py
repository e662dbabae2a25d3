"""Fit end: collapse in place, write the collapsed checkpoint and its compressed export, and report to the loggers."""

from __future__ import annotations

import os
from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_dwf.callbacks.checkpoint import default_collapsed_ckpt_path, export_compressed, save_weights_atomically
from lightning_dwf.callbacks.publish import publish_metrics
from lightning_dwf.callbacks.sharded import finish_sharded, is_model_parallel
from lightning_dwf.config import CollapseConfig, QuantizeConfig
from lightning_dwf.core.collapse import collapse_
from lightning_dwf.export import CompressionReport
from lightning_dwf.observe.pictures import log_summary_figure
from lightning_dwf.observe.report import SparsityReport
from lightning_dwf.training.run import TrainingRun


def finish_fit(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    report: SparsityReport,
    threshold: float,
    config: CollapseConfig,
    quantize: QuantizeConfig | None,
    run: TrainingRun,
    curve: Sequence[tuple[int, float]] | None,
    table_title: str | None,
) -> tuple[str | None, CompressionReport | None]:
    """Collapse ``module`` at ``threshold`` (absolute), write what ``config`` asks for, log the final numbers (and the
    summary figure when ``curve`` is given), print the table when ``table_title`` is given.

    Under ``ModelParallelStrategy`` the model stays sharded and factorized (its factors zeroed below ``threshold``);
    the files are written from its gathered, collapsed state dict (:mod:`lightning_dwf.callbacks.sharded`).

    Returns:
        The collapsed checkpoint's path and the export's report (None where not written).
    """
    path = str(config.path or default_collapsed_ckpt_path(trainer))
    export_path = os.path.splitext(path)[0] + ".safetensors" if config.export else None
    bits = quantize.bits if quantize else None
    if is_model_parallel(trainer):
        saved, exported = finish_sharded(trainer, module, threshold, config.save, path, export_path, bits)
    else:
        collapse_(module, threshold)
        saved = save_weights_atomically(trainer, path) if config.save else None
        exported = export_compressed(trainer, module, export_path, bits) if export_path else None
    if report.dead_layers:
        run.warn_dead(report.dead_layers, "the collapsed model has no non-zero weight in",
                      "(the checkpoint holds it as trained)")
    final = report.final_metrics()
    if exported is not None:
        rank_zero_info(f"DWFCallback: compressed model written to {exported.path}: {exported.file_bytes:,} bytes, "
                       f"{exported.ratio:.1f}× smaller than dense float32.")
        final["dwf/final/file_bytes"] = exported.file_bytes
        final["dwf/final/size_ratio"] = exported.ratio
    if curve is not None:
        log_summary_figure(trainer.loggers, report, curve, trainer.global_step)
    publish_metrics(trainer, final, trainer.global_step)
    for logger in trainer.loggers:
        logger.save()
    if table_title and trainer.is_global_zero:
        from rich.console import Console

        Console().print(report.table(title=f"{table_title} — collapsed at |w| < {threshold:.3g}"))
        if saved:
            rank_zero_info(f"DWFCallback: collapsed checkpoint written to {saved}")
    return saved, exported
