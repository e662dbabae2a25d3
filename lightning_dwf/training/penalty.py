"""Applying the DWF penalty inside any optimizer, and checking the factors' learning rate.

:class:`FactorPenalty` applies the factor penalty ``(λ/D)·Σ_d ||ω_d||²`` right before each optimizer step, after AMP
unscaling and before gradient clipping, so it acts once per optimizer step whatever optimizer, parameter groups and
schedulers the user built. It never changes the param-group layout, so LR schedulers keep driving the factors and
optimizer and scheduler state resume as usual. How the penalty enters the step depends on the optimizer family
(:func:`penalty_kind`):

* ``"gradient"`` (SGD, ASGD: steps proportional to the gradient): ``2λ/D · ω_d`` is added to the gradient. Gradient
  descent then minimizes ``loss + λ·Σ|w|^(2/D)``, the DWF objective, exactly.
* ``"decoupled"`` (Adam, AdamW, Adamax, NAdam, RAdam, RMSprop, Adagrad, Adadelta and any optimizer not listed): each
  factor is shrunk by ``ω_d ← ω_d·(1 − lr·2λ/D)`` before the step, outside the optimizer's per-coordinate
  normalization. Passed through Adam's preconditioner, the penalty gradient of a small weight would be normalized to a
  step as large as a big weight's, so a layer whose weights are small (in scale, not in importance) would be emptied
  first. Decoupled, every factor loses the same fraction per step and only the loss gradient, normalized as the
  optimizer does it, holds it up. A factor without loss gradient shrinks as under SGD, so the LR floor and the
  stability limit read the same with ``η = lr``. Under Adam this is AdamW-style decay of the *factors*: the collapsed
  weights then feel a shrinkage that grows like ``|w|^(1−2/D)`` relative to their size, the sparsifying L_{2/D}
  shape, but the stationary points are those of the preconditioned problem, not of ``loss + λ·Σ|w|^(2/D)`` itself.
  λ has different units there (a fraction per unit LR): typical values are ~1e2-1e3 × SGD's. Adam's normalized
  step holds every weight with a consistent gradient at a size set by λ and that gradient's signal-to-noise ratio,
  never at zero, so with a fixed λ :class:`~lightning_dwf.DWFCallback` follows each step with the proximal step of
  ``λ·|w|^(2/D)`` on the collapsed weights: those below
  :func:`~lightning_dwf.core.functional.prox_threshold` of ``lr × multiplier`` become exact zeros
  (:meth:`FactorPenalty.proximal_thresholds`). In target mode the cut sets the support instead.

The user's own ``weight_decay`` on the factors is neutralized (the factors get exactly λ, no double penalty):
coupled decay (SGD, Adam, RMSprop, …: ``grad += wd·p``) by subtracting ``wd·ω`` (after the shrink, of the factors the
optimizer then sees); decoupled decay (AdamW, or ``decoupled_weight_decay=True``: ``p *= 1 − lr·wd``) by scaling ω by
``1/(1 − lr·wd)`` before the step.

A factor LR multiplier ``m`` scales the factor's whole update of the step, from its values before
:meth:`FactorPenalty.before_step` to those after the optimizer's step: the decoupled shrink (taken at ``lr × m``) and
the neutralized decay included. So under the decoupled penalty a factor with multiplier ``m`` steps as the optimizer
at ``m × lr`` with decoupled decay ``m·2λ/D``, and the neutralization stays exact. That holds whichever way the step
is called: Lightning's 32-bit and bfloat16 steps run the step pre-hook first and :meth:`~FactorPenalty.before_step`
inside the optimizer's closure; a plain loop and 16-bit AMP with a gradient scaler call ``before_step`` first (until
2026-12-07 those two took the update from the values after it: an ``m`` times weaker shrink, and a decoupled decay
kept at ``(m − 1)·lr·wd`` per step), and there the changes of the factors themselves wait for the step's pre-hook, so
that a step the scaler skips after a non-finite gradient changes no factor (until 2026-12-07 it kept its shrink).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_dwf.core.factorize import sparse_tensors
from lightning_dwf.core.functional import DEFAULT_THRESHOLD, lam_to_weight_decay, prox_threshold
from lightning_dwf.core.gating import GatedTensor
from lightning_dwf.core.sharding import is_sharded
from lightning_dwf.training.step_cap import StepCap

#: Optimizers whose ``weight_decay`` adds ``wd·p`` to the gradient (unless ``decoupled_weight_decay``).
COUPLED_DECAY_OPTIMIZERS: tuple[type[Optimizer], ...] = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam,
    torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adadelta, torch.optim.ASGD,
)
#: Optimizers whose step is proportional to the gradient: the penalty is added to the gradient (the DWF objective).
GRADIENT_PENALTY_OPTIMIZERS: tuple[type[Optimizer], ...] = (torch.optim.SGD, torch.optim.ASGD)


def unwrap_optimizer(optimizer: Any) -> Optimizer:
    """The torch optimizer behind a ``LightningOptimizer`` (or the optimizer itself)."""
    return getattr(optimizer, "_optimizer", optimizer)


def decay_kind(optimizer: Optimizer, group: dict[str, Any]) -> str:
    """``"coupled"``, ``"decoupled"`` or ``"unknown"``: how ``optimizer`` applies ``weight_decay``."""
    if group.get("decoupled_weight_decay", False) or isinstance(optimizer, torch.optim.AdamW):
        return "decoupled"
    if isinstance(optimizer, COUPLED_DECAY_OPTIMIZERS):
        return "coupled"
    return "unknown"


def peak_lr(group: dict[str, Any]) -> float:
    """The largest learning rate a group's schedule starts from or aims for (lr, initial_lr, max_lr)."""
    values = [group.get(k) for k in ("lr", "initial_lr", "max_lr")]
    return max(float(v) for v in values if isinstance(v, (int, float)) or torch.is_tensor(v))


def penalty_kind(optimizer: Optimizer) -> str:
    """``"gradient"`` (the penalty gradient joins the loss gradient) for SGD-type optimizers, ``"decoupled"`` (the
    factors are shrunk outside the optimizer's normalization) for adaptive and unknown ones (module docstring)."""
    return "gradient" if isinstance(unwrap_optimizer(optimizer), GRADIENT_PENALTY_OPTIMIZERS) else "decoupled"


def effective_lr(optimizer: Optimizer, group: dict[str, Any], lr_multiplier: float = 1.0) -> float:
    """The step size the penalty sees in a group: ``peak lr × multiplier``, divided by ``1 − momentum`` when the
    penalty goes through the gradient (heavy-ball momentum μ multiplies the step of a slowly varying gradient, such as
    the penalty's, by ``1/(1 − μ)``)."""
    eta = peak_lr(group) * lr_multiplier
    if penalty_kind(optimizer) == "gradient":
        eta /= 1.0 - float(group.get("momentum", 0.0) or 0.0)
    return eta


def sign_flip(coef: float, eta: float, multiplier: float, penalty: str) -> float:
    """The fraction of a factor the penalty step alone takes per step: ``2λ/D × η`` (``coef × eta``), and under the
    decoupled penalty times the multiplier once more, since the multiplier scales the shrink (taken at ``lr ×
    multiplier``) with the step's whole update. At 1 or more the penalty flips the factors' sign every step: the train
    start check (:func:`~lightning_dwf.training.factor_lr.check_learning_rates`) refuses it, the step raises."""
    return coef * eta * (max(multiplier, 1.0) if penalty == "decoupled" else 1.0)


#: One param group's penalty step: its factors by the scale they get, and by the multiple of themselves added to
#: their gradients (:func:`_apply_penalty`).
_GroupStep = tuple[dict[float, list[nn.Parameter]], dict[float, list[nn.Parameter]]]


@dataclass
class _GroupPlan:
    optimizer: Optimizer
    index: int  # of the param group in ``optimizer.param_groups``
    params: list[nn.Parameter]
    kind: str  # how the optimizer applies the user's weight_decay (decay_kind)
    penalty: str  # how the DWF penalty is applied (penalty_kind)

    @property
    def group(self) -> dict[str, Any]:
        """The param group now: looked up at every use, since ``optimizer.load_state_dict`` (a resume restoring the
        scheduled LR) replaces the group dicts after the penalty was bound."""
        return self.optimizer.param_groups[self.index]


class FactorPenalty:
    """Apply the DWF penalty (and an optional factor LR multiplier) to the factors inside optimizers.

    Usage without Lightning::

        penalty = FactorPenalty(factor_parameters(model), lam=1e-3, depth=3)
        penalty.bind([optimizer])
        ...
        loss.backward()
        penalty.before_step(optimizer)   # after unscaling, before clipping
        optimizer.step()

    Args:
        factors: the factor Parameters (:func:`lightning_dwf.factor_parameters`).
        lam: λ in mean-loss units; may be changed between steps (``penalty.lam = ...``).
        depth: D.
        lr_multiplier: the factors' updates (from their values before :meth:`before_step` to those after the step:
            the decoupled shrink included, module docstring) are scaled by this, which equals multiplying their
            learning rate for every optimizer whose update is linear in the LR (SGD, Adam, …). It may be changed
            between steps (the callback ramps it, and lowers it after a non-finite step).
    """

    def __init__(self, factors: Sequence[nn.Parameter], lam: float, depth: int, lr_multiplier: float = 1.0) -> None:
        self.factors = list(factors)
        self.lam = lam
        self.depth = depth
        self.lr_multiplier = lr_multiplier
        #: per-factor multipliers on top of ``lr_multiplier`` (by ``id`` of the Parameter; absent: 1).
        self.multipliers: dict[int, float] = {}
        #: per-factor factors on λ (by ``id`` of the Parameter; absent: 1): a regime's per-layer λ, for the penalty and
        #: the proximal thresholds.
        self.lam_scales: dict[int, float] = {}
        #: factors (by ``id``) that get no penalty at the next steps (a layer the fixed-λ guard holds at its minimum);
        #: their proximal thresholds are still given, so the guard can decide again.
        self.exempt: set[int] = set()
        self._plans: dict[int, list[_GroupPlan]] = {}
        self._plan_of: dict[int, _GroupPlan] = {}  # by id of the factor
        self._snapshots: dict[int, list[tuple[nn.Parameter, float, torch.Tensor]]] = {}
        self._hooked: set[int] = set()  # optimizers (by id) whose snapshot of this step the step pre-hook took
        #: by id of the optimizer: the factor scalings and gradient changes :meth:`before_step` left to the step
        #: pre-hook (a plain loop, 16-bit AMP with a scaler)
        self._pending: dict[int, list[_GroupStep]] = {}
        self._buffers: dict[int, torch.Tensor] = {}  # by id of the factor: its values before the step
        self._scaled_candidates: dict[int, list[nn.Parameter]] = {}  # by id of the optimizer: its factors
        self._hooks: list[Any] = []
        #: the per-weight step cap of SGD-type factors (:meth:`cap_steps`; None: off)
        self.step_cap: StepCap | None = None
        #: first factors that train as dense weights (:meth:`train_densely`: multiplier ``lr_multiplier`` only), and
        #: the factors that no longer train (their gradient is dropped before each step), by ``id``
        self.dense: set[int] = set()
        self.frozen: set[int] = set()
        self._unfreeze: list[nn.Parameter] = []  # factors whose requires_grad train_densely turned off (unbind: on)

    def bind(self, optimizers: Sequence[Any]) -> None:
        """Find the factors in ``optimizers``' param groups and check how their weight decay works.

        Raises:
            ValueError: if a factor is in no optimizer or in two, or an optimizer of unknown weight-decay
                semantics applies ``weight_decay`` to factors.
        """
        self.unbind()
        factor_ids = {id(p): p for p in self.factors}
        owner: dict[int, str] = {}
        for i, opt in enumerate(map(unwrap_optimizer, optimizers)):
            plans = []
            for j, group in enumerate(opt.param_groups):
                params = [p for p in group["params"] if id(p) in factor_ids]
                if not params:
                    continue
                for p in params:
                    if id(p) in owner:
                        raise ValueError(f"A DWF factor is in two optimizers ({owner[id(p)]} and optimizer {i}); "
                                         "give each factor to one optimizer.")
                    owner[id(p)] = f"optimizer {i}"
                kind = decay_kind(opt, group)
                if kind == "unknown" and group.get("weight_decay", 0):
                    raise ValueError(
                        f"{type(opt).__name__} (param group {j}) applies weight_decay={group['weight_decay']} to DWF "
                        "factors and lightning_dwf cannot tell whether it is coupled or decoupled. Put the factors "
                        "(lightning_dwf.factor_parameters(model)) in a param group with weight_decay=0; DWF applies "
                        "λ itself."
                    )
                plans.append(_GroupPlan(opt, j, params, kind, penalty_kind(opt)))
                self._plan_of.update((id(p), plans[-1]) for p in params)
            if plans:
                self._plans[id(opt)] = plans
                self._scaled_candidates[id(opt)] = [p for plan in plans for p in plan.params]
                self._hooks.append(opt.register_step_pre_hook(self._snapshot))
                self._hooks.append(opt.register_step_post_hook(self._scale_update))
        missing = [p for p in self.factors if id(p) not in owner and p.requires_grad]
        if missing:
            raise ValueError(
                f"{len(missing)} DWF factor Parameters are in no optimizer, so they would never train or shrink. "
                "Build the optimizer from self.parameters() (or include lightning_dwf.factor_parameters(self))."
            )

    def cap_steps(self, tensors: Sequence[Sequence[nn.Parameter]], cap: float | None) -> None:
        """Cap each weight's step (after :meth:`bind`; :mod:`~lightning_dwf.training.step_cap`): for every tensor given
        as its D factors under an SGD-type optimizer, no weight moves more than ``cap`` times as far per step as a
        dense weight at the optimizer's LR. Adam-type optimizers normalize the step, and tensors of other optimizers
        are left alone. ``cap=None``: off."""
        sgd = [factors for factors in tensors if factors and self.kind_of(factors[0]) == "gradient"]
        self.step_cap = StepCap(cap, sgd) if cap is not None and sgd else None

    def train_densely(self, tensors: Sequence[Sequence[nn.Parameter]], reset: bool) -> None:
        """From now on (after :meth:`bind`), each tensor given as its D factors trains as a dense weight held in its
        first factor (:meth:`~lightning_dwf.core.factorize.FactorizedTensor.concentrate_` put it there): the first
        factor steps at the optimizer's LR (times the rollbacks' scale), without multiplier or step cap, and the other
        factors no longer train. ``reset``: the first factors' optimizer state starts afresh (it was a factor's);
        False on a resume, whose restored state is already the dense weight's.

        The other factors get no gradient in a single process (``requires_grad`` off until :meth:`unbind`, which saves
        their share of the backward pass); under ``torch.distributed`` they keep it, since DDP and FSDP expect a
        gradient of every parameter they were built with, and their gradients are dropped before each step."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        for first, *rest in tensors:
            self.dense.add(id(first))
            self.frozen.update(id(f) for f in rest)
            if not distributed:
                for factor in rest:
                    if factor.requires_grad:
                        factor.requires_grad_(False)
                        factor.grad = None
                        self._unfreeze.append(factor)
            for factor in (first, *rest):
                plan = self._plan_of.get(id(factor))
                if plan is not None and (reset or factor is not first):
                    plan.optimizer.state.pop(factor, None)

    @property
    def bound(self) -> bool:
        """Whether the penalty is bound to optimizers (between :meth:`bind` and :meth:`unbind`)."""
        return bool(self._plans)

    def kind_of(self, factor: nn.Parameter) -> str:
        """How the penalty reaches ``factor`` (:func:`penalty_kind` of its optimizer); after :meth:`bind`."""
        plan = self._plan_of.get(id(factor))
        if plan is None:
            raise KeyError("this factor is in no bound optimizer")
        return plan.penalty

    def decoupled_step(self, factor: nn.Parameter, gradient: bool = False) -> float:
        """The step ``lr × multiplier`` of the decoupled penalty on ``factor`` now (its param group's current lr);
        0 when its optimizer takes the penalty through the gradient (unless ``gradient``: that step then too), or it
        is in no bound optimizer (frozen)."""
        plan = self._plan_of.get(id(factor))
        if plan is None or (plan.penalty != "decoupled" and not gradient):
            return 0.0
        return float(plan.group["lr"]) * self.multiplier_of(factor)

    def proximal_thresholds(self, module: nn.Module, floor: float = DEFAULT_THRESHOLD,
                            gradient: bool = False) -> dict[str, float]:
        """Per factorized tensor of ``module`` under the decoupled penalty: the magnitude below which the proximal
        step of ``λ·|w|^(2/D)`` at the factors' current ``lr × multiplier`` is exactly zero
        (:func:`~lightning_dwf.core.functional.prox_threshold`), at least ``floor`` (absolute).

        Fixed λ under Adam-type optimizers: take them before ``optimizer.step()`` and zero below them after it with
        ``fix_support_(module, thresholds, [optimizer])``, as the callback does. Adam's normalized step would
        otherwise hold every weight with a consistent gradient off zero: few zeros, then a dead network.

        Args:
            module: the factorized model. floor: the smallest threshold (absolute).
            gradient: also the tensors whose optimizer takes the penalty through the gradient (SGD-type), at the same
                ``lr × multiplier`` (``FixedLamConfig(recovery=...)`` makes its zeros this way under every optimizer).
        """
        out = {}
        if self.lam <= 0:
            return out
        for tensor in sparse_tensors(module):
            factor = tensor.factors[0]
            eta = self.decoupled_step(factor)
            plan = self._plan_of.get(id(factor))
            if gradient and plan is not None and plan.penalty == "gradient":
                eta = float(plan.group["lr"]) * self.multiplier_of(factor)
            lam = self.lam * self.lam_scales.get(id(factor), 1.0)
            if eta > 0 and lam > 0:
                tau = prox_threshold(eta, lam, self.depth)
                if isinstance(tensor, GatedTensor):  # the group's norm is thresholded; units compare RMS
                    tau /= math.sqrt(tensor.entries)
                out[tensor.name] = max(floor, tau)
        return out

    def peak_lr_of(self, factor: nn.Parameter) -> float:
        """The peak learning rate of ``factor``'s param group (:func:`peak_lr`); 0 when it is in no bound optimizer."""
        plan = self._plan_of.get(id(factor))
        return 0.0 if plan is None else peak_lr(plan.group)

    def multiplier_of(self, factor: nn.Parameter) -> float:
        """The factor's LR multiplier now: ``lr_multiplier × multipliers[factor]`` (``lr_multiplier`` alone for a first
        factor that trains as a dense weight: :meth:`train_densely`)."""
        if id(factor) in self.dense:
            return self.lr_multiplier
        return self.lr_multiplier * self.multipliers.get(id(factor), 1.0)

    def unbind(self) -> None:
        """Forget the optimizers and remove the LR-multiplier hooks."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._plans.clear()
        self._plan_of.clear()
        self._scaled_candidates.clear()
        self._snapshots.clear()
        self._hooked.clear()
        self._pending.clear()
        self._buffers.clear()
        self.step_cap = None
        self.dense.clear()
        self.frozen.clear()
        for factor in self._unfreeze:
            factor.requires_grad_(True)
        self._unfreeze.clear()

    def user_weight_decay(self) -> dict[str, float]:
        """``{"optimizer.group": weight_decay}`` for groups whose own nonzero decay on factors is neutralized."""
        return {
            f"{i}.{j}": float(plan.group.get("weight_decay", 0.0))
            for i, plans in enumerate(self._plans.values())
            for j, plan in enumerate(plans)
            if plan.group.get("weight_decay", 0.0)
        }

    @torch.no_grad()
    def before_step(self, optimizer: Any) -> None:
        """Apply the penalty to the factors of ``optimizer`` (``2λ/D·ω`` into the gradient, or the decoupled shrink, by
        :func:`penalty_kind`; λ times the factor's :attr:`lam_scales`) and neutralize the user's own weight decay on
        them.

        The gradient penalty of SGD-type optimizers goes into the gradient at once (before clipping). A param group
        whose step changes the factors themselves (the decoupled shrink, the neutralized decoupled decay) gets it at
        once when the optimizer's step has begun (Lightning's 32-bit and bfloat16 steps call this inside the step's
        closure), and otherwise (a plain loop, 16-bit AMP with a gradient scaler) from the step's pre-hook, its
        gradient changes with it: a step the scaler skips after a non-finite gradient then leaves the factors as they
        were."""
        opt = unwrap_optimizer(optimizer)
        defer = id(opt) in self._scaled_candidates and id(opt) not in self._hooked
        coef = lam_to_weight_decay(self.lam, self.depth)
        pending: list[_GroupStep] = []
        for plan in self._plans.get(id(opt), ()):
            frozen = self.frozen
            params = [p for p in plan.params if p.requires_grad and id(p) not in frozen]
            for p in plan.params:
                if id(p) in frozen:
                    p.grad = None  # the optimizer skips a parameter without a gradient
            if not params:
                continue
            wd = float(plan.group.get("weight_decay", 0.0) or 0.0)
            own = wd if plan.kind == "coupled" else 0.0
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            lr = float(plan.group["lr"])
            keep = 1.0
            if plan.kind == "decoupled" and wd:  # undo the step's `p *= 1 - lr·wd` in advance
                keep = 1.0 - lr * wd
                if keep <= 0:
                    raise ValueError(f"lr·weight_decay = {1 - keep:.3g} >= 1 in a group with DWF factors; set "
                                     "weight_decay=0 for the factors.")
            by_scale: dict[float, list[nn.Parameter]] = {}
            by_coef: dict[float, list[nn.Parameter]] = {}
            for p in params:
                shrink = 1.0
                if plan.penalty == "decoupled" and coef:
                    m, own_coef = self.multiplier_of(p), self._coef_of(p, coef)
                    shrink = 1.0 - lr * m * own_coef
                    if (flip := sign_flip(own_coef, lr * m, m, plan.penalty)) >= 1:
                        raise ValueError(f"lr × multiplier² × 2λ/D = {flip:.3g} >= 1 for DWF factors: the decoupled "
                                         "penalty would flip their sign. Use a smaller lam or lr.")
                if shrink / keep != 1.0:
                    by_scale.setdefault(shrink / keep, []).append(p)
                dwf = self._coef_of(p, coef) if plan.penalty == "gradient" else 0.0
                if dwf != own:
                    by_coef.setdefault(dwf - own, []).append(p)
            if defer and by_scale:
                pending.append((by_scale, by_coef))
            else:
                _apply_penalty((by_scale, by_coef))
        if defer:
            self._pending[id(opt)] = pending  # replaces what a step the scaler skipped left

    def _coef_of(self, factor: nn.Parameter, coef: float) -> float:
        """The penalty coefficient ``2λ/D`` of ``factor``, times its λ scale if it has one (0 when exempt)."""
        if id(factor) in self.exempt:
            return 0.0
        scale = self.lam_scales.get(id(factor))
        return coef if scale is None else coef * scale

    @torch.no_grad()
    def _snapshot(self, optimizer: Optimizer, *_: Any) -> None:
        """The step pre-hook: keep the factors' values before the step, then apply what :meth:`before_step` left to
        it. Lightning's 32-bit and bfloat16 steps call the hook first and run the closure (backward, then
        :meth:`before_step`) inside ``optimizer.step``; a plain loop and 16-bit AMP with a gradient scaler call
        :meth:`before_step` first, which leaves its changes of the factors to this hook. Either way the update the
        multipliers scale starts from the values before the penalty."""
        self._take_snapshot(optimizer)
        self._hooked.add(id(optimizer))
        for step in self._pending.pop(id(optimizer), ()):
            _apply_penalty(step)

    @torch.no_grad()
    def _take_snapshot(self, optimizer: Optimizer) -> None:
        capped = self.step_cap
        trained = [p for p in self._scaled_candidates[id(optimizer)] if id(p) not in self.frozen]
        saved = [(p, m, self._copy(p)) for p in trained
                 if (m := self.multiplier_of(p)) != 1.0 or (capped is not None and p in capped)]
        if saved:
            self._snapshots[id(optimizer)] = saved
        else:
            self._snapshots.pop(id(optimizer), None)

    def _copy(self, param: nn.Parameter) -> torch.Tensor:
        """``param``'s values before the step, in a buffer kept from step to step: a fresh copy of every factor at
        every step made the allocator hand back and fault in the whole factor memory each time (sharded parameters
        are cloned; none has a buffer)."""
        buffer = self._buffers.get(id(param))
        if (buffer is not None and buffer.shape == param.shape and buffer.dtype == param.dtype
                and buffer.device == param.device):
            return buffer.copy_(param)
        if is_sharded(param):
            return param.detach().clone()
        buffer = self._buffers[id(param)] = torch.empty_like(param, memory_format=torch.preserve_format)
        return buffer.copy_(param)

    @torch.no_grad()
    def _scale_update(self, optimizer: Optimizer, *_: Any) -> None:
        saved = self._snapshots.pop(id(optimizer), None)
        self._hooked.discard(id(optimizer))
        if saved is None:
            return
        limits = self.step_cap.limits(saved, self.lr_multiplier) if self.step_cap is not None else {}
        for p, m, before in saved:  # p = before + m·(after − before), written into p (on this rank's shards)
            limit = limits.get(id(p))
            if is_sharded(p):
                p, before = p.to_local(), before.to_local()
            torch.lerp(before, p, m if limit is None else limit, out=p)


def _apply_penalty(step: _GroupStep) -> None:
    """One param group's penalty step: scale the factors (the decoupled shrink, the neutralized decoupled decay), then
    add to their gradients (the gradient penalty, the neutralized coupled decay, of the factors as they are at the
    step)."""
    by_scale, by_coef = step
    for scale, params in by_scale.items():
        torch._foreach_mul_(params, scale)
    for grad_coef, params in by_coef.items():
        torch._foreach_add_([p.grad for p in params], params, alpha=grad_coef)
