"""Adapting λ during training so that the collapsed model reaches a requested sparsity.

With a fixed λ, DWF's final sparsity jumps from none to most within a factor of two of λ (measured in
the README). :class:`SparsityController` instead treats λ as the actuator of a feedback loop:

* warm-up (``warmup`` of the run): λ = λ0, the λ at which unsupported weights just reach the
  threshold in the run's steps (the LR floor solved for λ);
* ramp (until ``ramp_end`` of the run): the reference sparsity follows the cubic schedule of gradual
  magnitude pruning, ``s_ref = target·(1 − (1 − p)^3)``;
* recovery (the rest, from ``ramp_end``): the callback fixes the support at exactly the target sparsity
  (:func:`lightning_dwf.support.fix_support_`) and λ drops to 0, so the surviving weights recover accuracy
  without the penalty's shrinkage (measured gain in the README). The callback repeats its factor LR warm-up
  from there: the cut makes the loss jump, and the largest weights, whose effective LR grows like |w|^(2−2/D),
  diverged at the full factor LR (README, D = 4).

Every ``interval`` steps λ is multiplied by ``exp(gain·e)`` with ``e = ln((1 − s)/(1 − s_ref))``, the
log-ratio of measured to wanted density (an integral controller in log λ; it lowers λ four times faster
than it raises it, because pruned weights do not come back). The measured sparsity ``s``
is taken at a control threshold (absolute; default :func:`default_control_threshold`): weights that small are on
their way to exact zero and barely change the network's output, while exact zeros lag far behind λ. How deep that
threshold sits is a trade-off the run's length decides (measured in the README): a deep one (1e-3) lets the penalty
separate the weights more sharply but shrinks the survivors further, which a short run cannot recover from. At recovery the
support is fixed at the global magnitude quantile of the target (:func:`lightning_dwf.support.support_threshold`),
which closes a remaining gap either way: the smallest surviving weights go if the controller lagged, the largest
sub-threshold ones stay if the dynamics overshot.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

#: Control threshold relative to the weights' RMS for long runs (>= LONG_RUN_STEPS optimizer steps) and at most.
MIN_RELATIVE_CONTROL_THRESHOLD = 0.02
MAX_RELATIVE_CONTROL_THRESHOLD = 0.25
#: Planned steps from which the deep control threshold is used (README: 4,700 steps liked 1e-3 ≈ 0.02 × RMS).
LONG_RUN_STEPS = 4_000
#: Targets from which the default recovery phase is shorter (a longer ramp for the penalty).
HIGH_TARGET = 0.995


def default_control_threshold(weight_rms: float, steps: int) -> float:
    """The control threshold (absolute) for a run of ``steps`` optimizer steps whose weights have RMS ``weight_rms``.

    ``weight_rms · 0.02 · (4,000 / steps)²``, clipped to ``[0.02, 0.25] · weight_rms``: 0.02 × RMS (1e-3 on
    LeNet-300-100) from 4,000 steps on, rising to 0.25 × RMS for runs of 1,130 steps or fewer. Measured (README,
    Fashion-MNIST, target 98 %, batch 256): LeNet-300-100 over 4,700 steps is best at 1e-3 (88.90 % vs 88.45 % at
    1e-2), over 940 steps at 1e-2–3e-2 (85.88–86.54 % vs 85.75 % at 1e-3); the BN CNN over 940 steps gains 1.6
    points at 1e-2 (89.24 % vs 87.64 %).
    """
    relative = MIN_RELATIVE_CONTROL_THRESHOLD * (LONG_RUN_STEPS / max(steps, 1)) ** 2
    return weight_rms * min(MAX_RELATIVE_CONTROL_THRESHOLD, max(MIN_RELATIVE_CONTROL_THRESHOLD, relative))


def default_recovery(target: float) -> float:
    """The recovery fraction that measured best (README, Fashion-MNIST LeNet-300-100, 3 seeds): 0.5 up to 99 %
    sparsity (0.4 and 0.5 tie at 99 %); 0.4 from 99.5 % on, where the penalty needs the longer ramp (87.1 % accuracy
    against 85.2 % with 0.5)."""
    return 0.4 if target >= HIGH_TARGET else 0.5


@dataclass
class SparsityController:
    """Integral controller on log λ that makes the measured sparsity follow a warm-up/ramp/hold schedule.

    Args:
        target: the sparsity wanted at the end (fraction of zero weights, e.g. 0.99).
        total_steps: optimizer steps of the whole run.
        lam: the current λ (start value λ0; updated in place by :meth:`update`).
        threshold: the control threshold (absolute): the caller measures sparsity as the fraction of ``|w| <`` it.
        warmup: fraction of the run before the ramp starts. ramp_end: fraction at which ``s_ref = target``.
        gain: step size of the log-λ integrator. max_step: bound on ``|Δ ln λ|`` per update.
        lam_min, lam_max: bounds on λ (relative factors of λ0 are set by the callback).
        recovery_step: the optimizer step at which the recovery phase (support fixed, λ = 0) started, -1 before it;
            the callback restarts the factor LR warm-up there.
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

    @property
    def recovering(self) -> bool:
        """Whether the recovery phase has started."""
        return self.recovery_step >= 0

    def reference(self, step: int) -> float:
        """The sparsity wanted after ``step`` optimizer steps."""
        progress = step / max(self.total_steps, 1)
        if progress <= self.warmup:
            return 0.0
        p = min(1.0, (progress - self.warmup) / max(self.ramp_end - self.warmup, 1e-9))
        return self.target * (1.0 - (1.0 - p) ** 3)

    def recovery_due(self, step: int) -> bool:
        """Whether the recovery phase should start after ``step`` optimizer steps (it starts once)."""
        return not self.recovering and step >= self.ramp_end * self.total_steps

    def start_recovery(self, step: int) -> None:
        """Enter the recovery phase after ``step`` optimizer steps: λ = 0 from now on (the caller fixes the support)."""
        self.lam, self.recovery_step = 0.0, step

    def update(self, step: int, sparsity: float) -> float:
        """Move λ toward the schedule given the measured ``sparsity``; returns the new λ."""
        if self.recovering or step / max(self.total_steps, 1) <= self.warmup:
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
