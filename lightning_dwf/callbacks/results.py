"""The public, read-only results of a DWF fit, as properties of the callback (tests and users read these, never
private state)."""

from __future__ import annotations

from typing import Any

from lightning_dwf.training.penalty import FactorPenalty
from lightning_dwf.training.regimes import Regime
from lightning_dwf.training.run import TrainingRun


class FitResults:
    """Read-only views of the fit's :class:`~lightning_dwf.TrainingRun` (built at ``setup``)."""

    _run: TrainingRun | None
    lam: float | None
    regime_config: Any

    @property
    def regime(self) -> Regime | None:
        """The regime of the current (or last) fit (from ``setup``)."""
        return None if self._run is None else self._run.regime

    @property
    def penalty(self) -> FactorPenalty | None:
        """The penalty bound to the optimizers (from fit start)."""
        return None if self._run is None else self._run.penalty

    @property
    def current_lam(self) -> float:
        """λ in force now (the fixed ``lam``, or the controller's value; 0 once the support is fixed)."""
        return self._run.regime.lam if self._run is not None else (self.lam or 0.0)

    @property
    def recovery(self) -> float | None:
        """Target mode: the fraction of the run in the recovery phase; else None."""
        return getattr(self.regime_config, "recovery", None)

    @property
    def control_threshold(self) -> float | None:
        """Target mode: the absolute control threshold the run used (from train start); else None."""
        return getattr(self.regime, "control_threshold", None)

    @property
    def rollbacks(self) -> int:
        """How many times the run stepped back to its last finite state."""
        return 0 if self._run is None else self._run.rollback.count

    @property
    def factor_lr_scale(self) -> float:
        """The factors' step multiplier the rollbacks left (``0.5 ** rollbacks``)."""
        return 1.0 if self._run is None else self._run.rollback.scale

    @property
    def factor_lr_multipliers(self) -> dict[str, float]:
        """Each factorized tensor's factor LR multiplier after the warm-up (a copy)."""
        return {} if self._run is None else dict(self._run.multipliers)
