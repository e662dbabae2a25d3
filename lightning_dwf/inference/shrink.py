"""Physical shrink: remove the zero neurons, filters and channels of a collapsed model, and what is coupled to them.

Structured DWF (``FactorizeConfig(structure="outputs")``) leaves whole groups at exact zero: a zero gate silences a
neuron's weights and bias, or a BatchNorm channel's scale and shift, so the channel's output is exactly zero. Removing
it, with the next layer's input columns, the BatchNorm channel and every channel coupled to it through residual
additions, gives a smaller dense model that computes the same function and runs faster on every kind of hardware.
Which layers are coupled comes from Torch-Pruning's dependency graph (``pip install torch-pruning``); a channel is
removed only when every layer that writes it gives exactly zero there, and the shrunk model's outputs are checked
against the collapsed model's on the example input.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from lightning_dwf.errors import DWFError
from lightning_dwf.inference.attention import rewrite_attention_
from lightning_dwf.inference.coupling import build_graph, channel_spaces, layer_macs, set_heads_, zero_channels


@dataclass(frozen=True)
class ShrinkReport:
    """What :func:`shrink_` removed and what it measured.

    Attributes:
        history: Torch-Pruning's pruning history ``[(module name, is output channels, removed indices), …]``, enough
            to shrink a fresh instance of the same class the same way (:func:`~lightning_dwf.load_shrunk`).
        removed: channels removed per root layer (qualified module name → count).
        params_before: parameters of the model before.
        params_after: parameters of the model after.
        macs_before: multiply–accumulates per sample of the Conv and Linear layers on the example input, before.
        macs_after: the same, after.
        max_abs_diff: largest absolute difference between the outputs before and after, on the example input.
        skipped: root layers with silent channels that stayed, and why (model outputs, or a group Torch-Pruning
            refused).
        heads: the new head count of every attention module that lost heads (name → ``(attribute, count)``).
        attention: the ``nn.MultiheadAttention`` modules rewritten as
            :class:`~lightning_dwf.inference.attention.LinearMultiheadAttention` (the same function) so that their
            silent heads could go.
    """

    history: list[tuple[str, bool, list[int]]]
    removed: dict[str, int]
    params_before: int
    params_after: int
    macs_before: float
    macs_after: float
    max_abs_diff: float
    skipped: dict[str, str] = field(default_factory=dict)
    heads: dict[str, tuple[str, int]] = field(default_factory=dict)
    attention: list[str] = field(default_factory=list)

    @property
    def macs_ratio(self) -> float:
        """MACs after / before (a MACs ratio, not a measured speed-up)."""
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    def history_json(self) -> str:
        return json.dumps([[name, bool(out), [int(i) for i in idxs]] for name, out, idxs in self.history])

    def heads_json(self) -> str:
        return json.dumps({name: [attr, int(count)] for name, (attr, count) in self.heads.items()})

    def attention_json(self) -> str:
        return json.dumps(list(self.attention))


def count_macs_and_params(model: nn.Module, example_inputs: Any) -> tuple[float, int]:
    """``(MACs per sample of the Conv and Linear layers and attention projections on example_inputs, parameters)``: the
    one MACs definition of the package (:func:`~lightning_dwf.inference.coupling.layer_macs`), the one budgets are met
    in."""
    return sum(layer_macs(model, example_inputs).values()), sum(p.numel() for p in model.parameters())


def _forward(model: nn.Module, example_inputs: Any) -> Any:
    with torch.no_grad():
        if isinstance(example_inputs, dict):
            return model(**example_inputs)
        if isinstance(example_inputs, (tuple, list)):
            return model(*example_inputs)
        return model(example_inputs)


def _max_diff(a: Any, b: Any) -> float:
    if torch.is_tensor(a):
        if a.shape != b.shape:
            return float("inf")
        return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
    if isinstance(a, (tuple, list)):
        return max((_max_diff(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    if isinstance(a, dict):
        return max((_max_diff(a[k], b[k]) for k in a), default=0.0)
    return 0.0


def shrink_(
    model: nn.Module,
    example_inputs: Any,
    *,
    ignored_layers: Sequence[nn.Module] = (),
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> ShrinkReport:
    """Remove every exactly-silent output channel of ``model`` (collapsed, plain) and everything coupled to it.

    The model is switched to ``eval()`` for the check and left in the mode it had. Layers whose output channels are
    the model's outputs stay whole; a layer none of whose channels survive keeps one (a zero one; an attention module
    keeps one head), so the model's shapes stay valid. Attention heads go whole and lower the module's head count
    (:mod:`lightning_dwf.inference.coupling`); an ``nn.MultiheadAttention`` with a silent head is first rewritten as a
    :class:`~lightning_dwf.inference.attention.LinearMultiheadAttention` (the same function with one Linear layer
    per projection: its packed projection cannot lose a head).

    Args:
        model: a collapsed model (:func:`~lightning_dwf.collapse_` or the collapsed checkpoint); changed in place.
        example_inputs: one input for ``model(...)`` (a tensor, a tuple of positional inputs or a dict of keyword
            inputs): the dependency graph is traced on it, and the outputs are compared on it.
        ignored_layers: layers never shrunk (an ``nn.MultiheadAttention`` here keeps its packed, fused form).
        atol: absolute tolerance of the output check.
        rtol: tolerance of the output check relative to the largest output magnitude.

    Returns:
        A :class:`ShrinkReport` (save it with the model through :func:`~lightning_dwf.save_shrunk`).

    Raises:
        ValueError: ``model`` is still factorized or gated (collapse it first).
        DWFError: the shrunk model's outputs differ from the collapsed model's beyond the tolerance (the model is
            restored, unchanged).
    """
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise ValueError("shrink_ needs a collapsed model: call lightning_dwf.collapse_(model) first (or load the "
                         "collapsed checkpoint into your plain class).")
    was = model.training
    model.eval()
    before_state = copy.deepcopy(model)
    reference = _forward(model, example_inputs)
    skipped: dict[str, str] = {}
    attention = _rewrite_silent_attention_(model, skipped, ignored_layers)
    macs_before, params_before = count_macs_and_params(model, example_inputs)
    dg = build_graph(model, example_inputs)
    removed: dict[str, int] = {}
    heads: dict[str, tuple[str, int]] = {}
    names = {m: n for n, m in model.named_modules()}
    for space in channel_spaces(dg, ignored_layers):
        idxs = space.removable(zero_channels)
        name = names.get(space.root, str(space.root))
        if not space.consumed:
            if space.aligned and any(bool(zero_channels(m, p).any()) for m, p in space.writers):
                skipped[name] = "its channels are model outputs"
            continue
        if not idxs:
            continue
        pruning = dg.get_pruning_group(space.root, space.handler, idxs)
        if not dg.check_pruning_group(pruning):
            skipped[name] = "Torch-Pruning refused the group"
            continue
        pruning.prune()
        removed[name] = len(idxs)
        heads |= space.heads_left(len(idxs))
    counts = {owner: (attr, getattr(model.get_submodule(owner), attr)) for owner, (attr, _) in heads.items()}
    set_heads_(model, heads)

    def undo() -> None:
        _restore(model, before_state)
        set_heads_(model, counts)  # the model itself may be the attention module
        model.train(was)

    try:
        after = _forward(model, example_inputs)
    except Exception as err:  # hard-coded shapes in the model's forward
        undo()
        raise DWFError(f"the shrunk model's forward fails ({err}); the model is restored unchanged. Its code fixes "
                       "a width the shrink changed: derive widths from the layers (e.g. `q.view(n, t, self.num_heads, "
                       "-1)`), or pass such layers in `ignored_layers`.") from err
    diff = _max_diff(reference, after)
    scale = max(_max_abs(reference), 1.0)
    if not diff <= atol + rtol * scale:
        undo()
        raise DWFError(
            f"shrink_ changed the model's outputs by {diff:.3g} (> atol {atol:g} + rtol {rtol:g} × {scale:.3g}); the "
            "model is restored unchanged. A layer's zero channels are not silent (e.g. a Conv whose zero filters feed "
            "an ungated BatchNorm, or code with hard-coded channel counts): pass it in `ignored_layers`."
        )
    macs_after, params_after = count_macs_and_params(model, example_inputs)
    model.train(was)
    history = [(str(n), bool(o), [int(i) for i in idx]) for n, o, idx in dg.pruning_history()]
    return ShrinkReport(history, removed, params_before, params_after, macs_before, macs_after, diff, skipped, heads,
                        attention)


def _rewrite_silent_attention_(model: nn.Module, skipped: dict[str, str],
                               ignored: Sequence[nn.Module] = ()) -> list[str]:
    """Rewrite every ``nn.MultiheadAttention`` of ``model`` with a silent head (and not in ``ignored``) as a
    :class:`~lightning_dwf.inference.attention.LinearMultiheadAttention` in its parent; returns their names (those
    that cannot be rewritten go into ``skipped`` with the reason)."""
    rewritten = []
    for name, m in list(model.named_modules()):
        if not isinstance(m, nn.MultiheadAttention) or not _silent_heads(m) or any(m is i for i in ignored):
            continue
        if not name:
            skipped[name] = "the model is an nn.MultiheadAttention itself; wrap it in a module to shrink its heads"
            continue
        try:
            rewrite_attention_(model, name)
        except ValueError as err:
            skipped[name] = str(err)
            continue
        rewritten.append(name)
    return rewritten



def _silent_heads(mha: nn.MultiheadAttention) -> bool:
    """Whether some head of ``mha`` is exactly zero in its packed q/k/v projection."""
    weight = mha.in_proj_weight
    if weight is None:
        return False
    rows = weight.detach().reshape(3, mha.num_heads, -1).eq(0).all(dim=(0, 2))
    return bool(rows.any())


def _max_abs(a: Any) -> float:
    if torch.is_tensor(a):
        return float(a.float().abs().max()) if a.numel() else 0.0
    if isinstance(a, (tuple, list)):
        return max((_max_abs(x) for x in a), default=0.0)
    if isinstance(a, dict):
        return max((_max_abs(v) for v in a.values()), default=0.0)
    return 0.0


def _restore(model: nn.Module, saved: nn.Module) -> None:
    """Put the modules and parameters of ``saved`` (a deep copy taken before) back into ``model``."""
    for name, child in saved.named_children():
        setattr(model, name, child)
    for name, param in saved.named_parameters(recurse=False):
        setattr(model, name, param)
    for name, buf in saved.named_buffers(recurse=False):
        model.register_buffer(name, buf)


def replay_shrink_(
    model: nn.Module,
    history: Sequence[tuple[str, bool, Sequence[int]]],
    example_inputs: Any,
    heads: Mapping[str, tuple[str, int]] | None = None,
    attention: Sequence[str] = (),
) -> None:
    """Shrink a fresh instance the way a :class:`ShrinkReport`'s ``history``, ``heads`` and ``attention`` record (same
    class)."""
    for name in attention:
        rewrite_attention_(model, name)
    dg = build_graph(model, example_inputs)
    dg.load_pruning_history([[n, bool(o), list(i)] for n, o, i in history])
    set_heads_(model, dict(heads or {}))
