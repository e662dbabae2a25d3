"""The LowRankProduct parametrization: collapsing it gives back plain layers (also on a deepcopy)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_dwf.decompose import DecomposeConfig, collapse_decomposed_, decompose_, decomposed_tensors

from .helpers import CONFIG, build, inputs


def test_collapse_decomposed_gives_back_plain_layers() -> None:
    model = build("conv2d")
    decompose_(model, DecomposeConfig(bits=4, **CONFIG))
    x = inputs("conv2d")
    out = model(x)
    twin = copy.deepcopy(model)
    collapse_decomposed_(model)
    assert type(model[0]) is nn.Conv2d and set(model.state_dict()) == {"0.weight", "0.bias", "2.weight"}
    torch.testing.assert_close(model(x), out)
    torch.testing.assert_close(twin(x), out)  # the deepcopy keeps working
    assert decomposed_tensors(twin) and not decomposed_tensors(model)


def test_a_decomposed_weight_refuses_a_dense_value() -> None:
    model = build("linear")
    decompose_(model, DecomposeConfig(**CONFIG))
    with pytest.raises(ValueError, match="collapse_decomposed_"):
        model[0].weight = torch.zeros(32, 40)
