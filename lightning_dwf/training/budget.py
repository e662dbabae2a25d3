"""The cost of the shrunk model, predicted from which groups are zero, and the cut that meets a budget exactly.

Structured DWF removes whole groups, and with them everything coupled to them: a neuron's row and the next layer's
input column, a filter with its BatchNorm channel and the next convolution's input channel. The cost of the model that
:func:`~lightning_dwf.shrink_` will produce is therefore not a sum over groups: a layer's multiply–accumulates (MACs)
scale with the channels kept on both its sides. :class:`CostModel` traces the model once (Torch-Pruning's dependency
graph on a collapsed copy, and forward hooks for each layer's MACs on the example input) and then predicts the shrunk
cost of any set of zero groups in microseconds, so each of the budget regime's cuts along the ramp meets its budget
exactly.

MACs count the Conv and Linear layers (one multiply–accumulate per weight and output position) and the projections of
``nn.MultiheadAttention`` (a gated one is traced in the Linear form :func:`~lightning_dwf.shrink_` removes its heads
in); parameters count every parameter of the model, as ``sum(p.numel())`` of the shrunk model does.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_dwf.core.collapse import collapse_
from lightning_dwf.core.gate_targets import BATCH_NORMS
from lightning_dwf.core.gating import GatedTensor, gated_tensors, relative_scores
from lightning_dwf.core.groups import GroupLayout
from lightning_dwf.inference.attention import rewrite_attention_
from lightning_dwf.inference.coupling import (
    LAYERS,
    ChannelSpace,
    build_graph,
    channel_spaces,
    layer_macs,
    out_channels,
)

Measure = Literal["macs", "params"]


@dataclass
class _Layer:
    out_space: int | None
    in_space: int | None
    weight: int  # parameters of the weight
    bias: int  # parameters that scale with the output channels only (bias, BatchNorm scale and shift)
    macs: float


class CostModel:
    """The shrunk model's MACs and parameters as a function of the zero groups of a structured model.

    Args:
        module: the gated model (not changed: a collapsed copy is traced).
        example_inputs: one input of ``module(...)`` (the batch size does not matter: MACs are per sample).
    """

    def __init__(self, module: nn.Module, example_inputs: Any) -> None:
        plain = collapse_(copy.deepcopy(module))
        layouts = {t.name: t.layout for t in gated_tensors(module) if t.layout.dim == 0}  # outputs and heads
        #: q/k/v Linear layers of a gated nn.MultiheadAttention, rewritten as shrink_ does: their gated tensor's name
        aliases = rewrite_gated_attention_(plain, layouts)
        names = {m: n for n, m in plain.named_modules()}
        macs = layer_macs(plain, example_inputs)
        self.spaces: list[ChannelSpace] = [s for s in channel_spaces(build_graph(plain, example_inputs))
                                           if s.shrinkable]
        #: per space and writer: (its gated tensor's name or None, the group of each of its channels in the space)
        self._writers: list[list[tuple[str | None, Tensor]]] = []
        for space in self.spaces:
            writers: list[tuple[str | None, Tensor]] = []
            for m, positions in space.writers:
                name = aliases.get(f"{names[m]}.weight", f"{names[m]}.weight")
                layout = layouts.get(name)
                channel = torch.tensor(positions, dtype=torch.long)
                if layout is None:
                    writers.append((None, channel))
                else:  # channel → its group: blocks of `groups × width` channels, `width` per group
                    writers.append((name, channel % (layout.groups * layout.width) // layout.width))
            self._writers.append(writers)
        #: names of the gated q/k/v projections of one attention module: their heads go together or not at all
        self.tied: list[list[str]] = []
        for space, writers in zip(self.spaces, self._writers, strict=True):
            tied = list(dict.fromkeys(name for name, _ in writers if name is not None))
            if space.heads and len(tied) > 1 and len({layouts[n].groups for n in tied}) == 1:
                self.tied.append(tied)
        where_out = {id(m): i for i, s in enumerate(self.spaces) for m, _ in s.outputs}
        where_in = {id(m): i for i, s in enumerate(self.spaces) for m, _ in s.inputs}
        self._layers: list[_Layer] = []
        modeled = 0
        for name, m in plain.named_modules():
            if isinstance(m, LAYERS):
                bias = m.bias.numel() if m.bias is not None else 0
                self._layers.append(_Layer(where_out.get(id(m)), where_in.get(id(m)), m.weight.numel(), bias,
                                           macs.get(name, 0.0)))
                modeled += m.weight.numel() + bias
            elif isinstance(m, BATCH_NORMS) and m.affine:
                self._layers.append(_Layer(where_out.get(id(m)), None, 0, 2 * out_channels(m), 0.0))
                modeled += 2 * out_channels(m)
            elif isinstance(m, nn.MultiheadAttention):  # not gated: its projections' MACs stay (parameters: other)
                self._layers.append(_Layer(None, None, 0, 0, macs.get(name, 0.0)))
        self._other_params = sum(p.numel() for p in plain.parameters()) - modeled
        self.dense = {"macs": sum(layer.macs for layer in self._layers), "params": float(self.cost({}, "params"))}

    def kept(self, dropped: Mapping[str, Tensor]) -> list[int]:
        """Channels kept in each shrinkable space when the groups ``dropped[name]`` (bool per group) are zero."""
        kept = []
        for space, writers in zip(self.spaces, self._writers, strict=True):
            silent = torch.ones(space.size, dtype=torch.bool)
            for name, groups in writers:
                mask = dropped.get(name) if name is not None else None
                if mask is None:
                    silent[:] = False
                    break
                silent &= mask.cpu()[groups]
            kept.append(space.size - space.removable_count(silent))
        return kept

    def cost(self, dropped: Mapping[str, Tensor], measure: Measure = "macs") -> float:
        """The shrunk model's MACs per sample or parameters when the groups ``dropped`` are zero."""
        kept = self.kept(dropped)
        fraction = [k / s.size for k, s in zip(kept, self.spaces, strict=True)]
        total = 0.0 if measure == "macs" else float(self._other_params)
        for layer in self._layers:
            f_out = fraction[layer.out_space] if layer.out_space is not None else 1.0
            f_in = fraction[layer.in_space] if layer.in_space is not None else 1.0
            if measure == "macs":
                total += layer.macs * f_out * f_in
            else:
                total += layer.weight * f_out * f_in + layer.bias * f_out
        return total


def rewrite_gated_attention_(plain: nn.Module, layouts: Mapping[str, GroupLayout]) -> dict[str, str]:
    """Rewrite each ``nn.MultiheadAttention`` of the collapsed ``plain`` whose packed projection is gated (in
    ``layouts``) as :class:`~lightning_dwf.inference.attention.LinearMultiheadAttention`, the form
    :func:`~lightning_dwf.shrink_` removes its heads in; returns ``{"<module>.q.weight": "<module>.in_proj_weight", …}``
    (a head of the packed tensor is the same head of q, k and v)."""
    aliases = {}
    for name, m in list(plain.named_modules()):
        gated = f"{name}.in_proj_weight" if name else "in_proj_weight"
        if not name or not isinstance(m, nn.MultiheadAttention) or gated not in layouts:
            continue
        rewrite_attention_(plain, name)
        aliases |= {f"{name}.{p}.weight": gated for p in ("q", "k", "v")}
    return aliases


def budget_masks(
    tensors: list[GatedTensor], model: CostModel, budget: float, measure: Measure, floor: float = 0.0,
    min_share: float = 0.0,
) -> dict[str, Tensor]:
    """Which groups to keep so that the shrunk model's cost is at most ``budget`` (a fraction of the dense cost) with
    as few groups dropped as possible: the groups are dropped smallest first by :func:`relative_scores` (after those
    whose RMS is below ``floor``, which are zero already), each tensor keeping at least ``ceil(min_share · groups)``
    (and one) of its largest. The heads of an attention module's q/k/v projections (``model.tied``) are one unit:
    dropped together, ranked by their largest score, and kept together.

    Returns:
        ``{tensor name: keep mask (bool per group)}``.
    """
    names = [t.name for t in tensors]
    raw = [t.unit_magnitudes().detach().float().cpu() for t in tensors]
    sizes = [r.numel() for r in raw]
    starts = dict(zip(names, torch.tensor([0, *sizes]).cumsum(0).tolist(), strict=False))
    flat = torch.cat(raw)
    scores = torch.cat([relative_scores(r) for r in raw])
    unit = torch.arange(scores.numel())  # the unit of each group: itself, or the first member's head
    for tied in model.tied:
        if all(n in starts for n in tied):
            first = starts[tied[0]] + torch.arange(sizes[names.index(tied[0])])
            for n in tied[1:]:
                unit[starts[n] + torch.arange(first.numel())] = first
    tied_heads = bool((unit != torch.arange(unit.numel())).any())
    if tied_heads:  # a unit scores (and weighs, for the protection below) as its largest member
        scores = _unit_max(scores, unit)
        raw = list(torch.split(_unit_max(flat, unit), sizes))
    protected = torch.zeros(scores.numel(), dtype=torch.bool)
    start = 0
    for size, r in zip(sizes, raw, strict=True):
        forced = min(size, max(1, math.ceil(min_share * size - 1e-9))) if min_share else 0
        if forced:
            protected[start + torch.topk(r, forced).indices] = True
        start += size
    if tied_heads:
        protected = _unit_max(protected, unit)
    always = (flat < floor) & ~protected
    candidates = (~protected & ~always & (unit == torch.arange(unit.numel()))).nonzero().flatten()
    order = candidates[torch.argsort(scores[candidates], stable=True)]
    limit = budget * model.dense[measure]

    def dropped(k: int) -> dict[str, Tensor]:
        ranked = torch.zeros_like(always)
        ranked[order[:k]] = True
        mask = always | (ranked[unit] if tied_heads else ranked)  # a ranked head drops in q, k and v together
        return dict(zip(names, torch.split(mask, sizes), strict=True))

    def fits(k: int) -> bool:
        return model.cost(dropped(k), measure) <= limit

    # the smallest k that fits (or all of them; the cost only falls as k grows). A cut along the ramp adds a few groups
    # to those zero already, so grow k from 0 in doubling steps until it fits, then bisect the last step.
    n, low, high, stride = order.numel(), 0, 0, 1
    while high < n and not fits(high):
        low, high, stride = high + 1, min(high + stride, n), stride * 2
    while low < high:
        mid = (low + high) // 2
        if fits(mid):
            high = mid
        else:
            low = mid + 1
    return {name: ~mask for name, mask in dropped(low).items()}


def _unit_max(values: Tensor, unit: Tensor) -> Tensor:
    """Each entry replaced by the largest of its unit's (``unit[i]``: the index its unit is kept at)."""
    return torch.zeros_like(values).scatter_reduce(0, unit, values, "amax", include_self=False)[unit]
