"""The factors' learning rate: per-tensor multipliers (``FactorLRConfig.multiplier``, ``"auto"``), their warm-up,
and the check of the factor LR against the floor needed for exact zeros and the stability limit (method doc §3.2)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_dwf.config import FactorLRConfig
from lightning_dwf.core.factorize import FactorizedTensor, sparse_tensors
from lightning_dwf.core.functional import auto_gated_lr_multiplier, auto_lr_multiplier, lam_to_weight_decay, lr_floor
from lightning_dwf.core.gating import GatedTensor
from lightning_dwf.core.sharding import root_mean_square
from lightning_dwf.training.penalty import FactorPenalty, effective_lr, penalty_kind, sign_flip, unwrap_optimizer


@torch.no_grad()
def plan_multipliers(module: nn.Module, config: FactorLRConfig, depth: int, penalty: FactorPenalty) -> dict[str, float]:
    """Each factorized tensor's factor LR multiplier after the warm-up: ``config.multiplier``, or with ``"auto"``
    :func:`~lightning_dwf.core.functional.auto_lr_multiplier` of its weights' RMS and its optimizer family
    (``penalty`` must be bound to the optimizers)."""
    out = {}
    for tensor in sparse_tensors(module):
        if config.multiplier != "auto":
            out[tensor.name] = float(config.multiplier)
            continue
        kind = penalty.kind_of(tensor.factors[0])
        if isinstance(tensor, GatedTensor):
            norm = float((tensor.unit_magnitudes().pow(2).mean() * tensor.entries).sqrt())
            out[tensor.name] = auto_gated_lr_multiplier(norm, depth, kind)
            continue
        rms = root_mean_square(tensor.product().float())
        out[tensor.name] = auto_lr_multiplier(rms, depth, kind)
    return out


def apply_multipliers(penalty: FactorPenalty, tensors: Sequence[FactorizedTensor | GatedTensor],
                      multipliers: dict[str, float], step: int, start: int, total: float, warmup: float) -> None:
    """Put each tensor's multiplier, ramped by the warm-up that began at step ``start``
    (:func:`warmup_multiplier`), into ``penalty`` for every factor of the tensor (``tensors``: the model's
    :func:`~lightning_dwf.core.factorize.sparse_tensors`, found once per fit: the ramp moves at every step)."""
    for tensor in tensors:
        m = warmup_multiplier(step, start, total, warmup, multipliers.get(tensor.name, 1.0))
        for factor in tensor.factors:
            penalty.multipliers[id(factor)] = m


def factor_learning_rates(
    optimizers: Sequence[Any], factors: Sequence[nn.Parameter], lr_multiplier: float = 1.0
) -> list[tuple[str, Optimizer, float]]:
    """``(description, optimizer, effective peak LR)`` of every param group holding factors (:func:`effective_lr`)."""
    ids = {id(p) for p in factors}
    out = []
    for i, opt in enumerate(map(unwrap_optimizer, optimizers)):
        for j, group in enumerate(opt.param_groups):
            if any(id(p) in ids for p in group["params"]):
                out.append((f"{type(opt).__name__} (optimizer {i}, group {j})", opt, effective_lr(opt, group,
                                                                                                   lr_multiplier)))
    return out


@dataclass(frozen=True)
class LearningRateCheck:
    """Outcome of :func:`check_learning_rates`: ``errors`` make training pointless, ``warnings`` predict few zeros or
    lost accuracy."""

    errors: list[str]
    warnings: list[str]
    floor: float


def check_learning_rates(
    optimizers: Sequence[Any],
    factors: Sequence[nn.Parameter],
    lam: float,
    depth: int,
    steps: int,
    init_std: float,
    threshold: float,
    lr_multiplier: float = 1.0,
    max_lr_multiplier: float | None = None,
) -> LearningRateCheck:
    """Check each factor group's peak LR against the floor and the stability limit (method doc §3.2).

    * Floor (gradient penalty, SGD-type): an unsupported weight reaches ``threshold`` within ``steps`` only if
      ``η0 ≥ ln(init_std/threshold)/(λ·steps)`` (cosine decay; a constant LR gets there twice as fast). Not checked
      under the decoupled penalty: there the callback's proximal step zeroes a weight once it falls below
      :func:`~lightning_dwf.core.functional.prox_threshold`, far above ``threshold``.
    * Stability (every optimizer): ``2·η·λ/D ≥ 1`` makes the penalty step alone overshoot zero every step; under the
      decoupled penalty ``2·η·λ/D × multiplier ≥ 1``, since the multiplier scales the shrink with the whole update.

    η is the effective LR of :func:`effective_lr`.

    Args:
        optimizers: the optimizers (or LightningOptimizers). factors: the factor Parameters.
        lam: λ (mean-loss units). depth: D. steps: optimizer steps left in the run.
        init_std: typical magnitude of the collapsed weights now. threshold: zero threshold.
        lr_multiplier: the (smallest) factor LR multiplier in use, for the floor.
        max_lr_multiplier: the largest one, for the stability limit (default ``lr_multiplier``).
    """
    floor = lr_floor(lam, steps, init_std, threshold)
    errors: list[str] = []
    warns: list[str] = []
    top = max_lr_multiplier or lr_multiplier
    coef = lam_to_weight_decay(lam, depth)
    for (where, opt, eta), (*_, eta_max) in zip(factor_learning_rates(optimizers, factors, lr_multiplier),
                                                 factor_learning_rates(optimizers, factors, top), strict=True):
        flip = sign_flip(coef, eta_max, top, penalty_kind(opt))
        if lam > 0 and flip >= 1:
            errors.append(
                f"{where}: effective factor lr {eta_max:.3g} × 2λ/D"
                + (f" × multiplier {top:g}" if flip > coef * eta_max else "")
                + f" = {flip:.3g} >= 1, so the penalty step alone flips the factors' sign every step. Lower the lr or "
                f"lam by a factor of more than {flip:.3g}."
            )
            continue
        if penalty_kind(opt) == "decoupled":
            continue  # fixed λ: the proximal step after each step makes the zeros (FactorPenalty.proximal_thresholds)
        if math.isfinite(floor) and eta < floor:
            warns.append(
                f"{where}: effective factor lr {eta:.3g} is below the floor "
                f"{floor:.3g} = ln({init_std:.3g}/{threshold:.3g})/(λ={lam:.3g} × "
                f"{steps} steps) needed for unsupported weights to reach the zero threshold, so the collapsed model "
                f"will have few exact zeros. Raise the lr (or FactorLRConfig.multiplier) to >= {floor:.3g}, raise lam, "
                f"or train {floor / eta:.1f}× longer."
            )
    return LearningRateCheck(errors, warns, floor)


def warmup_multiplier(step: int, start: int, total: float, warmup: float, multiplier: float) -> float:
    """The factor LR multiplier after ``step`` optimizer steps of a linear ramp from 1 that began at step ``start``.

    The ramp lasts ``warmup · total`` steps and ends at ``multiplier``; an open-ended run (``total`` infinite) or
    ``warmup = 0`` gets the full multiplier at once. A function of the step only, so resuming is exact.

    >>> warmup_multiplier(step=50, start=0, total=1000, warmup=0.1, multiplier=10.0)
    5.5
    """
    return 1.0 + (multiplier - 1.0) * warmup_progress(step, start, total, warmup)


def warmup_progress(step: int, start: int, total: float, warmup: float) -> float:
    """How far the ramp of :func:`warmup_multiplier` is after ``step`` steps (1: done; it sets every multiplier)."""
    if not warmup:
        return 1.0
    progress = (step - start) / (warmup * total) if math.isfinite(total) else 1.0
    return min(1.0, progress)
