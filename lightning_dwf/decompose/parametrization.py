"""The decomposed weight as a ``torch.nn.utils.parametrize`` parametrization, so a decomposed model stays a plain
module: ``layer.weight`` is computed from the trainable factors in every forward, with their masks and grid fixed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_dwf.decompose.projection import fake_quantize_rows

__all__ = ["DecomposedTensor", "LowRankProduct", "collapse_decomposed_", "decomposed_tensors"]


class LowRankProduct(nn.Module):
    """Parametrization ``weight = (Q(U ⊙ M_U) @ Q(V ⊙ M_V)).reshape(shape)`` (``torch.nn.utils.parametrize``).

    ``U`` and ``V`` are the trainable tensors ``<layer>.parametrizations.<name>.original0`` / ``original1``;
    ``M_U``, ``M_V`` are fixed boolean masks (buffers ``mask_u`` / ``mask_v``, the non-zeros of the given factors),
    and ``Q`` the straight-through per-row fake quantization of :func:`lightning_dwf.core.functional.fake_quantize`
    (identity for ``bits=None``). Registering it keeps the given factors (its ``right_inverse`` returns them once);
    assigning a new dense weight to the layer afterwards is refused.

    Args:
        u: ``[rows, r]`` initial factor; its non-zeros define ``M_U``. v: ``[r, cols]`` likewise.
        shape: the weight's shape (``rows · prod(shape[1:]) == rows · cols``).
        bits: ``None``, 8 or 4.
        dtype: the weight's dtype (the product is cast to it; the factors keep theirs).
    """

    def __init__(self, u: Tensor, v: Tensor, shape: Sequence[int], bits: int | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.shape = tuple(int(n) for n in shape)
        if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[0] or u.shape[0] * v.shape[1] != math.prod(
            self.shape
        ):
            raise ValueError(f"factors {tuple(u.shape)} @ {tuple(v.shape)} do not make a weight of shape {self.shape}.")
        self.bits = bits
        self.rank = int(u.shape[1])
        self.weight_dtype = dtype
        self.register_buffer("mask_u", u.detach() != 0)
        self.register_buffer("mask_v", v.detach() != 0)
        self._pending: tuple[Tensor, Tensor] | None = (u.detach().clone(), v.detach().clone())

    def factors(self, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """The effective factors: masked, then fake-quantized (straight-through)."""
        return fake_quantize_rows(u * self.mask_u, self.bits), fake_quantize_rows(v * self.mask_v, self.bits)

    def forward(self, u: Tensor, v: Tensor) -> Tensor:
        """The weight ``(Q(U ⊙ M_U) @ Q(V ⊙ M_V)).reshape(shape)`` in the weight's dtype."""
        qu, qv = self.factors(u, v)
        return (qu @ qv).reshape(self.shape).to(self.weight_dtype)

    @torch.no_grad()
    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """The factors given at construction, once (at registration); a later dense assignment is refused."""
        if self._pending is None:
            raise ValueError("A QSD-decomposed weight cannot be assigned a dense value. Call "
                             "`collapse_decomposed_(module)` first, or decompose the new weight again.")
        u, v = self._pending
        self._pending = None
        return u.to(weight.device), v.to(weight.device)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, rank={self.rank}, bits={self.bits}"


@dataclass(frozen=True)
class DecomposedTensor:
    """One decomposed tensor ``module.<param_name> = U @ V`` (reshaped).

    Attributes:
        name: qualified name in the root module (e.g. ``"features.0.weight"``).
        module: the submodule that owns it. param_name: attribute name on ``module`` (``"weight"``).
    """

    name: str
    module: nn.Module
    param_name: str

    @property
    def parametrization(self) -> LowRankProduct:
        """The :class:`LowRankProduct` of this tensor."""
        return self.module.parametrizations[self.param_name][0]

    @property
    def u(self) -> nn.Parameter:
        """The raw trainable ``U`` (``original0``)."""
        return self.module.parametrizations[self.param_name].original0

    @property
    def v(self) -> nn.Parameter:
        """The raw trainable ``V`` (``original1``)."""
        return self.module.parametrizations[self.param_name].original1

    def factors(self) -> tuple[Tensor, Tensor]:
        """The effective factors (masked and on the grid), detached: what :func:`save_decomposed` stores."""
        with torch.no_grad():
            u, v = self.parametrization.factors(self.u, self.v)
        return u.detach(), v.detach()


def decomposed_tensors(module: nn.Module) -> list[DecomposedTensor]:
    """All tensors of ``module`` decomposed by :func:`decompose_` or :func:`load_decomposed`, in module order."""
    found = []
    for mod_name, mod in module.named_modules():
        if not parametrize.is_parametrized(mod):
            continue
        for pname, plist in mod.parametrizations.items():
            if len(plist) == 1 and isinstance(plist[0], LowRankProduct):
                found.append(DecomposedTensor(f"{mod_name}.{pname}" if mod_name else pname, mod, pname))
    return found


def register_decomposition(mod: nn.Module, pname: str, u: Tensor, v: Tensor, bits: int | None) -> None:
    """Parametrize ``mod.<pname>`` as ``U @ V`` with the given factors (on the weight's device, its requires_grad)."""
    weight = getattr(mod, pname)
    requires_grad = weight.requires_grad
    p = LowRankProduct(u.to(weight.device), v.to(weight.device), weight.shape, bits, weight.dtype)
    parametrize.register_parametrization(mod, pname, p.to(weight.device))
    for f in (mod.parametrizations[pname].original0, mod.parametrizations[pname].original1):
        f.requires_grad_(requires_grad)


def collapse_decomposed_(module: nn.Module) -> nn.Module:
    """Turn every decomposed tensor back into one plain dense Parameter ``(Q(U) @ Q(V)).reshape(shape)``, in place.

    Each layer gets its original class back and ``state_dict()`` its ordinary keys (as
    :func:`lightning_dwf.collapse_` does for DWF factors; safe on a ``copy.deepcopy``). The weight is dense: its
    zeros are whatever the product has. Returns ``module``.
    """
    for t in decomposed_tensors(module):
        mod, cls = t.module, type(t.module)
        private = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
        mod.__class__ = type(cls.__name__, cls.__bases__, private)  # own class: deepcopies share parametrize's
        requires_grad = t.u.requires_grad
        with torch.enable_grad():  # leave_parametrized registers a Parameter only for a tensor that requires grad
            parametrize.remove_parametrizations(mod, t.param_name, leave_parametrized=True)
        getattr(mod, t.param_name).requires_grad_(requires_grad)
    return module
