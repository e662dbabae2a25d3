"""The config objects: frozen after construction, and their arguments normalized (strings and lists to tuples, layer
type names to classes, paths to strings)."""

from __future__ import annotations

import dataclasses

import pytest
from torch import nn

from lightning_dwf import CollapseConfig, FactorizeConfig


def test_configs_are_frozen_and_normalized():
    config = FactorizeConfig(exclude="head", layer_types=["Linear", nn.Conv2d], param_names="weight")
    assert config.exclude == ("head",) and config.layer_types == (nn.Linear, nn.Conv2d)
    assert config.param_names == ("weight",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.exclude = ("other",)
    assert CollapseConfig(path=__file__).path == str(__file__)
