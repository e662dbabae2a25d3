r"""
DWFCallback
===========

Sparse training by Deep Weight Factorization (Kolb et al., ICLR 2025, https://arxiv.org/abs/2502.02496)
as a Lightning callback: factorize at ``setup``, penalize the factors every optimizer step, log
sparsity live, collapse to a plain sparse model at the end of ``fit``. Each hook is a few calls into the module
that owns the step (``docs/architecture.md``).

.. code-block:: python

    trainer = Trainer(callbacks=[DWFCallback(depth=3, target_sparsity=0.95)])
    trainer.fit(model)                      # model is plain and sparse again afterwards
    MyModule.load_from_checkpoint(trainer.callbacks[0].collapsed_checkpoint_path)
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_dwf._validation import check_depth, check_nonnegative
from lightning_dwf.callbacks.checkpoint import default_collapsed_ckpt_path, export_compressed, save_weights_atomically
from lightning_dwf.callbacks.guards import check_amp_optimizers, check_trainer
from lightning_dwf.config import CollapseConfig, FactorizeConfig, FactorLRConfig, ScheduleConfig, resolve_target
from lightning_dwf.core.collapse import collapse_, collapse_state_dict, has_factors
from lightning_dwf.core.factorize import factor_parameters, factorize_, factorized_tensors
from lightning_dwf.core.functional import DECOUPLED_AUTO_MULTIPLIER, auto_lr_multiplier
from lightning_dwf.errors import (
    PLAIN_CHECKPOINT_MESSAGE,
    DWFDeadLayerWarning,
    DWFLearningRateWarning,
    DWFRollbackWarning,
    dead_layer_message,
    divergence_message,
    rollback_message,
)
from lightning_dwf.export.compressed import CompressionReport
from lightning_dwf.observe.pictures import (
    DEFAULT_PICTURE_FACTOR,
    log_summary_figure,
    log_weight_histograms,
    picture_cadence,
)
from lightning_dwf.observe.report import SparsityReport, sparsity_report, weight_scales
from lightning_dwf.training.controller import SparsityController, plan_controller
from lightning_dwf.training.penalty import FactorPenalty, check_learning_rates, factor_learning_rates, warmup_multiplier
from lightning_dwf._validation import check_bits
from lightning_dwf.training.quantize import set_fake_quantization_, zero_quantized_zeros_
from lightning_dwf.training.rollback import TrainingSnapshot
from lightning_dwf.training.support import cut_to_sparsity_, fix_support_

#: Where checkpoints written during fit keep the factors (their ``state_dict`` holds the collapsed weights).
FACTORIZED_STATE_KEY = "dwf_factorized_state_dict"
#: Constructor arguments of lightning-dwf 0.1 and where they live now.
_MOVED_ARGUMENTS = {
    **{name: f"factorize=FactorizeConfig({name}=...)" for name in
       ("layer_types", "include", "exclude", "param_names", "init", "init_std")},
    "init_eps_ratio": "factorize=FactorizeConfig(eps_ratio=...)",
    "recovery": "schedule=ScheduleConfig(recovery=...)",
    "control_threshold": "schedule=ScheduleConfig(control_threshold=...)",
    "factor_lr_multiplier": "factor_lr=FactorLRConfig(multiplier=...)",
    "factor_lr_warmup": "factor_lr=FactorLRConfig(warmup=...)",
    "lr_check": "factor_lr=FactorLRConfig(check=...)",
    "threshold": "collapse=CollapseConfig(threshold=...)",
    "collapse_on_fit_end": "collapse=CollapseConfig(on_fit_end=...)",
    "save_collapsed": "collapse=CollapseConfig(save=...)",
    "collapsed_ckpt_path": "collapse=CollapseConfig(path=...)",
}


class DWFCallback(Callback):
    r"""Train a sparse model by Deep Weight Factorization and hand back a plain, collapsed one.

    At ``setup`` (fit only, before the model is moved, wrapped or given an optimizer) every selected
    weight becomes ``w = ω1 ⊙ … ⊙ ωD``. Each optimizer step the factors get the gradient of
    ``(λ/D)·Σ_d ||ω_d||²`` (whatever optimizers and schedulers ``configure_optimizers`` returns; the
    user's weight decay on factors is neutralized, see :mod:`lightning_dwf.training.penalty`), which makes
    training minimize ``loss + λ·Σ|w|^(2/D)``. Metrics ``dwf/sparsity``, ``dwf/compression_ratio``,
    ``dwf/misalignment``, ``dwf/penalty`` and ``dwf/sparsity/<layer>`` go through ``LightningModule.log``
    (every logger, ``ModelCheckpoint``/``EarlyStopping`` can monitor them). At the end of ``fit`` the
    model is collapsed in place (exact zeros below ``collapse.threshold``) and written as a checkpoint that
    ``MyModule.load_from_checkpoint`` loads without this package.

    Args:
        depth: number of factors D (>= 2; 3 recommended, 2 is the lasso).
        lam: a fixed λ, the strength of the collapsed penalty ``λ·Σ|w|^(2/D)`` in units of a *mean* training loss.
            Larger λ gives more zeros.
        target_sparsity: instead of ``lam``, the fraction of zero weights wanted at the end (e.g. 0.99); λ is then
            adapted during training (:class:`~lightning_dwf.training.controller.SparsityController`).
        target_compression: the same as a compression ratio (weights / non-zeros, e.g. 100).
        factorize: which tensors to factorize and how to initialize them (:class:`~lightning_dwf.FactorizeConfig`).
        schedule: how target mode schedules λ (:class:`~lightning_dwf.ScheduleConfig`).
        factor_lr: the factors' learning rate multiplier, its warm-up and the LR check
            (:class:`~lightning_dwf.FactorLRConfig`).
        collapse: zero threshold, collapse at fit end, the collapsed checkpoint and its compressed export
            (:class:`~lightning_dwf.CollapseConfig`).
        quantize_bits: 8 or 4: end training quantization-aware (the last ``collapse.quantize_fraction`` of the run
            trains through a fake quantizer on the per-channel grid of :func:`~lightning_dwf.save_compressed`, with
            the sparsity pattern fixed and λ = 0), so that the collapsed weights lie on that grid.
        log_every_n_steps: metric cadence in optimizer steps (default: the Trainer's ``log_every_n_steps``).
        log_per_layer: also log ``dwf/sparsity/<layer>``.
        verbose: print the per-layer rich table on rank zero at fit end.
        log_pictures: pictures for TensorBoard and W&B loggers (others are skipped; rank zero only; training is
            unchanged): a histogram of ``log10|w|`` of each factorized tensor's non-zero weights
            (``dwf/log10_abs_weight/<tensor>``) and, at fit end, one figure of the collapsed model's per-layer density
            and the ``dwf/sparsity`` curve (``dwf/summary``, needs matplotlib). ``True``: histograms every 10 × the
            metric cadence (``log_every_n_steps``) optimizer steps; an int N: every N optimizer steps; ``False``: none.

    Attributes:
        factorized_names: qualified names of the factorized tensors (set at ``setup``).
        control_threshold: target mode: the absolute control threshold the run used (set at train start).
        final_report: the :class:`~lightning_dwf.SparsityReport` of the collapsed model (set at fit end).
        collapsed_checkpoint_path: where the collapsed checkpoint was written (set at fit end).
        compression_report: the :class:`~lightning_dwf.CompressionReport` of the exported file (``collapse.export``).

    Raises:
        TypeError, ValueError: on invalid arguments, at construction.

    Example:
        >>> from lightning_dwf import CollapseConfig, DWFCallback, FactorizeConfig
        >>> dwf = DWFCallback(depth=3, target_sparsity=0.95, factorize=FactorizeConfig(exclude=["classifier"]))
        >>> dwf.target_sparsity, dwf.factorize.exclude, dwf.collapse == CollapseConfig()
        (0.95, ('classifier',), True)
    """

    def __init__(
        self,
        depth: int = 3,
        lam: float | None = None,
        *,
        target_sparsity: float | None = None,
        target_compression: float | None = None,
        factorize: FactorizeConfig | None = None,
        schedule: ScheduleConfig | None = None,
        factor_lr: FactorLRConfig | None = None,
        collapse: CollapseConfig | None = None,
        quantize_bits: int | None = None,
        log_every_n_steps: int | None = None,
        log_per_layer: bool = True,
        verbose: bool = True,
        log_pictures: bool | int = True,
        **moved: Any,
    ) -> None:
        if moved:
            name = next(iter(moved))
            where = _MOVED_ARGUMENTS.get(name)
            if where is None:
                raise TypeError(f"DWFCallback got an unexpected keyword argument {name!r}.")
            raise TypeError(f"DWFCallback's `{name}` argument moved to a config object: pass {where}.")
        self.depth = check_depth(depth)
        given = [name for name, v in (("lam", lam), ("target_sparsity", target_sparsity),
                                      ("target_compression", target_compression)) if v is not None]
        if len(given) != 1:
            raise ValueError(
                "Give exactly one of `lam` (a fixed penalty strength), `target_sparsity` or `target_compression` (λ "
                f"adapted to reach it), got {given or 'none'}. E.g. DWFCallback(depth=3, target_sparsity=0.95)."
            )
        self.lam = None if lam is None else check_nonnegative(
            "lam", lam, " λ is the penalty strength in mean-loss units, e.g. 2e-3."
        )
        self.target_sparsity = resolve_target(target_sparsity, target_compression)
        self.factorize = _config("factorize", factorize, FactorizeConfig)
        self.schedule = _config("schedule", schedule, ScheduleConfig)
        self.factor_lr = _config("factor_lr", factor_lr, FactorLRConfig)
        self.collapse = _config("collapse", collapse, CollapseConfig)
        self.quantize_bits = check_bits(quantize_bits)
        every = log_every_n_steps
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(
                f"`log_every_n_steps` must be an int >= 1 or None (the Trainer's value), got {log_every_n_steps!r}."
            )
        self.log_every_n_steps = log_every_n_steps
        self.log_per_layer = log_per_layer
        self.verbose = verbose
        self.log_pictures = log_pictures
        self._picture_every = picture_cadence(log_pictures)  # 0: a multiple of the metric cadence, -1: off
        # results
        self.factorized_names: list[str] = []
        self.control_threshold: float | None = None
        self.final_report: SparsityReport | None = None
        self.collapsed_checkpoint_path: str | None = None
        self.compression_report: CompressionReport | None = None
        # live state
        self._lam = self.lam or 0.0
        self._penalty: FactorPenalty | None = None
        self._controller: SparsityController | None = None
        self._restored_controller: dict[str, Any] | None = None
        self._control_interval = 1
        self._last_logged_step = -1
        self._last_control_step = -1
        self._pending_prox: dict[str, float] = {}  # thresholds of the step just taken, applied after it
        self._warned_dead = False
        self._fits_collapsed = 0
        self._quantize_step: float = math.inf
        self._quantizing = False
        self._sparsity_curve: list[tuple[int, float]] = []  # (step, dwf/sparsity) as logged, for the fit-end figure
        self._last_picture_step = -1
        self._snapshot = TrainingSnapshot()  # the last finite state, for rollbacks
        self._rollbacks = 0
        self._factor_lr_scale = 1.0  # halved by each rollback
        self._multipliers: dict[str, float] = {}  # each factorized tensor's factor LR multiplier after the warm-up

    @property
    def current_lam(self) -> float:
        """λ in force now: the fixed ``lam``, or the controller's value in target mode (0 in its recovery phase)."""
        return self._lam

    @property
    def recovery(self) -> float | None:
        """Target mode: the fraction of the run in the recovery phase (the setting or its default); else None."""
        return None if self.target_sparsity is None else self.schedule.recovery_for(self.target_sparsity)

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Factorize the selected weights (fit only), before weights are restored, the model is wrapped and
        optimizers built."""
        if stage != "fit":
            return
        check_trainer(trainer, pl_module)
        self._multipliers, self._rollbacks, self._factor_lr_scale = {}, 0, 1.0  # a resumed run restores them after this
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
        self._warned_dead = False
        self._sparsity_curve = []
        self._snapshot = TrainingSnapshot()
        check_amp_optimizers(trainer)
        self._penalty = FactorPenalty(factor_parameters(pl_module), self._lam, self.depth, self._factor_lr_scale)
        self._penalty.bind(trainer.optimizers)
        if not self._multipliers:  # a resumed run keeps the multipliers it started with
            self._multipliers = self._plan_multipliers(pl_module)
        self._set_multipliers(trainer, pl_module)
        neutralized = self._penalty.user_weight_decay()
        if neutralized:
            rank_zero_info(
                f"DWFCallback: the weight_decay of param groups {neutralized} is neutralized on the DWF factors; they "
                f"get the DWF penalty (λ={self._lam:g}) instead. Other parameters keep your weight decay."
            )

    def _plan_multipliers(self, pl_module: pl.LightningModule) -> dict[str, float]:
        """Each factorized tensor's factor LR multiplier: ``FactorLRConfig.multiplier``, or with ``"auto"``
        :func:`~lightning_dwf.core.functional.auto_lr_multiplier` of its weights' RMS and its optimizer family."""
        assert self._penalty is not None
        out = {}
        for tensor in factorized_tensors(pl_module):
            if self.factor_lr.multiplier != "auto":
                out[tensor.name] = float(self.factor_lr.multiplier)
                continue
            with torch.no_grad():
                rms = float(tensor.product().float().pow(2).mean().sqrt())
            out[tensor.name] = auto_lr_multiplier(rms, self.depth, self._penalty.kind_of(tensor.factors[0]))
        if self.factor_lr.multiplier == "auto" and out:
            rank_zero_info(f"DWFCallback: factor LR multipliers (auto: by the weights' RMS under SGD, "
                           f"{DECOUPLED_AUTO_MULTIPLIER:g} under Adam-type): "
                           + ", ".join(f"{name} ×{m:.3g}" for name, m in out.items()))
        return out

    def _set_multipliers(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put each tensor's multiplier, ramped by the warm-up (from the start, and again from the recovery point),
        into the penalty, with the rollback scale on top."""
        if self._penalty is None:
            return
        start = max(self._controller.recovery_step, 0) if self._controller is not None else 0  # -1 before recovery
        total = trainer.estimated_stepping_batches
        for tensor in factorized_tensors(pl_module):
            m = warmup_multiplier(trainer.global_step, start, total, self.factor_lr.warmup,
                                  self._multipliers.get(tensor.name, 1.0))
            for factor in tensor.factors:
                self._penalty.multipliers[id(factor)] = m
        self._penalty.lr_multiplier = self._factor_lr_scale

    def _multiplier_range(self) -> tuple[float, float]:
        values = list(self._multipliers.values()) or [1.0]
        return min(values), max(values)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the λ controller (target mode) and check the factor LR (after a resume restored state)."""
        # an open-ended run (max_epochs=-1, max_time) has no step budget: only the stability limit is checked
        total = trainer.estimated_stepping_batches
        steps = max(int(total) - trainer.global_step, 0) if math.isfinite(total) else 0
        if self.factor_lr.warmup and not math.isfinite(total):
            rank_zero_warn(
                f"DWFCallback: FactorLRConfig(warmup={self.factor_lr.warmup:g}) is a fraction of the planned run, but "
                "this run has no step budget (max_epochs=-1 or max_time): the factors train at the full multiplier "
                "from the start."
            )
        if self.factor_lr.rollbacks:
            self._snapshot.take(pl_module, trainer.optimizers, trainer.global_step)
        scale, rms = weight_scales(pl_module)
        if self.target_sparsity is not None:
            self._start_controller(trainer, pl_module, total, scale, rms)
            steps = 0  # the controller sets λ from the LR floor itself; only the stability limit is left to check
        if self.quantize_bits:
            self._plan_quantization(trainer, pl_module, total)
        if self.factor_lr.check == "off" or self._lam == 0:
            return
        result = check_learning_rates(
            trainer.optimizers, factor_parameters(pl_module), self._lam, self.depth, steps, scale,
            self.collapse.threshold, *self._multiplier_range(),
        )
        if result.errors:
            raise MisconfigurationException("DWFCallback: " + " ".join(result.errors))
        if result.warnings and self.factor_lr.check == "error":
            raise MisconfigurationException("DWFCallback: " + " ".join(result.warnings) + " (check='error')")
        for message in result.warnings:
            rank_zero_warn(f"DWFCallback: {message} Silence with FactorLRConfig(check='off').",
                           category=DWFLearningRateWarning)

    def _start_controller(self, trainer: pl.Trainer, pl_module: pl.LightningModule, total: float, scale: float,
                          rms: float) -> None:
        assert self.target_sparsity is not None
        lrs = [eta for multiplier in self._multiplier_range()
               for *_, eta in factor_learning_rates(trainer.optimizers, factor_parameters(pl_module), multiplier)]
        restored = self._restored_controller
        try:
            controller = plan_controller(self.target_sparsity, total, lrs, self.depth, scale, rms, self.schedule,
                                         self.collapse.threshold, check_reachable=not restored)
        except ValueError as err:
            raise MisconfigurationException(f"DWFCallback: {err}") from err
        if restored:  # resuming: λ, phase and the threshold the run started with (the default depends on the weights)
            controller.load_state_dict(restored)
        self._controller = controller
        self._control_interval = max(1, controller.total_steps // 200)
        self.control_threshold = controller.threshold
        self._set_lam(controller.lam)
        if not restored:
            rank_zero_info(
                f"DWFCallback: target_sparsity={self.target_sparsity:g}: λ starts at {controller.lam:.3g}; weights "
                f"with |w| < {controller.threshold:.3g} count as pruned for the controller"
                + ("." if self.schedule.control_threshold else f" (default for {controller.total_steps} steps and "
                   f"weight RMS {rms:.3g}; set ScheduleConfig(control_threshold=...) to override).")
            )

    def _plan_quantization(self, trainer: pl.Trainer, pl_module: pl.LightningModule, total: float) -> None:
        if not math.isfinite(total):
            raise MisconfigurationException(
                f"DWFCallback(quantize_bits={self.quantize_bits}) finishes the last "
                f"{self.collapse.quantize_fraction:.0%} of the planned run quantization-aware, but this run has no "
                "step budget (max_epochs=-1 or max_time): set max_epochs or max_steps."
            )
        self._quantizing = False
        self._quantize_step = math.ceil((1.0 - self.collapse.quantize_fraction) * total)
        if trainer.global_step >= self._quantize_step:  # resumed inside the finish
            self._start_quantization(trainer, pl_module)

    def _start_quantization(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fix the sparsity pattern (target mode: its recovery point; fixed λ: the zero threshold), release λ, and
        train the weights through the fake quantizer from now on."""
        if self.target_sparsity is not None:
            if not self._recovering:
                self._start_recovery(trainer, pl_module)
        else:
            fix_support_(pl_module, self.collapse.threshold, trainer.optimizers)
            self._set_lam(0.0)
        assert self.quantize_bits is not None
        set_fake_quantization_(pl_module, self.quantize_bits)
        zero_quantized_zeros_(pl_module, self.quantize_bits, trainer.optimizers)
        self._quantizing = True
        rank_zero_info(
            f"DWFCallback: step {trainer.global_step}: quantization-aware finish: the sparsity pattern is fixed, "
            f"λ = 0, and the weights train on the {self.quantize_bits}-bit per-channel grid for the rest of the run."
        )

    def _start_recovery(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fix the support at exactly the target sparsity and release λ (identical on every rank: same factors).

        The controller usually lags its schedule (it raises λ cautiously); the magnitude cut closes the rest. That is
        the measured best regime (docs), so it is reported, not warned about.
        """
        assert self._controller is not None and self.target_sparsity is not None
        control = self._controller.threshold
        reached = sparsity_report(pl_module, control).sparsity
        threshold = self._cut(trainer, pl_module, self.target_sparsity)
        self._controller.start_recovery(trainer.global_step)
        self._set_lam(self._controller.lam)
        warmup = self.factor_lr.warmup
        rank_zero_info(
            f"DWFCallback: step {trainer.global_step}: sparsity pattern fixed. The penalty had brought {reached:.1%} "
            f"of the weights below the control threshold {control:.3g}; the {self.target_sparsity:.1%} smallest (|w| < "
            f"{threshold:.3g}, each layer keeping at least {self.schedule.min_layer_share:g} of its share) are now "
            f"exactly 0. λ = 0 for the remaining {self.recovery:.0%} of the run"
            + (f"; the factor LR multiplier ramps up again over {warmup:.0%} of it." if warmup else ".")
        )

    def _cut(self, trainer: pl.Trainer, pl_module: pl.LightningModule, sparsity: float) -> float:
        """Zero all but the largest weights so that exactly ``sparsity`` of them are zero, no layer emptied
        (:func:`~lightning_dwf.training.support.keep_masks`); returns the smallest surviving magnitude (absolute)."""
        return cut_to_sparsity_(pl_module, sparsity, self.collapse.threshold, trainer.optimizers,
                                self.schedule.min_layer_share)

    def _set_lam(self, lam: float) -> None:
        self._lam = lam
        if self._penalty is not None:
            self._penalty.lam = lam

    @property
    def _recovering(self) -> bool:
        return self._controller is not None and self._controller.recovering

    def _zero_threshold(self) -> float:
        """Where weights count as zero now: the collapse threshold, or (target mode, before recovery) the control
        threshold if larger."""
        if self.target_sparsity is None or self._recovering:
            return self.collapse.threshold
        control = self.control_threshold or self.schedule.control_threshold or self.collapse.threshold
        return max(self.collapse.threshold, control)

    # --------------------------------------------------------------- training
    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """Apply the penalty (gradients are unscaled (AMP) and not clipped yet), once per optimizer step; fixed λ under
        Adam-type optimizers: note the proximal thresholds at this step's lr."""
        if self._penalty is not None:
            self._penalty.before_step(optimizer)
            if self._proximal:
                self._pending_prox.update(self._penalty.proximal_thresholds(pl_module, self.collapse.threshold))

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """Start the quantization-aware finish when it is due; ramp the factor LR multiplier during its warm-up, from
        the start and again from the recovery point."""
        if self.quantize_bits and not self._quantizing and trainer.global_step >= self._quantize_step:
            self._start_quantization(trainer, pl_module)
        if self.factor_lr.warmup:
            self._set_multipliers(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Roll back (or stop) on non-finite weights; apply the proximal step (fixed λ, Adam-type); steer λ and cut
        the support (target mode); log the metrics every ``log_every_n_steps`` optimizer steps and at epoch end."""
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        prox, self._pending_prox = self._pending_prox, {}
        if torch.is_tensor(loss) and not bool(torch.isfinite(loss)) and self._check_finite(trainer, pl_module):
            return
        step = trainer.global_step
        if prox:
            fix_support_(pl_module, prox, trainer.optimizers)
        if self._controller is not None and self._controller.recovery_due(step):
            self._start_recovery(trainer, pl_module)
        report = None  # one product per layer serves both the controller and the metrics
        if self._controller is not None and step != self._last_control_step and step % self._control_interval == 0:
            self._last_control_step = step
            if self.schedule.gradual and not self._recovering:
                self._cut(trainer, pl_module, self._controller.support_sparsity(step))
            report = sparsity_report(pl_module, self._zero_threshold(), self._lam)
            self._set_lam(self._controller.update(step, report.sparsity))
        every = self.log_every_n_steps or trainer.log_every_n_steps
        self._log_histograms(trainer, pl_module, step, every)
        if step == self._last_logged_step or not (step % every == 0 or trainer.is_last_batch):
            return
        self._last_logged_step = step
        report = report or sparsity_report(pl_module, self._zero_threshold(), self._lam)
        if not report.finite and self._check_finite(trainer, pl_module):
            return
        if self.factor_lr.rollbacks:
            self._snapshot.take(pl_module, trainer.optimizers, step)
        # once per fit (the curves show the rest); in target mode only once λ is off (the control threshold is not 0)
        if report.dead_layers and not self._warned_dead and (self.target_sparsity is None or self._recovering):
            self._warned_dead = True
            self._warn_dead(report.dead_layers, f"at step {step} every weight of",
                            f"is below {self._zero_threshold():.3g} (λ={self._lam:.3g})")
        metrics = report.metrics(per_layer=self.log_per_layer)
        metrics["dwf/lam"] = self._lam
        metrics["dwf/rollbacks"] = float(self._rollbacks)
        metrics["dwf/factor_lr_scale"] = self._factor_lr_scale
        if self._controller is not None:
            metrics["dwf/target_sparsity"] = self._controller.target
            metrics["dwf/reference_sparsity"] = self._controller.reference(step)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, sync_dist=False, batch_size=1)
        self._sparsity_curve.append((step, report.sparsity))

    @property
    def _proximal(self) -> bool:
        """Fixed λ (not target mode, whose cut sets the support) with a penalty in force: the decoupled penalty's
        proximal step follows each optimizer step (:meth:`~lightning_dwf.FactorPenalty.proximal_thresholds` taken at
        the step's lr, applied in ``on_train_batch_end``)."""
        return self.target_sparsity is None and self._lam > 0 and self._penalty is not None

    def _log_histograms(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, every: int) -> None:
        """Weight histograms every ``log_pictures`` optimizer steps (``True``: 10 × the metric cadence ``every``)."""
        cadence = self._picture_every or DEFAULT_PICTURE_FACTOR * every
        if self._picture_every < 0 or step == self._last_picture_step or step % cadence:
            return
        self._last_picture_step = step
        log_weight_histograms(trainer.loggers, pl_module, step)

    def _warn_dead(self, names: list[str], what: str, detail: str) -> None:
        rank_zero_warn(dead_layer_message(names, what, detail, self.target_sparsity, self._lam),
                       category=DWFDeadLayerWarning)

    def _check_finite(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """If a weight is non-finite, roll back to the last finite state with the factors' step halved (returns True),
        or raise when no rollback is left. The factors are identical on every rank, so every rank decides alike."""
        bad = [name for name, p in pl_module.named_parameters() if not bool(torch.isfinite(p).all())]
        if not bad:
            return False
        if self._rollbacks >= self.factor_lr.rollbacks or self._snapshot.step < 0:
            lrs = sorted({float(g["lr"]) for opt in trainer.optimizers for g in opt.param_groups})
            raise RuntimeError(divergence_message(bad, trainer.global_step, lrs, self.depth))
        self._snapshot.restore(pl_module, trainer.optimizers)
        self._rollbacks += 1
        self._factor_lr_scale *= 0.5
        if self._penalty is not None:
            self._penalty.lr_multiplier = self._factor_lr_scale
        if self._rollbacks == 1:
            rank_zero_warn(rollback_message(bad, trainer.global_step, self._snapshot.step, self._factor_lr_scale,
                                            self.factor_lr.rollbacks - self._rollbacks), category=DWFRollbackWarning)
        else:
            rank_zero_info(f"DWFCallback: step {trainer.global_step}: non-finite weights again; rolled back to step "
                           f"{self._snapshot.step}, factor step ×{self._factor_lr_scale:g}.")
        return True

    # ---------------------------------------------------------------- the end
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Collapse in place, write the collapsed checkpoint, print the table and send final numbers to the loggers."""
        if self._penalty is not None:
            self._penalty.unbind()
        factorized = bool(factorized_tensors(pl_module))
        threshold = self._zero_threshold()
        if self.target_sparsity is not None and not self._recovering and factorized and self.collapse.on_fit_end:
            self._cut(trainer, pl_module, self.target_sparsity)  # the run ended before the recovery phase
            threshold = self.collapse.threshold
        self._controller, self._restored_controller = None, None
        if not self.collapse.on_fit_end or not factorized:
            return
        if self._quantizing:  # a weight the last step moved below half a grid step collapses to 0: count it so
            zero_quantized_zeros_(pl_module, self.quantize_bits)  # type: ignore[arg-type]
        report = sparsity_report(pl_module, threshold, self._lam)
        if not report.finite:
            self._check_finite(trainer, pl_module)
        self.final_report = report
        collapse_(pl_module, threshold)
        self._fits_collapsed += 1
        if self.collapse.save:
            path = str(self.collapse.path or default_collapsed_ckpt_path(trainer))
            self.collapsed_checkpoint_path = save_weights_atomically(trainer, path)
        if report.dead_layers:
            self._warn_dead(report.dead_layers, "the collapsed model has no non-zero weight in",
                            "(the checkpoint holds it as trained)")
        final = {f"dwf/final/{k[4:]}": v for k, v in report.metrics(per_layer=False).items()}
        final["dwf/final/compression_ratio_all_params"] = report.compression_ratio_all
        final["dwf/final/threshold"] = threshold
        if self.collapse.export:
            self.compression_report = self._export(trainer, pl_module)
            final["dwf/final/file_bytes"] = self.compression_report.file_bytes
            final["dwf/final/size_ratio"] = self.compression_report.ratio
        if self._picture_every >= 0:
            log_summary_figure(trainer.loggers, report, self._sparsity_curve, trainer.global_step)
        for logger in trainer.loggers:
            logger.log_metrics(final, step=trainer.global_step)
            logger.save()
        if self.verbose and trainer.is_global_zero:
            from rich.console import Console

            Console().print(report.table(title=f"DWF (D={self.depth}, λ={self._lam:g}) — collapsed at |w| < "
                                               f"{threshold:.3g}"))
            if self.collapsed_checkpoint_path:
                rank_zero_info(f"DWFCallback: collapsed checkpoint written to {self.collapsed_checkpoint_path}")

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> CompressionReport:
        """Write the collapsed model as ``dwf-collapsed.safetensors`` beside the checkpoint (rank zero), and report."""
        ckpt_path = self.collapsed_checkpoint_path or str(self.collapse.path or default_collapsed_ckpt_path(trainer))
        report = export_compressed(trainer, pl_module, os.path.splitext(ckpt_path)[0] + ".safetensors",
                                   self.quantize_bits)
        rank_zero_info(f"DWFCallback: compressed model written to {report.path}: {report.file_bytes:,} bytes, "
                       f"{report.ratio:.1f}× smaller than dense float32.")
        return report

    # ------------------------------------------------------------------ state
    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Make every checkpoint loadable into the plain class: collapsed weights in ``state_dict``, factors aside.

        The factors go to ``checkpoint["dwf_factorized_state_dict"]`` and are reloaded on resume, so resuming stays
        exact (the pattern of Lightning's WeightAveraging). ``ModelCheckpoint(save_weights_only=True)`` files skip
        this hook and stay factorized; ``collapse_state_dict`` converts them.
        """
        state = checkpoint.get("state_dict", {})
        if has_factors(state):
            checkpoint[FACTORIZED_STATE_KEY] = state
            checkpoint["state_dict"] = collapse_state_dict(state, self._zero_threshold())

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """On resume, reload the exact factors (the collapsed ``state_dict`` was loaded as balanced factors before)."""
        factorized = checkpoint.get(FACTORIZED_STATE_KEY)
        if factorized is not None:
            pl_module.load_state_dict(factorized, strict=pl_module.strict_loading)
        elif not has_factors(checkpoint.get("state_dict", {})):
            raise ValueError(PLAIN_CHECKPOINT_MESSAGE)

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"depth": self.depth, "lam": self._lam, "factorized": list(self.factorized_names),
                                 "rollbacks": self._rollbacks, "factor_lr_scale": self._factor_lr_scale,
                                 "factor_lr_multipliers": dict(self._multipliers)}
        controller = self._controller.state_dict() if self._controller is not None else self._restored_controller
        if controller:
            state["controller"] = controller
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("depth", self.depth) != self.depth:
            raise ValueError(
                f"The checkpoint was trained with DWFCallback(depth={state_dict['depth']}), this callback has "
                f"depth={self.depth}. Resume with the same depth."
            )
        self._restored_controller = state_dict.get("controller")
        self._rollbacks = int(state_dict.get("rollbacks", 0))
        self._factor_lr_scale = float(state_dict.get("factor_lr_scale", 1.0))
        self._multipliers = dict(state_dict.get("factor_lr_multipliers", {}))
        if self._restored_controller:
            self._lam = float(self._restored_controller["lam"])


def _config(name: str, value: Any, cls: type) -> Any:
    """``value`` if it is a ``cls`` (a mapping is accepted and converted, for plain-dict configuration), else the
    defaults."""
    if value is None:
        return cls()
    if isinstance(value, dict):
        return cls(**value)
    if not isinstance(value, cls):
        raise TypeError(f"`{name}` must be a {cls.__name__}, got {value!r}. E.g. {name}={cls.__name__}().")
    return value
