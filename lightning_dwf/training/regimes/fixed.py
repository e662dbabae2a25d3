"""Fixed λ: the penalty at one strength, either for the whole run (the paper's method) or ramped and then released.

With a constant λ (``recovery=0``), under SGD-type optimizers the penalty goes into the gradient and gradient
descent makes the zeros itself; under Adam-type optimizers each optimizer step is followed by the proximal step of
``λ·|w|^(2/D)``: weights below the threshold :meth:`~lightning_dwf.FactorPenalty.proximal_thresholds` noted before the
step (at that step's learning rate) become exact zeros (:func:`~lightning_dwf.fix_support_`); Adam's normalized step
would otherwise hold every weight with a consistent gradient off zero. The proximal step keeps every layer's largest
weights (``min_layer_share``), so a λ that is too large cannot empty a layer.

With ``recovery > 0`` λ ramps linearly from 0 to ``lam`` over the first ``1 − recovery`` of the run, the proximal step
makes the zeros under every optimizer (SGD-type too, at ``lr × multiplier``), and then the sparsity pattern is fixed
and the survivors train without penalty for the rest: the shape of target mode, with λ named instead of the
sparsity. ``recovery=None`` (the default) is the ramp with ``recovery=0.5``
(:data:`~lightning_dwf.config.DEFAULT_LAM_RECOVERY`; under SGD a constant λ gives its zeros through the gradient
alone, with no proximal step, no per-layer guard and a cliff in the sparsity, and under every optimizer it was less
accurate at equal sparsity, unstructured and structured); a run without a step budget keeps λ constant.

With ``relative=True`` ``lam`` has no units: each factorized tensor ``t`` gets ``λ_t = lam · rms_t^(2−2/D) / η_t``
(``rms_t`` its weights' RMS at train start, ``η_t`` its peak factor step ``lr × multiplier``), so that its proximal
threshold at the peak step is the same multiple of its RMS on every layer and model (:func:`relative_threshold`:
``1.48 · lam^(3/4)`` for D = 3). SGD-type optimizers only: under Adam-type ones the loss holds a weight at a size set
by its gradient's signal-to-noise ratio, not by its layer's scale, and the same λ_t emptied the large-scale layers'
support (measured: docs, "Optimizers").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lightning_dwf._validation import check_fraction, check_nonnegative, set_field
from lightning_dwf.config import DEFAULT_LAM_RECOVERY, DEFAULT_MIN_LAYER_SHARE
from lightning_dwf.core.factorize import sparse_tensors
from lightning_dwf.core.functional import prox_threshold
from lightning_dwf.core.gating import GatedTensor
from lightning_dwf.core.sharding import root_mean_square
from lightning_dwf.observe.report import SparsityReport
from lightning_dwf.training.penalty import penalty_kind
from lightning_dwf.training.regimes.base import Regime, RunContext, register_regime
from lightning_dwf.training.support import fix_support_


@dataclass(frozen=True)
class FixedLamConfig:
    """A fixed λ (``DWFCallback(lam=...)``).

    Args:
        lam: the strength of the collapsed penalty ``λ·Σ|w|^(2/D)`` in units of a *mean* training loss (>= 0).
        recovery: the fraction of the run, at its end, trained with the sparsity pattern fixed and λ = 0; before it λ
            ramps linearly from 0 to ``lam``, and the proximal step makes the zeros under every optimizer. 0: λ =
            ``lam`` for the whole run (the paper's schedule). None (default): 0.5
            (:data:`~lightning_dwf.config.DEFAULT_LAM_RECOVERY`), 0 in a run without a step budget; reported at train
            start.
        min_layer_share: the per-layer guard of the proximal step: every factorized tensor keeps at least this
            fraction of its uniform share ``d·n`` of the surviving weights (``d`` the density reached; at least one
            weight), as in target mode. 0 lets a large λ empty a layer.
        relative: ``lam`` without units, per tensor ``λ_t = lam · rms_t^(2−2/D) / η_t`` (module docstring): the
            proximal threshold at the peak factor step is :func:`relative_threshold` ``(lam, D)`` times each
            tensor's RMS at train start, and the proximal step makes the zeros. SGD-type optimizers only (refused at
            train start under others). The λ_t are reported at train start and kept across a resume.

    >>> FixedLamConfig(lam=-1.0)
    Traceback (most recent call last):
    ...
    ValueError: `lam` must be a finite float >= 0, got -1.0. λ is the penalty strength in mean-loss units, e.g. 2e-3.
    """

    lam: float
    recovery: float | None = None
    min_layer_share: float = DEFAULT_MIN_LAYER_SHARE
    relative: bool = False

    def __post_init__(self) -> None:
        set_field(self, "lam", check_nonnegative(
            "lam", self.lam, " λ is the penalty strength in mean-loss units, e.g. 2e-3."
        ))
        if self.recovery is not None:
            set_field(self, "recovery", check_fraction(
                "recovery", self.recovery, 0.8, True, "the fraction of the run, at its end, trained with the sparsity "
                "pattern fixed and λ = 0 (e.g. 0.5; 0 keeps λ for the whole run; None: 0.5, or 0 in a run without a "
                "step budget)"))
        set_field(self, "min_layer_share", check_fraction(
            "min_layer_share", self.min_layer_share, 1.0, True,
            "the fraction of a tensor's uniform share of surviving weights the proximal step always leaves it (e.g. "
            "0.1; 0 allows emptying a layer)"))
        if not isinstance(self.relative, bool):
            raise ValueError(f"`relative` must be True (lam without units, per layer) or False (λ in mean-loss units), "
                             f"got {self.relative!r}.")


def relative_threshold(lam: float, depth: int) -> float:
    """The proximal threshold at the peak factor step, as a multiple of a tensor's RMS, of
    ``FixedLamConfig(lam, relative=True)``: ``τ_t / rms_t`` (:func:`~lightning_dwf.core.functional.prox_threshold` at
    ``η·λ = lam · rms^(2−2/D)``).

    >>> round(relative_threshold(0.05, 3), 3)
    0.156
    """
    return prox_threshold(1.0, lam, depth)


@register_regime(FixedLamConfig)
class FixedLam(Regime):
    """Runs :class:`FixedLamConfig`: λ constant (or ramped, then released), plus the proximal step."""

    def __init__(self, config: FixedLamConfig) -> None:
        self.config = config
        self.lam = config.lam
        self._pending: dict[str, float] = {}  # proximal thresholds of the step being taken, applied after it
        self._release_step = math.inf  # the optimizer step at which the pattern is fixed (recovery > 0)
        self._released = False
        self._guarded: frozenset[str] = frozenset()  # tensors at their minimum: no penalty at the next step
        self._peak = config.lam  # the largest λ of the run (mean-loss units), the ramp's end
        self._scales: dict[str, float] = {}  # relative: λ_t / peak by tensor name
        self._steps: dict[str, float] = {}  # each tensor's peak factor step (from train start)
        self.recovery = config.recovery or 0.0  # config.recovery, or what None resolves to at train start
        self._restored_recovery: float | None = None  # the resolved recovery of the checkpoint resumed from

    @property
    def ramped(self) -> bool:
        return self.recovery > 0 and self.config.lam > 0

    def _resolve_recovery(self, ctx: RunContext) -> float:
        """``config.recovery``; for None the value the resumed run had, else the ramp in a run with a step budget,
        else 0."""
        if self.config.recovery is not None:
            return self.config.recovery
        if self._restored_recovery is not None:
            return self._restored_recovery
        ramp = math.isfinite(ctx.total_steps) and self.config.lam > 0
        return DEFAULT_LAM_RECOVERY if ramp else 0.0

    def start(self, ctx: RunContext) -> None:
        """Relative λ: each tensor's λ from its RMS and peak factor step (a resume keeps those it restored). Ramped:
        plan the ramp and the release point from the run's length."""
        if self.config.relative and any(penalty_kind(opt) != "gradient" for opt in ctx.optimizers):
            raise ValueError(
                "FixedLamConfig(relative=True) is defined for SGD-type optimizers (the penalty through the gradient). "
                "Under AdamW the same per-layer λ shrank the large-scale layers far past their loss support (LeNet-5 "
                "at chance accuracy with λ = 0.1): use an absolute `lam` there, or `target_sparsity=...`."
            )
        self.recovery = self._resolve_recovery(ctx)
        if self.config.relative and self.config.lam > 0 and not self._scales:
            self._plan_relative(ctx)
        self._steps = {name: step for name, step in ctx.factor_steps.items() if step > 0}
        if self.config.relative:
            self.lam = 0.0 if self._released else self._peak
        if not self.ramped:
            return
        if not math.isfinite(ctx.total_steps):
            raise ValueError(
                f"FixedLamConfig(recovery={self.recovery:g}) is a fraction of the planned run, but this run has "
                "no step budget (max_epochs=-1 or max_time): set max_epochs or max_steps, or use recovery=0."
            )
        self._release_step = (1.0 - self.recovery) * ctx.total_steps
        self._set_lam(ctx.step)
        if not self._released and ctx.step == 0:
            chosen = (" (the default; FixedLamConfig(lam, recovery=0) keeps λ constant)"
                      if self.config.recovery is None else "")
            ctx.info(f"DWFCallback: lam={self.config.lam:g}: λ ramps from 0 over {math.ceil(self._release_step)} "
                     f"steps, the proximal step makes the zeros; then the sparsity pattern is fixed and λ = 0 for the "
                     f"last {self.recovery:.0%} of the run{chosen}.")

    def _plan_relative(self, ctx: RunContext) -> None:
        lams = {}
        for tensor in sparse_tensors(ctx.module):
            rms = _entry_rms(tensor)
            step = ctx.factor_steps.get(tensor.name, 0.0)
            if rms > 0 and step > 0:
                lams[tensor.name] = self.config.lam * rms ** (2.0 - 2.0 / ctx.depth) / step
        if not lams:
            return
        self._peak = max(lams.values())
        self._scales = {name: lam / self._peak for name, lam in lams.items()}
        ctx.info(f"DWFCallback: relative lam={self.config.lam:g} (proximal threshold "
                 f"{relative_threshold(self.config.lam, ctx.depth):.3g} × each layer's RMS at the peak step): λ "
                 + ", ".join(f"{name} {lam:.3g}" for name, lam in lams.items()) + " (mean-loss units).")

    def before_batch(self, ctx: RunContext) -> None:
        if self.ramped:
            self._set_lam(ctx.step)

    def before_step(self, ctx: RunContext, optimizer: Any, thresholds: Callable[..., dict[str, float]]) -> None:
        """Note the proximal thresholds at this step's learning rate (under SGD-type optimizers only when ramped or
        relative)."""
        if self.lam > 0:
            self._pending.update(thresholds(gradient=self.ramped or self.config.relative))

    def after_step(self, ctx: RunContext) -> SparsityReport | None:
        """The proximal step: zero the weights below the thresholds noted before the step (each layer keeping its
        share); at the release point, fix the pattern."""
        prox, self._pending = self._pending, {}
        if prox:
            guarded: set[str] = set()
            fix_support_(ctx.module, prox, ctx.optimizers, self.config.min_layer_share, guarded)
            self._guarded = frozenset(guarded)
        if self.ramped and not self._released and ctx.step >= self._release_step:
            self.release(ctx)
        return None

    @property
    def pattern_fixed(self) -> bool:
        return self._released

    def release(self, ctx: RunContext) -> None:
        """Fix the pattern (below the collapse threshold: exact zeros) and set λ = 0 for the rest of the run."""
        super().release(ctx)
        self._released, self._guarded = True, frozenset()

    def exempt(self) -> frozenset[str]:
        """The layers the proximal step's guard kept at their minimum at the last step: λ = 0 on them at the next (the
        penalty's shrink would otherwise take the weights the guard kept); the step after decides again."""
        return self._guarded

    def lam_scales(self) -> dict[str, float]:
        """Relative λ: each tensor's λ over :attr:`lam`'s peak."""
        return self._scales

    def on_rollback(self) -> None:
        self._pending = {}

    def zero_threshold(self, floor: float) -> float:
        return floor

    @property
    def check_lam(self) -> float:
        """The largest λ of the run (the ramp's end); relative: the largest ``λ_t·η_t`` over the largest ``η_t``, so
        that the check's product with the largest factor LR is the largest step of any tensor."""
        if not self._scales:
            return self._peak
        steps = {name: self._steps.get(name, 0.0) for name in self._scales}
        top = max(steps.values(), default=0.0)
        return max(self._peak * scale * steps[name] for name, scale in self._scales.items()) / top if top else 0.0

    def lr_check_steps(self, steps: int) -> int:
        # ramped or relative: the proximal step makes the zeros under every optimizer, no LR floor to reach
        return 0 if self.ramped or self.config.relative else steps

    def dead_layer_fix(self) -> str:
        if self.lam > 0:
            return ("λ is too large for this run: lower `lam` (e.g. 3-10×), keep FixedLamConfig(min_layer_share) > 0, "
                    "or name the sparsity you want with `target_sparsity=...`.")
        return ("With λ = 0 they were zero from the start (zero factors get no gradient): initialize them, or "
                "FactorizeConfig(exclude=[...]) them.")

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"fixed_released": self._released} if self.ramped else {}
        if self.config.recovery is None:
            state["fixed_recovery"] = self.recovery
        if self._guarded:
            state["fixed_guarded"] = sorted(self._guarded)
        if self._scales:
            state["fixed_relative"] = {"peak": self._peak, "scales": dict(self._scales)}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._released = bool(state.get("fixed_released", False))
        self._guarded = frozenset(state.get("fixed_guarded", ()))
        # checkpoints from before recovery=None ran a constant λ (their default then)
        self._restored_recovery = float(state.get("fixed_recovery", 0.0))
        relative = state.get("fixed_relative")
        if relative:
            self._peak, self._scales = float(relative["peak"]), dict(relative["scales"])

    def _set_lam(self, step: int) -> None:
        self.lam = 0.0 if self._released else self._peak * min(1.0, step / self._release_step)


@torch.no_grad()
def _entry_rms(tensor: Any) -> float:
    """The RMS of a factorized tensor's collapsed weights (of a gated one: of its groups' entries)."""
    rms = root_mean_square(tensor.unit_magnitudes().float())
    return rms / math.sqrt(tensor.entries) if isinstance(tensor, GatedTensor) else rms
