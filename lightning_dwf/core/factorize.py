"""Selecting layers and factorizing their weights in place (plain PyTorch, no Lightning needed)."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_dwf._validation import MAX_RECOMMENDED_DEPTH, check_depth
from lightning_dwf.config import DEFAULT_LAYER_TYPES, FactorizeConfig, SelectionConfig
from lightning_dwf.core.functional import balanced_factors, hadamard_product
from lightning_dwf.core.gate_targets import gated_targets
from lightning_dwf.core.gating import (
    GatedProduct,
    GatedTensor,
    balanced_gating,
    gate_tensor_,
    gated_tensors,
)
from lightning_dwf.core.init import dwf_init_, resolve_init_std
from lightning_dwf.core.parametrization import HadamardProduct
from lightning_dwf.core.sharding import check_not_sharded, global_count, is_sharded, local_shard, local_tensor
from lightning_dwf.core.unit_state import unit_state


@dataclass(frozen=True)
class FactorizedTensor:
    """One factorized tensor: ``module.<param_name> = ω1 ⊙ … ⊙ ωD``.

    Attributes:
        name: qualified name of the tensor in the root module (e.g. ``"net.0.weight"``).
        module: the submodule that owns it.
        param_name: attribute name on ``module`` (usually ``"weight"``).
    """

    name: str
    module: nn.Module
    param_name: str

    @property
    def factors(self) -> tuple[nn.Parameter, ...]:
        """The D factor parameters (``original0 … original{D-1}``)."""
        plist = self.module.parametrizations[self.param_name]
        return tuple(getattr(plist, f"original{d}") for d in range(self.depth))

    @property
    def depth(self) -> int:
        return self.module.parametrizations[self.param_name][0].depth

    def product(self) -> Tensor:
        """The collapsed tensor ω1 ⊙ … ⊙ ωD (computed once, without the parametrize machinery)."""
        return hadamard_product(self.factors)

    def unit_magnitudes(self) -> Tensor:
        """``|w|``: each weight is its own unit (its magnitude is compared with thresholds and cuts)."""
        return self.product().abs()

    @torch.no_grad()
    def concentrate_(self) -> None:
        """Put the whole weight into the first factor: ``ω1 = w`` and ``ω2 … ωD`` = its 0/1 support, so the product is
        ``w`` bit for bit (times 1.0) and a zero weight has zero gradient through the mask. Idempotent (on every rank's
        own shards alike)."""
        weights = self.product()
        first, *rest = self.factors
        first.copy_(weights)
        for factor in rest:
            factor.copy_((weights != 0).to(factor.dtype))

    @torch.no_grad()
    def zero_units_(self, drop: Tensor, states: Sequence[Mapping]) -> int:
        """Zero all D factors of the weights where ``drop`` (bool, the tensor's shape) and reset their optimizer state
        tensors of the factors' shape (:func:`~lightning_dwf.core.unit_state.unit_state`); returns the number of weights
        dropped (over all ranks).

        Weights whose first factor is 0 are skipped: a weight is dropped with all its factors and state together and
        gets no gradient since (a first factor reaching exact 0 on its own in float32 training does not happen in
        practice), so a cut repeated every control step writes only what changes.

        Sharded factors (FSDP2): ``drop`` is either sharded like them or the whole mask (equal on every rank); each
        rank zeroes its own shards."""
        local = local_tensor(drop) if is_sharded(drop) else local_shard(drop, self.factors[0])
        count = global_count(drop) if is_sharded(drop) else int(local.count_nonzero())
        index = (local & (local_tensor(self.factors[0]) != 0)).nonzero(as_tuple=True)
        if index[0].numel():
            for factor in self.factors:
                for target, value in unit_state(factor, states):
                    target = local_tensor(target)
                    target.index_put_(index, torch.full((), value, dtype=target.dtype, device=target.device))
        return count


def factorized_tensors(module: nn.Module) -> list[FactorizedTensor]:
    """All tensors of ``module`` factorized by :func:`factorize_`, in ``named_modules`` order."""
    found = []
    for mod_name, mod in module.named_modules():
        if not parametrize.is_parametrized(mod):
            continue
        for param_name, plist in mod.parametrizations.items():
            if len(plist) == 1 and isinstance(plist[0], HadamardProduct):
                found.append(FactorizedTensor(f"{mod_name}.{param_name}" if mod_name else param_name, mod, param_name))
    return found


def factor_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Every factor parameter of ``module`` (what the DWF penalty applies to): the factors of each factorized tensor,
    then ω, the gates and the coupled tensors of each gated one."""
    return [f for t in sparse_tensors(module) for f in t.factors]


def sparse_tensors(module: nn.Module) -> list[FactorizedTensor | GatedTensor]:
    """Every tensor of ``module`` under DWF: the factorized ones (units: single weights), then the gated ones (units:
    groups). Both give ``unit_magnitudes()`` and ``zero_units_(drop, states)``."""
    return [*factorized_tensors(module), *gated_tensors(module)]


def select_tensors(module: nn.Module, config: SelectionConfig | None = None) -> list[tuple[str, nn.Module, str]]:
    """The ``(qualified_name, module, param_name)`` targets that :func:`factorize_` would factorize.

    A target is a tensor ``param_name`` of a submodule of one of ``config.layer_types`` whose qualified
    module name matches an ``include`` glob pattern (all modules when ``include`` is empty), no
    ``exclude`` pattern, and passes ``filter_fn``. Tensors that are already factorized are included; others must be
    Parameters.

    Raises:
        ValueError: if an ``include`` pattern matches no module of the selected types.
    """
    config = config or FactorizeConfig()
    candidates = _candidates(module, config)
    types = config.layer_types or DEFAULT_LAYER_TYPES
    for pattern in config.include:
        if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in candidates):
            raise ValueError(
                f"`include` pattern {pattern!r} matches no {'/'.join(t.__name__ for t in types)} module; "
                f"candidates are {[n for n, _ in candidates][:10]}. Fix the pattern or `layer_types`."
            )
    targets = []
    for mod_name, mod in candidates:
        if config.include and not any(fnmatch.fnmatchcase(mod_name, p) for p in config.include):
            continue
        if any(fnmatch.fnmatchcase(mod_name, p) for p in config.exclude):
            continue
        if config.filter_fn is not None and not config.filter_fn(mod, mod_name):
            continue
        if isinstance(mod, nn.MultiheadAttention):  # gated by heads on its packed q/k/v projection
            targets.append((f"{mod_name}.in_proj_weight" if mod_name else "in_proj_weight", mod, "in_proj_weight"))
            continue
        for pname in config.param_names:
            already = parametrize.is_parametrized(mod, pname)
            if already or isinstance(mod._parameters.get(pname), nn.Parameter):
                targets.append((f"{mod_name}.{pname}" if mod_name else pname, mod, pname))
    return targets


def _candidates(module: nn.Module, config: SelectionConfig) -> list[tuple[str, nn.Module]]:
    """Modules of the selected layer types; with a structured config and default types also every
    ``nn.MultiheadAttention`` whose structure is ``"heads"``."""
    types = config.layer_types or DEFAULT_LAYER_TYPES
    found: list[tuple[str, nn.Module]] = []
    heads: list[str] = []  # attention modules gated by heads: their out_proj belongs to the heads' groups
    for name, mod in module.named_modules():
        if any(name.startswith(f"{h}.") or (not h and name) for h in heads):
            continue
        if isinstance(mod, nn.MultiheadAttention):
            if config.layer_types is None and getattr(config, "structure_of", lambda _: "elements")(name) == "heads":
                found.append((name, mod))
                heads.append(name)
        elif isinstance(mod, types):
            found.append((name, mod))
    return found


def factorize_(
    module: nn.Module,
    depth: int = 3,
    config: FactorizeConfig | None = None,
    *,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Replace selected weights of ``module`` by D Hadamard factors, in place.

    Uses ``torch.nn.utils.parametrize`` with a multi-tensor ``right_inverse``: ``layer.weight`` keeps
    working (computed as ω1 ⊙ … ⊙ ωD), ``isinstance`` checks still hold, and the factors become the
    trainable Parameters ``layer.parametrizations.weight.original0 … original{D-1}``. Tensors already
    factorized with the same depth are left alone, so calling this twice is harmless.

    Args:
        module: the model (changed in place).
        depth: number of factors D >= 2 (3 is the recommended default).
        config: which tensors (layer types, include/exclude globs, ``filter_fn``, tensor names) and which init
            (:class:`~lightning_dwf.FactorizeConfig`; default: every Linear/Conv weight, DWF init). 1-D tensors
            (biases, norm scales) always get the balanced factorization of their current values.
        generator: RNG for the DWF init.

    Returns:
        Qualified names of the tensors that are factorized now (new and pre-existing).

    Raises:
        ValueError: if nothing is selected, a pattern matches nothing, a tensor is already
            factorized with another depth, or a selected weight is already sharded (a DTensor: factorize before
            ``fully_shard``).

    Example:
        >>> from torch import nn
        >>> from lightning_dwf import FactorizeConfig, collapse_, factorize_
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> factorize_(net, depth=3, config=FactorizeConfig(exclude=["2"]))
        ['0.weight']
        >>> type(collapse_(net)[0]) is nn.Linear
        True
    """
    config = config or FactorizeConfig()
    depth = check_depth(depth)
    if depth > MAX_RECOMMENDED_DEPTH:
        warnings.warn(
            f"depth={depth} > {MAX_RECOMMENDED_DEPTH}: deeper factorizations rarely help and train less stably; "
            "D=3 or 4 is recommended.",
            stacklevel=2,
        )
    targets = select_tensors(module, config)
    if not targets:
        raise ValueError(
            f"Nothing to factorize in {type(module).__name__}: no {list(config.param_names)} Parameter of a "
            f"{[t.__name__ for t in config.layer_types or DEFAULT_LAYER_TYPES]} layer is selected. "
            "Check `layer_types`, `include`, `exclude` and `filter_fn` of the FactorizeConfig."
        )
    check_not_sharded(targets)
    names = []
    for name, mod, pname in targets:
        mod_name = name[: -len(pname) - 1] if name != pname else ""
        kind = config.structure_of(mod_name)
        if kind != "elements" or isinstance(mod, nn.MultiheadAttention):
            if pname in ("weight", "in_proj_weight"):
                names.append(_gate_layer(module, mod_name, mod, kind, depth, config))
            continue
        if parametrize.is_parametrized(mod, pname):
            plist = mod.parametrizations[pname]
            if not (len(plist) == 1 and isinstance(plist[0], HadamardProduct)):
                raise ValueError(f"{name!r} already carries another parametrization ({plist}); exclude it from DWF.")
            if plist[0].depth != depth:
                raise ValueError(
                    f"{name!r} is already factorized with depth {plist[0].depth}, not {depth}. "
                    "Collapse it first (lightning_dwf.collapse_) or use the same depth."
                )
            names.append(name)
            continue
        weight = getattr(mod, pname)
        std = resolve_init_std(weight, config.init_std) if config.init == "dwf" and weight.dim() >= 2 else None
        parametrize.register_parametrization(mod, pname, HadamardProduct(depth), unsafe=True)
        if std is not None:
            dwf_init_(FactorizedTensor(name, mod, pname).factors, std, config.eps_ratio, generator)
        _register_load_hook(mod)
        names.append(name)
    return names


def _gate_layer(
    root: nn.Module, mod_name: str, layer: nn.Module, kind: str, depth: int, config: FactorizeConfig
) -> str:
    """Gate one selected layer by ``kind`` (idempotent); returns the gated tensor's qualified name."""
    name, owner, pname, layout, coupled = gated_targets(root, mod_name, layer, kind, config.num_heads)
    if parametrize.is_parametrized(owner, pname):
        plist = owner.parametrizations[pname]
        if not (len(plist) == 1 and isinstance(plist[0], GatedProduct) and plist[0].depth == depth
                and plist[0].layout == layout):
            raise ValueError(f"{name!r} already carries another parametrization ({plist}); collapse it first "
                             "(lightning_dwf.collapse_) or choose the same depth and structure.")
        return name
    gate_tensor_(owner, name, pname, depth, layout, coupled)
    _register_load_hook(owner)
    return name


_HOOK_FLAG = "_dwf_load_hook_registered"


def _register_load_hook(mod: nn.Module) -> None:
    if not getattr(mod, _HOOK_FLAG, False):
        if hasattr(mod, "register_load_state_dict_pre_hook"):
            mod.register_load_state_dict_pre_hook(_load_state_dict_pre_hook)
        else:  # older torch has only the private form (same hook signature, the module first)
            mod._register_load_state_dict_pre_hook(_load_state_dict_pre_hook, with_module=True)
        object.__setattr__(mod, _HOOK_FLAG, True)


def _load_state_dict_pre_hook(mod: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Let a factorized module load plain, collapsed or same-depth factorized state dicts.

    A plain ``<prefix><name>`` entry (a dense or collapsed checkpoint) is replaced by its balanced
    factors; factor entries of another depth raise a clear error instead of a wall of key mismatches.
    """
    if not parametrize.is_parametrized(mod):
        return
    for pname, plist in mod.parametrizations.items():
        if len(plist) == 1 and isinstance(plist[0], GatedProduct):
            _load_plain_into_gated(mod, pname, state_dict, prefix)
        if not (len(plist) == 1 and isinstance(plist[0], HadamardProduct)):
            continue
        depth = plist[0].depth
        base = f"{prefix}parametrizations.{pname}.original"
        present = sorted(int(k[len(base):]) for k in state_dict if k.startswith(base) and k[len(base):].isdigit())
        if present and present != list(range(depth)):
            raise ValueError(
                f"The state dict holds {len(present)} factors for '{prefix}{pname}' but the model is factorized "
                f"with depth {depth}. Use DWF depth={len(present)} to resume it, or convert it first with "
                "lightning_dwf.collapse_state_dict()."
            )
        plain_key = prefix + pname
        if not present and plain_key in state_dict:
            for d, f in enumerate(balanced_factors(state_dict.pop(plain_key), depth)):
                state_dict[f"{base}{d}"] = f


def _load_plain_into_gated(mod: nn.Module, pname: str, state_dict: dict[str, Any], prefix: str) -> None:
    """A plain (dense or collapsed) entry for a gated tensor and its coupled ones becomes their balanced gating."""
    base = f"{prefix}parametrizations.{pname}."
    if f"{base}original0" in state_dict or prefix + pname not in state_dict:
        return
    tensor = GatedTensor(prefix + pname, mod, pname)
    names = [pname] + [c for c, _ in tensor.coupled]
    if any(prefix + n not in state_dict for n in names):
        return  # let load_state_dict report the missing keys
    values = [state_dict.pop(prefix + n) for n in names]
    omegas, gate = balanced_gating(values, [tensor.layout] * len(values), tensor.depth)
    for n, omega in zip(names, omegas, strict=True):
        plist = mod.parametrizations[n]
        key = f"{prefix}parametrizations.{n}."
        state_dict[key + ("original0" if n == pname else "original")] = omega
        state_dict[f"{key}0.group_layout"] = plist[0].group_layout.clone()
    for d in range(1, tensor.depth):
        state_dict[f"{base}original{d}"] = gate.clone()


def is_factorized(module: nn.Module) -> bool:
    """Whether any tensor of ``module`` is DWF-factorized or gated."""
    return bool(sparse_tensors(module))

