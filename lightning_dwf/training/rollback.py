"""Keeping the last finite training state, so that a run whose weights go non-finite can step back instead of ending.

DWF's factors train with large effective learning rates (the product of D factors moves like ``|w|^(2−2/D)`` times
the factor step), so a loss spike can still throw a large weight's factors to Inf. :class:`TrainingSnapshot` holds a
copy of the module's state and the optimizers' state from the last step at which every weight was finite; the
callback restores it and halves the factors' step (``FactorLRConfig.rollbacks``). The copy lives on the weights'
device and costs one model plus one optimizer state of memory.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "_optimizer", optimizer)


class TrainingSnapshot:
    """The module's and the optimizers' state at one optimizer step (``step``: -1 while empty)."""

    def __init__(self) -> None:
        self.step = -1
        self._module: dict[str, torch.Tensor] = {}
        self._optimizers: list[dict[str, Any]] = []

    @torch.no_grad()
    def take(self, module: nn.Module, optimizers: Sequence[Any], step: int) -> None:
        """Copy the state of ``module`` and ``optimizers`` after ``step`` optimizer steps (call only when finite)."""
        self._module = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self._optimizers = [copy.deepcopy(_unwrap(opt).state_dict()) for opt in optimizers]
        self.step = step

    @torch.no_grad()
    def restore(self, module: nn.Module, optimizers: Sequence[Any]) -> None:
        """Put the copied state back; the optimizers keep their current learning rates (the schedulers own them)."""
        if self.step < 0:
            raise RuntimeError("TrainingSnapshot.restore() before take().")
        module.load_state_dict(self._module)
        for opt, state in zip(map(_unwrap, optimizers), self._optimizers, strict=True):
            lrs = [group["lr"] for group in opt.param_groups]
            opt.load_state_dict(copy.deepcopy(state))
            for group, lr in zip(opt.param_groups, lrs, strict=True):
                group["lr"] = lr
