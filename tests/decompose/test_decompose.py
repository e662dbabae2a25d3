"""decompose_: exact budgets, grids and a working forward; selection and skips."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_dwf import factorize_
from lightning_dwf.decompose import DecomposeConfig, LowRankProduct, decompose_, decomposed_tensors

from .helpers import CONFIG, KINDS, assert_on_grid, build, inputs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_decompose_respects_density_grid_and_forward(kind: str, bits: int | None) -> None:
    model = build(kind)
    x = inputs(kind)
    dense_out = model(x)
    config = DecomposeConfig(bits=bits, **CONFIG)
    report = decompose_(model, config)
    assert report.names == ("0.weight", "2.weight") and not report.skipped
    for row, t in zip(report.layers, decomposed_tensors(model)):
        u, v = t.factors()
        assert isinstance(t.parametrization, LowRankProduct) and isinstance(t.module, (nn.Linear, nn.Conv1d, nn.Conv2d))
        assert row.nonzero_u == int(u.count_nonzero()) <= config.density * u.numel()
        assert row.nonzero_v == int(v.count_nonzero()) <= config.density * v.numel()
        assert row.rank == u.shape[1] == v.shape[0] == config.rank_for(*row.matrix)
        assert torch.equal(t.module.weight, (u @ v).reshape(row.shape))
        assert row.svd_error <= row.error < row.init_error
        assert 0 < row.stored_bytes < row.dense_bytes == 4 * t.module.weight.numel()
        if bits is not None:
            assert_on_grid(u, bits)
            assert_on_grid(v, bits)
    out = model(x)
    assert out.shape == dense_out.shape and torch.isfinite(out).all()
    assert 0 < report.error < 1 and report.nonzeros == sum(r.nonzero_u + r.nonzero_v for r in report.layers)


def test_decompose_selection_and_skips() -> None:
    model = build("linear")
    report = decompose_(model, DecomposeConfig(exclude=["2"], min_size=0, density=0.5, steps=5))
    assert report.names == ("0.weight",) and type(model[2].weight) is nn.Parameter
    again = decompose_(model, DecomposeConfig(min_size=0, density=0.5, steps=5))
    assert again.skipped[0] == ("0.weight", "already decomposed") and again.names == ("2.weight",)
    tiny = decompose_(build("linear"), DecomposeConfig(steps=5, min_size=2000))
    assert not tiny.layers and "min_size" in tiny.skipped[0][1]
    full = decompose_(build("linear"), DecomposeConfig(rank_ratio=1.0, density=1.0, min_size=0, steps=5))
    assert not full.layers and all("dense weight" in reason for _, reason in full.skipped)
    dwf = build("linear")
    factorize_(dwf, depth=2)
    with pytest.raises(ValueError, match=r"collapse_\(module\)"):
        decompose_(dwf, DecomposeConfig(min_size=0))
