"""Turning ``DWFCallback``'s constructor arguments into validated configs, early and with the fix in the message."""

from __future__ import annotations

import warnings
from typing import Any

from lightning_dwf.config import CollapseConfig, QuantizeConfig, ScheduleConfig, resolve_target
from lightning_dwf.training.regimes import FixedLamConfig, TargetSparsityConfig, regime_for

#: Constructor arguments of lightning-dwf 0.1 and where they live now.
MOVED_ARGUMENTS = {
    **{name: f"factorize=FactorizeConfig({name}=...)" for name in
       ("layer_types", "include", "exclude", "param_names", "init", "init_std")},
    "init_eps_ratio": "factorize=FactorizeConfig(eps_ratio=...)",
    "recovery": "schedule=ScheduleConfig(recovery=...)",
    "control_threshold": "schedule=ScheduleConfig(control_threshold=...)",
    "factor_lr_multiplier": "factor_lr=FactorLRConfig(multiplier=...)",
    "factor_lr_warmup": "factor_lr=FactorLRConfig(warmup=...)",
    "lr_check": "factor_lr=FactorLRConfig(check=...)",
    "threshold": "collapse=CollapseConfig(threshold=...)",
    "collapse_on_fit_end": "collapse=CollapseConfig(on_fit_end=...)",
    "save_collapsed": "collapse=CollapseConfig(save=...)",
    "collapsed_ckpt_path": "collapse=CollapseConfig(path=...)",
}


def check_moved(moved: dict[str, Any]) -> None:
    """Refuse keyword arguments that moved into a config object (naming where), and unknown ones."""
    if moved:
        name = next(iter(moved))
        where = MOVED_ARGUMENTS.get(name)
        if where is None:
            raise TypeError(f"DWFCallback got an unexpected keyword argument {name!r}.")
        raise TypeError(f"DWFCallback's `{name}` argument moved to a config object: pass {where}.")


def as_config(name: str, value: Any, cls: type) -> Any:
    """``value`` if it is a ``cls`` (a mapping is accepted and converted, for plain-dict configuration), else the
    defaults."""
    if value is None:
        return cls()
    if isinstance(value, dict):
        return cls(**value)
    if not isinstance(value, cls):
        raise TypeError(f"`{name}` must be a {cls.__name__}, got {value!r}. E.g. {name}={cls.__name__}().")
    return value


def resolve_regime(lam: float | None, target_sparsity: float | None, target_compression: float | None,
                   regime: Any, schedule: ScheduleConfig) -> Any:
    """The regime config from exactly one of ``lam``, ``target_sparsity``, ``target_compression`` and ``regime``."""
    given = [name for name, v in (("lam", lam), ("target_sparsity", target_sparsity),
                                  ("target_compression", target_compression), ("regime", regime)) if v is not None]
    if len(given) != 1:
        raise ValueError(
            "Give exactly one of `lam` (a fixed penalty strength), `target_sparsity` or `target_compression` (λ "
            f"adapted to reach it), or a `regime` config, got {given or 'none'}. E.g. DWFCallback(depth=3, "
            "target_sparsity=0.95)."
        )
    if regime is not None:
        regime_for(regime)  # raises for an unregistered config
        return regime
    if lam is not None:
        return FixedLamConfig(lam)
    return TargetSparsityConfig(resolve_target(target_sparsity, target_compression), schedule)  # type: ignore[arg-type]


def resolve_quantize(quantize: QuantizeConfig | dict | None, quantize_bits: int | None,
                     collapse: CollapseConfig) -> QuantizeConfig | None:
    """The quantization-aware finish's config; ``quantize_bits=`` and ``CollapseConfig(quantize_fraction=...)`` of
    earlier releases still work, with a ``FutureWarning``."""
    if quantize_bits is not None:
        if quantize is not None:
            raise ValueError("Give `quantize=QuantizeConfig(...)` or the older `quantize_bits=`, not both.")
        warnings.warn(f"DWFCallback(quantize_bits={quantize_bits!r}) is deprecated: pass "
                      f"quantize=QuantizeConfig(bits={quantize_bits!r}).", FutureWarning, stacklevel=3)
        try:
            fraction = collapse.quantize_fraction
            return QuantizeConfig(quantize_bits, 0.2 if fraction is None else fraction)
        except ValueError as err:
            raise ValueError(str(err).replace("`bits`", "`quantize_bits`")) from None
    if quantize is None:
        if collapse.quantize_fraction is not None:
            raise ValueError("CollapseConfig(quantize_fraction=...) has no effect without a quantization-aware finish: "
                             "pass quantize=QuantizeConfig(bits=8, fraction=...).")
        return None
    quantize = as_config("quantize", quantize, QuantizeConfig)
    if collapse.quantize_fraction is not None:
        raise ValueError("Give the finish's fraction once: QuantizeConfig(fraction=...), not also "
                         "CollapseConfig(quantize_fraction=...).")
    return quantize


def check_log_every(every: Any) -> int | None:
    """``log_every_n_steps``: an int >= 1, or None (the Trainer's value)."""
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"`log_every_n_steps` must be an int >= 1 or None (the Trainer's value), got {every!r}.")
    return every
