"""Regimes: each way λ and the support evolve during a fit, one class each behind :class:`Regime`.

* :class:`FixedLam` (:class:`FixedLamConfig`): a fixed λ; the gradient penalty under SGD-type optimizers, the
  proximal step under Adam-type ones.
* :class:`TargetSparsity` (:class:`TargetSparsityConfig`): the controller, the gradual cut and the recovery phase.
* :class:`Budget` (:class:`BudgetConfig`): structured DWF to a budget of the shrunk model's MACs or parameters.
* :class:`QuantizedFinish` (:class:`~lightning_dwf.QuantizeConfig`): any of them, then the quantization-aware finish.

A new regime is a config class and a :class:`Regime` subclass registered with :func:`register_regime`; pass the config
as ``DWFCallback(regime=...)``.
"""

from __future__ import annotations

from typing import Any

from lightning_dwf.config import QuantizeConfig
from lightning_dwf.training.regimes.base import Regime, RunContext, regime_for, register_regime, unregister_regime
from lightning_dwf.training.regimes.budget import Budget, BudgetConfig
from lightning_dwf.training.regimes.fixed import FixedLam, FixedLamConfig
from lightning_dwf.training.regimes.quantized import QuantizedFinish
from lightning_dwf.training.regimes.target import TargetSparsity, TargetSparsityConfig


def build_regime(config: Any, quantize: QuantizeConfig | None = None) -> Regime:
    """The regime registered for ``config``, ending in the quantization-aware finish when ``quantize`` is given.

    >>> build_regime(FixedLamConfig(1e-3), QuantizeConfig(bits=4)).lam
    0.001
    """
    regime = regime_for(config)(config)
    return regime if quantize is None else QuantizedFinish(quantize, regime)


__all__ = [
    "Budget",
    "BudgetConfig",
    "FixedLam",
    "FixedLamConfig",
    "QuantizedFinish",
    "Regime",
    "RunContext",
    "TargetSparsity",
    "TargetSparsityConfig",
    "build_regime",
    "register_regime",
    "regime_for",
    "unregister_regime",
]
