"""DecomposeConfig: validation naming the field, the shared selection, the rank and budget rules."""

from __future__ import annotations

import pytest
from torch import nn

from lightning_dwf.config import SelectionConfig
from lightning_dwf.core.factorize import select_tensors
from lightning_dwf.decompose import DecomposeConfig


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(rank=0), "rank"),
        (dict(rank=4, rank_ratio=0.5), "rank_ratio"),
        (dict(rank_ratio=0.0), "rank_ratio"),
        (dict(rank_ratio=1.5), "rank_ratio"),
        (dict(density=0.0), "density"),
        (dict(density=1.01), "density"),
        (dict(density=float("nan")), "density"),
        (dict(bits=3), "bits"),
        (dict(bits=True), "bits"),
        (dict(steps=-1), "steps"),
        (dict(lr=0.0), "lr"),
        (dict(lr=-1e-3), "lr"),
        (dict(min_size=-1), "min_size"),
        (dict(layer_types=["NotALayer"]), "layer_types"),
    ],
)
def test_bad_config_raises_value_error_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"`{field}`"):
        DecomposeConfig(**kwargs)


def test_config_types_and_rank_rule() -> None:
    with pytest.raises(TypeError, match="`rank`"):
        DecomposeConfig(rank=2.5)
    with pytest.raises(TypeError, match="`filter_fn`"):
        DecomposeConfig(filter_fn="no")
    assert DecomposeConfig().rank_for(300, 784) == 75
    assert DecomposeConfig(rank=1000).rank_for(300, 784) == 300
    assert DecomposeConfig(rank_ratio=0.001).rank_for(300, 784) == 1
    assert DecomposeConfig(exclude="head").exclude == ("head",)
    assert DecomposeConfig(density=0.29).keep_for(100) == 29  # no float floor surprise (0.29 * 100 = 28.999…)


@pytest.mark.parametrize("param_names", [("weight", "bias"), ("bias",), "bias", ["weight", "weight"], ()])
def test_param_names_other_than_weight_are_refused(param_names) -> None:
    with pytest.raises(ValueError, match="`param_names`"):
        DecomposeConfig(param_names=param_names)


def test_selection_is_the_shared_selection_config() -> None:
    assert DecomposeConfig(param_names="weight").param_names == ("weight",)
    config = DecomposeConfig(layer_types=["Linear"], include=["0", "2"], exclude="2", rank=4)
    assert isinstance(config, SelectionConfig) and config.layer_types == (nn.Linear,)
    model = nn.Sequential(nn.Linear(8, 8), nn.Conv1d(2, 2, 1), nn.Linear(8, 2))
    assert [name for name, _, _ in select_tensors(model, config)] == ["0.weight"]
    assert [name for name, _, _ in select_tensors(model, DecomposeConfig())] == ["0.weight", "1.weight", "2.weight"]
    with pytest.raises(TypeError):
        DecomposeConfig(None, (), (), ("weight",), None, 16)  # the decomposition's own fields are keyword-only
