"""What a trained net achieved: accuracy, sparsity, compression, where the non-zeros are."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from benchmarks.models import accuracy
from examples.data import ImageData
from lightning_dwf import DEFAULT_LAYER_TYPES, sparsity_report


def prunable(net: nn.Module) -> list[tuple[nn.Module, str]]:
    """The weights every method sparsifies and counts: Linear and Conv weights (DWF's default selection).

    Args:
        net: The network.

    Returns:
        ``(module, "weight")`` pairs, in module order.
    """
    return [(m, "weight") for m in net.modules() if isinstance(m, DEFAULT_LAYER_TYPES)]


def measure(net: nn.Module, data: ImageData) -> dict[str, float]:
    """Test accuracy and sparsity of a trained (collapsed) net.

    Args:
        net: The network.
        data: The dataset (its test split is used).

    Returns:
        ``acc``, ``compression_ratio``, ``sparsity``, ``nonzero`` and ``numel`` (exact zeros counted).
    """
    report = sparsity_report(net, threshold=0.0)
    return dict(
        acc=accuracy(net, data.test_x, data.test_y),
        compression_ratio=report.compression_ratio,
        sparsity=report.sparsity,
        nonzero=report.nonzero,
        numel=report.numel,
    )


def emptied_layers(net: nn.Module) -> list[str]:
    """Linear/Conv layers whose weight is entirely zero.

    Args:
        net: The network.

    Returns:
        Their module names.
    """
    return [name for name, m in net.named_modules() if isinstance(m, DEFAULT_LAYER_TYPES) and not bool(m.weight.any())]


def layer_nonzeros(net: nn.Module) -> dict[str, int]:
    """Non-zero weights of each Linear/Conv layer: where a method put the weights it kept.

    Args:
        net: The network.

    Returns:
        Non-zeros by module name, in module order.
    """
    layers = (item for item in net.named_modules() if isinstance(item[1], DEFAULT_LAYER_TYPES))
    return {name: int(m.weight.count_nonzero()) for name, m in layers}


def measure_layers(net: nn.Module, data: ImageData) -> dict[str, Any]:
    """:func:`measure` plus the emptied layers, the non-zeros per layer, and non-finite weights.

    Args:
        net: The network.
        data: The dataset (its test split is used).

    Returns:
        :func:`measure`'s keys, ``emptied``, ``layer_nonzeros``, and ``diverged`` if a weight is NaN/Inf.
    """
    finite = all(bool(torch.isfinite(p).all()) for p in net.parameters())
    out = dict(measure(net, data), emptied=emptied_layers(net), layer_nonzeros=layer_nonzeros(net))
    if not finite:
        out["diverged"] = "non-finite weights at the end of training"
    return out
