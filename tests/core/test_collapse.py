"""Collapsing factors back into plain weights (``lightning_dwf.core.collapse``): in place and on a state dict give the
same model as the factorized one, and the threshold makes exact zeros where the sparsity report counts them."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEPTHS
from torch import nn

from lightning_dwf import (
    collapse_,
    collapse_state_dict,
    factor_parameters,
    factorize_,
    factorized_tensors,
    sparsity_report,
)
from lightning_dwf.core.functional import l2d_quasinorm

from .helpers import _models


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_collapsed_equals_factorized(depth, kind):
    model, x = _models()[kind]
    factorize_(model, depth)
    expected = model(x)
    factorized_sd = copy.deepcopy(model.state_dict())
    copy_ = copy.deepcopy(model)
    collapse_(copy_, threshold=0.0)
    assert not factorized_tensors(copy_)
    torch.testing.assert_close(copy_(x), expected)
    # the original (which shares parametrize's dynamic class with the copy) still works and trains
    torch.testing.assert_close(model(x), expected)
    assert factor_parameters(model)
    # offline conversion gives the same state dict as the in-place collapse
    offline = collapse_state_dict(factorized_sd, threshold=0.0)
    assert offline.keys() == copy_.state_dict().keys()
    for k, v in copy_.state_dict().items():
        torch.testing.assert_close(offline[k], v)
    plain = _models()[kind][0]
    plain.load_state_dict(offline)  # loads into the ordinary class, strict
    torch.testing.assert_close(plain(x), expected)


def test_collapse_threshold_makes_exact_zeros():
    model = nn.Linear(4, 3)
    factorize_(model, 3)
    f0, f1, f2 = factorized_tensors(model)[0].factors
    with torch.no_grad():
        f0[0].fill_(1e-3)  # |w| <= 1e-3 * 1 * 1 -> below threshold 1e-2
        f1[0].fill_(1.0)
        f2[0].fill_(1.0)
    report = sparsity_report(model, threshold=1e-2, lam=0.1)
    assert report.nonzero == 8 and report.numel == 12
    assert report.compression_ratio == pytest.approx(1.5)
    assert report.layers[0].sparsity == pytest.approx(4 / 12)
    assert report.total_params == 15 and report.total_nonzero == 11
    assert report.l2d_penalty == pytest.approx(0.1 * float(l2d_quasinorm(model.weight, 3)), rel=1e-5)
    assert report.factor_penalty == pytest.approx(report.l2d_penalty + 0.1 * report.misalignment, rel=1e-5)
    collapse_(model, threshold=1e-2)
    assert type(model) is nn.Linear
    assert int((model.weight == 0).sum()) == 4
    assert isinstance(model.weight, nn.Parameter) and model.weight.requires_grad
