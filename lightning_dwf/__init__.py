"""lightning-dwf: sparse training by Deep Weight Factorization, as a PyTorch Lightning callback.

The callback :class:`DWFCallback` orchestrates plain-PyTorch mechanics that also work without a Trainer:
:func:`factorize_`, :class:`FactorPenalty`, :class:`TrainingRun` with a regime (:class:`FixedLamConfig`,
:class:`TargetSparsityConfig`, :class:`QuantizeConfig`, or your own through :func:`register_regime`),
:func:`sparsity_report`, :func:`collapse_`, and the exports :func:`save_compressed` and :func:`save_decomposed`.

The package in the order data flows (``docs/architecture.md``): ``core`` (math, parametrizations, factorize,
collapse; structured DWF's gates in ``core.gating``), ``observe`` (reports, pictures), ``training`` (penalty, factor
LR, regimes, controller, support cut, rollback, the shrunk model's cost), ``callbacks`` (the Lightning glue),
``export`` (the compressed file format), ``decompose`` (the sparse quantized decomposition) and ``inference``
(physical shrink, sparse kernels). ``__all__`` lists the public surface; everything else stays importable from its
module.
"""

from typing import TYPE_CHECKING, Any

from lightning_dwf.config import (
    DEFAULT_LAYER_TYPES,
    CollapseConfig,
    FactorizeConfig,
    FactorLRConfig,
    QuantizeConfig,
    ScheduleConfig,
    SelectionConfig,
)
from lightning_dwf.core import functional
from lightning_dwf.core.collapse import collapse_, collapse_state_dict
from lightning_dwf.core.factorize import (  # noqa: F401  (0.1 names)
    FactorizedTensor,
    factor_parameters,
    factorize_,
    factorized_tensors,
    is_factorized,
)
from lightning_dwf.core.functional import DEFAULT_THRESHOLD
from lightning_dwf.core.gating import GatedTensor, gated_tensors
from lightning_dwf.core.init import dwf_init_  # noqa: F401  (0.1 names, importable from their modules)
from lightning_dwf.core.parametrization import HadamardProduct  # noqa: F401
from lightning_dwf.decompose import (
    DecomposeConfig,
    DecompositionReport,
    collapse_decomposed_,
    decompose_,
    finetune_,
    load_decomposed,
    save_decomposed,
)
from lightning_dwf.errors import (
    DWFDeadLayerWarning,
    DWFDivergenceError,
    DWFError,
    DWFFileError,
    DWFLearningRateWarning,
    DWFRollbackWarning,
    DWFWarning,
)
from lightning_dwf.export import CompressionReport, TensorSize, load_compressed, save_compressed
from lightning_dwf.inference.shrink import ShrinkReport, shrink_
from lightning_dwf.inference.shrunk_io import load_shrunk, save_shrunk
from lightning_dwf.observe.report import LayerSparsity, SparsityReport, sparsity_report
from lightning_dwf.training.controller import SparsityController  # noqa: F401
from lightning_dwf.training.factor_lr import LearningRateCheck, check_learning_rates
from lightning_dwf.training.penalty import FactorPenalty, penalty_kind
from lightning_dwf.training.regimes import (
    BudgetConfig,
    FixedLamConfig,
    Regime,
    RunContext,
    TargetSparsityConfig,
    register_regime,
)
from lightning_dwf.training.rollback import TrainingSnapshot  # noqa: F401
from lightning_dwf.training.run import TrainingRun
from lightning_dwf.training.support import cut_to_sparsity_, fix_support_, keep_masks, support_threshold  # noqa: F401

if TYPE_CHECKING:
    from lightning_dwf.callbacks.dwf import DWFCallback

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``DWFCallback`` is imported on first use, so that the plain-PyTorch modules work without importing Lightning."""
    if name == "DWFCallback":
        from lightning_dwf.callbacks.dwf import DWFCallback

        return DWFCallback
    raise AttributeError(f"module 'lightning_dwf' has no attribute {name!r}")

__all__ = [
    # the callback and its settings
    "DWFCallback",
    "BudgetConfig",
    "CollapseConfig",
    "FactorLRConfig",
    "FactorizeConfig",
    "FixedLamConfig",
    "QuantizeConfig",
    "ScheduleConfig",
    "SelectionConfig",
    "TargetSparsityConfig",
    "DEFAULT_LAYER_TYPES",
    "DEFAULT_THRESHOLD",
    # a regime of your own
    "Regime",
    "RunContext",
    "register_regime",
    # plain PyTorch verbs
    "FactorPenalty",
    "TrainingRun",
    "check_learning_rates",
    "collapse_",
    "collapse_state_dict",
    "cut_to_sparsity_",
    "factor_parameters",
    "factorize_",
    "fix_support_",
    "functional",
    "gated_tensors",
    "shrink_",
    "penalty_kind",
    # save and load
    "load_compressed",
    "load_decomposed",
    "load_shrunk",
    "save_compressed",
    "save_decomposed",
    "save_shrunk",
    # the sparse quantized decomposition
    "DecomposeConfig",
    "collapse_decomposed_",
    "decompose_",
    "finetune_",
    # reports
    "CompressionReport",
    "DecompositionReport",
    "GatedTensor",
    "LayerSparsity",
    "LearningRateCheck",
    "ShrinkReport",
    "SparsityReport",
    "TensorSize",
    "sparsity_report",
    # exceptions and warnings
    "DWFDeadLayerWarning",
    "DWFDivergenceError",
    "DWFError",
    "DWFFileError",
    "DWFLearningRateWarning",
    "DWFRollbackWarning",
    "DWFWarning",
]
