"""Keeping the last finite training state, so that a run whose weights go non-finite can step back instead of ending.

DWF's factors train with large effective learning rates (the product of D factors moves like ``|w|^(2−2/D)`` times
the factor step), so a loss spike can still throw a large weight's factors to Inf. :class:`TrainingSnapshot` holds a
copy of the module's state and the optimizers' state from the last step at which every weight was finite; the
callback restores it and halves the factors' step (``FactorLRConfig.rollbacks``). The copy lives on the weights'
device and costs one model plus one optimizer state of memory.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_dwf.core.sharding import full_tensor
from lightning_dwf.errors import DWFDivergenceError, divergence_message, rollback_message
from lightning_dwf.training.penalty import unwrap_optimizer


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
        self._optimizers = [copy.deepcopy(unwrap_optimizer(opt).state_dict()) for opt in optimizers]
        self.step = step

    @torch.no_grad()
    def restore(self, module: nn.Module, optimizers: Sequence[Any]) -> None:
        """Put the copied state back; the optimizers keep their current learning rates (the schedulers own them)."""
        if self.step < 0:
            raise RuntimeError("TrainingSnapshot.restore() before take().")
        module.load_state_dict(self._module)
        for opt, state in zip(map(unwrap_optimizer, optimizers), self._optimizers, strict=True):
            lrs = [group["lr"] for group in opt.param_groups]
            opt.load_state_dict(copy.deepcopy(state))
            for group, lr in zip(opt.param_groups, lrs, strict=True):
                group["lr"] = lr


class Rollback:
    """Steps a run whose weights went non-finite back to its last finite state, with the factors' step halved, at most
    ``allowed`` times (``FactorLRConfig.rollbacks``); then it raises :class:`~lightning_dwf.DWFDivergenceError`.

    Attributes:
        count: rollbacks so far. scale: the factors' step multiplier left by them (``0.5 ** count``).
    """

    def __init__(self, allowed: int) -> None:
        self.allowed = allowed
        self.count = 0
        self.scale = 1.0
        self.snapshot = TrainingSnapshot()

    def take(self, module: nn.Module, optimizers: Sequence[Any], step: int) -> None:
        """Keep the state after ``step`` optimizer steps as the one to go back to (when rollbacks are allowed)."""
        if self.allowed:
            self.snapshot.take(module, optimizers, step)

    def recover(self, module: nn.Module, optimizers: Sequence[Any], step: int, depth: int,
                warn: Callable[[str], None], info: Callable[[str], None]) -> bool:
        """If a weight of ``module`` is non-finite, restore the last finite state, halve :attr:`scale` and return True;
        False when every weight is finite. Every rank holds the same factors, so every rank decides alike.

        Raises:
            DWFDivergenceError: no rollback is left, or there is no finite state to go back to.
        """
        bad = [name for name, p in module.named_parameters() if int(full_tensor((~torch.isfinite(p)).sum()))]
        if not bad:
            return False
        if self.count >= self.allowed or self.snapshot.step < 0:
            lrs = sorted({float(g["lr"]) for opt in optimizers for g in unwrap_optimizer(opt).param_groups})
            raise DWFDivergenceError(divergence_message(bad, step, lrs, depth))
        self.snapshot.restore(module, optimizers)
        self.count += 1
        self.scale *= 0.5
        if self.count == 1:
            warn(rollback_message(bad, step, self.snapshot.step, self.scale, self.allowed - self.count))
        else:
            info(f"DWFCallback: step {step}: non-finite weights again; rolled back to step {self.snapshot.step}, "
                 f"factor step ×{self.scale:g}.")
        return True
