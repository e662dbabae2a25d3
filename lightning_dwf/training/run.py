"""One DWF fit's training state, in plain PyTorch: the penalty, the factor LR multipliers, rollbacks and the regime.

:class:`TrainingRun` is what :class:`~lightning_dwf.DWFCallback` drives from its hooks; a hand-written loop drives it
the same way::

    run = TrainingRun(build_regime(FixedLamConfig(2e-3)), depth=3)
    run.bind(model, [opt], step=0, total_steps=1000)
    run.start(model, [opt], step=0, total_steps=1000)
    for step, (x, y) in enumerate(loader):
        run.before_batch(model, [opt], step, 1000)
        loss = loss_fn(model(x), y)
        loss.backward()
        run.before_step(model, opt)
        opt.step()
        opt.zero_grad()
        run.after_batch(model, [opt], step + 1, bool(loss.isfinite()))
    run.close()
    report, threshold = run.finish(model, [opt], 1000, 1000)
    collapse_(model, threshold)
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from lightning_dwf.config import FactorLRConfig
from lightning_dwf.core.factorize import FactorizedTensor, factor_parameters, sparse_tensors
from lightning_dwf.core.functional import DECOUPLED_AUTO_MULTIPLIER, DEFAULT_THRESHOLD, GATED_DECOUPLED_AUTO_MULTIPLIER
from lightning_dwf.core.gating import GatedTensor
from lightning_dwf.errors import DWFDeadLayerWarning, DWFRollbackWarning, dead_layer_message
from lightning_dwf.observe.report import SparsityReport, sparsity_report, weight_scales
from lightning_dwf.training.factor_lr import (
    LearningRateCheck,
    apply_multipliers,
    check_learning_rates,
    factor_learning_rates,
    plan_multipliers,
    warmup_progress,
)
from lightning_dwf.training.penalty import FactorPenalty
from lightning_dwf.training.regimes.base import Regime, RunContext
from lightning_dwf.training.rollback import Rollback

_log = logging.getLogger("lightning_dwf")


def _warn(message: str, category: type[Warning]) -> None:
    warnings.warn(message, category, stacklevel=3)


class TrainingRun:
    """The state of one fit: penalty, factor LR multipliers, rollbacks, and the regime that sets λ and the support.

    Args:
        regime: how λ and the support evolve (:func:`~lightning_dwf.training.regimes.build_regime`).
        depth: D.
        factor_lr: the factors' LR multiplier, warm-up, LR check and rollbacks.
        floor: the collapse threshold (absolute).
        info: where progress messages go (default: the ``lightning_dwf`` logger).
        warn: where warnings go, ``warn(message, category)`` (default: :func:`warnings.warn`).

    Attributes:
        penalty: the :class:`~lightning_dwf.FactorPenalty` (from :meth:`bind`).
        multipliers: each factorized tensor's factor LR multiplier after the warm-up (from :meth:`bind`).
        rollback: the :class:`~lightning_dwf.training.rollback.Rollback` guard (its ``count`` and ``scale``).
    """

    def __init__(self, regime: Regime, depth: int, factor_lr: FactorLRConfig | None = None,
                 floor: float = DEFAULT_THRESHOLD, info: Callable[[str], None] = _log.info,
                 warn: Callable[[str, type[Warning]], None] = _warn) -> None:
        self.regime = regime
        self.depth = depth
        self.factor_lr = factor_lr or FactorLRConfig()
        self.floor = floor
        self.info, self.warn = info, warn
        self.penalty: FactorPenalty | None = None
        self.multipliers: dict[str, float] = {}
        self.rollback = Rollback(self.factor_lr.rollbacks)
        self.ctx: RunContext | None = None
        self._measured: SparsityReport | None = None  # the regime's report of this step, reused for the metrics
        self._warned_dead = False
        self._progress = math.nan  # the factor LR ramp's progress last put into the penalty
        self._exempt: frozenset[str] = frozenset()  # the regime's guarded tensors last put into the penalty
        self._scales: dict[str, float] = {}  # the regime's per-tensor λ factors last put into the penalty
        self._tensors: list[FactorizedTensor | GatedTensor] = []  # the module's sparse tensors (from bind)
        self._cap_phase: bool | None = None  # the phase (pattern fixed) whose step cap is in the penalty
        self._dense = False  # the unstructured tensors train as dense weights (FactorLRConfig.fixed_pattern="dense")

    def bind(self, module: nn.Module, optimizers: Sequence[Any], step: int, total_steps: float) -> dict[str, float]:
        """Fit start: bind the penalty to ``optimizers`` and set the factor LR multipliers (a resume keeps those it
        restored). Returns the param groups whose own weight decay on the factors is neutralized."""
        self._warned_dead = False
        self._tensors = sparse_tensors(module)
        self.penalty = FactorPenalty(factor_parameters(module), self.regime.lam, self.depth, self.rollback.scale)
        self.penalty.bind(optimizers)
        self._cap_phase = None
        self._enter_phase(module, optimizers, step)
        self._exempt, self._scales = frozenset(), {}  # the new penalty exempts and scales nothing yet
        if not self.multipliers:
            self.multipliers = plan_multipliers(module, self.factor_lr, self.depth, self.penalty)
            if self.factor_lr.multiplier == "auto" and self.multipliers:
                self.info(f"DWFCallback: factor LR multipliers (auto: by the weights' RMS under SGD, "
                          f"{DECOUPLED_AUTO_MULTIPLIER:g} under Adam-type, gated tensors by their groups' norm "
                          f"under SGD, {GATED_DECOUPLED_AUTO_MULTIPLIER:g} under Adam-type): "
                          + ", ".join(f"{name} ×{m:.3g}" for name, m in self.multipliers.items()))
        self._apply_multipliers(self._at(module, optimizers, step, total_steps), force=True)
        return self.penalty.user_weight_decay()

    def start(self, module: nn.Module, optimizers: Sequence[Any], step: int,
              total_steps: float) -> LearningRateCheck | None:
        """Train start: keep the first finite state, start the regime, and check the factor LR (``None``: not
        checked). Raises ``ValueError`` for a run the regime cannot schedule."""
        if self.factor_lr.warmup and not math.isfinite(total_steps):
            self.warn(
                f"DWFCallback: FactorLRConfig(warmup={self.factor_lr.warmup:g}) is a fraction of the planned run, but "
                "this run has no step budget (max_epochs=-1 or max_time): the factors train at the full multiplier "
                "from the start.", UserWarning,
            )
        ctx = self._at(module, optimizers, step, total_steps)
        self.rollback.take(module, optimizers, step)
        ctx.weight_scale, ctx.weight_rms = weight_scales(module)
        low, high = self.multiplier_range
        factors = factor_parameters(module)
        ctx.factor_lrs = [eta for m in (low, high) for *_, eta in factor_learning_rates(optimizers, factors, m)]
        assert self.penalty is not None
        ctx.factor_steps = {t.name: self.penalty.peak_lr_of(t.factors[0]) * self.multipliers.get(t.name, 1.0)
                            for t in sparse_tensors(module)}
        self.regime.start(ctx)
        lam = self.regime.check_lam
        if self.factor_lr.check == "off" or lam == 0:
            return None
        steps = max(int(total_steps) - step, 0) if math.isfinite(total_steps) else 0
        return check_learning_rates(optimizers, factors, lam, self.depth,
                                    self.regime.lr_check_steps(steps), ctx.weight_scale, self.floor, low, high)

    def before_batch(self, module: nn.Module, optimizers: Sequence[Any], step: int, total_steps: float) -> None:
        """Before each batch: the regime's turn, then the factor LR warm-up."""
        ctx = self._at(module, optimizers, step, total_steps)
        self.regime.before_batch(ctx)
        self._enter_phase(module, optimizers, step)
        if self.factor_lr.warmup:
            self._apply_multipliers(ctx)

    def _enter_phase(self, module: nn.Module, optimizers: Sequence[Any], step: int) -> None:
        """When the phase changed (the pattern fixed or not): once the pattern is fixed and with
        ``FactorLRConfig(fixed_pattern="dense")``, put each unstructured tensor into its first factor and train it as a
        dense weight (:meth:`~lightning_dwf.FactorPenalty.train_densely`; its optimizer state starts afresh unless a
        resume restored the dense phase, and a rollback returns to this state at the earliest); then the step cap of
        the phase (``FactorLRConfig.step_cap_for``) on the tensors that still train as factors."""
        phase = self.regime.pattern_fixed
        if self.penalty is None or phase == self._cap_phase:
            return
        tensors = [t for t in self._tensors if isinstance(t, FactorizedTensor)]
        dense = tensors if phase and self.factor_lr.fixed_pattern == "dense" else []
        if dense:
            for tensor in dense:
                tensor.concentrate_()
            self.penalty.train_densely([t.factors for t in dense], reset=not self._dense)
            self.rollback.take(module, optimizers, step)
            self._dense = True
            tensors = []
        cap, capped = self.factor_lr.step_cap_for(phase), self.penalty.step_cap
        if capped is not None and cap is not None and tensors:
            capped.cap = cap  # keeps the cap's buffers
        else:
            self.penalty.cap_steps([t.factors for t in tensors], cap)
        self._cap_phase = phase

    def before_step(self, module: nn.Module, optimizer: Any) -> None:
        """Right before ``optimizer`` steps (after AMP unscaling, before clipping): apply the penalty at the regime's
        λ, then the regime's turn."""
        penalty, ctx = self.penalty, self.ctx
        if penalty is None or ctx is None:
            return
        penalty.lam = self.regime.lam
        exempt, scales = self.regime.exempt(), self.regime.lam_scales()
        if exempt != self._exempt or scales != self._scales:  # names to factors only when the regime changed them
            tensors = self._tensors
            penalty.exempt = {id(f) for t in tensors if t.name in exempt for f in t.factors}
            penalty.lam_scales = {id(f): scales[t.name] for t in tensors if t.name in scales for f in t.factors}
            self._exempt, self._scales = exempt, scales
        penalty.before_step(optimizer)
        self.regime.before_step(ctx, optimizer,
                                lambda gradient=False: penalty.proximal_thresholds(module, self.floor, gradient))

    def after_batch(self, module: nn.Module, optimizers: Sequence[Any], step: int, loss_finite: bool = True) -> bool:
        """After each batch: roll back a non-finite loss's step (returns False), else the regime's turn (True)."""
        ctx = self._at(module, optimizers, step)
        self._measured = None
        if not loss_finite and self._recover(module, optimizers, step):
            self.regime.on_rollback()
            return False
        self._measured = self.regime.after_step(ctx)
        return True

    def report(self, module: nn.Module, optimizers: Sequence[Any], step: int) -> SparsityReport | None:
        """The sparsity report of this step for the loggers (None after a rollback); keeps the state as the last
        finite one and warns once per fit about an emptied layer."""
        report, self._measured = self._measured, None
        report = report or sparsity_report(module, self.zero_threshold(), self.regime.lam)
        if not report.finite and self._recover(module, optimizers, step):
            return None
        self.rollback.take(module, optimizers, step)
        if report.dead_layers and not self._warned_dead and self.regime.warns_dead_layers:
            self._warned_dead = True
            self.warn_dead(report.dead_layers, f"at step {step} every weight of",
                           f"is below {self.zero_threshold():.3g} (λ={self.regime.lam:.3g})")
        return report

    def metrics(self, step: int) -> dict[str, float]:
        """The training state as metrics: λ, rollbacks, the factor step scale, and the regime's own."""
        return {"dwf/lam": self.regime.lam, "dwf/rollbacks": float(self.rollback.count),
                "dwf/factor_lr_scale": self.rollback.scale, **self.regime.metrics(step)}

    def close(self) -> None:
        """Fit end: release the optimizers (the penalty's hooks)."""
        if self.penalty is not None:
            self.penalty.unbind()

    def finish(self, module: nn.Module, optimizers: Sequence[Any], step: int,
               total_steps: float) -> tuple[SparsityReport, float] | None:
        """Before the collapse (after :meth:`close`): settle the support and measure; returns the report and the
        collapse threshold, or None when nothing is factorized."""
        if not sparse_tensors(module):
            return None
        threshold = self.regime.finish(self._at(module, optimizers, step, total_steps))
        report = sparsity_report(module, threshold, self.regime.lam)
        if not report.finite:
            self._recover(module, optimizers, step)
        return report, threshold

    def zero_threshold(self) -> float:
        """Where weights count as zero now (absolute)."""
        return self.regime.zero_threshold(self.floor)

    @property
    def multiplier_range(self) -> tuple[float, float]:
        values = list(self.multipliers.values()) or [1.0]
        return min(values), max(values)

    def warn_dead(self, names: list[str], what: str, detail: str) -> None:
        self.warn(dead_layer_message(names, what, detail, self.regime.dead_layer_fix()), DWFDeadLayerWarning)

    def state_dict(self) -> dict[str, Any]:
        state = {"lam": self.regime.lam, "rollbacks": self.rollback.count, "factor_lr_scale": self.rollback.scale,
                 "factor_lr_multipliers": dict(self.multipliers), **self.regime.state_dict()}
        if self._dense:
            state["dense_survivors"] = True
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollback.count = int(state.get("rollbacks", 0))
        self.rollback.scale = float(state.get("factor_lr_scale", 1.0))
        self.multipliers = dict(state.get("factor_lr_multipliers", {}))
        self._dense = bool(state.get("dense_survivors", False))
        self.regime.load_state_dict(state)

    def _at(self, module: nn.Module, optimizers: Sequence[Any], step: int,
            total_steps: float | None = None) -> RunContext:
        """The context at ``step`` (``total_steps``: the planned length, kept from the last call when None)."""
        if total_steps is None:
            total_steps = self.ctx.total_steps if self.ctx is not None else math.inf
        if self.ctx is None:
            self.ctx = RunContext(module, optimizers, step, total_steps, self.depth, self.floor,
                                  lr_warmup=self.factor_lr.warmup, info=self.info)
        ctx = self.ctx
        ctx.module, ctx.optimizers, ctx.step, ctx.total_steps = module, optimizers, step, total_steps
        return ctx

    def _apply_multipliers(self, ctx: RunContext, force: bool = False) -> None:
        """Put the ramped multipliers into the penalty when the ramp moved (``force``: a new penalty)."""
        assert self.penalty is not None
        start = self.regime.warmup_start
        progress = warmup_progress(ctx.step, start, ctx.total_steps, self.factor_lr.warmup)
        if force or progress != self._progress:
            apply_multipliers(self.penalty, self._tensors, self.multipliers, ctx.step, start, ctx.total_steps,
                              self.factor_lr.warmup)
            self._progress = progress
        self.penalty.lr_multiplier = self.rollback.scale

    def _recover(self, module: nn.Module, optimizers: Sequence[Any], step: int) -> bool:
        rolled_back = self.rollback.recover(module, optimizers, step, self.depth,
                                            lambda m: self.warn(m, DWFRollbackWarning), self.info)
        if rolled_back and self.penalty is not None:
            self.penalty.lr_multiplier = self.rollback.scale
        return rolled_back
