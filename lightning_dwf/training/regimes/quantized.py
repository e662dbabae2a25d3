"""The quantization-aware finish: any regime, then the last part of the run on the export grid.

When the finish is due, the inner regime releases the support (:meth:`~Regime.release`: the pattern is fixed, λ = 0),
every factorized weight computes through the straight-through fake quantizer
(:func:`~lightning_dwf.training.quantize.set_fake_quantization_`), and weights that quantize to 0 are fixed at exact
zero. Everything else is the inner regime's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from lightning_dwf.config import QuantizeConfig
from lightning_dwf.core.factorize import factorized_tensors
from lightning_dwf.observe.report import SparsityReport
from lightning_dwf.training.quantize import set_fake_quantization_, zero_quantized_zeros_
from lightning_dwf.training.regimes.base import Regime, RunContext


class QuantizedFinish(Regime):
    """Runs ``inner``, then the last ``config.fraction`` of the planned run quantization-aware at ``config.bits``."""

    def __init__(self, config: QuantizeConfig, inner: Regime) -> None:
        self.config = config
        self.inner = inner
        self.quantizing = False
        self.quantize_step = math.inf

    @property  # type: ignore[override]
    def lam(self) -> float:
        return self.inner.lam

    @lam.setter
    def lam(self, value: float) -> None:
        self.inner.lam = value

    def start(self, ctx: RunContext) -> None:
        """Start the inner regime and plan the finish's first step (a run resumed inside the finish enters it now).

        Raises:
            ValueError: the run has no step budget, or no unstructured factorized tensor to quantize.
        """
        if not factorized_tensors(ctx.module):
            raise ValueError(
                f"QuantizeConfig(bits={self.config.bits}) trains unstructured (elementwise) factorized weights on the "
                "quantization grid, and this model has none: its layers are gated (structured DWF). Drop `quantize=` "
                "(save_compressed(..., bits=...) still quantizes the shrunk model's weights) or factorize some layers "
                "with structure 'elements'."
            )
        self.inner.start(ctx)
        if not math.isfinite(ctx.total_steps):
            raise ValueError(
                f"QuantizeConfig(bits={self.config.bits}) finishes the last {self.config.fraction:.0%} of the planned "
                "run quantization-aware, but this run has no step budget (max_epochs=-1 or max_time): set max_epochs "
                "or max_steps."
            )
        self.quantizing = False
        self.quantize_step = math.ceil((1.0 - self.config.fraction) * ctx.total_steps)
        if ctx.step >= self.quantize_step:
            self._begin(ctx)

    def before_batch(self, ctx: RunContext) -> None:
        if not self.quantizing and ctx.step >= self.quantize_step:
            self._begin(ctx)
        self.inner.before_batch(ctx)

    def before_step(self, ctx: RunContext, optimizer: Any, thresholds: Callable[..., dict[str, float]]) -> None:
        self.inner.before_step(ctx, optimizer, thresholds)

    def after_step(self, ctx: RunContext) -> SparsityReport | None:
        return self.inner.after_step(ctx)

    def on_rollback(self) -> None:
        self.inner.on_rollback()

    def exempt(self) -> frozenset[str]:
        return self.inner.exempt()

    def lam_scales(self) -> dict[str, float]:
        return self.inner.lam_scales()

    @property
    def check_lam(self) -> float:
        return self.inner.check_lam

    def release(self, ctx: RunContext) -> None:
        self.inner.release(ctx)

    def finish(self, ctx: RunContext) -> float:
        """The inner regime's finish; then a weight the last step moved below half a grid step is counted as 0."""
        threshold = self.inner.finish(ctx)
        if self.quantizing:
            zero_quantized_zeros_(ctx.module, self.config.bits)
        return threshold

    def zero_threshold(self, floor: float) -> float:
        return self.inner.zero_threshold(floor)

    @property
    def warmup_start(self) -> int:
        return self.inner.warmup_start

    @property
    def pattern_fixed(self) -> bool:
        return self.quantizing or self.inner.pattern_fixed  # quantizing starts by releasing the inner pattern

    def lr_check_steps(self, steps: int) -> int:
        return self.inner.lr_check_steps(steps)

    @property
    def warns_dead_layers(self) -> bool:
        return self.inner.warns_dead_layers

    def dead_layer_fix(self) -> str:
        return self.inner.dead_layer_fix()

    def metrics(self, step: int) -> dict[str, float]:
        return self.inner.metrics(step)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def _begin(self, ctx: RunContext) -> None:
        """Fix the sparsity pattern, release λ, and train on the grid from now on."""
        self.inner.release(ctx)
        set_fake_quantization_(ctx.module, self.config.bits)
        zero_quantized_zeros_(ctx.module, self.config.bits, ctx.optimizers)
        self.quantizing = True
        ctx.info(
            f"DWFCallback: step {ctx.step}: quantization-aware finish: the sparsity pattern is fixed, λ = 0, and the "
            f"weights train on the {self.config.bits}-bit per-channel grid for the rest of the run."
        )
