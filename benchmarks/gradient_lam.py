"""Probe (not adopted): a fixed λ calibrated against the loss gradient at train start, SGD, ramped and released.

Each factorized tensor ``t`` gets ``λ_t = lam · (D/2) · RMS(ḡ_t) · rms_t^(1−2/D)``: the collapsed penalty's pull on an
RMS-sized weight is ``lam`` times the RMS of the tensor's loss gradient ``ḡ_t`` (with respect to the collapsed weights,
averaged over the first ``calib`` optimizer steps, during which λ = 0), a unit from the objective alone, with no LR in
it. It was measured against the relative λ (``FixedLamConfig(relative=True)``) for whether one λ gives similar
sparsities on different models; it does not (docs, "Optimizers"):

    python -m benchmarks.gradient_lam --model vit --lam 0.03 0.1 0.3

Rows go to ``benchmarks/results/gradient_lam.jsonl`` (runs already there are skipped).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks import fixed_lam, matrix
from benchmarks.harness.store import RESULTS
from lightning_dwf import FixedLamConfig
from lightning_dwf.core.factorize import FactorizedTensor, sparse_tensors
from lightning_dwf.core.functional import factor_step_gain, hadamard_product
from lightning_dwf.core.sharding import root_mean_square
from lightning_dwf.training.regimes.base import RunContext, register_regime
from lightning_dwf.training.regimes.fixed import FixedLam

PATH = RESULTS / "gradient_lam.jsonl"
CALIBRATION_STEPS = 20


@dataclass(frozen=True)
class GradientLamConfig(FixedLamConfig):
    """``FixedLamConfig`` whose per-tensor λ is calibrated on the first ``calibrate_steps`` steps' loss gradients."""

    calibrate_steps: int = CALIBRATION_STEPS


@register_regime(GradientLamConfig)
class GradientLam(FixedLam):
    """:class:`FixedLam` with λ = 0 until the calibration is done, then the calibrated λ_t (the ramp continues)."""

    def __init__(self, config: GradientLamConfig) -> None:
        super().__init__(config)
        self.calibrate_steps = config.calibrate_steps
        self._sums: dict[str, torch.Tensor] | None = None
        self._seen = 0
        self._calibrated = False

    def _set_lam(self, step: int) -> None:
        if self._calibrated:
            super()._set_lam(step)
        else:
            self.lam = 0.0

    def before_step(self, ctx: RunContext, optimizer: Any, thresholds: Callable[..., dict[str, float]]) -> None:
        if self._calibrated:
            return super().before_step(ctx, optimizer, thresholds)
        tensors = [t for t in sparse_tensors(ctx.module) if isinstance(t, FactorizedTensor)]
        sums = self._sums = self._sums or {t.name: torch.zeros_like(t.factors[0], dtype=torch.float32) for t in tensors}
        for t in tensors:
            sums[t.name] += collapsed_gradient(t.factors)
        self._seen += 1
        if self._seen < self.calibrate_steps:
            return None
        lams = {t.name: self.config.lam * ctx.depth / 2 * root_mean_square(sums[t.name] / self._seen)
                * root_mean_square(t.product().float()) ** (1 - 2 / ctx.depth) for t in tensors}
        self._peak = max(lams.values())
        self._scales = {name: lam / self._peak for name, lam in lams.items()}
        self._calibrated, self._sums = True, None
        ctx.info("gradient-calibrated λ: " + ", ".join(f"{name} {lam:.3g}" for name, lam in lams.items()))
        return None

    @property
    def check_lam(self) -> float:
        return 0.0  # lam has no units; the proximal step makes the zeros (no LR floor)


@torch.no_grad()
def collapsed_gradient(factors: list[torch.nn.Parameter]) -> torch.Tensor:
    """The loss gradient with respect to the collapsed weight ``w = Π ω_d`` from the factors' gradients: each
    ``g_d = g_w · P_d`` (``P_d`` the product of the other factors), so ``g_w = Σ g_d·P_d / Σ P_d²`` (0 where every
    ``P_d`` is 0)."""
    values = [f.detach().float() for f in factors]
    num = torch.zeros_like(values[0])
    for d, factor in enumerate(factors):
        if factor.grad is not None:
            num += factor.grad.float() * hadamard_product([v for j, v in enumerate(values) if j != d])
    gain = factor_step_gain(values)  # Σ_d P_d²
    return torch.where(gain > 0, num / gain.clamp_min(1e-30), torch.zeros_like(gain))


def plan(model: str, lams: list[float], batch_size: int = 256) -> list[dict[str, Any]]:
    """One ``dwf-gradlam`` config per λ on the SGD matrix cell of ``model`` (ramp 0.5, calibrated on 20 steps)."""
    return [dict(c, method="dwf-gradlam", recovery=0.5, calib=CALIBRATION_STEPS)
            for c in fixed_lam.plan("fashion-mnist", model, "sgd", batch_size, lams)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lenet300", choices=sorted({m for _, m in matrix.SETTINGS}))
    parser.add_argument("--bs", type=int, default=256)
    parser.add_argument("--lam", type=float, nargs="+", default=[0.03, 0.1, 0.3])
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    from benchmarks.harness.runs import run_plan

    rows = run_plan(plan(args.model, args.lam, args.bs), PATH, args.data_dir).values()
    for r in sorted(rows, key=lambda r: (r["config"]["model"], r["config"]["lam"])):
        c, res = r["config"], r["results"]
        print(f"{c['model']} λ={c['lam']:g}: {100 * res.get('sparsity', 0.0):.2f} % zeros, CR "
              f"{res.get('compression_ratio', 0.0):.1f}, {100 * (res.get('acc') or 0.0):.2f} %")


if __name__ == "__main__":
    main()
