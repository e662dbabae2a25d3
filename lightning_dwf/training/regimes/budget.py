"""A budget for the shrunk model: structured DWF until the model :func:`~lightning_dwf.shrink_` will produce costs at
most a given fraction of the dense model's MACs or parameters.

It runs target mode's schedule (controller, gradual cut, recovery) on a different measure: the fraction of the dense
cost removed, predicted by :class:`~lightning_dwf.training.budget.CostModel` from the zero groups and everything
coupled to them. Every cut drops the groups of smallest RMS until the predicted cost meets the schedule's point, so
the recovery phase starts with the budget met exactly (up to one group's worth).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_dwf._validation import check_choice, set_field
from lightning_dwf.config import ScheduleConfig
from lightning_dwf.core.gating import GatedTensor, gated_tensors
from lightning_dwf.training.budget import CostModel, Measure, budget_masks
from lightning_dwf.training.regimes.base import RunContext, register_regime
from lightning_dwf.training.regimes.target import TargetSparsity
from lightning_dwf.training.support import zero_weights_


@dataclass(frozen=True)
class BudgetConfig:
    """Structured DWF to a budget of the shrunk model's cost (``DWFCallback(regime=BudgetConfig(0.25))``).

    Needs gated layers (``FactorizeConfig(structure="outputs")``) and Torch-Pruning (``lightning-dwf[structured]``).

    Args:
        budget: the shrunk model's cost as a fraction of the dense model's, in (0, 1) (0.25: a quarter of the MACs).
        measure: ``"macs"`` (multiply–accumulates of the Conv and Linear layers per sample) or ``"params"``.
        example_inputs: one input of the model to trace it on; default: the LightningModule's
            ``example_input_array``.
        schedule: the target-mode schedule (:class:`~lightning_dwf.ScheduleConfig`).
    """

    budget: float
    measure: Measure = "macs"
    example_inputs: Any = None
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        budget = self.budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < 1:
            raise ValueError(f"`budget` is the shrunk model's cost as a fraction of the dense model's, in (0, 1), e.g. "
                             f"0.25; got {budget!r}.")
        set_field(self, "budget", float(budget))
        check_choice("measure", self.measure, ("macs", "params"))
        if not isinstance(self.schedule, ScheduleConfig):
            raise TypeError(f"`schedule` must be a ScheduleConfig, got {self.schedule!r}.")

    @property
    def sparsity(self) -> float:
        """The fraction of the dense cost to remove (what the controller steers towards)."""
        return 1.0 - self.budget

    @property
    def recovery(self) -> float:
        return self.schedule.recovery_for(self.sparsity)


@register_regime(BudgetConfig)
class Budget(TargetSparsity):
    """Runs :class:`BudgetConfig`: target mode on the predicted cost of the shrunk model.

    Attributes:
        cost_model: the :class:`~lightning_dwf.training.budget.CostModel` (from train start).
    """

    config: BudgetConfig
    #: A cut here ranks every group by its RMS and searches the cost model for the budget: ~1.5 ms on a 2-core CPU,
    #: an eighth of LeNet-300-100's 4 ms step when made at every control step (every third step there). At every third
    #: control step its ramp still advances in ~40 cuts; accuracy measured unchanged (docs/findings/cost.md).
    cut_every = 3

    def __init__(self, config: BudgetConfig) -> None:
        super().__init__(config)  # type: ignore[arg-type]
        self.cost_model: CostModel | None = None
        self._cost: float | None = None
        self._tensors: list[GatedTensor] = []  # the module's gated tensors (from start: read at every control step)

    def start(self, ctx: RunContext) -> None:
        """Trace the model for its cost model, then plan the controller as target mode does.

        Raises:
            ValueError: no gated layer, or no example input to trace the model on.
        """
        self._tensors = gated_tensors(ctx.module)
        if not self._tensors:
            raise ValueError("BudgetConfig needs gated layers: factorize with FactorizeConfig(structure='outputs') (or "
                             "'heads'/'inputs'); unstructured zeros do not shrink the model.")
        example = self.config.example_inputs
        if example is None:
            example = getattr(ctx.module, "example_input_array", None)
        if example is None:
            raise ValueError("BudgetConfig needs an example input to trace the model: pass "
                             "BudgetConfig(example_inputs=...) or set `self.example_input_array` in your module.")
        if self.cost_model is None:
            self.cost_model = CostModel(ctx.module, example)
        everything = {t.name: torch.ones(t.groups, dtype=torch.bool) for t in self._tensors}
        floor = self.cost_model.cost(everything, self.config.measure) / self.cost_model.dense[self.config.measure]
        if floor > self.config.budget:
            raise ValueError(
                f"budget={self.config.budget:g} cannot be met: with every gated group removed (one channel kept per "
                f"layer) the shrunk model still has {floor:.3g} of the dense {self.config.measure} (ungated layers, "
                "model outputs and residual channels written by ungated layers stay). Raise the budget to > "
                f"{floor:.3g} or gate more layers (FactorizeConfig(structure=...))."
            )
        super().start(ctx)

    def cost_fraction(self, ctx: RunContext, threshold: float) -> float:
        """The shrunk model's predicted cost / dense, with the groups whose RMS is below ``threshold`` removed."""
        assert self.cost_model is not None
        measure = self.config.measure
        dropped = {t.name: (t.unit_magnitudes() < threshold).cpu() for t in self._tensors}
        return self.cost_model.cost(dropped, measure) / self.cost_model.dense[measure]

    def _progress(self, ctx: RunContext, threshold: float) -> float:
        self._cost = self.cost_fraction(ctx, threshold)
        return 1.0 - self._cost

    def _cut(self, ctx: RunContext, sparsity: float) -> float:
        assert self.cost_model is not None
        tensors = self._tensors
        measure = self.config.measure
        masks = budget_masks(tensors, self.cost_model, 1.0 - sparsity, measure, ctx.floor,
                             self.config.schedule.min_layer_share)
        zero_weights_(ctx.module, masks, ctx.optimizers)
        dropped = {name: ~keep for name, keep in masks.items()}
        self._cost = self.cost_model.cost(dropped, measure) / self.cost_model.dense[measure]
        kept = [t.unit_magnitudes()[masks[t.name].to(t.omega.device)] for t in tensors]
        return min((float(k.min()) for k in kept if k.numel()), default=float("inf"))

    def _cut_summary(self, target: float, threshold: float) -> str:
        return (f"the groups of smallest RMS (< {threshold:.3g}) are now exactly 0, so the shrunk model keeps "
                f"{1.0 - target:.1%} of the dense {self.config.measure}")

    def metrics(self, step: int) -> dict[str, float]:
        out = super().metrics(step)
        out["dwf/budget"] = self.config.budget
        if self._cost is not None:
            out["dwf/shrunk_cost"] = self._cost
        return out

    def dead_layer_fix(self) -> str:
        return (f"budget={self.config.budget:g} left nothing in them: keep ScheduleConfig(min_layer_share) > 0 (the "
                "default keeps every layer alive), raise the budget, or exclude these layers.")
