"""The config objects: validation at construction, immutability, and each field reaching the code that uses it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import replace

import pytest
from conftest import PLAIN_FACTOR_LR, ToyModel, trainer_kwargs
from lightning.pytorch import Callback, Trainer
from torch import nn

from lightning_dwf import (
    CollapseConfig,
    DWFCallback,
    FactorizeConfig,
    ScheduleConfig,
    factorize_,
    factorized_tensors,
)
from lightning_dwf.core.functional import lam_floor
from lightning_dwf.training.controller import plan_controller


def test_configs_are_frozen_and_normalized():
    config = FactorizeConfig(exclude="head", layer_types=["Linear", nn.Conv2d], param_names="weight")
    assert config.exclude == ("head",) and config.layer_types == (nn.Linear, nn.Conv2d)
    assert config.param_names == ("weight",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.exclude = ("other",)
    assert CollapseConfig(path=__file__).path == str(__file__)


def test_filter_fn_has_the_last_say():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    seen = []

    def wide_hidden(module: nn.Module, name: str) -> bool:
        seen.append(name)
        return module.out_features == 8

    names = factorize_(net, 3, FactorizeConfig(filter_fn=wide_hidden, exclude=["2"]))
    assert names == ["0.weight"]  # "2" excluded before filter_fn, "4" refused by it
    assert seen == ["0", "4"]


def test_filter_fn_through_the_callback(tmp_path):
    factor_lr = PLAIN_FACTOR_LR
    dwf = DWFCallback(depth=3, lam=0.01, factor_lr=factor_lr, verbose=False,
                      factorize=FactorizeConfig(filter_fn=lambda module, name: name == "net.2"))
    model = ToyModel()
    Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[dwf])).fit(model)
    assert dwf.factorized_names == ["net.2.weight"]
    assert [layer.name for layer in dwf.final_report.layers] == ["net.2.weight"]


def test_mappings_are_accepted_for_plain_dict_configuration():
    dwf = DWFCallback(depth=3, lam=0.01, factorize={"exclude": ["net.2"]}, collapse={"threshold": 1e-4})
    assert dwf.factorize == FactorizeConfig(exclude=("net.2",)) and dwf.collapse.threshold == 1e-4
    with pytest.raises(TypeError, match="unexpected keyword argument 'exclued'"):
        DWFCallback(depth=3, lam=0.01, factorize={"exclued": ["net.2"]})


class LamTrace(Callback):
    def __init__(self) -> None:
        self.lams: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        dwf = next(c for c in trainer.callbacks if isinstance(c, DWFCallback))
        self.lams.append(dwf.current_lam)


@pytest.mark.parametrize("gain", [0.0, 0.2])
def test_schedule_gain_reaches_the_controller(tmp_path, gain):
    """gain=0 is the ablation the benchmarks run: λ stays at its start value until the recovery point."""
    trace = LamTrace()
    dwf = DWFCallback(depth=3, target_sparsity=0.9, schedule=ScheduleConfig(gain=gain, recovery=0.3), verbose=False)
    Trainer(**trainer_kwargs(tmp_path, max_epochs=8, callbacks=[dwf, trace])).fit(ToyModel())
    before_recovery = trace.lams[: int(0.7 * len(trace.lams)) - 1]
    assert len(set(before_recovery)) == (1 if gain == 0 else len(set(before_recovery)))
    if gain:
        assert len(set(before_recovery)) > 5
    assert trace.lams[-1] == 0.0 and abs(dwf.final_report.sparsity - 0.9) < 0.01


def test_plan_controller_starts_at_a_tenth_of_the_floor():
    config = ScheduleConfig(control_threshold=1e-3, recovery=0.5)
    controller = plan_controller(0.95, 1000, [1.0, 2.0], 3, 0.05, 0.04, config, 1.19e-7)
    floor = lam_floor(1.0, 1000, 0.05, 1e-3, min_log_ratio=1.0)
    assert floor == pytest.approx(math.log(50) / 1000)
    assert controller.lam == pytest.approx(0.1 * floor) and controller.lam_min == pytest.approx(1e-3 * floor)
    assert controller.lam_max == pytest.approx(0.05 * 3 / (2 * 2.0))  # the penalty shrink 2·lr·λ/D stays <= 5 %
    assert (controller.threshold, controller.ramp_end, controller.warmup) == (1e-3, 0.5, 0.1)
    with pytest.raises(ValueError, match="at least 50 optimizer steps"):
        plan_controller(0.95, 49, [1.0], 3, 0.05, 0.04, config, 1.19e-7)
    with pytest.raises(ValueError, match="cannot be reached in 1000 steps"):  # one cut at recovery: λ must get there
        plan_controller(0.95, 1000, [1e-6, 10.0], 3, 0.05, 0.04, replace(config, gradual=False), 1.19e-7)
    # gradual cuts reach the target whatever λ does: nothing to refuse
    assert plan_controller(0.95, 1000, [1e-6, 10.0], 3, 0.05, 0.04, config, 1.19e-7).lead == 0.0


def test_factorize_config_init_reaches_the_factors():
    net = nn.Linear(16, 16)
    before = net.weight.detach().clone()
    factorize_(net, 2, FactorizeConfig(init="balanced"))
    assert (factorized_tensors(net)[0].product() - before).abs().max() < 1e-6
