"""The regime protocol: how λ and the support evolve during a fit, behind one small interface.

A regime is chosen by its config: :func:`register_regime` maps a config class to the regime class that runs it (the
pattern of torchao's ``quantize_``, which looks its handler up by config type), and ``build_regime`` builds one,
wrapped in the quantization-aware finish when asked (:mod:`lightning_dwf.training.regimes`). A new regime is a new
config and a new class, registered; the callback and :class:`~lightning_dwf.training.run.TrainingRun` never name a
regime.

The run calls a regime at fixed points of every fit, in this order (all steps are counted in optimizer steps):

* :meth:`Regime.start` at train start, after a resume restored the regime's state;
* :meth:`Regime.before_batch` before each training batch;
* :meth:`Regime.before_step` right before each optimizer step, after the penalty went into the gradients;
* :meth:`Regime.after_step` after each optimizer step (not after a step that was rolled back:
  :meth:`Regime.on_rollback` then);
* :meth:`Regime.finish` at fit end, before the factors are collapsed at the threshold it returns.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lightning_dwf.observe.report import SparsityReport
from lightning_dwf.training.support import fix_support_


@dataclass
class RunContext:
    """What a regime may read at one point of a fit. Plain PyTorch: no Trainer.

    Attributes:
        module: the factorized model (changed in place by the regime's cuts).
        optimizers: the optimizers holding the factors (their state is zeroed with the factors).
        step: optimizer steps taken so far.
        total_steps: optimizer steps planned for the whole run (``inf`` when open-ended).
        depth: D.
        floor: the collapse threshold (absolute): below it a weight is zero.
        lr_warmup: the fraction of the run over which the factor LR multiplier ramps up (from
            :attr:`Regime.warmup_start`).
        factor_lrs: the effective peak learning rate of every param group holding factors, at the smallest and at the
            largest factor LR multiplier in use (set at train start).
        weight_scale: largest per-tensor RMS of the collapsed weights (at train start).
        weight_rms: their global RMS (at train start).
        factor_steps: each factorized tensor's peak factor step ``peak lr × its LR multiplier`` by name (at train
            start; the step the proximal thresholds use).
        info: where a regime reports what it did (the callback passes Lightning's ``rank_zero_info``).
    """

    module: nn.Module
    optimizers: Sequence[Any]
    step: int
    total_steps: float
    depth: int
    floor: float
    lr_warmup: float = 0.0
    factor_lrs: list[float] = field(default_factory=list)
    weight_scale: float = math.nan
    weight_rms: float = math.nan
    factor_steps: dict[str, float] = field(default_factory=dict)
    info: Callable[[str], None] = print


class Regime(ABC):
    """One way λ and the support evolve during a fit. Subclasses set :attr:`lam` and implement the abstract methods;
    the other hooks default to doing nothing."""

    #: λ in force now (mean-loss units); the penalty reads it before every optimizer step.
    lam: float = 0.0

    @abstractmethod
    def start(self, ctx: RunContext) -> None:
        """Train start (after a resume restored :meth:`load_state_dict`); ``ctx.factor_lrs`` and the weight scales
        are set.

        Raises:
            ValueError: a run this regime cannot schedule, with the numbers and the fix.
        """

    def before_batch(self, ctx: RunContext) -> None:  # noqa: B027
        """Before each training batch."""

    def before_step(self, ctx: RunContext, optimizer: Any, thresholds: Callable[..., dict[str, float]]) -> None:  # noqa: B027
        """Right before ``optimizer`` steps; ``thresholds()`` gives the proximal thresholds of the decoupled penalty at
        this step's learning rate, ``thresholds(gradient=True)`` those of every optimizer's factors
        (:meth:`~lightning_dwf.FactorPenalty.proximal_thresholds`)."""

    def after_step(self, ctx: RunContext) -> SparsityReport | None:
        """After each optimizer step that was kept. Returns the report it measured, if it measured one at the current
        zero threshold and λ (the run logs it instead of measuring again)."""
        return None

    def exempt(self) -> frozenset[str]:
        """The tensors (by name) that get no penalty at the next optimizer step: a per-layer guard's."""
        return frozenset()

    def lam_scales(self) -> dict[str, float]:
        """Per-tensor factors on :attr:`lam` by name (absent: 1), for the penalty and the proximal thresholds."""
        return {}

    def on_rollback(self) -> None:  # noqa: B027
        """The step just taken was rolled back: forget what :meth:`before_step` noted for it."""

    @abstractmethod
    def zero_threshold(self, floor: float) -> float:
        """The magnitude (absolute) below which a weight counts as zero now, for metrics and checkpoints; ``floor`` is
        the collapse threshold."""

    def release(self, ctx: RunContext) -> None:
        """Fix the support as it is now and set λ = 0 for the rest of the run (the quantization-aware finish calls
        it): every weight below the collapse threshold becomes an exact zero."""
        fix_support_(ctx.module, ctx.floor, ctx.optimizers)
        self.lam = 0.0

    def finish(self, ctx: RunContext) -> float:
        """Fit end, before the collapse: settle the support; returns the collapse threshold (absolute)."""
        return self.zero_threshold(ctx.floor)

    @property
    def warmup_start(self) -> int:
        """The optimizer step from which the factor LR warm-up ramps (it may restart, e.g. at a recovery point)."""
        return 0

    @property
    def pattern_fixed(self) -> bool:
        """Whether the sparsity pattern is fixed now (a recovery phase): the factors' step cap changes here
        (``FactorLRConfig.pattern_step_cap``). Default: never."""
        return False

    @property
    def check_lam(self) -> float:
        """The λ the LR check at train start compares with the factors' learning rate: the largest of the run, in the
        units of the largest factor LR (default: :attr:`lam` now)."""
        return self.lam

    def lr_check_steps(self, steps: int) -> int:
        """Steps over which the LR floor must bring unsupported weights to zero (0: the floor is not checked)."""
        return steps

    @property
    def warns_dead_layers(self) -> bool:
        """Whether an emptied layer is a problem to warn about now."""
        return True

    @abstractmethod
    def dead_layer_fix(self) -> str:
        """What the user should change when this regime emptied a layer (ends the dead-layer warning)."""

    def metrics(self, step: int) -> dict[str, float]:
        """Regime-specific metrics logged beside the sparsity report (``dwf/...`` keys)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs; merged into the callback's saved state (keys must not clash with its own)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027
        """Restore from the callback's saved state (before :meth:`start`)."""


_REGIMES: dict[type, Callable[[Any], Regime]] = {}


def register_regime(config_type: type) -> Callable[[type[Regime]], type[Regime]]:
    """Class decorator: ``config_type`` instances are run by the decorated regime class, built as ``cls(config)``.

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class HoldConfig:
    ...     lam: float
    >>> @register_regime(HoldConfig)
    ... class Hold(Regime):
    ...     def __init__(self, config): self.lam = config.lam
    ...     def start(self, ctx): pass
    ...     def zero_threshold(self, floor): return floor
    ...     def dead_layer_fix(self): return "lower `lam`."
    >>> regime_for(HoldConfig(0.1))(HoldConfig(0.1)).lam
    0.1
    >>> unregister_regime(HoldConfig)
    """

    def decorate(cls: type[Regime]) -> type[Regime]:
        if config_type in _REGIMES:
            raise ValueError(f"A regime is already registered for {config_type.__name__}.")
        _REGIMES[config_type] = cls
        return cls

    return decorate


def unregister_regime(config_type: type) -> None:
    """Remove the regime registered for ``config_type`` (tests, plugins reloading)."""
    _REGIMES.pop(config_type, None)


def regime_for(config: Any) -> Callable[[Any], Regime]:
    """The regime class registered for ``type(config)`` (or its nearest registered base class).

    Raises:
        TypeError: nothing is registered for it.
    """
    for cls in type(config).__mro__:
        if cls in _REGIMES:
            return _REGIMES[cls]
    names = ", ".join(sorted(c.__name__ for c in _REGIMES))
    raise TypeError(f"`regime` must be a registered regime config ({names}), got {type(config).__name__}. Register a "
                    "new one with lightning_dwf.register_regime(ConfigClass) on its Regime class.")
