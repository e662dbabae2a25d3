"""Sharded (DTensor) factors: FSDP2's ``fully_shard`` and tensor parallelism turn each factor into a ``DTensor``.

Elementwise math (the product, the penalty, the proximal step's comparison) works on DTensors as it is, shard by shard.
Three things do not: ``nonzero``/``index_put_`` (the support's in-place zeroing, which needs plain local tensors),
global selections (the target cut's top-k, which must see every rank's magnitudes so that every rank keeps the same
weights) and Python numbers from reductions (``float(w.sum())`` of a DTensor is this rank's partial sum, silently:
take ``float(full_tensor(w.sum()))``). These helpers do exactly those three, and are the identity on plain tensors, so
the single-device and DDP paths run unchanged.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence

from torch import Tensor, nn

__all__ = ["SHARD_FIRST_FIX", "check_not_sharded", "full_tensor", "global_count", "global_sum", "is_sharded",
           "local_shard", "local_tensor", "root_mean_square", "sharded_parameter_names"]

#: How to factorize a model that is sharded (quoted by every error about it).
SHARD_FIRST_FIX = (
    "Factorize before sharding: in `configure_model`, call `lightning_dwf.factorize_(module, depth, config)` first and "
    "`fully_shard(...)` after it (docs/guides/distributed.md, 'Sharded training')."
)


def is_sharded(tensor: object) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a factor of a model sharded by ``fully_shard`` or tensor parallelism).

    Imports nothing: while ``torch.distributed.tensor`` is not imported, no tensor can be a DTensor (so that
    ``import lightning_dwf`` does not pay for it).
    """
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(tensor, dtensor.DTensor)


def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's shard of ``tensor`` as a plain tensor sharing its storage (``tensor`` itself when not sharded).

    In-place writes to the result (under ``torch.no_grad()``) change the sharded tensor.
    """
    return tensor.to_local() if is_sharded(tensor) else tensor


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor on every rank (a collective: call it on every rank); ``tensor`` itself when not sharded."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local_shard(full: Tensor, like: Tensor) -> Tensor:
    """The part of ``full`` (a plain tensor of ``like``'s global shape, equal on every rank) that this rank holds of
    ``like``, as a plain tensor; ``full`` itself when ``like`` is not sharded. No communication."""
    if not is_sharded(like):
        return full
    if is_sharded(full):
        return full.to_local()
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None).to_local()


def global_count(mask: Tensor) -> int:
    """The number of True entries of ``mask`` over all ranks (a collective when ``mask`` is sharded). On a plain
    tensor ``count_nonzero``: torch's CPU ``sum`` of a bool tensor is about 18× slower (measured here)."""
    return int(full_tensor(mask.sum())) if is_sharded(mask) else int(mask.count_nonzero())


def global_sum(counts: Sequence[Tensor]) -> int:
    """The sum of integer scalar tensors (e.g. ``mask.sum()`` of several masks) over all ranks, with one reduction per
    device mesh when some are sharded (a collective then: call it on every rank with the same tensors)."""
    total = 0
    groups: dict[int, Tensor] = {}
    for count in counts:
        if is_sharded(count):
            key = id(count.device_mesh)
            groups[key] = groups[key] + count if key in groups else count  # partial sums add up without communication
        else:
            total += int(count)
    return total + sum(int(full_tensor(group)) for group in groups.values())


def root_mean_square(tensor: Tensor) -> float:
    """``sqrt(mean(tensor²))`` over all ranks when ``tensor`` is sharded (a collective then), else computed exactly as
    ``float(tensor.pow(2).mean().sqrt())``."""
    if is_sharded(tensor):  # from the sum: a DTensor's mean of unevenly split shards would average the shards' means
        return math.sqrt(float(full_tensor(tensor.pow(2).sum())) / tensor.numel())
    return float(tensor.pow(2).mean().sqrt())


def sharded_parameter_names(module: nn.Module) -> list[str]:
    """Qualified names of the parameters of ``module`` that are sharded (DTensors)."""
    return [name for name, p in module.named_parameters() if is_sharded(p)]


def check_not_sharded(targets: Iterable[tuple[str, nn.Module, str]]) -> None:
    """Refuse to factorize tensors that are already sharded.

    New factors registered on a sharded module would be unknown to FSDP: their gradients would never be reduced and
    the ranks would drift apart without an error.

    Args:
        targets: ``(qualified_name, module, param_name)`` as :func:`~lightning_dwf.core.factorize.select_tensors`
            returns them.

    Raises:
        ValueError: naming the sharded tensors and the fix.
    """
    sharded = [name for name, mod, pname in targets if is_sharded(mod._parameters.get(pname))]
    if sharded:
        raise ValueError(
            f"Cannot factorize {sharded[:5]}{' …' if len(sharded) > 5 else ''}: the module is already sharded "
            f"(its weights are DTensors, e.g. after `fully_shard`). {SHARD_FIRST_FIX}"
        )

