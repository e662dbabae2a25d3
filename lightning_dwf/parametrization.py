"""The ``torch.nn.utils.parametrize`` module that turns D factor tensors into one weight."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_dwf.functional import balanced_factors, hadamard_product


class HadamardProduct(nn.Module):
    """Parametrization ``w = ω1 ⊙ … ⊙ ωD`` (registered with ``parametrize.register_parametrization``).

    ``right_inverse`` returns the *balanced* factorization of a given weight, so registering it on a
    trained module keeps the function it computes; :func:`lightning_dwf.init.dwf_init_` then
    overwrites the factors with the DWF initialization when training starts from scratch.
    The factors live at ``<module>.parametrizations.<name>.original0 … original{D-1}``.

    Args:
        depth: number of factors D (>= 2).
    """

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.depth = depth

    def forward(self, *factors: Tensor) -> Tensor:
        return hadamard_product(factors)

    @torch.no_grad()
    def right_inverse(self, weight: Tensor) -> tuple[Tensor, ...]:
        return balanced_factors(weight, self.depth)

    def extra_repr(self) -> str:
        return f"depth={self.depth}"
