"""Adapting λ during training so that the collapsed model reaches a requested sparsity.

With a fixed λ, DWF's final sparsity jumps from none to most within a narrow range of λ (measured in
the docs, "Benchmarks"). :class:`SparsityController` instead treats λ as the actuator of a feedback loop:

* warm-up (``warmup`` of the run): λ = λ0, the λ at which unsupported weights just reach the
  threshold in the run's steps (the LR floor solved for λ);
* ramp (until ``ramp_end`` of the run): the support sparsity follows the cubic schedule of gradual
  magnitude pruning, ``s(p) = target·(1 − (1 − p)^3)``: the callback cuts the smallest weights down to it every update
  (``ScheduleConfig.gradual``), and λ is steered so that the penalty runs ``lead`` of the run *ahead* of the cut
  (the reference ``s_ref = s(p + lead)``), shrinking the weights before the cut removes them;
* recovery (the rest, from ``ramp_end``): the callback fixes the support at exactly the target sparsity
  (:func:`lightning_dwf.training.support.fix_support_`) and λ drops to 0, so the surviving weights recover accuracy
  without the penalty's shrinkage. The callback repeats its factor LR warm-up from there: the cut makes the
  loss jump, and the largest weights, whose effective LR grows like |w|^(2−2/D), can diverge at the full factor LR.

Every ``interval`` steps λ is multiplied by ``exp(gain·e)`` with ``e = ln((1 − s)/(1 − s_ref))``, the
log-ratio of measured to wanted density (an integral controller in log λ; it lowers λ four times faster
than it raises it, because pruned weights do not come back). The measured sparsity ``s``
is taken at a control threshold (absolute; default :func:`default_control_threshold`): weights that small are on
their way to exact zero and barely change the network's output, while exact zeros lag far behind λ. How deep that
threshold sits is a trade-off the run's length decides (measured in the docs): a deep one lets the penalty separate
the weights more sharply but shrinks the survivors further, which a short run cannot recover from. At recovery the
support is fixed at the global magnitude quantile of the target (:func:`~lightning_dwf.support_threshold`),
which closes a remaining gap either way: the smallest surviving weights go if the controller lagged, the largest
sub-threshold ones stay if the dynamics overshot.

:func:`plan_controller` turns a run (steps, factor learning rates, weight scale) into a started controller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from lightning_dwf.config import HIGH_TARGET, ScheduleConfig, default_recovery  # noqa: F401  (re-exported)
from lightning_dwf.core.functional import lam_floor

#: Control threshold relative to the weights' RMS for long runs (>= LONG_RUN_STEPS optimizer steps) and at most.
MIN_RELATIVE_CONTROL_THRESHOLD = 0.02
MAX_RELATIVE_CONTROL_THRESHOLD = 0.25
#: Planned steps from which the deep control threshold is used.
LONG_RUN_STEPS = 4_000
#: Fewest planned optimizer steps in which target mode can schedule λ.
MIN_TARGET_STEPS = 50
#: Largest per-step penalty shrink ``2·lr·λ/D`` the controller may reach (bounds λ from above).
MAX_SHRINK_PER_STEP = 0.05


def default_control_threshold(weight_rms: float, steps: int) -> float:
    """The control threshold (absolute) for a run of ``steps`` optimizer steps whose weights have RMS ``weight_rms``.

    ``weight_rms · 0.02 · (4,000 / steps)²``, clipped to ``[0.02, 0.25] · weight_rms``: 0.02 × RMS from 4,000
    steps on, rising to 0.25 × RMS for runs of 1,130 steps or fewer (the measurements behind it are in the docs,
    "Benchmarks").

    >>> default_control_threshold(weight_rms=0.05, steps=10_000)
    0.001
    """
    relative = MIN_RELATIVE_CONTROL_THRESHOLD * (LONG_RUN_STEPS / max(steps, 1)) ** 2
    return weight_rms * min(MAX_RELATIVE_CONTROL_THRESHOLD, max(MIN_RELATIVE_CONTROL_THRESHOLD, relative))


@dataclass
class SparsityController:
    """Integral controller on log λ that makes the measured sparsity follow a warm-up/ramp/hold schedule.

    Args:
        target: the sparsity wanted at the end (fraction of zero weights, e.g. 0.99).
        total_steps: optimizer steps of the whole run.
        lam: the current λ (start value λ0; updated in place by :meth:`update`).
        threshold: the control threshold (absolute): the caller measures sparsity as the fraction of ``|w| <`` it.
        warmup: fraction of the run before the ramp starts.
        ramp_end: fraction at which ``s_ref = target``.
        gain: step size of the log-λ integrator.
        max_step: bound on ``|Δ ln λ|`` per update.
        lam_min: lower bound on λ (relative factors of λ0 are set by the callback).
        lam_max: upper bound on λ (relative factors of λ0 are set by the callback).
        recovery_step: the optimizer step at which the recovery phase (support fixed, λ = 0) started, -1 before it;
            the callback restarts the factor LR warm-up there.
        lead: fraction of the run by which the λ reference runs ahead of the support schedule (0: they coincide).
    """

    target: float
    total_steps: int
    lam: float
    threshold: float
    warmup: float = 0.1
    ramp_end: float = 0.5
    gain: float = 0.2
    max_step: float = 0.05
    lam_min: float = 0.0
    lam_max: float = math.inf
    recovery_step: int = -1
    lead: float = 0.0

    @property
    def recovering(self) -> bool:
        """Whether the recovery phase has started."""
        return self.recovery_step >= 0

    def support_sparsity(self, step: int) -> float:
        """The cubic schedule: the sparsity of the support after ``step`` optimizer steps (0 in the warm-up)."""
        progress = step / max(self.total_steps, 1)
        if progress <= self.warmup:
            return 0.0
        p = min(1.0, (progress - self.warmup) / max(self.ramp_end - self.warmup, 1e-9))
        return self.target * (1.0 - (1.0 - p) ** 3)

    def reference(self, step: int) -> float:
        """The sparsity λ aims at after ``step`` optimizer steps: the support schedule ``lead`` of the run ahead."""
        if step / max(self.total_steps, 1) <= self.warmup:
            return 0.0
        return self.support_sparsity(step + int(self.lead * self.total_steps))

    def recovery_due(self, step: int) -> bool:
        """Whether the recovery phase should start after ``step`` optimizer steps (it starts once)."""
        return not self.recovering and step >= self.ramp_end * self.total_steps

    def start_recovery(self, step: int) -> None:
        """Enter the recovery phase after ``step`` optimizer steps: λ = 0 from now on (the caller fixes the support)."""
        self.lam, self.recovery_step = 0.0, step

    def steering(self, step: int) -> bool:
        """Whether :meth:`update` moves λ at ``step`` (not in the warm-up, not while recovering): the measurement it
        reads is needed only then."""
        return not (self.recovering or step / max(self.total_steps, 1) <= self.warmup)

    def update(self, step: int, sparsity: float) -> float:
        """Move λ toward the schedule given the measured ``sparsity``; returns the new λ."""
        if not self.steering(step):
            return self.lam
        wanted = self.reference(step)
        error = math.log(max(1.0 - sparsity, 1e-9) / max(1.0 - wanted, 1e-9))
        # Pruned weights barely come back (their gradient vanishes like |w|^(2-2/D)), so overshoot is permanent:
        # raise λ cautiously, lower it four times as fast.
        gain = self.gain if error > 0 else 4 * self.gain
        delta = max(-4 * self.max_step, min(self.max_step, gain * error))
        self.lam = min(self.lam_max, max(self.lam_min, self.lam * math.exp(delta)))
        return self.lam

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore λ and the settings; ``total_steps`` stays that of the current run (it may plan more epochs).

        A state saved before ``recovery_step`` existed has ``recovering`` instead; it resumes with the warm-up done.
        """
        for key, value in state.items():
            if key not in ("total_steps", "recovering"):
                setattr(self, key, value)
        if state.get("recovering") and "recovery_step" not in state:
            self.recovery_step = 0


def plan_controller(
    target: float,
    total_steps: float,
    factor_lrs: Sequence[float],
    depth: int,
    weight_scale: float,
    weight_rms: float,
    config: ScheduleConfig,
    zero_threshold: float,
    check_reachable: bool = True,
) -> SparsityController:
    """The controller for a run: control threshold, start λ, λ bounds and phases.

    λ starts at a tenth of the LR floor solved for λ (:func:`lightning_dwf.core.functional.lam_floor`: the λ at which
    unsupported weights of magnitude ``weight_scale`` just reach the control threshold in the run), well below it,
    because at the floor every weight the loss does not support dies. λ is bounded above so that the per-step
    penalty shrink ``2·lr·λ/D`` stays below :data:`MAX_SHRINK_PER_STEP`.

    Args:
        target: sparsity wanted at the end (fraction of zero weights).
        total_steps: optimizer steps planned for the whole run (``Trainer.estimated_stepping_batches``).
        factor_lrs: effective peak learning rate of every param group holding factors.
        depth: D. weight_scale: largest per-layer RMS of the collapsed weights. weight_rms: their global RMS.
        config: the schedule settings. zero_threshold: absolute magnitude counted as zero at collapse.
        check_reachable: refuse a target whose ramp is too short for any stable λ (off when resuming; never with
            ``config.gradual``, whose cuts reach the target whatever λ does).

    Raises:
        ValueError: with the numbers and the fix, for a run too short to schedule or a target it cannot reach.
    """
    if not math.isfinite(total_steps) or total_steps < MIN_TARGET_STEPS:
        raise ValueError(
            f"target mode (target_sparsity=...) needs a planned run of at least {MIN_TARGET_STEPS} optimizer steps "
            f"(got {total_steps}) to schedule λ: set max_epochs or max_steps."
        )
    steps = int(total_steps)
    recovery = config.recovery_for(target)
    control = config.control_threshold or max(default_control_threshold(weight_rms, steps), zero_threshold)
    start = max(weight_scale, control)
    lam0 = lam_floor(min(factor_lrs), steps, start, control, min_log_ratio=1.0)
    lam_max = MAX_SHRINK_PER_STEP * depth / (2 * max(factor_lrs))  # 2·lr·λ/D = MAX_SHRINK_PER_STEP solved for λ
    controller = SparsityController(
        target, steps, 0.1 * lam0, control, warmup=config.warmup, ramp_end=1.0 - recovery, gain=config.gain,
        max_step=config.max_step, lam_min=lam0 * 1e-3, lam_max=lam_max, lead=config.lead if config.gradual else 0.0,
    )
    ramp = (controller.ramp_end - controller.warmup) * steps
    needed = lam_floor(min(factor_lrs), ramp, start, control, min_log_ratio=1.0)
    if check_reachable and not config.gradual and needed > lam_max:
        raise ValueError(
            f"target_sparsity={target:g} cannot be reached in {steps} steps: shrinking weights from "
            f"{weight_scale:.3g} to {control:.3g} during the ramp ({ramp:.0f} steps) needs λ ≈ {needed:.3g}, but the "
            f"factor lr {max(factor_lrs):.3g} only allows λ <= {lam_max:.3g} before the penalty step becomes unstable. "
            f"Train at least {math.ceil(steps * needed / lam_max)} steps, or shorten the recovery phase "
            f"(recovery={recovery:g})."
        )
    return controller
