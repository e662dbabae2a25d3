"""The callbacks (or module) that make each method out of a plain training run: DWF (a tuned recipe or the callback's
defaults), Lightning's ModelPruning, torchao's PAT, one-shot magnitude pruning; dense is a run without any."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.nn.utils import prune

from benchmarks.harness.fit import MOMENTUM, SEED, make_trainer, train_loader
from benchmarks.harness.measure import measure, prunable
from benchmarks.harness.tables import row_recovery
from benchmarks.models import Classifier
from examples.data import ImageData
from lightning_dwf import (
    DEFAULT_LAYER_TYPES,
    DEFAULT_THRESHOLD,
    CollapseConfig,
    DWFCallback,
    FactorizeConfig,
    FactorLRConfig,
    FixedLamConfig,
    QuantizeConfig,
    ScheduleConfig,
    factorized_tensors,
)
from lightning_dwf.config import DEFAULT_STEP_CAP
from lightning_dwf.core.factorize import FactorizedTensor, sparse_tensors
from lightning_dwf.core.functional import AUTO_MULTIPLIER_RANGE, _clipped_inverse, auto_lr_multiplier, balanced_factors
from lightning_dwf.core.gate_targets import following_batch_norm
from lightning_dwf.training import run as _training_run
from lightning_dwf.training.penalty import unwrap_optimizer
from lightning_dwf.training.support import cut_to_sparsity_, keep_masks, zero_weights_

#: Learning rate of the fine-tune after one-shot pruning.
FINETUNE_LR = 0.01
#: PAT: no pruning for the first 10 % of the steps, mask frozen (healing) from 60 %.
PAT_WARMUP, PAT_HEAL = 0.1, 0.6


# ------------------------------------------------------------------------------------------------------- ModelPruning
def gradual_amounts(target: float, epochs: int) -> list[float]:
    """Per-epoch pruning amounts of the cubic schedule of Zhu & Gupta (2017).

    Args:
        target: The final sparsity, reached at 70 % of training (then fine-tuning for the rest).
        epochs: The epochs of the run.

    Returns:
        For each epoch, the fraction of the *remaining* weights to prune.
    """
    prune_epochs = max(1, math.ceil(0.7 * epochs))
    amounts, previous = [], 0.0
    for k in range(1, prune_epochs + 1):
        current = target * (1 - (1 - k / prune_epochs) ** 3)
        amounts.append(1 - (1 - current) / (1 - previous))
        previous = current
    return amounts + [0.0] * (epochs - prune_epochs)


class GradualAmount:
    """Picklable ``amount(epoch)`` for ModelPruning: ``amounts[epoch]``, 0 past the end."""

    def __init__(self, amounts: list[float]) -> None:
        self.amounts = amounts

    def __call__(self, epoch: int) -> float:
        return self.amounts[epoch] if epoch < len(self.amounts) else 0.0


class LayerPruning(ModelPruning):
    """Lightning's ModelPruning restricted to the Linear/Conv weights (not BatchNorm scales), like the other methods."""

    def filter_parameters_to_prune(
        self, parameters_to_prune: Sequence[tuple[nn.Module, str]]
    ) -> list[tuple[nn.Module, str]]:
        """Keep only the Linear/Conv weights."""
        return [(m, n) for m, n in parameters_to_prune if isinstance(m, DEFAULT_LAYER_TYPES)]


def model_pruning(target: float, epochs: int) -> LayerPruning:
    """Gradual global L1 pruning to ``target`` on :func:`gradual_amounts`' schedule, made permanent at the end.

    Args:
        target: The final sparsity.
        epochs: The epochs of the run.

    Returns:
        The callback.
    """
    return LayerPruning(
        "l1_unstructured",
        parameter_names=["weight"],
        use_global_unstructured=True,
        amount=GradualAmount(gradual_amounts(target, epochs)),
        make_pruning_permanent=True,
        use_lottery_ticket_hypothesis=False,
        verbose=0,
    )


# ---------------------------------------------------------------------------------------------------------------- DWF
#: Probe rules for the per-layer SGD ``"auto"`` multipliers (:mod:`benchmarks.factor_lr` ``--multiplier min sqrt
#: at-2rms track-rms track-max``): ``min`` gives every tensor the smallest of them, ``sqrt`` moves each halfway
#: (geometrically) to the smallest, ``at-2rms`` evaluates the rule at twice the tensor's RMS (each multiplier
#: ÷2^(2−2/D): the ``"auto"`` of before the step cap; with ``--step-cap none`` that default's training);
#: ``track-*`` keep them and lower them during the fit (:class:`_TrackMultipliers`). The phase rules split target
#: mode's run at its recovery point: ``ramp-half`` / ``recovery-double`` scale the planned values (of either optimizer
#: family) by :data:`PHASE_FACTORS` before / after it, ``recut-rms`` re-plans every tensor there from its survivors.
#: (Rows before 2026-12-06 ran on the ``"auto"`` at twice the RMS, without the step cap; their ``at-rms`` rule is the
#: ``"auto"`` of now without the cap, their ``cap-K`` rows that ``"auto"`` with ``step_cap=K``.)
PLANNED_RULES = ("min", "sqrt", "at-2rms")
TRACKING_RULES = ("track-rms", "track-max", "recut-rms", "ramp-half", "recovery-double")
#: Probe rules for target mode's global cut (the multipliers stay ``"auto"``'s): rank each weight by ``|w| / rms^a``,
#: ``rms`` its tensor's RMS (zeros included, as structured mode ranks its groups), ``a`` from :data:`CUT_EXPONENTS`.
CUT_EXPONENTS = {"cut-relative": 1.0, "cut-halfrel": 0.5}
#: Probe rules for target mode's global cut (:class:`_BatchNormScaleCut`), as ``(BatchNorm-fed tensors at their
#: train-start scale, every tensor times its train-start RMS)``. ``cut-bn-init`` ranks the weights of a tensor whose
#: layer feeds a BatchNorm (which normalizes that scale away) at the tensor's scale at train start, ``|w| · rms0 /
#: rms_c`` (``rms_c`` the RMS of the weight's output channel now, zeros included; ``rms0`` the tensor's RMS at train
#: start), the other tensors by ``|w|``; ``cut-init-scale`` ranks every weight by ``|w| · rms0`` (undoing the per-layer
#: multipliers' speed-up, which is ∝ rms0^(−(2−2/D)) under SGD, as the dense init's scale does for ModelPruning);
#: ``cut-bn-init-scale`` both.
SCALE_FREE_CUTS = {"cut-bn-init": (True, False), "cut-init-scale": (False, True), "cut-bn-init-scale": (True, True)}
#: Diagnostic probe (:class:`_AllocatedCut`): target mode's cuts keep each layer's share of the survivors that
#: ModelPruning's matrix row of the same cell and seed ended with (its ``layer_nonzeros``), each layer by magnitude:
#: whether the per-layer allocation of the global cut explains a cell DWF trails in.
ALLOCATED_CUTS = ("cut-alloc-mp",)
#: Diagnostic probe (:class:`_NoPenalty`): target mode with λ held at 0, so that its gradual cut alone makes the zeros
#: (DWF's factors trained as a gradual magnitude pruner): whether the penalty or the factorization costs a cell.
NO_PENALTY = ("no-penalty",)
#: Diagnostic probe (:class:`_NoPenaltyOnBatchNormFed`): the defaults, but the tensors a BatchNorm follows get no
#: penalty (the cut still ranks them with the others): whether what ``no-penalty`` gains on a BatchNorm net is the
#: penalty on the tensors whose scale the BatchNorm removes.
NO_PENALTY_BN = ("no-penalty-bn",)
#: What the survivors train as once the pattern is fixed (``FactorLRConfig.fixed_pattern``), whatever the optimizer:
#: ``recovery-collapse`` as dense weights under their mask (``"dense"``; its first rows ran as a probe callback that did
#: the same, bit for bit), ``recovery-factors`` as the D factors (``"factors"``, the library's default).
FIXED_PATTERN_RULES = {"recovery-collapse": "dense", "recovery-factors": "factors"}
#: Probe (:class:`_DenseStepScale`): ``recovery-collapse`` with the dense fine-tune's step times this factor (every
#: survivor moves k times as far as a dense weight at the optimizer's LR): whether the factors' speed on large
#: survivors is what the full-data AdamW cells lose with the plain dense step.
DENSE_STEP_SCALES = {"recovery-collapse-x3": 3.0}
#: Probe (:class:`_CarriedState`): ``recovery-collapse`` whose first factors keep their Adam-type moments, rescaled to
#: the dense weight's gradient (``g_w = g_ω1 · ω1/w``: the first moment times ``ω1/w``, the second times its square)
#: instead of starting afresh: whether the fresh state is what the full-data AdamW cells lose with the dense step.
CARRIED_STATE = ("recovery-collapse-state",)
#: Probe (:class:`_DenseStart`): the first fraction of the run (the key's value; 0.1 is target mode's warm-up, before
#: the first cut) trains every factorized tensor as a dense weight (held in its first factor, the others 1), then the
#: factors restart balanced from the trained weights (``|ω_d| = |w|^(1/D)``) with fresh optimizer state: whether what a
#: cell loses to the factorized training is its first steps from the DWF init (from a trained net DWF leads every cell).
DENSE_STARTS = {"dense-start": 0.1, "dense-start-0.25": 0.25}
#: The recovery-phase rules (SGD-type), as the step cap from target mode's recovery point on (the support fixed,
#: λ = 0), the run's own cap (``--step-cap``) before it: the library's ``FactorLRConfig(step_cap=<this>,
#: pattern_step_cap=<the run's>)``. ``recovery-cap-1`` caps every weight at one dense step from there;
#: ``recovery-dense`` also raises the multipliers far above the cap there (:data:`PHASE_FACTORS`), so that every
#: survivor moves as a dense weight at the optimizer's LR would (``min(m, 1/G) = 1/G``), as ModelPruning's survivors
#: do; ``recovery-cap-3`` with ``--step-cap 1`` holds one dense step while the pattern is made, then gives the
#: survivors 3.
RECOVERY_CAPS = {"recovery-cap-1": 1.0, "recovery-dense": 1.0, "recovery-cap-3": 3.0}
MULTIPLIER_RULES = (PLANNED_RULES + TRACKING_RULES + tuple(RECOVERY_CAPS) + tuple(CUT_EXPONENTS)
                    + tuple(SCALE_FREE_CUTS) + ALLOCATED_CUTS + NO_PENALTY + tuple(FIXED_PATTERN_RULES)
                    + tuple(DENSE_STEP_SCALES) + CARRIED_STATE + tuple(DENSE_STARTS)
                    + NO_PENALTY_BN)
#: ``(ramp, recovery)`` factors on the planned multipliers of the phase rules (:meth:`_TrackMultipliers._phases`).
PHASE_FACTORS = {"ramp-half": (0.5, 1.0), "recovery-double": (1.0, 2.0), "recovery-dense": (1.0, 1e3)}
#: Optimizer steps between two updates of a ``track-*`` rule.
TRACK_EVERY = 25


class _TrackMultipliers(Callback):
    """Probe: every :data:`TRACK_EVERY` optimizer steps, lower each SGD ``"auto"`` multiplier of a factorized tensor
    as its weights grow (never above the planned value), so that its largest weights keep about the optimizer's step;
    or, for the phase rules, change the multipliers at target mode's recovery point (:meth:`_phases`, :meth:`_recut`).

    ``track-rms``: the ``"auto"`` value of the RMS of the tensor's non-zero weights now (selection by the cut raises it
    too); ``track-max``: the planned value times ``(max|w| now / max|w| at the first update)^−(2−2/D)`` (the cut never
    raises the maximum). Runs after the DWF callback's own batch-end work.
    """

    def __init__(self, dwf: DWFCallback, mode: str) -> None:
        self.dwf, self.mode = dwf, mode
        self.planned: dict[str, float] = {}
        self.first_max: dict[str, float] = {}
        self.switched = False  # the phase rules: the recovery's multipliers are set

    def on_train_batch_end(self, trainer: Any, pl_module: nn.Module, *args: Any) -> None:
        run = self.dwf._run
        if self.mode == "recut-rms":
            self._recut(pl_module, run)
            return
        if self.mode in PHASE_FACTORS:
            self._phases(pl_module, run, *PHASE_FACTORS[self.mode])
            return
        if run is None or run.penalty is None or trainer.global_step % TRACK_EVERY:
            return
        self.planned = self.planned or dict(run.multipliers)
        for tensor in factorized_tensors(pl_module):
            name = tensor.name
            if name not in self.planned or run.penalty.kind_of(tensor.factors[0]) != "gradient":
                continue
            weights = tensor.product().detach().float()
            if self.mode == "track-max":
                now = float(weights.abs().max())
                first = self.first_max.setdefault(name, now)
                growth = now / first if first > 0 else 1.0
                run.multipliers[name] = self.planned[name] * min(1.0, growth ** -(2.0 - 2.0 / run.depth))
            elif bool((weights != 0).any()):
                rms = float(weights[weights != 0].pow(2).mean().sqrt())
                run.multipliers[name] = min(self.planned[name], auto_lr_multiplier(rms, run.depth, "gradient"))
        run._apply_multipliers(run.ctx, force=True)

    def _phases(self, pl_module: nn.Module, run: Any, ramp: float, recovery: float) -> None:
        """``ramp-half`` / ``recovery-double``: the planned multipliers times ``ramp`` until target mode's recovery
        point, times ``recovery`` after it."""
        if run is None or run.penalty is None:
            return
        if not self.planned:
            self.planned = dict(run.multipliers)
            run.multipliers.update({n: m * ramp for n, m in self.planned.items()})
            run._apply_multipliers(run.ctx, force=True)
        elif getattr(run.regime, "recovering", False) and not self.switched:
            self.switched = True
            run.multipliers.update({n: m * recovery for n, m in self.planned.items()})
            run._apply_multipliers(run.ctx, force=True)

    def _recut(self, pl_module: nn.Module, run: Any) -> None:
        """``recut-rms``: once, at the recovery point (the support is fixed), each tensor's multiplier from the RMS of
        its survivors: SGD-type ``"auto"`` of that RMS; Adam-type the multiplier at which a weight of that size moves
        as a dense weight would, ``1/(D·rms^(1−1/D))``, clipped like ``"auto"``. The ramp from 1 restarts there."""
        if run is None or run.penalty is None or self.planned or not getattr(run.regime, "recovering", False):
            return
        self.planned = dict(run.multipliers)
        for tensor in factorized_tensors(pl_module):
            weights = tensor.product().detach().float()
            if tensor.name not in self.planned or not bool((weights != 0).any()):
                continue
            rms = float(weights[weights != 0].pow(2).mean().sqrt())
            if run.penalty.kind_of(tensor.factors[0]) == "gradient":
                run.multipliers[tensor.name] = auto_lr_multiplier(rms, run.depth, "gradient")
            else:
                run.multipliers[tensor.name] = _clipped_inverse(run.depth * rms ** (1.0 - 1.0 / run.depth))
        print(f"recut-rms at step {run.ctx.step}: " + ", ".join(f"{n} ×{self.planned[n]:.3g} → ×{m:.3g}"
                                                                  for n, m in run.multipliers.items()), flush=True)
        run._apply_multipliers(run.ctx, force=True)


def _target_regime(dwf: DWFCallback) -> Any:
    """The target-mode regime of a fitting ``dwf`` callback (inside a quantization-aware finish, if any): the probes
    replace its ``_cut`` or set its ``lam``."""
    regime = dwf._run.regime
    return getattr(regime, "inner", regime)


def _zero_but(ctx: Any, masks: dict[str, torch.Tensor]) -> float:
    """A probe cut's end: zero every weight outside ``masks`` (with its optimizer state) and return the smallest kept
    magnitude (absolute; ``inf`` if none), as :func:`~lightning_dwf.training.support.cut_to_sparsity_` does."""
    zero_weights_(ctx.module, masks, ctx.optimizers)
    kept = [t.unit_magnitudes()[masks[t.name]] for t in sparse_tensors(ctx.module)]
    return min((float(k.min()) for k in kept if k.numel()), default=math.inf)


class _RelativeCut(Callback):
    """Probe: target mode's cuts (along the ramp and at the recovery point) rank every weight by its magnitude over its
    tensor's RMS to the power ``exponent`` instead of its magnitude (1: structured mode's ranking; 0: the library's)."""

    def __init__(self, dwf: DWFCallback, exponent: float) -> None:
        self.dwf, self.exponent = dwf, exponent

    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        regime = _target_regime(self.dwf)
        min_share, exponent = regime.config.schedule.min_layer_share, self.exponent

        def cut(ctx: Any, sparsity: float) -> float:
            return cut_to_sparsity_(ctx.module, sparsity, ctx.floor, ctx.optimizers, min_share,
                                    score=lambda w: w / w.pow(2).mean().sqrt().clamp_min(1e-30) ** exponent)

        regime._cut = cut


class _BatchNormScaleCut(Callback):
    """Probes of :data:`SCALE_FREE_CUTS`: target mode's cuts (along the ramp and at the recovery point) rank the weights
    of a BatchNorm-fed tensor at its scale at train start (each output channel rescaled to the tensor's RMS then),
    and/or every weight by ``|w|`` times its tensor's train-start RMS (over their mean)."""

    def __init__(self, dwf: DWFCallback, batch_norm: bool, init_scale: bool) -> None:
        self.dwf, self.batch_norm, self.init_scale = dwf, batch_norm, init_scale

    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        regime = _target_regime(self.dwf)
        min_share = regime.config.schedule.min_layer_share
        tensors = sparse_tensors(pl_module)
        rms0 = {t.name: float(t.product().detach().pow(2).mean().sqrt()) for t in tensors}
        mean_rms0 = sum(rms0.values()) / max(len(rms0), 1)
        fed = {t.name for t in tensors if self.batch_norm and following_batch_norm(pl_module, t.name.rsplit(".", 1)[0])}
        print("scale cut: train-start RMS", {n: round(v, 4) for n, v in rms0.items()}, "BatchNorm-fed", fed, flush=True)

        @torch.no_grad()
        def cut(ctx: Any, sparsity: float) -> float:
            scores = {}
            for t in sparse_tensors(ctx.module):
                w = magnitude = t.unit_magnitudes()
                if t.name in fed:
                    rms_c = w.pow(2).flatten(1).mean(1).sqrt().clamp_min(1e-30).view(-1, *[1] * (w.dim() - 1))
                    w = w * (rms0[t.name] / rms_c)
                if self.init_scale:  # relative to the mean, so that the scores keep the magnitudes' scale (the floor)
                    w = w * (rms0[t.name] / mean_rms0)
                scores[t.name] = w.masked_fill(magnitude < ctx.floor, 0.0)
            masks = keep_masks(scores, sparsity, ctx.floor, min_share)
            return _zero_but(ctx, masks)

        regime._cut = cut


class _AllocatedCut(Callback):
    """Probe ``cut-alloc-mp``: target mode's cuts give each layer ``share_l`` of the weights kept (ModelPruning's final
    allocation in the same cell and seed), the largest by magnitude within each layer."""

    def __init__(self, dwf: DWFCallback, cfg: dict[str, Any]) -> None:
        from benchmarks import matrix

        same = ("dataset", "model", "batch_size", "epochs", "optimizer", "target", "seed", "start")
        peer = [r for r in matrix.load_rows(matrix.PATH).values() if r["config"]["method"] == "model-pruning"
                and all(r["config"].get(k) == cfg.get(k) for k in same)]
        if not peer or "layer_nonzeros" not in peer[0]["results"]:
            raise ValueError(f"cut-alloc-mp: no ModelPruning row with layer_nonzeros for {cfg}")
        counts = peer[0]["results"]["layer_nonzeros"]
        total = sum(counts.values())
        self.dwf, self.share = dwf, {f"net.{n}.weight": c / total for n, c in counts.items()}

    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        regime = _target_regime(self.dwf)
        share = self.share
        assert set(share) == {t.name for t in sparse_tensors(pl_module)}, (share, sparse_tensors(pl_module))

        @torch.no_grad()
        def cut(ctx: Any, sparsity: float) -> float:
            tensors = sparse_tensors(ctx.module)
            keep = sum(t.unit_magnitudes().numel() for t in tensors) * (1.0 - sparsity)
            masks = {}
            for t in tensors:
                w = t.unit_magnitudes()
                k = min(w.numel(), max(1, round(share[t.name] * keep)))
                masks.update(keep_masks({t.name: w}, 1.0 - k / w.numel(), ctx.floor, 0.0))
            return _zero_but(ctx, masks)

        regime._cut = cut


class _NoPenalty(Callback):
    """Probe ``no-penalty``: the regime's λ set to 0 before every batch (after the DWF callback's own hook), so the
    penalty applied at each step is 0; the controller and the cut schedule run as they do by default."""

    def __init__(self, dwf: DWFCallback) -> None:
        self.dwf = dwf

    def on_train_batch_start(self, trainer: Any, pl_module: nn.Module, batch: Any, batch_idx: int) -> None:
        regime = _target_regime(self.dwf)
        regime.lam = 0.0


class _NoPenaltyOnBatchNormFed(Callback):
    """Probe ``no-penalty-bn``: the target regime exempts the BatchNorm-fed tensors from the penalty at every step (its
    ``exempt``, which the run reads before each step, returns their names)."""

    def __init__(self, dwf: DWFCallback) -> None:
        self.dwf = dwf

    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        fed = frozenset(t.name for t in sparse_tensors(pl_module)
                        if following_batch_norm(pl_module, t.name.rsplit(".", 1)[0]))
        print("no penalty on the BatchNorm-fed tensors", sorted(fed), flush=True)
        _target_regime(self.dwf).exempt = lambda: fed


class _DenseStepScale(Callback):
    """Probe of :data:`DENSE_STEP_SCALES`: once the pattern is fixed (the survivors train as dense weights), their step
    is ``scale`` times the optimizer's (the penalty's common multiplier, which the dense first factors keep; set before
    every batch after the DWF callback's own hook, which resets it to the rollbacks' scale)."""

    def __init__(self, dwf: DWFCallback, scale: float) -> None:
        self.dwf, self.scale = dwf, scale

    def on_train_batch_start(self, trainer: Any, pl_module: nn.Module, batch: Any, batch_idx: int) -> None:
        run = self.dwf._run
        if run is not None and run.penalty is not None and run.regime.pattern_fixed:
            run.penalty.lr_multiplier = run.rollback.scale * self.scale


class _CarriedState(Callback):
    """Probe of :data:`CARRIED_STATE` (placed before the DWF callback): before every batch of the factor phase it keeps
    each first factor's values and optimizer state; at the first step of the dense phase it gives each first factor,
    now the dense weight ``w``, the kept Adam-type moments rescaled by ``s = ω1_old / w`` (0 where ``w`` is 0):
    ``exp_avg · s``, ``exp_avg_sq · s²``, the same step count."""

    def __init__(self, dwf: DWFCallback) -> None:
        self.dwf = dwf
        self.kept: dict[int, tuple[torch.Tensor, dict, Any]] = {}  # by id of a first factor: (values, state, optimizer)
        self.done = False

    def on_train_batch_start(self, trainer: Any, pl_module: nn.Module, batch: Any, batch_idx: int) -> None:
        run = self.dwf._run
        if self.done or run is None or run.penalty is None or run._dense:
            return
        self.kept.clear()
        for opt in trainer.optimizers:
            for tensor in sparse_tensors(pl_module):
                first = tensor.factors[0]
                state = opt.state.get(first)
                if state and "exp_avg_sq" in state:
                    self.kept[id(first)] = (first.detach().clone(), dict(state), opt)

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: Any, pl_module: nn.Module, optimizer: Any) -> None:
        run = self.dwf._run
        if self.done or run is None or not run._dense:
            return
        self.done = True
        for tensor in sparse_tensors(pl_module):
            first = tensor.factors[0]
            if id(first) not in self.kept:
                continue
            old, state, opt = self.kept[id(first)]
            w = first.detach()
            s = torch.where(w != 0, old / torch.where(w != 0, w, torch.ones_like(w)), torch.zeros_like(w))
            opt.state[first] = {"step": state["step"].clone(), "exp_avg": state["exp_avg"] * s,
                                "exp_avg_sq": state["exp_avg_sq"] * s * s}
        self.kept.clear()


class _DenseStart(Callback):
    """Probe of :data:`DENSE_STARTS` (placed after the DWF callback): at train start every unstructured tensor goes into
    its first factor (``concentrate_``: ``ω1 = w``, the other factors 1) and trains as a dense weight
    (:meth:`~lightning_dwf.FactorPenalty.train_densely`: the optimizer's step, no multiplier, no step cap); after
    ``fraction`` of the run's steps each tensor's factors become the balanced factorization of its weight, their
    optimizer state starts afresh, and the run goes on as the defaults (multipliers, the step cap of the phase)."""

    def __init__(self, dwf: DWFCallback, fraction: float) -> None:
        self.dwf, self.fraction = dwf, fraction
        self.switch: int | None = None  # the optimizer step of the switch; None once done

    def _tensors(self) -> list[Any]:
        return [t for t in self.dwf._run._tensors if isinstance(t, FactorizedTensor)]

    @torch.no_grad()
    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        run = self.dwf._run
        tensors = self._tensors()
        for tensor in tensors:
            tensor.concentrate_()
        run.penalty.train_densely([t.factors for t in tensors], reset=True)
        run.rollback.take(pl_module, trainer.optimizers, trainer.global_step)
        self.switch = round(self.fraction * trainer.estimated_stepping_batches)

    @torch.no_grad()
    def on_train_batch_start(self, trainer: Any, pl_module: nn.Module, batch: Any, batch_idx: int) -> None:
        run = self.dwf._run
        if self.switch is None:
            return
        penalty = run.penalty
        if trainer.global_step < self.switch:
            penalty.step_cap = None  # the DWF callback's phase set it on every tensor
            return
        self.switch = None
        tensors = self._tensors()
        for tensor in tensors:
            for factor, value in zip(tensor.factors, balanced_factors(tensor.product(), tensor.depth), strict=True):
                factor.copy_(value)
        penalty.dense.clear()
        penalty.frozen.clear()
        for factor in penalty._unfreeze:
            factor.requires_grad_(True)
        penalty._unfreeze.clear()
        for opt in trainer.optimizers:
            for tensor in tensors:
                for factor in tensor.factors:
                    unwrap_optimizer(opt).state.pop(factor, None)
        penalty.cap_steps([t.factors for t in tensors], run.factor_lr.step_cap_for(run.regime.pattern_fixed))
        run.rollback.take(pl_module, trainer.optimizers, trainer.global_step)


@dataclass(frozen=True)
class _RuleFactorLR(FactorLRConfig):
    """``FactorLRConfig()`` whose planned ``"auto"`` multipliers :func:`_plan_by_rule` reshapes by ``rule``."""

    rule: str = "min"


def _plan_by_rule(module: nn.Module, config: FactorLRConfig, depth: int, penalty: Any) -> dict[str, float]:
    """The library's plan, reshaped by the probe's rule when ``config`` carries one (else unchanged)."""
    planned = _library_plan(module, config, depth, penalty)
    if not isinstance(config, _RuleFactorLR) or not planned:
        return planned
    if config.rule == "at-2rms":
        low = AUTO_MULTIPLIER_RANGE[0]
        return {n: max(low, m / 2.0 ** (2.0 - 2.0 / depth)) for n, m in planned.items()}
    low = min(planned.values())
    return {n: low if config.rule == "min" else math.sqrt(m * low) for n, m in planned.items()}


_library_plan = _training_run.plan_multipliers
_training_run.plan_multipliers = _plan_by_rule  # only configs built by defaults_callback(multiplier=rule) differ


def defaults_callback(
    depth: int,
    target: float | None = None,
    init: str = "dwf",
    lam: float | None = None,
    multiplier: float | str | None = None,
    recovery: float = 0.0,
    relative: bool = False,
    quantize: QuantizeConfig | None = None,
    step_cap: float | None | str = "default",
    pattern_step_cap: float | None = None,
    fixed_pattern: str | None = None,
) -> DWFCallback:
    """DWF as a user adds it: ``DWFCallback(depth=D, target_sparsity=T)`` (or ``lam=λ``) and nothing else.

    ``save=False`` and ``verbose=False`` only silence the collapsed file and the messages.

    Args:
        depth: The factorization depth D.
        target: The target sparsity (ignored when ``lam`` is given).
        init: ``"balanced"`` to start from a trained net.
        lam: A fixed λ instead of the target.
        multiplier: One factor LR multiplier for every tensor instead of ``"auto"``, ``"auto"`` itself (the library's
            rule, named to run it under another ``step_cap``), or a rule of
            :data:`MULTIPLIER_RULES` applied to ``"auto"``'s (:mod:`benchmarks.factor_lr`).
        recovery: With ``lam``: ``FixedLamConfig(lam, recovery=...)`` (λ ramped, then released; 0: constant, the
            rows made before ``recovery=None`` became the default).
        relative: With ``lam``: ``FixedLamConfig(lam, relative=True)`` (λ without units, per layer).
        quantize: The quantization-aware finish (``DWFCallback(quantize=...)``), for the size benchmark.
        step_cap: ``FactorLRConfig(step_cap=...)`` in place of the library's two-phase default (``None``: no cap),
            throughout the run unless ``pattern_step_cap`` is given: every probe row with a ``step_cap`` key ran so.
        pattern_step_cap: With ``step_cap``: ``FactorLRConfig(pattern_step_cap=...)``, the cap while the pattern is
            being made.
        fixed_pattern: ``FactorLRConfig(fixed_pattern=...)`` in place of the library's ``"auto"``.

    Returns:
        The callback.
    """
    extra: dict[str, Any] = dict(factorize=FactorizeConfig(init=init)) if init != "dwf" else {}
    cap: dict[str, Any] = {} if step_cap == "default" else dict(step_cap=step_cap, pattern_step_cap=pattern_step_cap)
    if fixed_pattern is not None:
        cap["fixed_pattern"] = fixed_pattern
    if isinstance(multiplier, str) and multiplier != "auto":  # "auto": the library's rule, named
        if multiplier not in PLANNED_RULES:
            raise ValueError(f"defaults_callback plans the rules {PLANNED_RULES}; {multiplier!r} is a callback of "
                             "cell_callbacks")
        extra["factor_lr"] = _RuleFactorLR(rule=multiplier, **cap)
    elif multiplier is not None:
        extra["factor_lr"] = FactorLRConfig(multiplier=multiplier, **cap)
    elif cap:
        extra["factor_lr"] = FactorLRConfig(**cap)
    knob: dict[str, Any] = dict(target_sparsity=target)
    if lam is not None:
        knob = dict(regime=FixedLamConfig(lam, recovery=recovery, relative=relative))
    if quantize is not None:
        extra["quantize"] = quantize
    return DWFCallback(depth=depth, collapse=CollapseConfig(save=False), verbose=False, **knob, **extra)


def method_callbacks(cfg: dict, schedule: ScheduleConfig | None = None) -> list[Callback]:
    """The callbacks of a sweep / probe config: DWF (fixed λ or target, a tuned recipe), or ModelPruning.

    A row with ``recipe="defaults"`` gets :func:`defaults_callback`; otherwise the row's ``recovery``,
    ``control_threshold``, factor LR and quantization settings are set on the callback.

    Args:
        cfg: The config; ``cfg["method"]`` is ``dense``, ``model-pruning`` or a ``dwf-*`` method.
        schedule: Target mode's other schedule settings (controller gain, step bound).

    Returns:
        The callbacks (none for dense).
    """
    if cfg["method"] == "dense":
        return []
    if cfg["method"] == "model-pruning":
        return [model_pruning(cfg["target"], cfg["epochs"])]
    if cfg.get("recipe") == "defaults":
        quantize = (QuantizeConfig(cfg["quantize_bits"], cfg.get("quantize_fraction", 0.2))
                    if cfg.get("quantize_bits") else None)
        return [defaults_callback(cfg["depth"], cfg["target"], cfg.get("init", "dwf"), quantize=quantize)]
    control = cfg.get("control_threshold")
    if "target" in cfg:
        schedule = replace(
            schedule or ScheduleConfig(),
            recovery=cfg["recovery"],
            control_threshold=None if control == "auto" else control,
        )
        knob: dict[str, Any] = dict(target_sparsity=cfg["target"], schedule=schedule)
        collapse = CollapseConfig(save=False)
    else:
        knob = dict(lam=cfg["lam"])
        collapse = CollapseConfig(threshold=cfg.get("threshold", DEFAULT_THRESHOLD), save=False)
    factor_lr = FactorLRConfig(
        multiplier=cfg["factor_lr_multiplier"], warmup=cfg.get("factor_lr_warmup", 0.0), check="off"
    )
    return [
        DWFCallback(
            depth=cfg["depth"],
            factorize=FactorizeConfig(init=cfg.get("init", "dwf")),
            factor_lr=factor_lr,
            collapse=collapse,
            quantize=QuantizeConfig(cfg["quantize_bits"], cfg.get("quantize_fraction", 0.2))
            if cfg.get("quantize_bits") else None,
            verbose=False,
            **knob,
        )
    ]


def _probe_callback(rule: Any, cfg: dict[str, Any]) -> Callable[[DWFCallback], Callback] | None:
    """The probe callback of a :data:`MULTIPLIER_RULES` rule that works on the run rather than on the planned
    multipliers (built around the DWF callback it reshapes), or ``None``."""
    if rule in TRACKING_RULES:
        return lambda dwf: _TrackMultipliers(dwf, rule)
    if rule in CUT_EXPONENTS:
        return lambda dwf: _RelativeCut(dwf, CUT_EXPONENTS[rule])
    if rule in SCALE_FREE_CUTS:
        return lambda dwf: _BatchNormScaleCut(dwf, *SCALE_FREE_CUTS[rule])
    if rule in ALLOCATED_CUTS:
        return lambda dwf: _AllocatedCut(dwf, cfg)
    if rule in NO_PENALTY:
        return _NoPenalty
    if rule in NO_PENALTY_BN:
        return _NoPenaltyOnBatchNormFed
    return None


def cell_callbacks(cfg: dict[str, Any]) -> list[Callback]:
    """The callbacks of a matrix-cell config: defaults only.

    Args:
        cfg: The config. ``dwf`` / ``dwf-balanced``: :func:`defaults_callback` to ``cfg["target"]`` (a
            ``factor_lr_multiplier`` key replaces ``"auto"``, a ``depth`` key the depth 3); ``dwf-lam``: a fixed
            ``cfg["lam"]``; ``model-pruning``: :func:`model_pruning`.

    Returns:
        The callbacks (none for dense and PAT, which is an optimizer: :func:`make_module`).
    """
    method, depth = cfg["method"], cfg.get("depth", 3)
    if method == "model-pruning":
        return [model_pruning(cfg["target"], cfg["epochs"])]
    if method in ("dwf", "dwf-balanced"):
        init = "balanced" if method == "dwf-balanced" else "dwf"
        multiplier, cap = cfg.get("factor_lr_multiplier"), cfg.get("step_cap", "default")
        if multiplier in RECOVERY_CAPS:  # the library's two-phase cap, the run's cap while the pattern is made
            pattern = DEFAULT_STEP_CAP if cap == "default" else cap
            dwf = defaults_callback(depth, cfg["target"], init, step_cap=RECOVERY_CAPS[multiplier],
                                    pattern_step_cap=pattern)
            return [dwf, _TrackMultipliers(dwf, multiplier)] if multiplier in PHASE_FACTORS else [dwf]
        if multiplier in DENSE_STEP_SCALES:
            dwf = defaults_callback(depth, cfg["target"], init, step_cap=cap, fixed_pattern="dense")
            return [dwf, _DenseStepScale(dwf, DENSE_STEP_SCALES[multiplier])]
        if multiplier in CARRIED_STATE:
            dwf = defaults_callback(depth, cfg["target"], init, step_cap=cap, fixed_pattern="dense")
            return [_CarriedState(dwf), dwf]
        if multiplier in DENSE_STARTS:
            dwf = defaults_callback(depth, cfg["target"], init, step_cap=cap)
            return [dwf, _DenseStart(dwf, DENSE_STARTS[multiplier])]
        if multiplier in FIXED_PATTERN_RULES:
            return [defaults_callback(depth, cfg["target"], init, step_cap=cap,
                                      fixed_pattern=FIXED_PATTERN_RULES[multiplier])]
        probe = _probe_callback(multiplier, cfg)
        if probe is not None:  # the defaults' multipliers, and a callback beside them that reshapes the run
            dwf = defaults_callback(depth, cfg["target"], init, step_cap=cap)
            return [dwf, probe(dwf)]
        return [defaults_callback(depth, cfg["target"], init, multiplier=multiplier, step_cap=cap)]
    if method in ("dwf-lam", "dwf-gradlam"):  # benchmarks.fixed_lam
        recovery = row_recovery(cfg)
        if method == "dwf-gradlam":  # benchmarks.gradient_lam, a probe
            from benchmarks.gradient_lam import GradientLamConfig

            return [DWFCallback(depth=depth, collapse=CollapseConfig(save=False), verbose=False,
                                regime=GradientLamConfig(cfg["lam"], recovery=recovery))]
        return [defaults_callback(depth, lam=cfg["lam"], recovery=recovery, relative=cfg.get("relative", False))]
    return []


# -------------------------------------------------------------------------------------------------------------- PAT
class PATClassifier(Classifier):
    """:class:`Classifier` whose optimizer is torchao's PAT ``PruneOptimizer`` around the same base optimizer.

    One global per-element (``KElementGrouper(k=1)``) minimum-sparsity constraint over the Linear/Conv weights, ramped
    cubically from :data:`PAT_WARMUP` to :data:`PAT_HEAL` of the run, the mask frozen after it.
    """

    def __init__(self, *args: Any, target: float = 0.9, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.target = target

    def configure_optimizers(self) -> dict[str, Any]:
        """PAT's ``PruneOptimizer`` around :meth:`make_optimizer`, with the cell's per-step LR schedule."""
        from torchao.prototype.pat.optim import PruneOptimizer

        total = max(int(self.trainer.estimated_stepping_batches), 2)
        pruned = {id(m.weight) for m in self.net.modules() if isinstance(m, DEFAULT_LAYER_TYPES)}
        groups = [
            dict(
                params=[p for p in self.parameters() if id(p) in pruned],
                prox_type="GlobalMinSparsityConstraint",
                group_type="KElementGrouper",
                k=1,
                min_sparsity=self.target,
                min_sparsity_schedule=True,
            ),
            dict(params=[p for p in self.parameters() if id(p) not in pruned]),
        ]
        opt = PruneOptimizer(
            self.make_optimizer(groups), warmup_steps=int(PAT_WARMUP * total), healing_start_step=int(PAT_HEAL * total)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.make_scheduler(opt), "interval": "step"}}


def pat_missing() -> str | None:
    """Why PAT cannot run here (torchao missing or broken).

    Returns:
        The import error as text, or None when PAT can run.
    """
    try:
        import torchao.prototype.pat.optim  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure skips the method
        return f"{type(err).__name__}: {err}"
    return None


def make_module(cfg: dict[str, Any], num_classes: int) -> Classifier:
    """The module a matrix-cell config trains: a :class:`PATClassifier` for PAT, else a :class:`Classifier`.

    Args:
        cfg: The config: ``model``, ``method``, the optimizer keys (``lr``, ``optimizer``, ``weight_decay``,
            ``warmup``, optionally ``momentum``) and, for PAT, ``target``.
        num_classes: Outputs of the network.

    Returns:
        The untrained module.
    """
    kwargs = {k: cfg[k] for k in ("lr", "optimizer", "weight_decay", "warmup")}
    kwargs["momentum"] = cfg.get("momentum", 0.0)
    if cfg["method"] == "pat":
        return PATClassifier(cfg["model"], num_classes=num_classes, target=cfg["target"], **kwargs)
    return Classifier(cfg["model"], num_classes=num_classes, **kwargs)


# ---------------------------------------------------------------------------------------------------------- one-shot
def oneshot(dense_net: nn.Module, cfg: dict, data: ImageData) -> tuple[dict, dict]:
    """Global L1 magnitude pruning of a trained dense net, without and with a short fine-tune (masks kept).

    Args:
        dense_net: The trained dense net (left unchanged).
        cfg: The config: ``target``, ``model``, ``finetune_epochs``, ``batch_size`` and the device keys.
        data: The dataset.

    Returns:
        The :func:`~benchmarks.harness.measure.measure` results without fine-tuning, and with it (plus
        ``train_seconds``).
    """
    pruned = copy.deepcopy(dense_net)
    prune.global_unstructured(prunable(pruned), pruning_method=prune.L1Unstructured, amount=cfg["target"])
    for m, name in prunable(pruned):
        prune.remove(m, name)
    no_ft = measure(pruned, data)
    net = copy.deepcopy(dense_net)  # the same (deterministic) pruning, with masks kept through fine-tuning
    prune.global_unstructured(prunable(net), pruning_method=prune.L1Unstructured, amount=cfg["target"])
    module = Classifier(cfg["model"], lr=FINETUNE_LR, momentum=MOMENTUM, num_classes=data.num_classes)
    module.net = net
    seed_everything(SEED, verbose=False)
    start = time.perf_counter()
    make_trainer(cfg["finetune_epochs"], [], cfg).fit(module, train_loader(data, cfg["batch_size"]))
    for m, name in prunable(net):
        prune.remove(m, name)
    return no_ft, dict(measure(net, data), train_seconds=time.perf_counter() - start)
