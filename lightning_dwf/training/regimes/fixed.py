"""Fixed λ: the penalty at one strength for the whole run.

Under SGD-type optimizers the penalty goes into the gradient and gradient descent makes the zeros itself. Under
Adam-type optimizers each optimizer step is followed by the proximal step of ``λ·|w|^(2/D)``: weights below the
threshold :meth:`~lightning_dwf.FactorPenalty.proximal_thresholds` noted before the step (at that step's learning
rate) become exact zeros (:func:`~lightning_dwf.fix_support_`); Adam's normalized step would otherwise hold every
weight with a consistent gradient off zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lightning_dwf._validation import check_nonnegative, set_field
from lightning_dwf.observe.report import SparsityReport
from lightning_dwf.training.regimes.base import Regime, RunContext, register_regime
from lightning_dwf.training.support import fix_support_


@dataclass(frozen=True)
class FixedLamConfig:
    """A fixed λ (``DWFCallback(lam=...)``).

    Args:
        lam: the strength of the collapsed penalty ``λ·Σ|w|^(2/D)`` in units of a *mean* training loss (>= 0).

    >>> FixedLamConfig(lam=-1.0)
    Traceback (most recent call last):
    ...
    ValueError: `lam` must be a finite float >= 0, got -1.0. λ is the penalty strength in mean-loss units, e.g. 2e-3.
    """

    lam: float

    def __post_init__(self) -> None:
        set_field(self, "lam", check_nonnegative(
            "lam", self.lam, " λ is the penalty strength in mean-loss units, e.g. 2e-3."
        ))


@register_regime(FixedLamConfig)
class FixedLam(Regime):
    """Runs :class:`FixedLamConfig`: λ constant, plus the proximal step under Adam-type optimizers."""

    def __init__(self, config: FixedLamConfig) -> None:
        self.config = config
        self.lam = config.lam
        self._pending: dict[str, float] = {}  # proximal thresholds of the step being taken, applied after it

    def start(self, ctx: RunContext) -> None:
        """Nothing to plan: λ is fixed."""

    def before_step(self, ctx: RunContext, optimizer: Any, thresholds: Callable[[], dict[str, float]]) -> None:
        """Note the proximal thresholds at this step's learning rate (empty under SGD-type optimizers)."""
        if self.lam > 0:
            self._pending.update(thresholds())

    def after_step(self, ctx: RunContext) -> SparsityReport | None:
        """The proximal step: zero the weights below the thresholds noted before the step."""
        prox, self._pending = self._pending, {}
        if prox:
            fix_support_(ctx.module, prox, ctx.optimizers)
        return None

    def on_rollback(self) -> None:
        self._pending = {}

    def zero_threshold(self, floor: float) -> float:
        return floor

    def dead_layer_fix(self) -> str:
        if self.lam > 0:
            return ("λ is too large for this run: lower `lam` (e.g. 3-10×), or name the sparsity you want with "
                    "`target_sparsity=...`.")
        return ("With λ = 0 they were zero from the start (zero factors get no gradient): initialize them, or "
                "FactorizeConfig(exclude=[...]) them.")
