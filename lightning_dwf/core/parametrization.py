"""The ``torch.nn.utils.parametrize`` module that turns D factor tensors into one weight."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_dwf.core.functional import balanced_factors, fake_quantize, hadamard_product


class HadamardProduct(nn.Module):
    """Parametrization ``w = ω1 ⊙ … ⊙ ωD`` (registered with ``parametrize.register_parametrization``).

    ``right_inverse`` returns the *balanced* factorization of a given weight, so registering it on a
    trained module keeps the function it computes; :func:`lightning_dwf.core.init.dwf_init_` then
    overwrites the factors with the DWF initialization when training starts from scratch.
    The factors live at ``<module>.parametrizations.<name>.original0 … original{D-1}``. With ``quant_bits`` set
    (:func:`lightning_dwf.training.quantize.set_fake_quantization_`) the product goes through the straight-through fake
    quantizer :func:`lightning_dwf.core.functional.fake_quantize`.

    Args:
        depth: number of factors D (>= 2).
    """

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.depth = depth
        #: During the quantization-aware finish, the bits of the per-channel grid the weight is rounded to.
        self.quant_bits: int | None = None

    def forward(self, *factors: Tensor) -> Tensor:
        weight = hadamard_product(factors)
        if self.quant_bits:
            weight = fake_quantize(weight, self.quant_bits)
        return weight

    @torch.no_grad()
    def right_inverse(self, weight: Tensor) -> tuple[Tensor, ...]:
        return balanced_factors(weight, self.depth)

    def extra_repr(self) -> str:
        return f"depth={self.depth}"
