"""Groups of a tensor for structured DWF (D-Gating): which entries share one gate.

A group is everything a neuron, filter, input feature or attention head owns in one tensor: the rows of a Linear or
Conv weight along ``dim`` 0 (outputs), its columns along ``dim`` 1 (inputs), or for heads the ``width = head_dim`` rows
of each head in each of the ``blocks`` (3 for a packed q/k/v projection) along ``dim`` 0. :class:`GroupLayout` turns a
tensor into a ``(groups, entries)`` matrix and a per-group scale back into the tensor's shape; 1-D tensors coupled to
the same groups (a bias, a BatchNorm shift) use the same layout along their only dimension.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

#: The kinds of group a layer can be gated by: ``"outputs"`` (neurons, filters, BatchNorm channels), ``"inputs"``
#: (input features of a layer), ``"heads"`` (attention heads of a q/k/v projection).
GroupKind = Literal["outputs", "inputs", "heads"]
#: ``"elements"``: plain (unstructured) DWF, every weight its own unit.
Structure = Literal["elements", "outputs", "inputs", "heads"]
STRUCTURES: tuple[str, ...] = ("elements", "outputs", "inputs", "heads")


@dataclass(frozen=True)
class GroupLayout:
    """Where the groups of a tensor lie.

    Attributes:
        dim: the axis the groups partition (0: outputs and heads, 1: inputs).
        groups: the number of groups G.
        width: consecutive slices along ``dim`` per group within one block (the head dim for heads, else 1).
        blocks: repeats of the groups along ``dim`` (3 for a packed q/k/v projection, else 1).

    >>> layout = GroupLayout(dim=0, groups=2, width=2, blocks=3)  # 2 heads of dim 2 in a packed (12, 5) q/k/v weight
    >>> layout.grouped(torch.arange(60.).view(12, 5)).shape
    torch.Size([2, 30])
    >>> layout.expand(torch.tensor([1., 0.]), (12, 5))[:, 0].tolist()
    [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    """

    dim: int
    groups: int
    width: int = 1
    blocks: int = 1

    def check(self, shape: torch.Size | tuple[int, ...], name: str) -> None:
        """Raise a clear ``ValueError`` when a tensor of ``shape`` does not split into these groups."""
        if len(shape) <= self.dim or shape[self.dim] != self.groups * self.width * self.blocks:
            raise ValueError(
                f"{name!r} of shape {tuple(shape)} does not split into {self.groups} groups of width {self.width} "
                f"in {self.blocks} block(s) along dim {self.dim}; check `num_heads` or the structure chosen for it."
            )

    def grouped(self, tensor: Tensor) -> Tensor:
        """``tensor`` as a ``(groups, entries per group)`` matrix (a copy when the layout needs one)."""
        moved = tensor.movedim(self.dim, 0)
        rest = moved.shape[1:]
        split = moved.reshape(self.blocks, self.groups, self.width, *rest).movedim(1, 0)
        return split.reshape(self.groups, -1)

    def expand(self, scale: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """A per-group ``scale`` (shape ``(groups,)``) broadcast to a tensor of ``shape``."""
        if (self.blocks, self.width) == (1, 1):  # one slice per group: the scale as it is (no view ops to backprop)
            along = scale
        else:
            along = scale.view(1, self.groups, 1).expand(self.blocks, self.groups, self.width).reshape(-1)
        if len(shape) == 1:
            return along
        view = [1] * len(shape)
        view[self.dim] = along.numel()
        return along.view(view)

    def entries(self, shape: torch.Size | tuple[int, ...]) -> int:
        """Entries per group of a tensor of ``shape``."""
        total = 1
        for size in shape:
            total *= size
        return total // self.groups

    def encode(self, role: int) -> Tensor:
        """The layout as a small int64 tensor (kept in state dicts so that they collapse without the model)."""
        return torch.tensor([self.dim, self.groups, self.width, self.blocks, role], dtype=torch.int64)

    @classmethod
    def decode(cls, code: Tensor) -> tuple[GroupLayout, int]:
        """Inverse of :meth:`encode`: ``(layout, role)``."""
        dim, groups, width, blocks, role = (int(v) for v in code.tolist())
        return cls(dim, groups, width, blocks), role
