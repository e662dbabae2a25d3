"""Pictures for the loggers: weight-magnitude histograms during fit and one summary figure at its end.

``DWFCallback(log_pictures=...)`` calls these from its hooks; they work on any module and logger list too.

* :func:`log_weight_histograms`: a histogram of ``log10|w|`` of the non-zero weights of every factorized tensor, tagged
  ``dwf/log10_abs_weight/<tensor>``. The penalty's separation of the weights into survivors and a falling tail shows
  as two humps drifting apart.
* :func:`log_summary_figure`: one matplotlib figure, tagged ``dwf/summary``: per-layer density (non-zeros / weights) of
  the collapsed model as a bar chart, and the ``dwf/sparsity`` values the callback logged over the run.

Supported loggers: ``TensorBoardLogger`` (``add_histogram``, ``add_figure``) and ``WandbLogger`` (``wandb.Histogram``,
``wandb.Image``); other loggers are skipped. matplotlib is optional: without it the figure is skipped with one message.
Everything runs on rank zero only, under ``torch.no_grad``, and draws no random numbers, so training is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from torch import nn

from lightning_dwf.core.factorize import factorized_tensors
from lightning_dwf.observe.report import SparsityReport

#: Tag prefix of the weight-magnitude histograms (one per factorized tensor).
HISTOGRAM_TAG = "dwf/log10_abs_weight"
#: Tag of the summary figure logged at fit end.
FIGURE_TAG = "dwf/summary"
#: ``log_pictures=True`` logs the histograms every this many metric logging steps (``log_every_n_steps``).
DEFAULT_PICTURE_FACTOR = 10


def picture_cadence(log_pictures: bool | int) -> int:
    """Validate ``DWFCallback(log_pictures=...)``: ``True`` (every ``DEFAULT_PICTURE_FACTOR`` × the metric cadence,
    returned as 0), ``False`` (off, returned as -1) or an int >= 1 (every that many optimizer steps).

    Example:
        >>> picture_cadence(True), picture_cadence(False), picture_cadence(500)
        (0, -1, 500)
    """
    if isinstance(log_pictures, bool):
        return 0 if log_pictures else -1
    if not isinstance(log_pictures, int) or log_pictures < 1:
        raise ValueError(
            f"`log_pictures` must be True (histograms every {DEFAULT_PICTURE_FACTOR} × log_every_n_steps optimizer "
            f"steps), False (no pictures) or an int >= 1 (every that many optimizer steps), got {log_pictures!r}."
        )
    return log_pictures


class PictureCadence:
    """When weight histograms are due: ``log_pictures`` (:func:`picture_cadence`) against the metric cadence, once
    per optimizer step."""

    def __init__(self, log_pictures: bool | int) -> None:
        self.every = picture_cadence(log_pictures)  # 0: a multiple of the metric cadence, -1: off
        self._last = -1

    @property
    def enabled(self) -> bool:
        return self.every >= 0

    def histograms_due(self, step: int, metric_every: int) -> bool:
        """Whether to log histograms after ``step`` optimizer steps (``metric_every``: the metric cadence)."""
        cadence = self.every or DEFAULT_PICTURE_FACTOR * metric_every
        if not self.enabled or step == self._last or step % cadence:
            return False
        self._last = step
        return True


def _picture_loggers(loggers: Sequence[Logger]) -> list[Logger]:
    return [lg for lg in loggers if isinstance(lg, (TensorBoardLogger, WandbLogger))]


def _wandb() -> Any:
    try:
        import wandb
    except ImportError:  # pragma: no cover - WandbLogger itself needs wandb
        return None
    return wandb


@rank_zero_only
@torch.no_grad()
def log_weight_histograms(loggers: Sequence[Logger], module: nn.Module, step: int) -> None:
    """Log a histogram of ``log10|w|`` of the non-zero weights of each factorized tensor of ``module``.

    Args:
        loggers: the trainer's loggers; those that are neither TensorBoard nor W&B are skipped.
        module: a factorized model (a plain one has no factorized tensors and logs nothing).
        step: the optimizer step (``trainer.global_step``).
    """
    targets = _picture_loggers(loggers)
    if not targets:
        return
    values: dict[str, torch.Tensor] = {}
    for t in factorized_tensors(module):
        w = t.product().detach().abs().flatten()
        w = w[w > 0]
        if w.numel():
            values[f"{HISTOGRAM_TAG}/{t.name}"] = w.float().log10().cpu()
    if not values:
        return
    for logger in targets:
        if isinstance(logger, TensorBoardLogger):
            for tag, v in values.items():
                logger.experiment.add_histogram(tag, v, step)
        else:
            wandb = _wandb()
            if wandb is not None:
                logger.experiment.log({**{tag: wandb.Histogram(v.numpy()) for tag, v in values.items()},
                                       "trainer/global_step": step})


@rank_zero_only
def log_summary_figure(loggers: Sequence[Logger], report: SparsityReport, curve: Sequence[tuple[int, float]],
                       step: int) -> None:
    """Log one figure: per-layer density of ``report`` (bars) and the sparsity ``curve`` over the run.

    Args:
        loggers: the trainer's loggers; those that are neither TensorBoard nor W&B are skipped.
        report: the collapsed model's :class:`~lightning_dwf.SparsityReport`.
        curve: ``(optimizer step, dwf/sparsity)`` pairs, as logged during fit.
        step: the step to log the figure at (``trainer.global_step``).
    """
    targets = _picture_loggers(loggers)
    if not targets:
        return
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        rank_zero_info("DWFCallback: matplotlib is not installed, so the summary figure (per-layer density and the "
                       "sparsity curve) is not logged; `pip install matplotlib` to get it.")
        return
    fig = _summary_figure(Figure, report, curve)
    canvas = FigureCanvasAgg(fig)
    for logger in targets:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure(FIGURE_TAG, fig, step, close=False)
        else:
            wandb = _wandb()
            if wandb is not None:
                import numpy as np

                canvas.draw()
                image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
                logger.experiment.log({FIGURE_TAG: wandb.Image(image), "trainer/global_step": step})


def _summary_figure(figure_cls: type, report: SparsityReport, curve: Sequence[tuple[int, float]]) -> Any:
    """Build the two-panel figure (no pyplot state: a bare ``Figure``)."""
    names = [layer.name for layer in report.layers]
    density = [layer.nonzero / layer.numel if layer.numel else 0.0 for layer in report.layers]
    fig = figure_cls(figsize=(10, max(3.0, 0.3 * len(names) + 1.5)), layout="constrained")
    bars, line = fig.subplots(1, 2)
    positions = list(range(len(names)))
    container = bars.barh(positions, density)
    bars.bar_label(container, labels=[f"{d:.2%}" for d in density], fontsize=8, padding=2)
    bars.set_yticks(positions, names, fontsize=8)
    bars.invert_yaxis()
    bars.set_xlim(0, 1)
    bars.set_xlabel("density (non-zeros / weights)")
    cr = report.compression_ratio
    bars.set_title(f"collapsed: sparsity {report.sparsity:.2%}, CR {cr:.1f}" if math.isfinite(cr) else "collapsed")
    if curve:
        steps, values = zip(*curve)
        line.plot(steps, values)
    line.set_xlabel("optimizer step")
    line.set_ylabel("dwf/sparsity")
    line.set_ylim(0, 1)
    line.set_title("sparsity during fit")
    line.grid(alpha=0.3)
    return fig
