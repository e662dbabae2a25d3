"""A short end-to-end fine-tune of a decomposed module in plain PyTorch, with the user's optimizer or Adam.

The factors ``U``, ``V`` are ordinary Parameters whose masks and grid hold in every forward (see
:class:`~lightning_dwf.decompose.LowRankProduct`), so any optimizer keeps the decomposition's sparsity and grid.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dwf._validation import check_int, check_positive
from lightning_dwf.decompose.parametrization import decomposed_tensors

__all__ = ["DEFAULT_FINETUNE_LR", "OptimizerLike", "finetune_"]

#: Learning rate of the default Adam of :func:`finetune_` (e.g. for a model trained at 1e-3).
DEFAULT_FINETUNE_LR = 1e-4

#: An optimizer over the module's parameters, or a factory ``params -> Optimizer``.
OptimizerLike = torch.optim.Optimizer | Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def _optimizer_for(
    params: list[nn.Parameter], factors: list[nn.Parameter], optimizer: OptimizerLike | None, lr: float | None
) -> torch.optim.Optimizer:
    """The optimizer to step: Adam over ``params`` at ``lr``, or the user's, checked to hold some of ``params`` and,
    where some factors are trainable, some of those (one built before ``decompose_`` holds the replaced weights)."""
    if optimizer is None:
        lr = check_positive("lr", DEFAULT_FINETUNE_LR if lr is None else lr, " E.g. lr=1e-4.")
        return torch.optim.Adam(params, lr=lr)
    if lr is not None:
        raise ValueError("Give either `optimizer` or `lr`, not both: `lr` is the learning rate of the default Adam; "
                         "set the learning rate in your optimizer (e.g. torch.optim.SGD(params, lr=...)).")
    if not isinstance(optimizer, torch.optim.Optimizer):
        if not callable(optimizer):
            raise TypeError(f"`optimizer` must be a torch.optim.Optimizer over the module's parameters or a callable "
                            f"params -> Optimizer, got {type(optimizer).__name__}.")
        optimizer = optimizer(params)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"The `optimizer` callable must return a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}.")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable_factors = [p for p in factors if p.requires_grad]
    for what, wanted in (("trainable parameters", params), ("trainable factors U, V", trainable_factors)):
        if wanted and not any(id(p) in held for p in wanted):
            raise ValueError(f"`optimizer` holds none of the module's {what} (was it built before `decompose_`, "
                             "which replaces each weight by its factors U, V?). Build it after decompose_ over "
                             "module.parameters(), e.g. torch.optim.SGD(module.parameters(), lr=1e-3), or pass a "
                             "callable: optimizer=lambda params: torch.optim.SGD(params, lr=1e-3).")
    return optimizer


def finetune_(
    module: nn.Module,
    data_loader: Iterable[Any],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    optimizer: OptimizerLike | None = None,
    *,
    epochs: int = 1,
    lr: float | None = None,
    max_steps: int | None = None,
) -> list[float]:
    """A short end-to-end fine-tune of a decomposed module, in place (plain PyTorch).

    Trains the parameters ``optimizer`` holds: by default every parameter that requires grad, i.e. the factors
    ``U``, ``V`` of each decomposed layer (their masks and grid hold in the forward, see :class:`LowRankProduct`)
    and the rest (biases, layers left dense). The default is Adam because its per-parameter normalization copes
    with the very different gradient scales of ``U``, ``V`` and dense layers without tuning; pruned factor entries
    get exactly zero gradient, so no optimizer moves them through the loss.

    Args:
        module: the model (trained in place; its train/eval mode is restored afterwards).
        data_loader: yields ``(inputs, targets)`` batches; they are moved to the module's device.
        loss_fn: ``loss_fn(module(inputs), targets)`` → scalar (a batch mean, e.g. ``nn.functional.cross_entropy``).
        optimizer: a ``torch.optim.Optimizer`` built over the module's parameters AFTER :func:`decompose_` (it must
            hold some of its trainable parameters and factors), or a callable ``params -> Optimizer`` given the
            trainable parameters. ``None`` (default): ``torch.optim.Adam(params, lr=lr)``.
        epochs: passes over ``data_loader`` (>= 1).
        lr: the default Adam's learning rate (``None``: 1e-4, e.g. for a model trained at 1e-3); an error together
            with ``optimizer``, which carries its own.
        max_steps: stop after this many optimizer steps in total (``None``: no limit).

    Returns:
        The mean training loss of each epoch.

    Raises:
        ValueError: ``optimizer`` together with ``lr``; ``optimizer`` holds none of the module's trainable
            parameters, or none of its trainable factors; the module has none; a bad ``epochs``, ``lr`` or
            ``max_steps``.

    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Linear(8, 2))
    >>> data = [(torch.randn(4, 8), torch.randint(0, 2, (4,))) for _ in range(3)]
    >>> sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> len(finetune_(model, data, nn.functional.cross_entropy, sgd, epochs=2))
    2
    """
    check_int("epochs", epochs, 1, " E.g. epochs=1.")
    if max_steps is not None:
        check_int("max_steps", max_steps, 1)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("`module` has no parameter that requires grad: nothing to fine-tune.")
    device = params[0].device
    factors = [f for t in decomposed_tensors(module) for f in (t.u, t.v)]
    optimizer = _optimizer_for(params, factors, optimizer, lr)
    was_training = module.training
    module.train()
    losses: list[float] = []
    steps = 0
    try:
        for _ in range(epochs):
            total, batches = 0.0, 0
            for inputs, targets in data_loader:
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(module(inputs.to(device)), targets.to(device))
                loss.backward()
                optimizer.step()
                total, batches, steps = total + float(loss.detach()), batches + 1, steps + 1
                if max_steps is not None and steps >= max_steps:
                    break
            losses.append(total / max(batches, 1))
            if max_steps is not None and steps >= max_steps:
                break
    finally:
        module.train(was_training)
    return losses
