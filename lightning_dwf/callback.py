r"""
DWFCallback
===========

Sparse training by Deep Weight Factorization (Kolb et al., ICLR 2025, https://arxiv.org/abs/2502.02496)
as a Lightning callback: factorize at ``setup``, penalize the factors every optimizer step, log
sparsity live, collapse to a plain sparse model at the end of ``fit``.

.. code-block:: python

    trainer = Trainer(callbacks=[DWFCallback(depth=3, lam=2e-3)])
    trainer.fit(model)                      # model is plain and sparse again afterwards
    MyModule.load_from_checkpoint(trainer.callbacks[0].collapsed_checkpoint_path)
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning, StochasticWeightAveraging, WeightAveraging
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_dwf._validation import check_choice, check_depth, check_fraction, check_nonnegative, check_patterns, check_positive
from lightning_dwf.collapse import collapse_, collapse_state_dict, has_factors
from lightning_dwf.controller import SparsityController, default_control_threshold, default_recovery
from lightning_dwf.factorize import LayerTypes, factor_parameters, factorize_, factorized_tensors, resolve_layer_types
from lightning_dwf.functional import DEFAULT_THRESHOLD
from lightning_dwf.init import DEFAULT_EPS_RATIO, InitStd
from lightning_dwf.optim import FactorPenalty, check_learning_rates, factor_learning_rates
from lightning_dwf.report import SparsityReport, sparsity_report
from lightning_dwf.support import fix_support_, support_threshold

#: Where checkpoints written during fit keep the factors (their ``state_dict`` holds the collapsed weights).
FACTORIZED_STATE_KEY = "dwf_factorized_state_dict"
_UNSUPPORTED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)
#: Callbacks that cannot compose with DWF, and why.
_INCOMPATIBLE_CALLBACKS: dict[type[Callback], str] = {
    ModelPruning: "it only sees nn.Parameter weights, so it would silently skip every factorized layer; DWF already makes the zeros",
    StochasticWeightAveraging: "it averages the factors, and the product of averaged factors is not the average of the weights",
    WeightAveraging: "it averages the factors, and the product of averaged factors is not the average of the weights",
}


class DWFLearningRateWarning(UserWarning):
    """The factor learning rate is below the floor needed to reach exact zeros (silence with ``lr_check="off"``)."""


class DWFDeadLayerWarning(UserWarning):
    """Every weight of a factorized tensor is (or would collapse to) zero: the layer no longer passes its input on."""


class DWFCallback(Callback):
    r"""Train a sparse model by Deep Weight Factorization and hand back a plain, collapsed one.

    At ``setup`` (fit only, before the model is moved, wrapped or given an optimizer) every selected
    weight becomes ``w = ω1 ⊙ … ⊙ ωD``. Each optimizer step the factors get the gradient of
    ``(lam/D)·Σ_d ||ω_d||²`` (whatever optimizers and schedulers ``configure_optimizers`` returns; the
    user's weight decay on factors is neutralized, see :mod:`lightning_dwf.optim`), which makes
    training minimize ``loss + lam·Σ|w|^(2/D)``. Metrics ``dwf/sparsity``, ``dwf/compression_ratio``,
    ``dwf/misalignment``, ``dwf/penalty`` and ``dwf/sparsity/<layer>`` go through ``LightningModule.log``
    (every logger, ``ModelCheckpoint``/``EarlyStopping`` can monitor them). At the end of ``fit`` the
    model is collapsed in place (exact zeros below ``threshold``) and written as a checkpoint that
    ``MyModule.load_from_checkpoint`` loads without this package.

    Args:
        depth: number of factors D (>= 2; 3 recommended, 2 is the lasso).
        lam: λ, the strength of the collapsed penalty ``lam·Σ|w|^(2/D)`` in units of a *mean*
            training loss. Larger λ gives more zeros; see the README for measured values.
        target_sparsity: instead of ``lam``, the fraction of zero weights wanted at the end (e.g. 0.99); λ is then
            adapted during training (:class:`~lightning_dwf.controller.SparsityController`).
        target_compression: the same as a compression ratio (weights / non-zeros, e.g. 100).
        control_threshold: target mode: absolute magnitude below which a weight counts as pruned for the λ controller
            (default :func:`~lightning_dwf.controller.default_control_threshold`: 0.02 × the weights' RMS for runs of
            4,000 steps or more, up to 0.25 × RMS for short runs, which cannot recover from a deeper penalty).
        recovery: target mode: the fraction of the run, at its end, in which the sparsity pattern is fixed at exactly
            the target and λ = 0, so the surviving weights recover accuracy without the penalty's shrinkage
            (default :func:`~lightning_dwf.controller.default_recovery`: 0.5, or 0.4 for targets >= 0.995).
        threshold: absolute magnitude below which collapsed weights become exact zeros
            (default 1.19e-7, float32 epsilon).
        layer_types: layer classes or ``torch.nn`` names to factorize (default Linear, Conv1d/2d/3d).
        include: glob patterns of module names to factorize (default all of ``layer_types``).
        exclude: glob patterns of module names to keep plain (e.g. ``["classifier"]``).
        param_names: tensors to factorize on each layer (``["weight", "bias"]`` adds biases).
        init: ``"dwf"`` (truncated variance-matched init, for training from scratch) or ``"balanced"``
            (exact factorization of the current weights, to sparsify a pretrained model).
        init_std: σ_w of the DWF init: ``"kaiming"`` (sqrt(2/fan_in)), ``"current"`` or a float.
        init_eps_ratio: lower bound of the initial ``|w|`` relative to σ_w.
        factor_lr_multiplier: scales the factors' updates, i.e. their learning rate (DWF needs larger
            learning rates than dense training; this leaves the other parameters' LR alone).
        factor_lr_warmup: fraction of the planned run over which the multiplier ramps linearly from 1 to
            ``factor_lr_multiplier`` (0: no ramp). Large factor LRs diverge in the first steps without it (measured).
            Target mode repeats the ramp when it fixes the sparsity pattern: the cut makes the loss jump, and at the
            full multiplier the largest weights (effective LR ∝ |w|^(2−2/D)) diverged there (README, D = 4).
        lr_check: at train start, compare the factor LR with the floor needed to reach exact zeros in
            the planned steps: ``"warn"`` (default), ``"error"`` or ``"off"``. An LR at which the
            penalty alone diverges is always an error.
        log_every_n_steps: metric cadence in optimizer steps (default: the Trainer's ``log_every_n_steps``).
        log_per_layer: also log ``dwf/sparsity/<layer>``.
        collapse_on_fit_end: collapse the model in place when ``fit`` ends.
        collapsed_ckpt_path: where to write the collapsed checkpoint (default
            ``<ModelCheckpoint dirpath or log dir>/dwf-collapsed.ckpt``); ignored without collapse.
        save_collapsed: write the collapsed checkpoint.
        verbose: print the per-layer rich table on rank zero at fit end.

    Raises:
        TypeError, ValueError: on invalid arguments, at construction.
    """

    def __init__(
        self,
        depth: int = 3,
        lam: float | None = None,
        *,
        target_sparsity: float | None = None,
        target_compression: float | None = None,
        control_threshold: float | None = None,
        recovery: float | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        layer_types: LayerTypes | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        param_names: Sequence[str] = ("weight",),
        init: Literal["dwf", "balanced"] = "dwf",
        init_std: InitStd = "kaiming",
        init_eps_ratio: float = DEFAULT_EPS_RATIO,
        factor_lr_multiplier: float = 1.0,
        factor_lr_warmup: float = 0.0,
        lr_check: Literal["warn", "error", "off"] = "warn",
        log_every_n_steps: int | None = None,
        log_per_layer: bool = True,
        collapse_on_fit_end: bool = True,
        collapsed_ckpt_path: str | None = None,
        save_collapsed: bool = True,
        verbose: bool = True,
    ) -> None:
        self.depth = check_depth(depth)
        given = [name for name, v in (("lam", lam), ("target_sparsity", target_sparsity), ("target_compression", target_compression))
                 if v is not None]
        if len(given) != 1:
            raise ValueError(
                f"Give exactly one of `lam` (a fixed penalty strength), `target_sparsity` or `target_compression` (λ adapted "
                f"to reach it), got {given or 'none'}. E.g. DWFCallback(depth=3, target_sparsity=0.95)."
            )
        self.target_sparsity: float | None = None
        if target_compression is not None:
            target_compression = check_positive("target_compression", target_compression)
            if target_compression <= 1:
                raise ValueError(f"`target_compression` (weights / non-zeros) must be > 1, got {target_compression}.")
            self.target_sparsity = 1.0 - 1.0 / target_compression
        elif target_sparsity is not None:
            value = check_positive("target_sparsity", target_sparsity)
            if not value < 1:
                raise ValueError(f"`target_sparsity` is a fraction of zero weights in (0, 1), e.g. 0.95; got {target_sparsity}.")
            self.target_sparsity = value
        self.lam = 0.0 if lam is None else check_nonnegative("lam", lam, " λ is the penalty strength in mean-loss units, e.g. 2e-3.")
        self.control_threshold = None if control_threshold is None else check_positive("control_threshold", control_threshold)
        if recovery is None:
            recovery = default_recovery(self.target_sparsity if self.target_sparsity is not None else 0.0)
        self.recovery = check_fraction(
            "recovery", recovery, 0.8, True, "the fraction of the run, at its end, trained with the sparsity pattern fixed and λ = 0 "
            "(default: 0.5, or 0.4 for targets >= 0.995; 0 fixes the pattern only at fit end)",
        )
        self.threshold = check_nonnegative("threshold", threshold, " Use e.g. 1.19e-7 (float32 epsilon), the default.")
        self.layer_types = resolve_layer_types(layer_types)
        self.include, self.exclude = check_patterns("include", include) or None, check_patterns("exclude", exclude)
        self.param_names = tuple([param_names] if isinstance(param_names, str) else param_names)
        self.init = check_choice("init", init, ("dwf", "balanced"))
        if not (init_std in ("kaiming", "current") or (not isinstance(init_std, (bool, str)) and isinstance(init_std, (int, float)) and init_std > 0)):
            raise ValueError(f"`init_std` must be 'kaiming', 'current' or a float > 0, got {init_std!r}.")
        self.init_std = init_std
        self.init_eps_ratio = check_positive("init_eps_ratio", init_eps_ratio)
        self.factor_lr_multiplier = check_positive("factor_lr_multiplier", factor_lr_multiplier)
        self.factor_lr_warmup = check_fraction(
            "factor_lr_warmup", factor_lr_warmup, 1.0, False, "the fraction of the run over which the factor LR multiplier ramps up from 1 (e.g. 0.1)"
        )
        self.lr_check = check_choice("lr_check", lr_check, ("warn", "error", "off"))
        if log_every_n_steps is not None and (isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1):
            raise ValueError(f"`log_every_n_steps` must be an int >= 1 or None (the Trainer's value), got {log_every_n_steps!r}.")
        self.log_every_n_steps = log_every_n_steps
        self.log_per_layer = log_per_layer
        self.collapse_on_fit_end = collapse_on_fit_end
        self.collapsed_ckpt_path = collapsed_ckpt_path
        self.save_collapsed = save_collapsed
        self.verbose = verbose

        self.factorized_names: list[str] = []
        self.final_report: SparsityReport | None = None
        self.collapsed_checkpoint_path: str | None = None
        self._penalty: FactorPenalty | None = None
        self._last_logged_step = -1
        self._last_control_step = -1
        self._warned_dead = False
        self._control_interval = 1
        self._fits_collapsed = 0
        self._controller: SparsityController | None = None
        self._controller_state: dict[str, float] | None = None
        #: Target mode: the control threshold the run used (``control_threshold`` or its default, set at train start).
        self.resolved_control_threshold: float | None = None

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Factorize the selected weights (fit only), before weights are restored, the model is wrapped and optimizers built."""
        if stage != "fit":
            return
        if isinstance(trainer.strategy, _UNSUPPORTED_STRATEGIES):
            raise MisconfigurationException(
                f"DWFCallback does not support {type(trainer.strategy).__name__} yet: sharded parameters break the "
                "elementwise factor product and the in-place collapse. Use strategy='ddp' (or a single device)."
            )
        precision = str(trainer.precision)
        if precision in ("16-true", "bf16-true"):
            raise MisconfigurationException(
                f"DWFCallback does not support precision={precision!r}: with half-precision factors the per-step penalty "
                "shrink factor 1 − 2·lr·λ/D rounds to exactly 1 (half-precision epsilon is 1e-3 for float16 and 8e-3 for "
                "bfloat16, typical lr·λ is 1e-4), so no weight ever reaches zero, and the product of D small factors "
                "underflows. Use precision='16-mixed' or 'bf16-mixed' (float32 factors, half-precision compute)."
            )
        if getattr(pl_module, "_compiler_ctx", None):
            raise MisconfigurationException(
                "DWFCallback does not support `trainer.fit(torch.compile(model))`: the whole-module compile is set up before DWF "
                "factorizes the weights (and fails in Lightning 2.6 / torch 2.13 even without DWF). Compile the network inside "
                "your LightningModule instead, e.g. `self.net = torch.compile(self.net)`; that works with DWF."
            )
        for callback in trainer.callbacks:
            for cls, why in _INCOMPATIBLE_CALLBACKS.items():
                if isinstance(callback, cls):
                    raise MisconfigurationException(
                        f"DWFCallback cannot be combined with {type(callback).__name__}: {why}. Remove one of the two "
                        "(average or prune after DWF's collapsed checkpoint instead)."
                    )
        if is_overridden("configure_model", pl_module):
            rank_zero_info("DWFCallback: calling `configure_model()` before factorizing, so that its layers exist (it must be idempotent).")
            pl_module.configure_model()
        # A model this callback already collapsed keeps its trained weights: continue from them exactly.
        init = "balanced" if self._fits_collapsed else self.init
        self.factorized_names = factorize_(
            pl_module, self.depth, layer_types=self.layer_types, include=self.include, exclude=self.exclude,
            param_names=self.param_names, init=init, init_std=self.init_std, eps_ratio=self.init_eps_ratio,
        )
        rank_zero_info(f"DWFCallback: factorized {len(self.factorized_names)} tensors with depth {self.depth} ({init} init).")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Bind the penalty to the optimizers ``configure_optimizers`` returned, and check precision."""
        self._warned_dead = False
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        for opt in trainer.optimizers:
            if scaler is not None and getattr(opt, "_step_supports_amp_scaling", False):
                raise MisconfigurationException(
                    f"{type(opt).__name__} unscales gradients inside step() (e.g. fused=True), after DWFCallback adds the "
                    "penalty, which would then be scaled wrongly. Use fused=False with precision='16-mixed'."
                )
        self._penalty = FactorPenalty(factor_parameters(pl_module), self.lam, self.depth, self.factor_lr_multiplier)
        self._penalty.bind(trainer.optimizers)
        neutralized = self._penalty.user_weight_decay()
        if neutralized:
            rank_zero_info(
                f"DWFCallback: the weight_decay of param groups {neutralized} is neutralized on the DWF factors; they get "
                f"the DWF penalty (λ={self.lam:g}) instead. Other parameters keep your weight decay."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the λ controller (target mode) and check the factor LR (after a resume restored state)."""
        # an open-ended run (max_epochs=-1, max_time) has no step budget: only the stability limit is checked
        total = trainer.estimated_stepping_batches
        steps = max(int(total) - trainer.global_step, 0) if math.isfinite(total) else 0
        if self.factor_lr_warmup and not math.isfinite(total):
            rank_zero_warn(
                f"DWFCallback: factor_lr_warmup={self.factor_lr_warmup:g} is a fraction of the planned run, but this run has no step "
                "budget (max_epochs=-1 or max_time): the factors train at the full factor_lr_multiplier from the start."
            )
        with torch.no_grad():
            weights = [t.product() for t in factorized_tensors(pl_module)]
            scale = max(float(w.pow(2).mean().sqrt()) for w in weights)
            rms = math.sqrt(sum(float(w.pow(2).sum()) for w in weights) / sum(w.numel() for w in weights))
        if self.target_sparsity is not None:
            self._start_controller(trainer, pl_module, total, scale, rms)
            steps = 0  # the controller sets λ from the LR floor itself; only the stability limit is left to check
        if self.lr_check == "off" or self.lam == 0:
            return
        result = check_learning_rates(
            trainer.optimizers, factor_parameters(pl_module), self.lam, self.depth, steps, scale, self.threshold, self.factor_lr_multiplier
        )
        if result.errors:
            raise MisconfigurationException("DWFCallback: " + " ".join(result.errors))
        if result.warnings and self.lr_check == "error":
            raise MisconfigurationException("DWFCallback: " + " ".join(result.warnings) + " (lr_check='error')")
        for message in result.warnings:
            rank_zero_warn(f"DWFCallback: {message} Silence with lr_check='off'.", category=DWFLearningRateWarning)

    def _start_controller(self, trainer: pl.Trainer, pl_module: pl.LightningModule, total: float, scale: float, rms: float) -> None:
        if not math.isfinite(total) or total < 50:
            raise MisconfigurationException(
                f"DWFCallback(target_sparsity=...) needs a planned run of at least 50 optimizer steps (got {total}) to schedule "
                "λ: set max_epochs or max_steps."
            )
        steps = int(total)
        control = self.control_threshold or max(default_control_threshold(rms, steps), self.threshold)  # > 0 even for zero weights
        etas = [eta for _, _, eta in factor_learning_rates(trainer.optimizers, factor_parameters(pl_module), self.factor_lr_multiplier)]
        decades = max(math.log(max(scale, control) / control), 1.0)
        lam0 = decades / (min(etas) * steps)  # the LR floor solved for λ: small weights just reach the control threshold
        lam_max = 0.05 * self.depth / (2 * max(etas))  # keeps the penalty shrink 2·lr·λ/D <= 5 % per step
        # start well below the floor: at the floor every weight the loss does not support dies, i.e. maximal sparsity
        controller = SparsityController(
            self.target_sparsity, steps, 0.1 * lam0, control, ramp_end=1.0 - self.recovery, lam_min=lam0 * 1e-3, lam_max=lam_max
        )
        ramp = (controller.ramp_end - controller.warmup) * steps
        needed = decades / (min(etas) * ramp)
        if needed > lam_max and not self._controller_state:  # checked once, at the start of the run (not on resume)
            raise MisconfigurationException(
                f"DWFCallback: target_sparsity={self.target_sparsity:g} cannot be reached in {steps} steps: shrinking weights from "
                f"{scale:.3g} to {control:.3g} during the ramp ({ramp:.0f} steps) needs λ ≈ {needed:.3g}, but the factor "
                f"lr {max(etas):.3g} only allows λ <= {lam_max:.3g} before the penalty step becomes unstable. Train at least "
                f"{math.ceil(steps * needed / lam_max)} steps, or shorten the recovery phase (recovery={self.recovery:g})."
            )
        if self._controller_state:  # resuming: λ, phase and the threshold the run started with (the default depends on the weights)
            controller.load_state_dict(self._controller_state)
        self._controller = controller
        self._control_interval = max(1, steps // 200)
        self.resolved_control_threshold = controller.threshold
        self._set_lam(controller.lam)
        if not self._controller_state:
            rank_zero_info(
                f"DWFCallback: target_sparsity={self.target_sparsity:g}: λ starts at {controller.lam:.3g}; weights with |w| < "
                f"{control:.3g} count as pruned for the controller"
                + ("." if self.control_threshold else f" (default for {steps} steps and weight RMS {rms:.3g}; set control_threshold to override).")
            )

    def _support_threshold(self, pl_module: pl.LightningModule) -> float:
        """The global magnitude threshold (absolute) that gives exactly the target sparsity."""
        assert self.target_sparsity is not None
        with torch.no_grad():
            return support_threshold([t.product() for t in factorized_tensors(pl_module)], self.target_sparsity, self.threshold)

    def _start_recovery(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fix the support at exactly the target sparsity and release λ (identical on every rank: same factors).

        The controller usually lags its schedule (it raises λ cautiously); the magnitude cut closes the rest. That is
        the measured best regime (README: a controller fast enough to track the schedule ended lower), so it is reported,
        not warned about.
        """
        assert self._controller is not None
        control = self._control_threshold
        reached = sparsity_report(pl_module, control).sparsity
        threshold = self._support_threshold(pl_module)
        zeroed = fix_support_(pl_module, threshold, trainer.optimizers)
        self._controller.start_recovery(trainer.global_step)
        self._set_lam(self._controller.lam)
        rank_zero_info(
            f"DWFCallback: step {trainer.global_step}: sparsity pattern fixed. The penalty had brought {reached:.1%} of the weights "
            f"below the control threshold {control:.3g}; the {self.target_sparsity:.1%} smallest ({zeroed} weights, |w| < "
            f"{threshold:.3g}) are now exactly 0. λ = 0 for the remaining {self.recovery:.0%} of the run"
            + (f"; the factor LR multiplier ramps up again over {self.factor_lr_warmup:.0%} of it." if self.factor_lr_warmup else ".")
        )

    def _set_lam(self, lam: float) -> None:
        self.lam = lam
        if self._penalty is not None:
            self._penalty.lam = lam

    @property
    def _recovering(self) -> bool:
        return self._controller is not None and self._controller.recovering

    @property
    def collapse_threshold(self) -> float:
        """Where weights count as zero: ``threshold``, or ``max(threshold, control_threshold)`` in target mode before recovery."""
        if self.target_sparsity is None or self._recovering:
            return self.threshold
        return max(self.threshold, self._control_threshold)

    @property
    def _control_threshold(self) -> float:
        """The control threshold resolved at train start, else the user's ``control_threshold`` or ``threshold``."""
        return self.resolved_control_threshold or self.control_threshold or self.threshold

    # --------------------------------------------------------------- training
    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        """Add the penalty gradient: gradients are unscaled (AMP) and not clipped yet, once per optimizer step."""
        if self._penalty is not None:
            self._penalty.before_step(optimizer)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """Ramp the factor LR multiplier during ``factor_lr_warmup``, from the start and again from the recovery point.

        A function of the step (and of the recovery step, saved with the controller), so resume is exact.
        """
        if self._penalty is None or not self.factor_lr_warmup:
            return
        total = trainer.estimated_stepping_batches
        start = max(self._controller.recovery_step, 0) if self._controller is not None else 0  # -1 before recovery
        progress = (trainer.global_step - start) / (self.factor_lr_warmup * total) if math.isfinite(total) else 1.0
        self._penalty.lr_multiplier = 1.0 + (self.factor_lr_multiplier - 1.0) * min(1.0, progress)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Stop on non-finite factors; log the metrics every ``log_every_n_steps`` optimizer steps and at epoch end."""
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if torch.is_tensor(loss) and not bool(torch.isfinite(loss)):
            self._check_finite(trainer, pl_module)
        step = trainer.global_step
        if self._controller is not None and self._controller.recovery_due(step):
            self._start_recovery(trainer, pl_module)
        report = None  # one product per layer serves both the controller and the metrics
        if self._controller is not None and step != self._last_control_step and step % self._control_interval == 0:
            self._last_control_step = step
            report = sparsity_report(pl_module, self.collapse_threshold, self.lam)
            self._set_lam(self._controller.update(step, report.sparsity))
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if step == self._last_logged_step or not (step % every == 0 or trainer.is_last_batch):
            return
        self._last_logged_step = step
        report = report or sparsity_report(pl_module, self.collapse_threshold, self.lam)
        if not report.finite:
            self._check_finite(trainer, pl_module)
        # once per fit (the curves show the rest); in target mode only once λ is off, since the control threshold is not zero
        if report.dead_layers and not self._warned_dead and (self.target_sparsity is None or self._recovering):
            self._warned_dead = True
            self._warn_dead(report.dead_layers, f"at step {step} every weight of", f"is below {self.collapse_threshold:.3g} (λ={self.lam:.3g})")
        metrics = report.metrics(per_layer=self.log_per_layer)
        metrics["dwf/lam"] = self.lam
        if self._controller is not None:
            metrics["dwf/target_sparsity"] = self._controller.target
            metrics["dwf/reference_sparsity"] = self._controller.reference(step)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, sync_dist=False, batch_size=1)

    def _warn_dead(self, names: list[str], what: str, detail: str) -> None:
        """Warn that ``names`` are entirely zero: the network's output no longer depends on its input through them."""
        if self.target_sparsity is not None:
            fix = (f"target_sparsity={self.target_sparsity:g} left nothing in them (the support is one global magnitude cut): "
                   "lower the target, or keep these layers dense with `exclude=[...]`.")
        elif self.lam > 0:
            fix = "λ is too large for this run: lower `lam` (e.g. 3-10×), or name the sparsity you want with `target_sparsity=...`."
        else:
            fix = "With λ = 0 they were zero from the start (zero factors get no gradient): initialize them, or `exclude=[...]` them."
        rank_zero_warn(
            f"DWFCallback: {what} {names[:5]}{' …' if len(names) > 5 else ''} {detail}: through these layers the output no longer "
            f"depends on the input (expect chance accuracy). {fix}",
            category=DWFDeadLayerWarning,
        )

    def _check_finite(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        bad = [t.name for t in factorized_tensors(pl_module) if not all(bool(torch.isfinite(f).all()) for f in t.factors)]
        if bad:
            lrs = sorted({float(g["lr"]) for opt in trainer.optimizers for g in opt.param_groups})
            raise RuntimeError(
                f"DWFCallback: the factors of {bad[:5]} became NaN/Inf at step {trainer.global_step} (learning rates {lrs}, "
                f"depth {self.depth}). The factor learning rate is too large for this depth: lower it (or factor_lr_multiplier), "
                "add a warm-up, or clip gradients (Trainer(gradient_clip_val=...)). No collapsed checkpoint was written."
            )

    # ---------------------------------------------------------------- the end
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Collapse in place, write the collapsed checkpoint, print the table and send final numbers to the loggers."""
        if self._penalty is not None:
            self._penalty.unbind()
        factorized = bool(factorized_tensors(pl_module))
        threshold = self.collapse_threshold
        if self.target_sparsity is not None and not self._recovering and factorized:
            threshold = self._support_threshold(pl_module)  # the run ended before the recovery phase (recovery=0, stopped early)
        self._controller, self._controller_state = None, None
        if not self.collapse_on_fit_end or not factorized:
            return
        report = sparsity_report(pl_module, threshold, self.lam)
        if not report.finite:
            self._check_finite(trainer, pl_module)
        self.final_report = report
        collapse_(pl_module, threshold)
        self._fits_collapsed += 1
        if self.save_collapsed:
            self.collapsed_checkpoint_path = self._save_collapsed(trainer)
        if report.dead_layers:
            self._warn_dead(report.dead_layers, "the collapsed model has no non-zero weight in", "(the checkpoint holds it as trained)")
        final = {f"dwf/final/{k[4:]}": v for k, v in report.metrics(per_layer=False).items()}
        final["dwf/final/compression_ratio_all_params"] = report.compression_ratio_all
        final["dwf/final/threshold"] = threshold
        for logger in trainer.loggers:
            logger.log_metrics(final, step=trainer.global_step)
            logger.save()
        if self.verbose and trainer.is_global_zero:
            from rich.console import Console

            Console().print(report.table(title=f"DWF (D={self.depth}, λ={self.lam:g}) — collapsed at |w| < {threshold:.3g}"))
            if self.collapsed_checkpoint_path:
                rank_zero_info(f"DWFCallback: collapsed checkpoint written to {self.collapsed_checkpoint_path}")

    def default_collapsed_ckpt_path(self, trainer: pl.Trainer) -> str:
        """``<ModelCheckpoint dirpath>/dwf-collapsed.ckpt``, else ``<log_dir or default_root_dir>/dwf-collapsed.ckpt``."""
        ckpt = trainer.checkpoint_callback
        directory = getattr(ckpt, "dirpath", None) or trainer.log_dir or trainer.default_root_dir
        return os.path.join(directory, "dwf-collapsed.ckpt")

    def _save_collapsed(self, trainer: pl.Trainer) -> str:
        path = str(self.collapsed_ckpt_path or self.default_collapsed_ckpt_path(trainer))
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

    # ------------------------------------------------------------------ state
    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Make every checkpoint loadable into the plain class: collapsed weights in ``state_dict``, factors kept aside.

        The factors go to ``checkpoint["dwf_factorized_state_dict"]`` and are reloaded on resume, so resuming stays
        exact (the pattern of Lightning's WeightAveraging). ``ModelCheckpoint(save_weights_only=True)`` files skip
        this hook and stay factorized; ``collapse_state_dict`` converts them.
        """
        state = checkpoint.get("state_dict", {})
        if has_factors(state):
            checkpoint[FACTORIZED_STATE_KEY] = state
            checkpoint["state_dict"] = collapse_state_dict(state, self.collapse_threshold)

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """On resume, reload the exact factors (the collapsed ``state_dict`` was loaded as balanced factors just before)."""
        factorized = checkpoint.get(FACTORIZED_STATE_KEY)
        if factorized is not None:
            pl_module.load_state_dict(factorized, strict=pl_module.strict_loading)
        elif not has_factors(checkpoint.get("state_dict", {})):
            raise ValueError(
                "`ckpt_path` points to a plain checkpoint (dense, or DWF's collapsed one) but resuming DWF training needs a "
                "checkpoint written during DWF training (it holds the factors and the optimizer state). To start DWF from "
                "these weights, load them (MyModule.load_from_checkpoint(path)) and call trainer.fit(model) without "
                "ckpt_path, with DWFCallback(init='balanced')."
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"depth": self.depth, "lam": self.lam, "factorized": list(self.factorized_names)}
        controller = self._controller.state_dict() if self._controller is not None else self._controller_state
        if controller:
            state["controller"] = controller
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("depth", self.depth) != self.depth:
            raise ValueError(
                f"The checkpoint was trained with DWFCallback(depth={state_dict['depth']}), this callback has depth={self.depth}. "
                "Resume with the same depth."
            )
        self._controller_state = state_dict.get("controller")
        if self._controller_state:
            self.lam = float(self._controller_state["lam"])
