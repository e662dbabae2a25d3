"""Models and checks shared by the compressed-file tests."""

from __future__ import annotations

import torch
from torch import nn

KINDS = ["linear", "conv1d", "conv2d", "conv3d", "batchnorm"]
SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]


def build(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":
        model = nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 4))
    elif kind == "conv1d":
        model = nn.Sequential(nn.Conv1d(3, 8, 5), nn.ReLU(), nn.Conv1d(8, 4, 3))
    elif kind == "conv2d":
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1, bias=False))
    elif kind == "conv3d":
        model = nn.Sequential(nn.Conv3d(2, 4, 3), nn.ReLU(), nn.Conv3d(4, 2, 1))
    else:
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8, 4),
                              nn.BatchNorm1d(4))
        model.register_buffer("flags", torch.tensor([True, False, True]))
    return model


def sparsify_(model: nn.Module, sparsity: float, seed: int = 1) -> nn.Module:
    """Random state (incl. BN statistics) with each >= 2-D weight magnitude-pruned to ``sparsity``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                value = torch.randn(t.shape, generator=g)
                t.copy_(value.abs() if "running_var" in name else value)
                if t.dim() >= 2:
                    keep = round(t.numel() * (1 - sparsity))
                    flat = t.view(-1)
                    order = flat.abs().argsort(descending=True)
                    flat[order[keep:]] = 0.0
            elif name.endswith("num_batches_tracked"):
                t.fill_(7)
    return model


def lenet(sparsity: float, seed: int = 0) -> nn.Module:
    """LeNet-300-100 (784-300-100-10, biases) with N(0, 1) weights pruned to ``sparsity`` by global magnitude."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for w in weights:
            w.normal_()
        magnitudes = torch.cat([w.abs().flatten() for w in weights])
        threshold = magnitudes.topk(round(magnitudes.numel() * (1 - sparsity))).values.min()
        for w in weights:
            w.masked_fill_(w.abs() < threshold, 0.0)
    return model


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k
