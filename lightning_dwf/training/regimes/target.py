"""Target sparsity: λ steered by a controller, the support cut gradually along the ramp, then a recovery phase.

The schedule, the controller and the cut are documented in :mod:`lightning_dwf.training.controller` and
:mod:`lightning_dwf.training.support`; this regime runs them at the points of a fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lightning_dwf._validation import check_target, set_field
from lightning_dwf.config import ScheduleConfig
from lightning_dwf.observe.report import SparsityReport, sparsity_report
from lightning_dwf.training.controller import SparsityController, plan_controller
from lightning_dwf.training.regimes.base import Regime, RunContext, register_regime
from lightning_dwf.training.support import cut_to_sparsity_

#: Controller updates per run (at most): λ is steered every ``total_steps // CONTROL_UPDATES`` optimizer steps.
CONTROL_UPDATES = 200


@dataclass(frozen=True)
class TargetSparsityConfig:
    """A target fraction of zero weights (``DWFCallback(target_sparsity=...)``).

    Args:
        sparsity: the fraction of zero weights wanted at the end, in (0, 1).
        schedule: how λ and the support get there (:class:`~lightning_dwf.ScheduleConfig`).
    """

    sparsity: float
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        set_field(self, "sparsity", check_target("target_sparsity", self.sparsity))
        if not isinstance(self.schedule, ScheduleConfig):
            raise TypeError(f"`schedule` must be a ScheduleConfig, got {self.schedule!r}.")

    @property
    def recovery(self) -> float:
        """The fraction of the run in the recovery phase (the setting or its default for the target)."""
        return self.schedule.recovery_for(self.sparsity)


@register_regime(TargetSparsityConfig)
class TargetSparsity(Regime):
    """Runs :class:`TargetSparsityConfig`.

    Attributes:
        controller: the :class:`~lightning_dwf.SparsityController` (from train start).
        control_threshold: the absolute control threshold the run uses (from train start).
    """

    #: The support is cut along the ramp at every ``cut_every``-th control step (λ is steered at every one).
    cut_every: int = 1

    def __init__(self, config: TargetSparsityConfig) -> None:
        self.config = config
        self.lam = 0.0
        self.controller: SparsityController | None = None
        self._restored: dict[str, Any] | None = None
        self._interval = 1
        self._last_control_step = -1

    @property
    def control_threshold(self) -> float | None:
        return None if self.controller is None else self.controller.threshold

    @property
    def recovering(self) -> bool:
        return self.controller is not None and self.controller.recovering

    def start(self, ctx: RunContext) -> None:
        """Plan the controller from the run's length, factor LRs and weight scales (a resume restores its state)."""
        schedule, restored = self.config.schedule, self._restored
        controller = plan_controller(self.config.sparsity, ctx.total_steps, ctx.factor_lrs, ctx.depth,
                                     ctx.weight_scale, ctx.weight_rms, schedule, ctx.floor,
                                     check_reachable=not restored)
        if restored:  # resuming: λ, phase and the threshold the run started with (the default depends on the weights)
            controller.load_state_dict(restored)
        self.controller = controller
        self._interval = max(1, controller.total_steps // CONTROL_UPDATES)
        self.lam = controller.lam
        if not restored:
            ctx.info(
                f"DWFCallback: target_sparsity={self.config.sparsity:g}: λ starts at {controller.lam:.3g}; weights "
                f"with |w| < {controller.threshold:.3g} count as pruned for the controller"
                + ("." if schedule.control_threshold else f" (default for {controller.total_steps} steps and "
                   f"weight RMS {ctx.weight_rms:.3g}; set ScheduleConfig(control_threshold=...) to override).")
            )

    def after_step(self, ctx: RunContext) -> SparsityReport | None:
        """Start the recovery phase when due; every control interval steer λ, and at every :attr:`cut_every`-th cut
        the support along the ramp."""
        controller, step = self.controller, ctx.step
        if controller is None:
            return None
        if controller.recovery_due(step):
            self._start_recovery(ctx)
        if step == self._last_control_step or step % self._interval:
            return None
        self._last_control_step = step
        if self.config.schedule.gradual and not self.recovering and step % (self._interval * self.cut_every) == 0:
            self._cut(ctx, controller.support_sparsity(step))
        if controller.steering(step):
            self.lam = controller.update(step, self._progress(ctx, self.zero_threshold(ctx.floor)))
        return None  # the loggers measure their own report when due

    def release(self, ctx: RunContext) -> None:
        if not self.recovering:
            self._start_recovery(ctx)

    def finish(self, ctx: RunContext) -> float:
        """The run ended before the recovery phase: cut to the target now."""
        if not self.recovering:
            self._cut(ctx, self.config.sparsity)
        return ctx.floor

    def zero_threshold(self, floor: float) -> float:
        """The collapse threshold, or before recovery the control threshold if larger."""
        if self.recovering:
            return floor
        control = self.control_threshold or self.config.schedule.control_threshold or floor
        return max(floor, control)

    @property
    def warmup_start(self) -> int:
        return max(self.controller.recovery_step, 0) if self.controller is not None else 0

    @property
    def pattern_fixed(self) -> bool:
        return self.recovering

    def lr_check_steps(self, steps: int) -> int:
        return 0  # the controller sets λ from the LR floor itself; only the stability limit is left to check

    @property
    def warns_dead_layers(self) -> bool:
        return self.recovering  # before recovery the control threshold is not 0

    def dead_layer_fix(self) -> str:
        return (f"target_sparsity={self.config.sparsity:g} left nothing in them (a global magnitude cut with "
                "ScheduleConfig(min_layer_share=0), or weights already zero): keep min_layer_share > 0 (the default "
                "0.1 keeps every layer alive), lower the target, or keep these layers dense with "
                "FactorizeConfig(exclude=[...]).")

    def metrics(self, step: int) -> dict[str, float]:
        if self.controller is None:
            return {}
        return {"dwf/target_sparsity": self.controller.target,
                "dwf/reference_sparsity": self.controller.reference(step)}

    def state_dict(self) -> dict[str, Any]:
        controller = self.controller.state_dict() if self.controller is not None else self._restored
        return {"controller": controller} if controller else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = state.get("controller")
        if self._restored:
            self.lam = float(self._restored["lam"])

    def _progress(self, ctx: RunContext, threshold: float) -> float:
        """What the controller steers towards the target: the fraction of units (weights, or groups of gated tensors)
        below ``threshold`` (absolute)."""
        return sparsity_report(ctx.module, threshold, counts_only=True).unit_sparsity

    def _cut_summary(self, target: float, threshold: float) -> str:
        """How :meth:`_start_recovery` describes the cut it made."""
        return (f"the {target:.1%} smallest (|w| < {threshold:.3g}, each layer keeping at least "
                f"{self.config.schedule.min_layer_share:g} of its share) are now exactly 0")

    def _cut(self, ctx: RunContext, sparsity: float) -> float:
        """Zero all but the largest weights so that exactly ``sparsity`` of them are zero, no layer emptied; returns
        the smallest surviving magnitude (absolute)."""
        return cut_to_sparsity_(ctx.module, sparsity, ctx.floor, ctx.optimizers, self.config.schedule.min_layer_share)

    def _start_recovery(self, ctx: RunContext) -> None:
        """Fix the support at exactly the target sparsity and release λ (identical on every rank: same factors).

        The controller usually lags its schedule (it raises λ cautiously); the magnitude cut closes the rest. That is
        the measured best regime (docs), so it is reported, not warned about.
        """
        assert self.controller is not None
        control, target = self.controller.threshold, self.config.sparsity
        reached = self._progress(ctx, control)
        threshold = self._cut(ctx, target)
        self.controller.start_recovery(ctx.step)
        self.lam = self.controller.lam
        ctx.info(
            f"DWFCallback: step {ctx.step}: sparsity pattern fixed. The penalty had brought {reached:.1%} "
            f"of the weights below the control threshold {control:.3g}; {self._cut_summary(target, threshold)}. "
            f"λ = 0 for the remaining {self.config.recovery:.0%} of the run"
            + (f"; the factor LR multiplier ramps up again over {ctx.lr_warmup:.0%} of it." if ctx.lr_warmup else ".")
        )
