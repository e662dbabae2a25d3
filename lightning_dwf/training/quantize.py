"""The quantization-aware finish: weights trained through a straight-through fake quantizer on the export grid.

The grid is the one :func:`lightning_dwf.save_compressed` stores with ``bits=8`` or ``bits=4``: per output channel
(dim 0), symmetric and uniform, ``scale_r = max|w_r| / (2**(bits-1) - 1)``. During the finish every factorized
weight is computed as ``w + (round(w/scale)·scale − w).detach()``: the forward sees the quantized weight, the
gradient passes straight through to the factors. A zero stays zero (``round(0) = 0``), so the sparsity pattern fixed
before the finish is kept, and the collapsed model's non-zeros lie on the grid.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lightning_dwf.core.factorize import factorized_tensors
from lightning_dwf.core.functional import quantize_to_grid
from lightning_dwf.training.support import zero_weights_


def set_fake_quantization_(module: nn.Module, bits: int | None) -> int:
    """Make every factorized weight of ``module`` compute through :func:`fake_quantize` (``bits=None``: off again).

    Returns the number of factorized tensors changed.
    """
    tensors = factorized_tensors(module)
    for t in tensors:
        t.module.parametrizations[t.param_name][0].quant_bits = bits
    return len(tensors)


@torch.no_grad()
def zero_quantized_zeros_(module: nn.Module, bits: int, optimizers: Iterable[torch.optim.Optimizer] = ()) -> int:
    """Fix at exact zero every factorized weight that quantizes to 0 (``|w| < scale/2``); returns how many.

    Keeps the pattern the forward sees and the one the report counts the same.
    """
    masks = {}
    for t in factorized_tensors(module):
        masks[t.name] = quantize_to_grid(t.product(), bits) != 0
    return zero_weights_(module, masks, optimizers)
