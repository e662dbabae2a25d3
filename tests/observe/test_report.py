"""The sparsity report: counts at a threshold, the metric dictionaries, the final metrics, weight scales."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_dwf import FactorizeConfig, collapse_, factorize_, sparsity_report
from lightning_dwf.observe.report import weight_scales


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0], [0.2, 0.0, 0.0, 0.0]]))
        net[2].weight.fill_(0.5)
    return net


def test_counts_metrics_and_final_metrics():
    net = _net()
    factorize_(net, depth=3, config=FactorizeConfig(init="balanced"))  # keeps the weights
    report = sparsity_report(net, threshold=1e-6, lam=0.1)
    assert (report.numel, report.nonzero) == (18, 9) and report.sparsity == pytest.approx(0.5)
    assert report.compression_ratio == pytest.approx(2.0) and report.dead_layers == []
    metrics = report.metrics(per_layer=True)
    assert {"dwf/sparsity", "dwf/compression_ratio", "dwf/misalignment", "dwf/penalty", "dwf/sparsity/0.weight",
            "dwf/sparsity/2.weight"} <= set(metrics)
    assert metrics["dwf/penalty"] == pytest.approx(0.1 * sum(abs(v) ** (2 / 3) for v in (1.0, 0.5, 0.2) + (0.5,) * 6))
    final = report.final_metrics()
    assert final["dwf/final/sparsity"] == pytest.approx(0.5) and final["dwf/final/threshold"] == 1e-6
    assert final["dwf/final/compression_ratio_all_params"] == pytest.approx(report.compression_ratio_all)
    assert not any(k.startswith("dwf/final/sparsity/") for k in final)  # the final numbers are global


def test_dead_layers_and_weight_scales():
    net = _net()
    with torch.no_grad():
        net[2].weight.zero_()
    factorize_(net, depth=2, config=FactorizeConfig(init="balanced"))
    assert sparsity_report(net, threshold=1e-6).dead_layers == ["2.weight"]
    scale, rms = weight_scales(net)
    w0 = torch.tensor([1.0, 0.5, 0.2])
    assert scale == pytest.approx(math.sqrt(float(w0.pow(2).sum()) / 12), rel=1e-5)
    assert rms == pytest.approx(math.sqrt(float(w0.pow(2).sum()) / 18), rel=1e-5)
    collapse_(net)
    collapsed = sparsity_report(net, threshold=0.0)  # a plain model: its Linear weights, counted the same way
    assert (collapsed.numel, collapsed.nonzero, collapsed.dead_layers) == (18, 3, ["2.weight"])
