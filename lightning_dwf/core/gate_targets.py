"""Where the gates of a layer selected for structured DWF go: the tensor that carries them, its groups
(:class:`~lightning_dwf.core.groups.GroupLayout`) and the tensors coupled to them.

A Linear or Conv gated by outputs carries its gates on its own weight and bias, unless a BatchNorm follows it: then the
BatchNorm's scale and shift do (a BatchNorm normalizes a filter's scale away). Heads of ``nn.MultiheadAttention`` are
gated on its packed q/k/v projection.
"""

from __future__ import annotations

from torch import nn

from lightning_dwf.core.groups import GroupLayout

#: The BatchNorm layers whose channels follow a Conv/Linear layer's outputs (gated with them, removed with them).
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def following_batch_norm(module: nn.Module, name: str) -> tuple[str, nn.Module] | None:
    """The BatchNorm registered right after the Conv/Linear ``name`` with one channel per output (the usual
    ``conv → bn`` order), or ``None``. Its scale and shift, not the layer's weight, carry the gates then: BatchNorm
    normalizes a filter's scale away, so a gate on the filter could not silence the channel. The layer's own
    submodules (a parametrized layer's factors) are not "after" it."""
    names = [(n, m) for n, m in module.named_modules()]
    index = next(i for i, (n, _) in enumerate(names) if n == name)
    layer = names[index][1]
    width = getattr(layer, "out_channels", getattr(layer, "out_features", None))
    for next_name, nxt in names[index + 1:]:
        if next_name.startswith(name + ".") or any(True for _ in nxt.children()):
            continue
        if isinstance(nxt, BATCH_NORMS) and nxt.num_features == width and nxt.affine:
            return next_name, nxt
        return None
    return None


def layout_for(layer: nn.Module, pname: str, kind: str, num_heads: int | None) -> GroupLayout:
    """The groups of ``layer.<pname>`` for a structure ``kind`` (``"outputs"``, ``"inputs"`` or ``"heads"``).

    Raises:
        ValueError: a layer or tensor this structure cannot group, with the fix.
    """
    weight = getattr(layer, pname)
    if kind == "outputs":
        return GroupLayout(0, weight.shape[0])
    if kind == "inputs":
        if weight.dim() < 2 or getattr(layer, "groups", 1) != 1:
            raise ValueError(f"structure 'inputs' needs a Linear or ungrouped Conv weight, got {type(layer).__name__}.")
        return GroupLayout(1, weight.shape[1])
    if isinstance(layer, nn.MultiheadAttention):
        heads = layer.num_heads
        return GroupLayout(0, heads, layer.embed_dim // heads, 3)
    if not num_heads or weight.shape[0] % num_heads:
        raise ValueError(
            f"structure 'heads' on {type(layer).__name__} needs FactorizeConfig(num_heads=H) with H dividing its "
            f"{weight.shape[0]} outputs (for nn.MultiheadAttention the head count is read from the module)."
        )
    return GroupLayout(0, num_heads, weight.shape[0] // num_heads)


def gated_targets(root: nn.Module, mod_name: str, layer: nn.Module, kind: str,
                  num_heads: int | None) -> tuple[str, nn.Module, str, GroupLayout, tuple[str, ...]]:
    """Where the gates for a selected layer go: ``(qualified name, owner, tensor, layout, coupled tensors)``."""
    if isinstance(layer, nn.MultiheadAttention):
        if kind != "heads" or not layer._qkv_same_embed_dim:
            raise ValueError(f"nn.MultiheadAttention {mod_name!r} can be gated by 'heads' only (with q, k and v of the "
                             "same size); choose structure='heads' for it or exclude it.")
        return _qualified(mod_name, "in_proj_weight"), layer, "in_proj_weight", layout_for(layer, "in_proj_weight",
                                                                                        kind, None), ("in_proj_bias",)
    if kind == "outputs" and (bn := following_batch_norm(root, mod_name)) is not None:
        bn_name, bn_layer = bn
        return _qualified(bn_name, "weight"), bn_layer, "weight", GroupLayout(0, bn_layer.num_features), ("bias",)
    layout = layout_for(layer, "weight", kind, num_heads)
    coupled = ("bias",) if kind != "inputs" else ()
    return _qualified(mod_name, "weight"), layer, "weight", layout, coupled


def _qualified(mod_name: str, pname: str) -> str:
    return f"{mod_name}.{pname}" if mod_name else pname
