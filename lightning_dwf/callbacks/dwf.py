"""DWFCallback: Deep Weight Factorization (Kolb et al., ICLR 2025) inside ``Trainer.fit``. Hook glue only: each hook
hands the model, optimizers and step to :class:`~lightning_dwf.training.run.TrainingRun`, whose regime decides what λ
and the support do."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_dwf._validation import check_depth
from lightning_dwf.callbacks.arguments import as_config, check_log_every, check_moved, resolve_quantize, resolve_regime
from lightning_dwf.callbacks.checkpoint import FACTORIZED_STATE_KEY, collapse_checkpoint, restore_factors
from lightning_dwf.callbacks.finish import finish_fit
from lightning_dwf.callbacks.guards import check_amp_optimizers, check_learning_rate_result, check_trainer
from lightning_dwf.callbacks.publish import publish_metrics
from lightning_dwf.callbacks.results import FitResults
from lightning_dwf.callbacks.sharded import adopt_factorized, factorize_before_sharding, is_model_parallel
from lightning_dwf.config import CollapseConfig, FactorizeConfig, FactorLRConfig, QuantizeConfig, ScheduleConfig
from lightning_dwf.core.factorize import factorize_
from lightning_dwf.export import CompressionReport
from lightning_dwf.observe.pictures import PictureCadence, log_weight_histograms
from lightning_dwf.observe.report import SparsityReport
from lightning_dwf.training.regimes import build_regime
from lightning_dwf.training.run import TrainingRun

__all__ = ["FACTORIZED_STATE_KEY", "DWFCallback"]


class DWFCallback(FitResults, Callback):
    r"""Train a sparse model by Deep Weight Factorization and hand back a plain, collapsed one.

    At ``setup`` (fit only) every selected weight becomes ``w = ω1 ⊙ … ⊙ ωD``; each optimizer step the factors get
    the penalty ``(λ/D)·Σ_d ||ω_d||²`` inside whatever optimizers ``configure_optimizers`` returns
    (:mod:`lightning_dwf.training.penalty`), so training minimizes ``loss + λ·Σ|w|^(2/D)``. ``dwf/sparsity``,
    ``dwf/compression_ratio``, ``dwf/lam``, … go to the loggers and ``trainer.callback_metrics``
    (:mod:`lightning_dwf.callbacks.publish`; ``ModelCheckpoint`` and ``EarlyStopping`` see them). At fit end the model
    is collapsed in place (exact zeros below ``collapse.threshold``) and written as a checkpoint that
    ``MyModule.load_from_checkpoint`` loads without this package. Invalid arguments
    raise ``TypeError``/``ValueError`` here. Under ``ModelParallelStrategy`` (FSDP2) the factors are created before
    ``configure_model`` shards them and the model stays sharded after fit; the collapsed checkpoint is gathered
    (``docs/guides/distributed.md``, "Sharded training").

    Args:
        depth: number of factors D (>= 2; 3 recommended, 2 is the lasso).
        lam: a fixed λ, the strength of the collapsed penalty ``λ·Σ|w|^(2/D)`` in units of a *mean* training loss;
            by default ramped over the first half of the run, then released (:class:`~lightning_dwf.FixedLamConfig`).
        target_sparsity: instead, the fraction of zero weights wanted at the end (e.g. 0.99); λ is then adapted
            during training (:class:`~lightning_dwf.TargetSparsityConfig`).
        target_compression: the same as a compression ratio (weights / non-zeros, e.g. 100).
        regime: instead, any registered regime config (:func:`~lightning_dwf.register_regime`).
        factorize: which tensors to factorize and how to initialize them (:class:`~lightning_dwf.FactorizeConfig`).
        schedule: how target mode schedules λ (:class:`~lightning_dwf.ScheduleConfig`).
        factor_lr: the factors' LR multiplier, its warm-up, the LR check and rollbacks
            (:class:`~lightning_dwf.FactorLRConfig`).
        collapse: zero threshold, collapse at fit end, the collapsed checkpoint and its compressed export
            (:class:`~lightning_dwf.CollapseConfig`).
        quantize: end training quantization-aware on the export grid (:class:`~lightning_dwf.QuantizeConfig`).
        quantize_bits: deprecated shortcut for ``quantize=QuantizeConfig(bits=...)``.
        log_every_n_steps: metric cadence in optimizer steps (default: the Trainer's ``log_every_n_steps``).
        log_per_layer: also log ``dwf/sparsity/<layer>``.
        verbose: print the per-layer table on rank zero at fit end (off by default, like Lightning's callbacks).
        log_pictures: pictures for TensorBoard and W&B loggers (rank zero; others skipped): ``log10|w|`` histograms
            of each factorized tensor and, at fit end, a density/sparsity figure. ``True``: histograms every 10 × the
            metric cadence; an int N: every N optimizer steps; ``False``: none.

    Attributes:
        factorized_names: qualified names of the factorized tensors (set at ``setup``).
        final_report: the :class:`~lightning_dwf.SparsityReport` of the collapsed model (set at fit end).
        collapsed_checkpoint_path: where the collapsed checkpoint was written (set at fit end).
        compression_report: the :class:`~lightning_dwf.CompressionReport` of the exported file (``collapse.export``).
        sparsity_curve: ``(step, dwf/sparsity)`` as logged during the last fit.

    Example:
        >>> from lightning_dwf import CollapseConfig, DWFCallback, FactorizeConfig
        >>> dwf = DWFCallback(depth=3, target_sparsity=0.95, factorize=FactorizeConfig(exclude=["classifier"]))
        >>> dwf.target_sparsity, dwf.factorize.exclude, dwf.collapse == CollapseConfig()
        (0.95, ('classifier',), True)
    """

    def __init__(self, depth: int = 3, lam: float | None = None, *, target_sparsity: float | None = None,
                 target_compression: float | None = None, regime: Any = None,
                 factorize: FactorizeConfig | None = None, schedule: ScheduleConfig | None = None,
                 factor_lr: FactorLRConfig | None = None, collapse: CollapseConfig | None = None,
                 quantize: QuantizeConfig | None = None, quantize_bits: int | None = None,
                 log_every_n_steps: int | None = None, log_per_layer: bool = True, verbose: bool = False,
                 log_pictures: bool | int = True, **moved: Any) -> None:
        check_moved(moved)
        self.depth = check_depth(depth)
        self.factorize = as_config("factorize", factorize, FactorizeConfig)
        self.schedule = as_config("schedule", schedule, ScheduleConfig)
        self.factor_lr = as_config("factor_lr", factor_lr, FactorLRConfig)
        self.collapse = as_config("collapse", collapse, CollapseConfig)
        self.regime_config = resolve_regime(lam, target_sparsity, target_compression, regime, self.schedule)
        self.lam: float | None = None if lam is None else self.regime_config.lam
        self.target_sparsity: float | None = (
            None if target_sparsity is None and target_compression is None else self.regime_config.sparsity)
        self.quantize = resolve_quantize(quantize, quantize_bits, self.collapse)
        self.log_every_n_steps = check_log_every(log_every_n_steps)
        self.log_per_layer, self.verbose, self.log_pictures = log_per_layer, verbose, log_pictures
        self._pictures = PictureCadence(log_pictures)
        self.factorized_names: list[str] = []
        self.final_report: SparsityReport | None = None
        self.collapsed_checkpoint_path: str | None = None
        self.compression_report: CompressionReport | None = None
        self.sparsity_curve: list[tuple[int, float]] = []
        self._run: TrainingRun | None = None
        self._restored: dict[str, Any] | None = None
        self._fits_collapsed = 0
        self._last_logged_step = -1
        self._sharded = False  # ModelParallelStrategy (FSDP2): callbacks/sharded.py
        self._rebind = False  # state restored after the penalty was bound (strategies that restore after setup)

    # ----------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Factorize the selected weights (fit only), before weights are restored, the model wrapped and optimizers
        built; a resumed run restores its state after this."""
        if stage != "fit":
            return
        check_trainer(trainer, pl_module)
        self._run = None
        self._ensure_run()
        self._sharded = is_model_parallel(trainer)
        if self._sharded:  # `configure_model` shards after this: factorize what exists now, adopt the rest at fit start
            names = factorize_before_sharding(pl_module, self.depth, self.factorize)
            rank_zero_info(f"DWFCallback: factorized {len(names)} tensors with depth {self.depth} before "
                           "`configure_model` shards them." if names else "DWFCallback: no layer to factorize yet; "
                           "the tensors `configure_model` factorizes before sharding are adopted at fit start.")
            if self._pictures.enabled:
                rank_zero_info("DWFCallback: the per-step weight histograms are skipped under ModelParallelStrategy "
                               "(they would need the full weights on rank zero alone); the fit-end figure is kept.")
            return
        if is_overridden("configure_model", pl_module):
            rank_zero_info("DWFCallback: calling `configure_model()` before factorizing, so that its layers exist "
                           "(it must be idempotent).")
            pl_module.configure_model()
        # A model this callback already collapsed keeps its trained weights: continue from them exactly.
        config = replace(self.factorize, init="balanced") if self._fits_collapsed else self.factorize
        self.factorized_names = factorize_(pl_module, self.depth, config)
        rank_zero_info(f"DWFCallback: factorized {len(self.factorized_names)} tensors with depth {self.depth} "
                       f"({config.init} init).")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Bind the penalty to the optimizers ``configure_optimizers`` returned, and check precision."""
        self.sparsity_curve = []
        check_amp_optimizers(trainer)
        if self._sharded:
            self.factorized_names = adopt_factorized(pl_module, self.depth)
        run = self._ensure_run()
        neutralized = run.bind(pl_module, trainer.optimizers, trainer.global_step, trainer.estimated_stepping_batches)
        if neutralized:
            rank_zero_info(
                f"DWFCallback: the weight_decay of param groups {neutralized} is neutralized on the DWF factors; they "
                f"get the DWF penalty (λ={self.current_lam:g}) instead. Other parameters keep your weight decay."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the regime and check the factor LR (after a resume restored state)."""
        assert self._run is not None
        if self._rebind:  # the strategy restored our state after `on_fit_start` bound the penalty: bind it again
            self._rebind = False
            self._run.close()
            self._run.bind(pl_module, trainer.optimizers, trainer.global_step, trainer.estimated_stepping_batches)
        try:
            result = self._run.start(pl_module, trainer.optimizers, trainer.global_step,
                                     trainer.estimated_stepping_batches)
        except ValueError as err:
            raise MisconfigurationException(f"DWFCallback: {err}") from err
        check_learning_rate_result(result, self.factor_lr.check)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        assert self._run is not None
        self._run.before_batch(pl_module, trainer.optimizers, trainer.global_step, trainer.estimated_stepping_batches)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """Apply the penalty: gradients are unscaled (AMP) and not clipped yet; once per optimizer step."""
        if self._run is not None:
            self._run.before_step(pl_module, optimizer)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """The regime's step (rolled back on non-finite weights); metrics every ``log_every_n_steps`` optimizer steps
        and at epoch end; pictures at their cadence."""
        assert self._run is not None
        loss, step = outputs.get("loss") if isinstance(outputs, dict) else outputs, trainer.global_step
        if not self._run.after_batch(pl_module, trainer.optimizers, step,
                                     not (torch.is_tensor(loss) and not math.isfinite(loss.item()))):
            return
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if self._pictures.histograms_due(step, every) and not self._sharded:  # rank-zero pictures need full tensors
            log_weight_histograms(trainer.loggers, pl_module, step)
        if step == self._last_logged_step or not (step % every == 0 or trainer.is_last_batch):
            return
        self._last_logged_step = step
        report = self._run.report(pl_module, trainer.optimizers, step)
        if report is not None:
            metrics = {**report.metrics(per_layer=self.log_per_layer), **self._run.metrics(step)}
            publish_metrics(trainer, metrics, step)
            self.sparsity_curve.append((step, report.sparsity))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Collapse in place, write the collapsed checkpoint (and export), send the final numbers to the loggers."""
        assert self._run is not None
        self._run.close()
        if not self.collapse.on_fit_end:
            return
        result = self._run.finish(pl_module, trainer.optimizers, trainer.global_step,
                                  trainer.estimated_stepping_batches)
        if result is None:
            return
        self.final_report, threshold = result
        self._fits_collapsed += 1
        self.collapsed_checkpoint_path, self.compression_report = finish_fit(
            trainer, pl_module, self.final_report, threshold, self.collapse, self.quantize, self._run,
            self.sparsity_curve if self._pictures.enabled else None,
            f"DWF (D={self.depth}, λ={self.current_lam:g})" if self.verbose else None,
        )

    def _ensure_run(self) -> TrainingRun:
        """The fit's training state, built at ``setup`` (or here, for hooks called without it)."""
        if self._run is None:
            self._run = TrainingRun(build_regime(self.regime_config, self.quantize), self.depth, self.factor_lr,
                                    self.collapse.threshold, rank_zero_info,
                                    lambda message, category: rank_zero_warn(message, category=category))
            if self._restored is not None:  # state loaded before a fit built the run
                self._run.load_state_dict(self._restored)
                self._restored = None
        return self._run

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Collapsed weights in ``state_dict`` (loadable into the plain class), factors under
        ``checkpoint["dwf_factorized_state_dict"]`` for an exact resume (the pattern of Lightning's WeightAveraging).
        Sharded (ModelParallelStrategy): the checkpoint keeps the factors as they are (the strategy saves the sharded
        or gathered state dict itself); the collapsed checkpoint written at fit end is the plain one."""
        if self._sharded:
            return
        collapse_checkpoint(checkpoint, self._run.zero_threshold() if self._run else self.collapse.threshold)

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """On resume, reload the exact factors (the collapsed ``state_dict`` was loaded as balanced factors before).
        Sharded: the strategy has loaded the factors already."""
        if self._sharded:
            return
        restore_factors(pl_module, checkpoint)

    @override
    def state_dict(self) -> dict[str, Any]:
        run = self._run.state_dict() if self._run is not None else {"lam": self.current_lam}
        return {"depth": self.depth, "factorized": list(self.factorized_names), **run}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("depth", self.depth) != self.depth:
            raise ValueError(f"The checkpoint was trained with DWFCallback(depth={state_dict['depth']}), this callback "
                             f"has depth={self.depth}. Resume with the same depth.")
        if self._run is None:  # applied when the next fit builds its run
            self._restored = dict(state_dict)
        else:
            self._run.load_state_dict(state_dict)
            self._rebind = self._run.penalty is not None
