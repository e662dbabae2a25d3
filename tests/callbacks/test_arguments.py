"""DWFCallback's constructor arguments: each bad argument (and each bad config field) raises in ``__init__`` with the
fix in the message, the 0.1 names point to their config field, configs given as plain mappings, ``target_compression``
as the same dial as ``target_sparsity``, and the default recovery for high targets."""

from __future__ import annotations

import pytest

from lightning_dwf import CollapseConfig, DWFCallback, FactorizeConfig, FactorLRConfig, ScheduleConfig


@pytest.mark.parametrize(
    "factory, kwargs, error, match",
    [
        (DWFCallback, dict(depth=1, lam=0.1), ValueError, "`depth` must be >= 2"),
        (DWFCallback, dict(depth=2.0, lam=0.1), TypeError, "`depth` must be an int"),
        (DWFCallback, dict(depth=True, lam=0.1), TypeError, "`depth` must be an int"),
        (DWFCallback, dict(depth=3), ValueError, "Give exactly one of `lam`"),
        (DWFCallback, dict(depth=3, lam=0.1, target_sparsity=0.9), ValueError, "Give exactly one of `lam`"),
        (DWFCallback, dict(depth=3, target_sparsity=1.0), ValueError, "`target_sparsity` is a fraction"),
        (DWFCallback, dict(depth=3, target_compression=0.5), ValueError, "`target_compression` .* must be > 1"),
        (ScheduleConfig, dict(recovery=0.9), ValueError, "`recovery` is the fraction of the run"),
        (ScheduleConfig, dict(recovery=True), ValueError, "`recovery` is the fraction of the run"),
        (DWFCallback, dict(depth=3, lam=-1.0), ValueError, "`lam` must be a finite float >= 0"),
        (DWFCallback, dict(depth=3, lam=float("nan")), ValueError, "`lam` must be a finite float >= 0"),
        (DWFCallback, dict(depth=3, lam="0.1"), TypeError, "`lam` must be a finite float"),
        (CollapseConfig, dict(threshold=-1e-7), ValueError, "`threshold` must be a finite float >= 0"),
        (FactorizeConfig, dict(init="xavier"), ValueError, "`init` must be one of"),
        (FactorizeConfig, dict(init_std=-1.0), ValueError, "`init_std` must be"),
        (FactorLRConfig, dict(multiplier=0), ValueError, "`multiplier` must be > 0"),
        (FactorLRConfig, dict(warmup=1.0), ValueError, "`warmup` is the fraction"),
        (FactorLRConfig, dict(check="loud"), ValueError, "`check` must be one of"),
        (FactorLRConfig, dict(step_cap=0), ValueError, "`step_cap` must be > 0"),
        (FactorLRConfig, dict(pattern_step_cap=0), ValueError, "`pattern_step_cap` must be > 0"),
        (FactorLRConfig, dict(fixed_pattern="frozen"), ValueError, "`fixed_pattern` must be one of"),
        (FactorLRConfig, dict(step_cap=float("inf")), ValueError, "`step_cap` must be a finite float"),
        (
            DWFCallback,
            dict(depth=3, lam=0.1, log_every_n_steps=0),
            ValueError,
            "`log_every_n_steps` must be an int >= 1",
        ),
        (FactorizeConfig, dict(layer_types=["Linearr"]), ValueError, "not a torch.nn layer class name"),
        (FactorizeConfig, dict(layer_types=[]), ValueError, "`layer_types` is empty"),
        (FactorizeConfig, dict(include=[3]), TypeError, "`include` must be a string or a list of strings"),
        (FactorizeConfig, dict(filter_fn="net.0"), TypeError, "`filter_fn` must be a callable"),
        (FactorizeConfig, dict(eps_ratio=2.0), ValueError, "`eps_ratio` must lie in"),
        (ScheduleConfig, dict(gain=-0.1), ValueError, "`gain` must be a finite float >= 0"),
        (ScheduleConfig, dict(control_threshold=0.0), ValueError, "`control_threshold` must be > 0"),
        # the arguments of 0.1 name the config field they moved to
        (
            DWFCallback,
            dict(depth=3, lam=0.1, exclude=["net.2"]),
            TypeError,
            r"factorize=FactorizeConfig\(exclude=...\)",
        ),
        (DWFCallback, dict(depth=3, lam=0.1, factor_lr_multiplier=10), TypeError, r"FactorLRConfig\(multiplier=...\)"),
        (DWFCallback, dict(depth=3, lam=0.1, threshold=1e-3), TypeError, r"CollapseConfig\(threshold=...\)"),
        (DWFCallback, dict(depth=3, lam=0.1, recovery=0.3), TypeError, r"ScheduleConfig\(recovery=...\)"),
        (DWFCallback, dict(depth=3, lam=0.1, exclued=["net.2"]), TypeError, "unexpected keyword argument 'exclued'"),
        (DWFCallback, dict(depth=3, lam=0.1, factorize="net.2"), TypeError, "`factorize` must be a FactorizeConfig"),
    ],
)
def test_bad_arguments_raise_in_init(factory, kwargs, error, match):
    with pytest.raises(error, match=match):
        factory(**kwargs)


def test_mappings_are_accepted_for_plain_dict_configuration():
    dwf = DWFCallback(depth=3, lam=0.01, factorize={"exclude": ["net.2"]}, collapse={"threshold": 1e-4})
    assert dwf.factorize == FactorizeConfig(exclude=("net.2",)) and dwf.collapse.threshold == 1e-4
    with pytest.raises(TypeError, match="unexpected keyword argument 'exclued'"):
        DWFCallback(depth=3, lam=0.01, factorize={"exclued": ["net.2"]})


def test_target_compression_is_the_same_dial():
    assert DWFCallback(target_compression=50).target_sparsity == pytest.approx(0.98)


def test_default_recovery_is_shorter_for_high_targets():
    assert DWFCallback(target_sparsity=0.99).recovery == 0.5
    assert DWFCallback(target_sparsity=0.995).recovery == DWFCallback(target_compression=200).recovery == 0.4
    assert DWFCallback(target_sparsity=0.995, schedule=ScheduleConfig(recovery=0.3)).recovery == 0.3
