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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_dwf.errors import DWFError

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)
#: Output-changing layers whose input is a channel's only consumer are judged by that consumer (a Conv before a
#: BatchNorm: the BatchNorm's zero scale and shift silence the channel, whatever the filter holds).
_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _torch_pruning() -> Any:
    try:
        import torch_pruning
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("Physical shrink needs Torch-Pruning: pip install 'lightning-dwf[structured]' "
                          "(or pip install torch-pruning).") from err
    return torch_pruning


@dataclass(frozen=True)
class ShrinkReport:
    """What :func:`shrink_` removed and what it measured.

    Attributes:
        history: Torch-Pruning's pruning history ``[(module name, is output channels, removed indices), …]``, enough
            to shrink a fresh instance of the same class the same way (:func:`~lightning_dwf.load_shrunk`).
        removed: channels removed per root layer (qualified module name → count).
        params_before, params_after: parameters of the model before and after.
        macs_before, macs_after: multiply–accumulates of one forward pass on the example input, before and after.
        max_abs_diff: largest absolute difference between the outputs before and after, on the example input.
    """

    history: list[tuple[str, bool, list[int]]]
    removed: dict[str, int]
    params_before: int
    params_after: int
    macs_before: float
    macs_after: float
    max_abs_diff: float
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def macs_ratio(self) -> float:
        """MACs after / before (a MACs ratio, not a measured speed-up)."""
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    def history_json(self) -> str:
        return json.dumps([[name, bool(out), [int(i) for i in idxs]] for name, out, idxs in self.history])


def _zero_channels(module: nn.Module, count: int) -> Tensor:
    """Which of ``module``'s ``count`` output channels are exactly zero in all its parameters (bool, ``(count,)``)."""
    zero = torch.ones(count, dtype=torch.bool)
    params = [p for p in module.parameters(recurse=False)]
    if not params or isinstance(module, _NORMS) and not all(p.shape[0] == count for p in params):
        return torch.zeros(count, dtype=torch.bool)
    for p in params:
        if p.dim() == 0 or p.shape[0] != count:
            return torch.zeros(count, dtype=torch.bool)
        zero &= (p.detach().reshape(count, -1) == 0).all(dim=1)
    return zero


def _judged_by(dg: Any, module: nn.Module) -> nn.Module:
    """The module whose output decides whether ``module``'s output channels are silent: a following norm layer when it
    is ``module``'s only consumer, else ``module`` itself."""
    node = dg.module2node.get(module)
    if node is None or not isinstance(module, _PRODUCERS):
        return module
    consumers = {id(n.module): n.module for n in node.outputs}
    if len(consumers) == 1:
        (only,) = consumers.values()
        if isinstance(only, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) and only.affine:
            return only
    return module


def _removable(dg: Any, group: Any) -> tuple[list[int], bool]:
    """Root indices of ``group`` whose channel is silent in every layer that writes it; and whether the channels
    are consumed inside the model (else they are model outputs and stay)."""
    root_idxs = list(group[0].idxs)
    keep_going = torch.ones(len(root_idxs), dtype=torch.bool)
    consumed = False
    for dep, idxs in group:
        module = dep.target.module
        if not dg.is_out_channel_pruning_fn(dep.handler):
            consumed = consumed or isinstance(module, nn.Module) and any(
                True for _ in module.parameters(recurse=False))
            continue
        if not isinstance(module, nn.Module) or not any(True for _ in module.parameters(recurse=False)):
            continue  # an operation without parameters (add, activation) passes zeros on
        judge = _judged_by(dg, module)
        count = _out_channels(judge)
        zero = _zero_channels(judge, count) if count else torch.zeros(0, dtype=torch.bool)
        positions = [int(getattr(i, "idx", i)) for i in idxs]
        if len(positions) != len(root_idxs) or (positions and max(positions) >= zero.numel()):
            return [], consumed
        keep_going &= zero[positions]
    return [int(getattr(r, "idx", r)) for r, ok in zip(root_idxs, keep_going.tolist()) if ok], consumed


def _out_channels(module: nn.Module) -> int:
    for attr in ("out_features", "out_channels", "num_features", "num_channels"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[0])
    return 0


def count_macs_and_params(model: nn.Module, example_inputs: Any) -> tuple[float, int]:
    """``(MACs of one forward pass on example_inputs, parameters)`` from Torch-Pruning's counter."""
    tp = _torch_pruning()
    was = model.training
    model.eval()
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    model.train(was)
    return float(macs), int(params)


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
    the model's outputs stay whole; a layer none of whose channels survive keeps one (a zero one), so the model's
    shapes stay valid.

    Args:
        model: a collapsed model (:func:`~lightning_dwf.collapse_` or the collapsed checkpoint); changed in place.
        example_inputs: one input for ``model(...)`` (a tensor, a tuple of positional inputs or a dict of keyword
            inputs): the dependency graph is traced on it, and the outputs are compared on it.
        ignored_layers: layers never shrunk.
        atol, rtol: tolerance of the output check (absolute, relative to the largest output magnitude).

    Returns:
        A :class:`ShrinkReport` (save it with the model through :func:`~lightning_dwf.save_shrunk`).

    Raises:
        ValueError: ``model`` is still factorized or gated (collapse it first).
        DWFError: the shrunk model's outputs differ from the collapsed model's beyond the tolerance (the model is
            restored, unchanged).
    """
    tp = _torch_pruning()
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise ValueError("shrink_ needs a collapsed model: call lightning_dwf.collapse_(model) first (or load the "
                         "collapsed checkpoint into your plain class).")
    was = model.training
    model.eval()
    before_state = copy.deepcopy(model)
    reference = _forward(model, example_inputs)
    macs_before, params_before = count_macs_and_params(model, example_inputs)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
    removed: dict[str, int] = {}
    skipped: dict[str, str] = {}
    names = {m: n for n, m in model.named_modules()}
    root_types = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    for group in list(dg.get_all_groups(ignored_layers=list(ignored_layers), root_module_types=root_types)):
        root = group[0].dep.target.module
        idxs, consumed = _removable(dg, group)
        if not idxs:
            continue
        if not consumed:
            skipped[names.get(root, str(root))] = "its channels are model outputs"
            continue
        total = _out_channels(root)
        if len(idxs) >= total:
            idxs = idxs[1:]  # keep one (zero) channel so that the shapes stay valid
        if not idxs:
            continue
        pruning = dg.get_pruning_group(root, group[0].dep.handler, idxs)
        if not dg.check_pruning_group(pruning):
            skipped[names.get(root, str(root))] = "Torch-Pruning refused the group"
            continue
        pruning.prune()
        removed[names.get(root, str(root))] = len(idxs)
    after = _forward(model, example_inputs)
    diff = _max_diff(reference, after)
    scale = max(_max_abs(reference), 1.0)
    if not diff <= atol + rtol * scale:
        _restore(model, before_state)
        model.train(was)
        raise DWFError(
            f"shrink_ changed the model's outputs by {diff:.3g} (> atol {atol:g} + rtol {rtol:g} × {scale:.3g}); the "
            "model is restored unchanged. A layer's zero channels are not silent (e.g. a Conv whose zero filters feed "
            "an ungated BatchNorm, or code with hard-coded channel counts): pass it in `ignored_layers`."
        )
    macs_after, params_after = count_macs_and_params(model, example_inputs)
    model.train(was)
    history = [(str(n), bool(o), [int(i) for i in idx]) for n, o, idx in dg.pruning_history()]
    return ShrinkReport(history, removed, params_before, params_after, macs_before, macs_after, diff, skipped)


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


def replay_shrink_(model: nn.Module, history: Sequence[tuple[str, bool, Sequence[int]]], example_inputs: Any) -> None:
    """Shrink a fresh instance the way a :class:`ShrinkReport`'s ``history`` records (same class, same graph)."""
    tp = _torch_pruning()
    was = model.training
    model.eval()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
    dg.load_pruning_history([[n, bool(o), list(i)] for n, o, i in history])
    model.train(was)
