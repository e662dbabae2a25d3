"""Fixing the sparsity pattern (support) of a factorized model: which weights are zero, exactly.

Target mode (``DWFCallback(target_sparsity=...)``) lets the penalty choose *where* the zeros go, then fixes that
support and trains the surviving weights without penalty (the "recovery" phase): the same sparsity, without the
shrinkage bias the penalty puts on the survivors. A weight whose D factors are all exactly zero stays zero under
any gradient-based optimizer: each factor's gradient is the loss gradient times the product of the other factors
(zero), the penalty gradient is proportional to the factor (zero), and the entry's optimizer state is zeroed here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_dwf.factorize import factorized_tensors


@torch.no_grad()
def support_threshold(weights: Sequence[Tensor], target: float, floor: float = 0.0) -> float:
    """The global magnitude threshold at which ``weights`` have sparsity ``target`` (never below ``floor``).

    Weights with ``|w| < threshold`` are the ``round(target · n)`` smallest ones (ties aside). The ``floor``
    (absolute) keeps weights that are already numerically zero from being counted as survivors.

    >>> support_threshold([torch.tensor([0.1, -0.4, 0.3, 0.2])], target=0.5)
    0.30000001192092896
    """
    magnitudes = torch.cat([w.detach().abs().flatten().float() for w in weights])
    k = int(round(target * magnitudes.numel()))
    if k <= 0:
        return floor
    values = torch.sort(magnitudes).values
    return max(floor, float(values[min(k, values.numel() - 1)]))


@torch.no_grad()
def fix_support_(module: nn.Module, threshold: float, optimizers: Iterable[torch.optim.Optimizer] = ()) -> int:
    """Set every factor of each factorized weight with ``|w| < threshold`` (absolute) to exactly zero.

    The optimizers' per-parameter state tensors of the factors' shape (momentum buffers, Adam moments) are
    zeroed at the same entries, so momentum cannot move them off zero. Returns the number of zeroed weights.
    """
    keep = {tensor.name: tensor.product().abs() >= threshold for tensor in factorized_tensors(module)}
    return zero_weights_(module, keep, optimizers)


@torch.no_grad()
def zero_weights_(
    module: nn.Module, keep: Mapping[str, Tensor], optimizers: Iterable[torch.optim.Optimizer] = ()
) -> int:
    """Set all D factors of every weight where ``keep[name]`` is False to exactly zero, with their optimizer state.

    Args:
        module: a factorized model (changed in place).
        keep: boolean masks of the weights' shapes, by factorized tensor name; tensors not named are left alone.
        optimizers: whose per-parameter state tensors of the factors' shape are zeroed at the same entries.

    Returns:
        The number of weights outside ``keep`` (zero now).
    """
    states = [opt.state for opt in optimizers]
    zeroed = 0
    for tensor in factorized_tensors(module):
        mask = keep.get(tensor.name)
        if mask is None:
            continue
        zeroed += int((~mask).sum())
        for factor in tensor.factors:
            factor.mul_(mask)
            for state in states:
                for value in state.get(factor, {}).values():
                    if torch.is_tensor(value) and value.shape == factor.shape:
                        value.mul_(mask)
    return zeroed
