"""Factorizing in place (``lightning_dwf.core.factorize``): which tensors are selected (``exclude`` before
``filter_fn``), the balanced init that keeps the outputs, and loading dense or mismatched state dicts into a factorized
model."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEPTHS
from torch import nn

from lightning_dwf import FactorizeConfig, collapse_state_dict, factorize_, factorized_tensors, sparsity_report

from .helpers import _models


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("kind", ["linear", "conv", "conv1d"])
def test_balanced_init_preserves_outputs(depth, kind):
    model, x = _models()[kind]
    expected = model(x)
    names = factorize_(model, depth, config=FactorizeConfig(init="balanced"))
    assert names and all(".weight" in n for n in names)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    assert sparsity_report(model).relative_misalignment < 1e-5


def test_filter_fn_has_the_last_say():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    seen = []

    def wide_hidden(module: nn.Module, name: str) -> bool:
        seen.append(name)
        return module.out_features == 8

    names = factorize_(net, 3, FactorizeConfig(filter_fn=wide_hidden, exclude=["2"]))
    assert names == ["0.weight"]  # "2" excluded before filter_fn, "4" refused by it
    assert seen == ["0", "4"]


def test_factorize_config_init_reaches_the_factors():
    net = nn.Linear(16, 16)
    before = net.weight.detach().clone()
    factorize_(net, 2, FactorizeConfig(init="balanced"))
    assert (factorized_tensors(net)[0].product() - before).abs().max() < 1e-6


def test_load_dense_and_mismatched_state_dicts():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 5)
    model = copy.deepcopy(dense)
    factorize_(model, 3)
    model.load_state_dict(dense.state_dict())  # a dense (or collapsed) checkpoint -> balanced factors
    torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-6)
    deeper = copy.deepcopy(dense)
    factorize_(deeper, 4)
    with pytest.raises(ValueError, match="factorized with depth 3"):
        model.load_state_dict(deeper.state_dict())
    with pytest.raises(ValueError, match="already plain"):
        collapse_state_dict(dense.state_dict())
