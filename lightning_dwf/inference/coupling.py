"""Which channels of a model are coupled: the channel spaces of Torch-Pruning's dependency graph.

A channel space is the set of output channels that must go together (a layer's outputs, its BatchNorm, every layer
added to them through a residual connection) and the input channels of the layers that read them. A channel can be
removed only when every layer that writes it is silent there, and only when something inside the model reads it (the
model's own outputs stay). The q/k/v projections of an attention module written as ``nn.Linear`` layers share one
space; when their parent module holds its head count (``num_heads``, ``heads``, ``num_attention_heads``, ``n_heads``
or ``n_head``), the space's unit is a whole head: a head goes only when q, k and v are all silent on it, and the
parent's count is lowered to match. :func:`~lightning_dwf.shrink_` removes channels space by space, and the budget
regime (:mod:`lightning_dwf.training.budget`) predicts the shrunk model's cost from the same spaces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dwf.core.gate_targets import BATCH_NORMS

#: Attributes that hold an attention module's head count (PyTorch, timm, Hugging Face and nanoGPT spellings).
HEAD_ATTRS = ("num_heads", "heads", "num_attention_heads", "n_heads", "n_head")
#: Conv and Linear layers: those whose MACs are counted, and whose output channels a following BatchNorm can silence
#: (its zero scale and shift silence the channel, whatever the layer holds).
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Layers whose outputs can be the roots of channel spaces.
ROOT_TYPES = (*LAYERS, *BATCH_NORMS)


def torch_pruning() -> Any:
    """The ``torch_pruning`` module, or an ImportError that names the extra to install."""
    try:
        import torch_pruning as tp
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("Structured shrink and budgets need Torch-Pruning: pip install 'lightning-dwf[structured]' "
                          "(or pip install torch-pruning).") from err
    return tp


def out_channels(module: nn.Module) -> int:
    """The number of output channels of a Linear, Conv or norm layer (0 for anything else)."""
    for attr in ("out_features", "out_channels", "num_features", "num_channels"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[0])
    return 0


def _has_params(module: Any) -> bool:
    return isinstance(module, nn.Module) and any(True for _ in module.parameters(recurse=False))


@dataclass
class ChannelSpace:
    """One set of coupled channels.

    Attributes:
        root: the layer whose output channels define the space; ``handler`` prunes them.
        size: its number of channels.
        writers: ``(module, positions)`` of every layer whose outputs decide whether a channel is silent (a BatchNorm
            stands for the layer before it); ``positions[i]`` is that layer's channel for the space's channel ``i``.
        outputs: ``(module, positions)`` of every layer with parameters whose output channels are in the space.
        inputs: ``(module, positions)`` of every layer with parameters whose input channels read the space.
        consumed: whether a layer inside the model reads the channels (else they are model outputs and stay).
        aligned: whether every layer that writes the channels maps them one to one (else the space is left whole;
            readers may expand them, as a flatten does).
        heads: ``(attention module name, attribute, head count)`` when the space is the q/k/v output of an attention
            module with a head count: channels then go only as whole heads.
    """

    root: nn.Module
    handler: Any
    size: int
    writers: list[tuple[nn.Module, list[int]]]
    outputs: list[tuple[nn.Module, list[int]]]
    inputs: list[tuple[nn.Module, list[int]]]
    consumed: bool
    aligned: bool
    heads: tuple[str, str, int] | None = None

    @property
    def shrinkable(self) -> bool:
        return self.consumed and self.aligned

    @property
    def unit(self) -> int:
        """Channels that go together: the head dim of an attention space, else 1."""
        return self.size // self.heads[2] if self.heads else 1

    def removable(self, silent: Callable[[nn.Module, list[int]], Tensor]) -> list[int]:
        """The space's channels that every writer leaves silent (``silent(module, positions)`` → bool per channel)."""
        everywhere = torch.ones(self.size, dtype=torch.bool)
        for module, positions in self.writers:
            everywhere &= silent(module, positions)
        return self.removable_where(everywhere)

    def heads_left(self, removed: int) -> dict[str, tuple[str, int]]:
        """``{attention module: (attribute, head count)}`` after ``removed`` of the space's channels went (empty for a
        space without heads)."""
        if not self.heads:
            return {}
        owner, attr, count = self.heads
        return {owner: (attr, count - removed // self.unit)}

    def removable_units(self, silent: Tensor) -> Tensor:
        """Which units (heads, else channels) can go when ``silent`` (bool per channel) marks the channels silent in
        every writer: whole units only, and at least one unit always stays, so the shapes stay valid."""
        units = silent.reshape(-1, self.unit).all(dim=1) & self.shrinkable
        if bool(units.all()):
            units[0] = False
        return units

    def removable_count(self, silent: Tensor) -> int:
        """``len(self.removable_where(silent))`` (the budget's cost model calls it often)."""
        return int(self.removable_units(silent).count_nonzero()) * self.unit

    def removable_where(self, silent: Tensor) -> list[int]:
        """The channels that can go (:meth:`removable_units`, as channel positions)."""
        return self.removable_units(silent).repeat_interleave(self.unit).nonzero().flatten().tolist()


def judged_by(dg: Any, module: nn.Module) -> nn.Module:
    """The module whose output decides whether ``module``'s output channels are silent: an affine BatchNorm that is
    ``module``'s only consumer, else ``module`` itself."""
    node = dg.module2node.get(module)
    if node is None or not isinstance(module, LAYERS):
        return module
    consumers = {id(n.module): n.module for n in node.outputs}
    if len(consumers) == 1:
        (only,) = consumers.values()
        if isinstance(only, BATCH_NORMS) and only.affine:
            return only
    return module


def build_graph(model: nn.Module, example_inputs: Any) -> Any:
    """Torch-Pruning's dependency graph of ``model`` traced on ``example_inputs`` (in eval mode)."""
    tp = torch_pruning()
    was = model.training
    model.eval()
    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
    finally:
        model.train(was)


def channel_spaces(dg: Any, ignored_layers: Sequence[nn.Module] = ()) -> list[ChannelSpace]:
    """Every channel space of the model behind ``dg`` (one per group of :meth:`DependencyGraph.get_all_groups`)."""
    spaces = []
    for group in dg.get_all_groups(ignored_layers=list(ignored_layers), root_module_types=ROOT_TYPES):
        root_dep, root_idxs = group[0].dep, [int(getattr(i, "idx", i)) for i in group[0].idxs]
        size = len(root_idxs)
        writers, outputs, inputs = [], [], []
        consumed, aligned = False, True
        for dep, idxs in group:
            module = dep.target.module
            positions = [int(getattr(i, "idx", i)) for i in idxs]
            if not _has_params(module):
                continue  # an operation without parameters (add, activation) passes zeros on
            if dg.is_out_channel_pruning_fn(dep.handler):
                aligned = aligned and len(positions) == size  # inputs may expand (a flatten: channels × positions)
                outputs.append((module, positions))
                judge = judged_by(dg, module)
                if judge is module or all(j is not judge for j, _ in writers):
                    writers.append((judge, positions))
            else:
                inputs.append((module, positions))
                consumed = True
        heads = _heads(dg, writers, size) if _through_attention(group) else None
        spaces.append(ChannelSpace(root_dep.target.module, root_dep.handler, size, writers, outputs, inputs,
                                   consumed, aligned, heads))
    return spaces


#: Autograd node names of the operations that mix heads' queries, keys and values (SDPA kernels, batched matmuls).
_ATTENTION_OPS = ("Attention", "Bmm", "MatMul", "Matmul")


def _through_attention(group: Any) -> bool:
    """Whether the channels of a dependency group pass through an attention operation (not just through additions, as
    a residual stream or a gated MLP does)."""
    for dep, _ in group:
        grad_fn = getattr(dep.target.module, "_grad_fn", None)  # Torch-Pruning keeps the autograd node's name
        name = grad_fn if isinstance(grad_fn, str) else type(grad_fn).__name__
        if any(op in name for op in _ATTENTION_OPS):
            return True
    return False


def _heads(dg: Any, writers: list[tuple[nn.Module, list[int]]], size: int) -> tuple[str, str, int] | None:
    """``(parent name, attribute, count)`` when the writers are two or more Linear layers of one module that holds a
    head count dividing ``size`` (the q/k/v projections of an attention module)."""
    if len(writers) < 2 or not all(isinstance(m, nn.Linear) for m, _ in writers):
        return None
    names = [dg._module2name.get(m) for m, _ in writers]
    parents = {n.rpartition(".")[0] for n in names if n is not None}
    if len(parents) != 1 or None in names:
        return None
    (parent_name,) = parents
    parent = dg.model.get_submodule(parent_name)
    for attr in HEAD_ATTRS:
        count = getattr(parent, attr, None)
        if isinstance(count, int) and not isinstance(count, bool) and count > 1 and size % count == 0:
            return parent_name, attr, count
    return None


def set_heads_(model: nn.Module, heads: dict[str, tuple[str, int]]) -> None:
    """Set the head counts ``{attention module name: (attribute, count)}`` after their heads were removed."""
    for name, (attr, count) in heads.items():
        setattr(model.get_submodule(name), attr, int(count))


def zero_channels(module: nn.Module, positions: list[int]) -> Tensor:
    """Whether ``module``'s output channels at ``positions`` are exactly zero in all its parameters."""
    count = out_channels(module)
    params = list(module.parameters(recurse=False))
    if not count or not params or any(p.dim() == 0 or p.shape[0] != count for p in params):
        return torch.zeros(len(positions), dtype=torch.bool)
    if positions and max(positions) >= count:
        return torch.zeros(len(positions), dtype=torch.bool)
    zero = torch.ones(count, dtype=torch.bool)
    for p in params:
        zero &= (p.detach().reshape(count, -1) == 0).all(dim=1)
    return zero[positions]


def layer_macs(model: nn.Module, example_inputs: Any) -> dict[str, float]:
    """MACs per sample of every Conv and Linear layer (and ``nn.MultiheadAttention``'s projections) of ``model`` on
    ``example_inputs`` (forward hooks): each layer's MACs over the whole input, divided by the size of the input's
    first axis (the first tensor's; the batch of a batch-first model), so a layer that sees the batch on another axis
    (a sequence-first attention inside, tokens flattened into the batch) counts the same as one that does not."""
    found: dict[str, float] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, LAYERS):
            def hook(mod: nn.Module, args: Any, out: Tensor, name: str = name) -> None:
                per_output = mod.weight[0].numel()  # inputs per output element (in / groups × kernel)
                found[name] = found.get(name, 0.0) + out.numel() * per_output
            handles.append(module.register_forward_hook(hook))
        elif isinstance(module, nn.MultiheadAttention):  # its projections are not called as layers: count them here
            handles.append(module.register_forward_hook(_attention_hook(found, name), with_kwargs=True))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(example_inputs, dict):
                model(**example_inputs)
            elif isinstance(example_inputs, (tuple, list)):
                model(*example_inputs)
            else:
                model(example_inputs)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    batch = _batch_size(example_inputs)
    return {name: macs / batch for name, macs in found.items()}


def _attention_hook(found: dict[str, float], name: str) -> Callable[..., None]:
    """A forward hook adding an ``nn.MultiheadAttention``'s projection MACs to ``found[name]``: q and the output
    projection on every query token, k and v on every key and value token (what the same module rewritten with Linear
    layers counts; the attention products are not counted, as for Linear attention)."""

    def hook(mod: nn.MultiheadAttention, args: tuple, kwargs: dict, out: Any) -> None:
        query, key, value = (list(args) + [kwargs.get(k) for k in ("query", "key", "value")[len(args):]])[:3]
        embed = mod.embed_dim
        tokens = query.numel() // embed
        macs = 2 * tokens * embed * embed + key.numel() * embed + value.numel() * embed
        found[name] = found.get(name, 0.0) + float(macs)

    return hook


def _batch_size(example_inputs: Any) -> int:
    """The first axis of the first tensor in ``example_inputs`` (a tensor, a tuple or list, or a dict), else 1."""
    if torch.is_tensor(example_inputs):
        return max(int(example_inputs.shape[0]), 1) if example_inputs.dim() else 1
    items = example_inputs.values() if isinstance(example_inputs, dict) else (
        example_inputs if isinstance(example_inputs, (tuple, list)) else ())
    return next((_batch_size(v) for v in items if torch.is_tensor(v)), 1)
