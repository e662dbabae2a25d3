"""The per-weight cap on SGD-type factor steps (``FactorLRConfig.step_cap``), applied by
:class:`~lightning_dwf.FactorPenalty` where it rescales each factor update by its LR multiplier.

A gradient step on the factors moves their product ``G = Σ_d Π_{j≠d} ω_j²`` times as far as the same step moves a
dense weight (:func:`~lightning_dwf.core.functional.factor_step_gain`, ``D·|w|^(2−2/D)`` at balance), and ``G`` grows
without bound as the weight grows: a weight far past the range its multiplier was set for (a survivor of a deep cut)
runs away. Capped, each factor's multiplier ``m`` becomes ``min(m, s·cap / G)`` per entry (``s`` the rollback's step
scale), so no weight moves more than ``cap`` times as far as a dense weight at the optimizer's LR, and the small
weights, among which the sparsity is decided, keep their speed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_dwf.core.functional import factor_step_gain
from lightning_dwf.core.sharding import is_sharded


class StepCap:
    """The cap of ``cap`` times a dense step on the factors of ``tensors`` (each given as its D factors).

    Args:
        cap: the largest step of a weight, in dense steps at the optimizer's LR (> 0).
        tensors: the capped tensors' factors, one sequence per weight tensor.
    """

    def __init__(self, cap: float, tensors: Sequence[Sequence[nn.Parameter]]) -> None:
        self.cap = cap
        #: each capped factor's tensor (by ``id`` of the factor: the tensor's factors, in order)
        self.tensors: dict[int, tuple[nn.Parameter, ...]] = {id(f): tuple(fs) for fs in tensors for f in fs}
        self._buffers: dict[int, list[torch.Tensor]] = {}  # by id of a tensor's first factor

    def __contains__(self, factor: object) -> bool:
        return id(factor) in self.tensors

    def limits(self, saved: Sequence[tuple[nn.Parameter, float, torch.Tensor]],
               scale: float) -> dict[int, torch.Tensor]:
        """Each capped factor's multiplier per entry, ``min(m, scale·cap / G)``, from ``saved``'s ``(factor, m,
        values before the step)`` (on this rank's shards); one tensor per weight tensor, shared by its factors and
        computed in buffers kept from step to step. A tensor with a factor outside ``saved`` (another optimizer's) is
        not capped."""
        before = {id(p): b for p, _, b in saved}
        multiplier = {id(p): m for p, m, _ in saved}
        out: dict[int, torch.Tensor] = {}
        for p, _, _ in saved:
            factors = self.tensors.get(id(p))
            if factors is None or id(p) in out or any(id(f) not in before for f in factors):
                continue
            values = [before[id(f)] for f in factors]
            values = [v.to_local() if is_sharded(v) else v for v in values]
            limit = factor_step_gain(values, self._workspace(factors, values[0])).reciprocal_().mul_(scale * self.cap)
            ms = {multiplier[id(f)] for f in factors}
            if len(ms) == 1:
                limit.clamp_(max=ms.pop())
                out.update((id(f), limit) for f in factors)
            else:
                out.update((id(f), limit.clamp(max=multiplier[id(f)])) for f in factors)
        return out

    def _workspace(self, factors: tuple[nn.Parameter, ...], like: torch.Tensor) -> list[torch.Tensor]:
        """The D buffers :func:`~lightning_dwf.core.functional.factor_step_gain` computes in for the tensor of
        ``factors``, kept from step to step (new ones when the shape, dtype or device changed)."""
        buffers = self._buffers.get(id(factors[0]))
        if (buffers is None or buffers[0].shape != like.shape or buffers[0].dtype != like.dtype
                or buffers[0].device != like.device):
            buffers = self._buffers[id(factors[0])] = [torch.empty_like(like) for _ in factors]
        return buffers
