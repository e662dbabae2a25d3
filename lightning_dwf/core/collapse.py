"""Collapsing factors back into plain weights with exact zeros (in place, or on a state dict)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from lightning_dwf._validation import check_nonnegative
from lightning_dwf.core.factorize import factorized_tensors
from lightning_dwf.core.functional import DEFAULT_THRESHOLD, hadamard_product, threshold_
from lightning_dwf.core.gating import collapse_gated_, collapse_gated_state, gated_tensors

_FACTOR_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)parametrizations\.(?P<name>[^.]+)\.original(?P<index>\d+)$")
#: A tensor scaled by gates (:class:`~lightning_dwf.core.gating.GateScale`) has one ``original``.
_COUPLED_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)parametrizations\.(?P<name>[^.]+)\.original(?P<index>)$")
#: The group layout a gated tensor keeps in the state dict.
_LAYOUT_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)parametrizations\.(?P<name>[^.]+)\.0\.group_layout$")


def _is_gated(state_dict: Mapping[str, Any], match: re.Match) -> bool:
    return f"{match['prefix']}parametrizations.{match['name']}.0.group_layout" in state_dict


def collapse_(module: nn.Module, threshold: float = DEFAULT_THRESHOLD) -> nn.Module:
    """Turn every factorized tensor of ``module`` back into one plain Parameter, in place.

    The new Parameter is ``ω1 ⊙ … ⊙ ωD`` with entries ``|w| < threshold`` set to exact zero, and each
    layer gets its original class back (``type(layer) is nn.Linear`` again), so ``state_dict()`` has
    the ordinary keys. Safe on a ``copy.deepcopy`` of a factorized model: the original keeps working
    (``parametrize`` shares one dynamic class between copies; we give each module its own first).

    Args:
        module: the model (changed in place); a model with nothing factorized is returned unchanged.
        threshold: absolute magnitude below which collapsed weights become exact zeros.

    Returns:
        ``module``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_dwf import collapse_, factorize_
        >>> net = nn.Linear(3, 2)
        >>> _ = factorize_(net, depth=2)
        >>> with torch.no_grad():
        ...     net.parametrizations.weight.original0[0, 0] = 1e-9  # a weight far below the threshold
        >>> net = collapse_(net, threshold=1e-6)
        >>> type(net) is nn.Linear, float(net.weight[0, 0])
        (True, 0.0)
    """
    threshold = check_nonnegative("threshold", threshold, " Use e.g. 1.19e-7 (float32 epsilon), the default.")
    for t in gated_tensors(module):
        _own_class(t.module)
        collapse_gated_(t, threshold)
    for t in factorized_tensors(module):
        mod = t.module
        _own_class(mod)
        requires_grad = t.factors[0].requires_grad
        with torch.enable_grad():  # leave_parametrized registers a Parameter only for a tensor that requires grad
            parametrize.remove_parametrizations(mod, t.param_name, leave_parametrized=True)
        weight = getattr(mod, t.param_name)
        with torch.no_grad():
            threshold_(weight, threshold)
        weight.requires_grad_(requires_grad)
    return module


def _own_class(mod: nn.Module) -> None:
    """Give ``mod`` a parametrized class of its own (``parametrize`` shares one between deep copies)."""
    cls = type(mod)
    if parametrize.is_parametrized(mod):
        private = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
        mod.__class__ = type(cls.__name__, cls.__bases__, private)


def has_factors(state_dict: Mapping[str, Any]) -> bool:
    """Whether ``state_dict`` holds DWF factors (``...parametrizations.<name>.original<d>`` keys)."""
    return any(_FACTOR_KEY.match(k) for k in state_dict)


def collapse_state_dict(state_dict: Mapping[str, Any], threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """Collapse the factors in a (Lightning or plain) state dict, without a model.

    ``<prefix>parametrizations.<name>.original0 … original{D-1}`` become ``<prefix><name>`` with exact
    zeros below ``threshold``; every other entry is copied unchanged. The input is not modified.

    Args:
        state_dict: e.g. ``torch.load(path)["state_dict"]`` of a checkpoint written during DWF training.
        threshold: absolute magnitude below which collapsed weights become exact zeros.

    Raises:
        ValueError: if the state dict holds no factors (it is already plain) or a factor is missing.
    """
    threshold = check_nonnegative("threshold", threshold, " Use e.g. 1.19e-7 (float32 epsilon), the default.")
    groups: dict[str, dict[int, Any]] = {}
    gated: dict[str, dict[str, dict[str, Any]]] = {}  # module prefix -> tensor name -> layout and originals
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        match = _LAYOUT_KEY.match(key)
        if match is not None:
            gated.setdefault(match["prefix"], {}).setdefault(match["prefix"] + match["name"], {})["layout"] = value
            continue
        match = _FACTOR_KEY.match(key) or _COUPLED_KEY.match(key)
        if match is None:
            out[key] = value
            continue
        target = match["prefix"] + match["name"]
        if _is_gated(state_dict, match):
            entry = gated.setdefault(match["prefix"], {}).setdefault(target, {})
            entry[f"original{match['index'] or ''}"] = value
            out.setdefault(target, None)
            continue
        target = match["prefix"] + match["name"]
        groups.setdefault(target, {})[int(match["index"])] = value
        out.setdefault(target, None)  # keep the tensor where its first factor was
    for entries in gated.values():
        out.update(collapse_gated_state(entries, threshold))
    if not groups and not gated:
        raise ValueError(
            "The state dict holds no DWF factors (no '...parametrizations.<name>.original<d>' keys): it is already "
            "plain."
        )
    for target, factors in groups.items():
        if sorted(factors) != list(range(len(factors))):
            raise ValueError(f"Factors of {target!r} are incomplete: found indices {sorted(factors)}.")
        weight = hadamard_product([factors[d] for d in range(len(factors))]).detach().clone()
        out[target] = threshold_(weight, threshold)
    return out
