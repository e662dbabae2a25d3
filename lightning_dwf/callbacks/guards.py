"""Refusing Trainer set-ups that DWF cannot train correctly, early and with the fix (the callback's ``setup``), and
turning the factor-LR check into errors and warnings."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelPruning, StochasticWeightAveraging, WeightAveraging
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_dwf.errors import DWFLearningRateWarning
from lightning_dwf.training.factor_lr import LearningRateCheck

_SHARDED_ALTERNATIVE = ("Use strategy=ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) with "
                        "`fully_shard` in `configure_model` (FSDP2: docs/guides/distributed.md, 'Sharded training'), "
                        "or strategy='ddp'.")
#: Strategies DWF refuses, and why.
UNSUPPORTED_STRATEGIES: dict[type, str] = {
    FSDPStrategy: "FSDP1 shards a flattened concatenation of the parameters, so the D factors of one weight are cut at "
                  "different places on each rank and their elementwise product, the proximal step and the support "
                  "cut cannot be computed shard by shard",
    DeepSpeedStrategy: "DeepSpeed builds, partitions and steps the optimizer itself (ZeRO), outside the optimizer "
                       "hooks in which DWF applies its penalty, and partitions the factors like FSDP1",
}
_AVERAGING = "it averages the factors, and the product of averaged factors is not the average of the weights"
#: Callbacks that cannot compose with DWF, and why.
INCOMPATIBLE_CALLBACKS: dict[type[Callback], str] = {
    ModelPruning: "it only sees nn.Parameter weights, so it would silently skip every factorized layer; DWF already "
                  "makes the zeros",
    StochasticWeightAveraging: _AVERAGING,
    WeightAveraging: _AVERAGING,
}


def check_trainer(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Refuse FSDP1 and DeepSpeed, true half precision, a compiled LightningModule and incompatible callbacks.

    Raises:
        MisconfigurationException: naming the problem and what to use instead.
    """
    for cls, why in UNSUPPORTED_STRATEGIES.items():
        if isinstance(trainer.strategy, cls):
            raise MisconfigurationException(
                f"DWFCallback does not support {type(trainer.strategy).__name__}: {why}. {_SHARDED_ALTERNATIVE}"
            )
    precision = str(trainer.precision)
    if precision in ("16-true", "bf16-true"):
        raise MisconfigurationException(
            f"DWFCallback does not support precision={precision!r}: with half-precision factors the per-step penalty "
            "shrink factor 1 − 2·lr·λ/D rounds to exactly 1 (half-precision epsilon is 1e-3 for float16 and 8e-3 for "
            "bfloat16, typical lr·λ is 1e-4), so no weight ever reaches zero, and the product of D small factors "
            "underflows. Use precision='16-mixed' or 'bf16-mixed' (float32 factors, half-precision compute)."
        )
    if getattr(pl_module, "_compiler_ctx", None):
        raise MisconfigurationException(
            "DWFCallback does not support `trainer.fit(torch.compile(model))`: the whole-module compile is set up "
            "before DWF factorizes the weights. Compile the network inside your LightningModule instead, e.g. "
            "`self.net = torch.compile(self.net)`; that works with DWF."
        )
    for callback in trainer.callbacks:
        for cls, why in INCOMPATIBLE_CALLBACKS.items():
            if isinstance(callback, cls):
                raise MisconfigurationException(
                    f"DWFCallback cannot be combined with {type(callback).__name__}: {why}. Remove one of the two "
                    "(average or prune after DWF's collapsed checkpoint instead)."
                )


def check_amp_optimizers(trainer: pl.Trainer) -> None:
    """Refuse optimizers that unscale AMP gradients inside ``step()``: DWF's penalty would be scaled wrongly."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    for opt in trainer.optimizers:
        if scaler is not None and getattr(opt, "_step_supports_amp_scaling", False):
            raise MisconfigurationException(
                f"{type(opt).__name__} unscales gradients inside step() (e.g. fused=True), after DWFCallback adds the "
                "penalty, which would then be scaled wrongly. Use fused=False with precision='16-mixed'."
            )


def check_learning_rate_result(result: LearningRateCheck | None, check: str) -> None:
    """Raise on the LR check's errors (and on its warnings with ``check="error"``), else warn with them.

    Raises:
        MisconfigurationException: the factor LR makes training pointless (or predicts few zeros, with "error").
    """
    if result is None:
        return
    if result.errors:
        raise MisconfigurationException("DWFCallback: " + " ".join(result.errors))
    if result.warnings and check == "error":
        raise MisconfigurationException("DWFCallback: " + " ".join(result.warnings) + " (check='error')")
    for message in result.warnings:
        rank_zero_warn(f"DWFCallback: {message} Silence with FactorLRConfig(check='off').",
                       category=DWFLearningRateWarning)
