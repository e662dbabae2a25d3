"""Structured DWF (D-Gating): each group of weights is ``w_g = ω_g · γ_{g,1} ⋯ γ_{g,D−1}`` with scalar gates.

Kolb, Frost, Bischl, Rügamer (NeurIPS 2025, arXiv 2509.23898): trained under the plain L2 penalty
``(λ/D)(‖ω_g‖² + Σ_d γ_{g,d}²)``, which at balance (``|γ_{g,d}| = ‖ω_g‖ = ‖w_g‖^{1/D}``) equals ``λ·‖w_g‖₂^{2/D}``, a
non-convex group penalty (the group lasso for D = 2) whose gates reach zero, so whole neurons, filters or heads go.

A gated tensor is registered with ``torch.nn.utils.parametrize`` like a factorized one: ``layer.weight`` keeps working,
the group weights ω live at ``parametrizations.weight.original0`` and the gates, one 1-D tensor of length G per depth
(FSDP2 refuses 0-d parameters), at ``original1 … original{D-1}``. Tensors that belong to the same groups (the layer's
bias, the shift of a gated BatchNorm) are scaled by the same gates (:class:`GateScale`), so a zero gate makes the
group's output exactly zero and the group can be removed without changing the model. Each parametrization keeps its
:class:`~lightning_dwf.core.groups.GroupLayout` as a buffer, so a state dict collapses without the model.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from lightning_dwf.core.functional import hadamard_product
from lightning_dwf.core.groups import GroupLayout
from lightning_dwf.core.sharding import is_sharded
from lightning_dwf.core.unit_state import unit_state

#: :meth:`GatedTensor.unit_magnitudes` by ω, with the parameters' versions it was computed at.
_MAGNITUDES: dict[int, tuple[tuple[int, ...], Tensor]] = {}
#: ``role`` codes of :meth:`GroupLayout.encode`: the gated tensor itself, or a tensor scaled by its gates.
PRIMARY, COUPLED = 0, 1


def gate_scale(gates: Sequence[Tensor]) -> Tensor:
    """The per-group scale ``γ_1 ⋯ γ_{D−1}`` (shape ``(G,)``)."""
    return hadamard_product(gates)


def balanced_gating(
    values: Sequence[Tensor], layouts: Sequence[GroupLayout], depth: int
) -> tuple[list[Tensor], Tensor]:
    """The balanced gating of a group's tensors: ``ω = w / ‖w_g‖^{(D−1)/D}`` for each tensor and gates
    ``‖w_g‖^{1/D}`` (the AM–GM minimizer of the L2 penalty for the same weights); the norm runs over all the
    tensors of a group. A zero group gets zero ω and zero gates."""
    sq = sum(layout.grouped(v.detach()).double().pow(2).sum(dim=1) for v, layout in zip(values, layouts, strict=True))
    norm = sq.sqrt()
    gate = norm.pow(1.0 / depth)
    divisor = torch.where(norm > 0, norm.pow((depth - 1.0) / depth), torch.ones_like(norm))
    omegas = [(v.detach().double() / layout.expand(divisor, v.shape)).to(v.dtype) for v, layout in zip(values, layouts)]
    return omegas, gate.to(values[0].dtype)


class GatedProduct(nn.Module):
    """Parametrization ``w = ω ⊙ expand(γ_1 ⋯ γ_{D−1})`` of a gated tensor (``D − 1`` gate vectors of length G).

    A plain Linear or Conv layer gated by outputs or heads does not call it in its forward: it scales its output by the
    gates instead (the same function, without weight-sized products; :func:`gate_tensor_`).

    Args:
        depth: D >= 2 (the number of factors of each group: ω and D − 1 gates).
        layout: where the groups lie in the tensor.
    """

    def __init__(self, depth: int, layout: GroupLayout) -> None:
        super().__init__()
        self.depth = depth
        self.layout = layout
        self.register_buffer("group_layout", layout.encode(PRIMARY))

    def forward(self, omega: Tensor, *gates: Tensor) -> Tensor:
        return omega * self.layout.expand(gate_scale(gates), omega.shape)

    @torch.no_grad()
    def right_inverse(self, weight: Tensor) -> tuple[Tensor, ...]:
        (omega,), gate = balanced_gating([weight], [self.layout], self.depth)
        return (omega,) + tuple(gate.clone() for _ in range(self.depth - 1))

    def extra_repr(self) -> str:
        return f"depth={self.depth}, layout={self.layout}"


class GateScale(nn.Module):
    """Parametrization ``b = β ⊙ expand(γ_1 ⋯ γ_{D−1})`` of a tensor coupled to the groups of ``source`` on the same
    module (a bias, a BatchNorm shift): the same gates scale it, so a zero gate silences the whole group."""

    def __init__(self, owner: nn.Module, source: str, layout: GroupLayout) -> None:
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a submodule: the owner holds this parametrization
        self.source = source
        self.layout = layout
        self.register_buffer("group_layout", layout.encode(COUPLED))

    def forward(self, value: Tensor) -> Tensor:
        plist = self._owner.parametrizations[self.source]
        gates = [getattr(plist, f"original{d}") for d in range(1, plist[0].depth)]
        return value * self.layout.expand(gate_scale(gates), value.shape)

    def right_inverse(self, value: Tensor) -> Tensor:
        return value

    def extra_repr(self) -> str:
        return f"source={self.source!r}"


@dataclass(frozen=True)
class GatedTensor:
    """One gated tensor ``module.<param_name>`` and the tensors coupled to its groups.

    Attributes:
        name: qualified name of the gated tensor (e.g. ``"features.1.weight"`` for a gated BatchNorm).
        module: the submodule that owns it.
        param_name: its attribute name on ``module``.
    """

    name: str
    module: nn.Module
    param_name: str

    @property
    def parametrization(self) -> GatedProduct:
        return self.module.parametrizations[self.param_name][0]

    @property
    def layout(self) -> GroupLayout:
        return self.parametrization.layout

    @property
    def depth(self) -> int:
        return self.parametrization.depth

    @property
    def omega(self) -> nn.Parameter:
        """The group weights ω (the tensor's shape)."""
        return self.module.parametrizations[self.param_name].original0

    @property
    def gates(self) -> tuple[nn.Parameter, ...]:
        """The D − 1 gate vectors (length G each)."""
        plist = self.module.parametrizations[self.param_name]
        return tuple(getattr(plist, f"original{d}") for d in range(1, self.depth))

    @property
    def coupled(self) -> tuple[tuple[str, nn.Parameter], ...]:
        """``(param_name, β)`` of each tensor scaled by the gates."""
        return tuple(
            (pname, plist.original) for pname, plist in self.module.parametrizations.items()
            if isinstance(plist[0], GateScale) and plist[0].source == self.param_name
        )

    @property
    def factors(self) -> tuple[nn.Parameter, ...]:
        """Every Parameter the penalty applies to: ω, the gates, the coupled tensors."""
        return (self.omega, *self.gates, *(p for _, p in self.coupled))

    @property
    def groups(self) -> int:
        return self.layout.groups

    @property
    def entries(self) -> int:
        """Weights per group, in the gated tensor and its coupled tensors together."""
        return self.layout.entries(self.omega.shape) + sum(p.numel() // self.groups for _, p in self.coupled)

    def scale(self) -> Tensor:
        """``γ_1 ⋯ γ_{D−1}`` per group."""
        return gate_scale(self.gates)

    def product(self) -> Tensor:
        """The collapsed gated tensor (without the coupled ones)."""
        return self.omega * self.layout.expand(self.scale(), self.omega.shape)

    def values(self) -> list[Tensor]:
        """The collapsed gated tensor, then each collapsed coupled tensor."""
        scale = self.scale()
        return [t * self.layout.expand(scale, t.shape) for t in (self.omega, *(p for _, p in self.coupled))]

    def unit_magnitudes(self) -> Tensor:
        """Each group's RMS over all its weights (gated and coupled), shape ``(G,)``: the magnitude thresholds and cuts
        compare (for a plain weight it is ``|w|``, so one threshold means the same for both kinds).

        ``‖w_g‖² = (γ_1 ⋯ γ_{D−1})² · ‖ω_g‖²``; the result is remembered until a parameter of the group changes (the
        controller, the cut and the report read it at the same step)."""
        return self._group_sums()[1]

    def factor_sq_norm(self) -> float:
        """``‖ω‖² + Σ_d ‖γ_d‖²`` plus the coupled tensors' (what the L2 penalty sees), from the remembered sums."""
        omega_sq = self._group_sums()[0]
        return float(omega_sq.double().sum()) + sum(float(g.detach().double().pow(2).sum()) for g in self.gates)

    def _group_sums(self) -> tuple[Tensor, Tensor]:
        """``(Σ over each group's ω and coupled entries of their squares, the group RMS of the collapsed weights)``."""
        versions = self._versions()
        cached = _MAGNITUDES.get(id(self.omega))
        if cached is not None and cached[0] == versions:
            return cached[1]
        with torch.no_grad():
            omegas = (self.omega, *(p for _, p in self.coupled))
            sq = sum(self.layout.grouped(o.detach()).float().pow(2).sum(dim=1) for o in omegas)
            result = (sq, (sq * self.scale().detach().float().pow(2) / self.entries).sqrt())
        if id(self.omega) not in _MAGNITUDES:
            weakref.finalize(self.omega, _MAGNITUDES.pop, id(self.omega), None)
        _MAGNITUDES[id(self.omega)] = (versions, result)
        return result

    def _versions(self) -> tuple[int, ...]:
        """What :meth:`_group_sums` remembers its result by: the factors' in-place versions and identities."""
        params = self.factors
        return tuple(p._version for p in params) + tuple(id(p) for p in params)

    @torch.no_grad()
    def zero_units_(self, drop: Tensor, states: Sequence[Mapping]) -> int:
        """Set ω, the gates and the coupled tensors of the groups where ``drop`` (bool, ``(G,)``) to exact zero, and
        reset the optimizer state tensors of the same shapes there (:func:`~lightning_dwf.core.unit_state.unit_state`);
        returns the number of groups dropped.

        Groups whose gates are zero already are skipped: they get no gradient and their optimizer state was reset with
        them, so a cut repeated every control step writes only what changes. Remembered magnitudes stay remembered,
        with the dropped groups' set to the exact zeros a recomputation gives (the cut's next reader, the controller,
        then does not recompute them)."""
        count = int(drop.count_nonzero())
        new = drop & (self.gates[0].detach() != 0)
        if not bool(new.any()):
            return count
        cached = _MAGNITUDES.get(id(self.omega))
        remembered = cached[1] if cached is not None and cached[0] == self._versions() else None
        rows = new.nonzero().flatten() if (self.layout.width, self.layout.blocks) == (1, 1) else None
        for param in (self.omega, *(p for _, p in self.coupled)):
            where = None if rows is not None else self.layout.expand(new, param.shape)
            for target, value in unit_state(param, states):
                if rows is not None:
                    target.index_fill_(self.layout.dim, rows.to(target.device), value)
                else:
                    target.masked_fill_(where.to(target.device), value)
        for gate in self.gates:
            for target, value in unit_state(gate, states):
                target.masked_fill_(new, value)
        if remembered is not None and not is_sharded(self.omega):
            mask = new.to(remembered[0].device)
            _MAGNITUDES[id(self.omega)] = (self._versions(), tuple(t.masked_fill(mask, 0.0) for t in remembered))
        return count

    @torch.no_grad()
    def balance_(self, values: Sequence[Tensor] | None = None) -> None:
        """Rebalance ω, gates and coupled tensors (``|γ| = ‖ω_g‖ = ‖w_g‖^{1/D}``) to the same collapsed ``values``
        (gated tensor first, then the coupled ones; default: the current ones)."""
        params = (self.omega, *(p for _, p in self.coupled))
        values = self.values() if values is None else values
        omegas, gate = balanced_gating(values, [self.layout] * len(params), self.depth)
        for param, value in zip(params, omegas, strict=True):
            param.copy_(value)
        for g in self.gates:
            g.copy_(gate)

    def misalignment(self) -> float:
        """``(1/D)(Σ_g ‖ω_g‖² + Σ_d ‖γ_d‖²) − Σ_g ‖w_g‖^{2/D}`` (≥ 0, zero iff balanced)."""
        with torch.no_grad():
            factor_sq = sum(float(p.double().pow(2).sum()) for p in self.factors)
            norms = (self.unit_magnitudes().double().pow(2) * self.entries).sqrt()
            return factor_sq / self.depth - float(norms.pow(2.0 / self.depth).sum())


def relative_scores(magnitudes: Tensor) -> Tensor:
    """Group magnitudes relative to their tensor's RMS: comparable across layers of different scale (a BatchNorm's
    channels sit near 1, a Linear layer's rows near its init scale), so a global cut does not empty the layers whose
    groups are small in scale rather than in importance."""
    reference = magnitudes.pow(2).mean().sqrt()
    return magnitudes / reference if reference > 0 else magnitudes


def gated_tensors(module: nn.Module) -> list[GatedTensor]:
    """All gated tensors of ``module``, in ``named_modules`` order."""
    found = []
    for mod_name, mod in module.named_modules():
        if not parametrize.is_parametrized(mod):
            continue
        for pname, plist in mod.parametrizations.items():
            if len(plist) == 1 and isinstance(plist[0], GatedProduct):
                found.append(GatedTensor(f"{mod_name}.{pname}" if mod_name else pname, mod, pname))
    return found


def gate_tensor_(owner: nn.Module, name: str, pname: str, depth: int, layout: GroupLayout,
                 coupled: Sequence[str] = ()) -> GatedTensor:
    """Register the gating of ``owner.<pname>`` (and the coupling of each tensor named in ``coupled``), balanced.

    A plain Linear or Conv ``owner`` gated along its outputs (``layout.dim == 0``) gets :func:`_output_gated_forward`
    as the forward of the class ``parametrize`` made for it alone (so collapsing, which restores the class, restores
    the layer's own forward)."""
    layout.check(getattr(owner, pname).shape, name)
    coupled = [c for c in coupled if isinstance(getattr(owner, c, None), nn.Parameter)]
    values = [getattr(owner, pname).detach().clone()]
    parametrize.register_parametrization(owner, pname, GatedProduct(depth, layout), unsafe=True)
    for cname in coupled:
        layout.check(getattr(owner, cname).shape, f"{name} ({cname})")
        values.append(getattr(owner, cname).detach().clone())
        parametrize.register_parametrization(owner, cname, GateScale(owner, pname, layout), unsafe=True)
    if pname == "weight" and layout.dim == 0 and _base_forward(owner) is not None:
        type(owner).forward = _output_gated_forward  # the class parametrize made for this module alone
    tensor = GatedTensor(name, owner, pname)
    tensor.balance_(values)
    return tensor


#: Layer forwards :func:`_output_gated_forward` stands in for.
_FORWARDS = (nn.Linear.forward, nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)


def _base_forward(layer: nn.Module) -> Any:
    """The forward of ``layer``'s class before parametrization when it is a plain Linear or Conv forward (a subclass
    with its own forward gets None: it may use the weight in ways a scaled output does not reproduce)."""
    forward = parametrize.type_before_parametrizations(layer).forward
    return forward if forward in _FORWARDS else None


def _output_gated_forward(self: nn.Module, input: Tensor) -> Tensor:
    """The forward of a Linear or Conv layer gated by outputs or heads: ``(x ∗ ω + β) · expand(γ_1 ⋯ γ_{D−1})``, the
    gates applied to the layer's output (batch × outputs numbers) instead of to its weight (outputs × inputs): the
    same function, without a weight-sized product and its two weight-sized backward products at every step.

    Uses the layer's own forward (through the parametrized weight) where the weight is the smaller side: when the
    input has at least as many rows (positions × batch) as the weight has entries per output (a ViT's token-wise
    Linear layers, a Conv on large feature maps); and when the weight or bias carries any other parametrization (e.g.
    the quantization-aware finish's fake quantization)."""
    plists = self.parametrizations
    weight = plists["weight"]
    bias_list = plists["bias"] if "bias" in plists else None
    base = parametrize.type_before_parametrizations(self).forward
    omega = weight.original0
    linear = base is nn.Linear.forward
    rows = input.numel() // (input.shape[-1] if linear else self.in_channels)
    if rows * omega.shape[0] >= omega.numel() or len(weight) != 1 or not isinstance(weight[0], GatedProduct) or (
        bias_list is not None and (len(bias_list) != 1 or not isinstance(bias_list[0], GateScale))
    ):
        return base(self, input)
    product = weight[0]
    scale = gate_scale([getattr(weight, f"original{d}") for d in range(1, product.depth)])
    coupled = bias_list.original if bias_list is not None else None
    out = F.linear(input, omega, coupled) if linear else self._conv_forward(input, omega, coupled)
    shape = (omega.shape[0],) + (1,) * (omega.dim() - 2)  # the output channels' axis: last for Linear, 1 for Conv
    out = out * product.layout.expand(scale.to(out.dtype), shape)
    if bias_list is None and self.bias is not None:  # a bias the gates do not scale
        out = out + self.bias
    return out


def collapse_gated_(tensor: GatedTensor, threshold: float) -> None:
    """Replace the gating of ``tensor`` (and its coupled tensors) by plain Parameters, with every group whose RMS is
    below ``threshold`` (absolute) set to exact zero."""
    dead = tensor.unit_magnitudes() < threshold
    mod, layout = tensor.module, tensor.layout
    requires_grad = tensor.omega.requires_grad
    names = [c for c, _ in tensor.coupled] + [tensor.param_name]  # coupled first: they read the gates
    with torch.enable_grad():
        for pname in names:
            parametrize.remove_parametrizations(mod, pname, leave_parametrized=True)
    with torch.no_grad():
        for pname in names:
            value = getattr(mod, pname)
            value.mul_(layout.expand((~dead).to(value.dtype), value.shape))
            value.requires_grad_(requires_grad)


def collapse_gated_state(entries: Mapping[str, Mapping[str, Any]], threshold: float = 0.0) -> dict[str, Tensor]:
    """Collapse the gated tensors of one module prefix in a state dict.

    Args:
        entries: ``{tensor name: {"layout": code, "original<d>" or "original": value}}`` for the module's parametrized
            tensors that carry a group layout.
        threshold: groups with RMS below it (absolute) become exact zeros.

    Returns:
        ``{tensor name: collapsed tensor}``.
    """
    primary = [n for n, e in entries.items() if GroupLayout.decode(e["layout"])[1] == PRIMARY]
    if len(primary) != 1:
        raise ValueError(f"Expected one gated tensor per module in the state dict, found {primary or 'none'}.")
    source = primary[0]
    layout, _ = GroupLayout.decode(entries[source]["layout"])
    depth = 1 + sum(1 for k in entries[source] if k.startswith("original") and k != "original0")
    gates = [entries[source][f"original{d}"] for d in range(1, depth)]
    scale = gate_scale(gates)
    out = {source: entries[source]["original0"] * layout.expand(scale, entries[source]["original0"].shape)}
    for name, e in entries.items():
        if name != source:
            value = e["original"]
            out[name] = value * GroupLayout.decode(e["layout"])[0].expand(scale, value.shape)
    sq = sum(layout.grouped(v.detach()).float().pow(2).sum(dim=1) for v in out.values())
    entries_per_group = sum(v.numel() for v in out.values()) / layout.groups
    dead = (sq / entries_per_group).sqrt() < threshold
    return {n: (v * layout.expand((~dead).to(v.dtype), v.shape)).detach().clone() for n, v in out.items()}
