"""lightning-dwf: sparse training by Deep Weight Factorization, as a PyTorch Lightning callback.

Plain-PyTorch mechanics (no Trainer needed): :func:`factorize_`, :func:`collapse_`,
:func:`collapse_state_dict`, :func:`sparsity_report`, :class:`FactorPenalty`, :func:`cut_to_sparsity_`; settings as
validated config objects (:class:`FactorizeConfig`, :class:`ScheduleConfig`, :class:`FactorLRConfig`,
:class:`CollapseConfig`); the callback :class:`DWFCallback` orchestrates them inside ``Trainer.fit``.
"""

from lightning_dwf.callbacks.dwf import DWFCallback
from lightning_dwf.config import (
    DEFAULT_LAYER_TYPES,
    CollapseConfig,
    FactorizeConfig,
    FactorLRConfig,
    ScheduleConfig,
)
from lightning_dwf.core import functional
from lightning_dwf.core.collapse import collapse_, collapse_state_dict
from lightning_dwf.core.factorize import (
    FactorizedTensor,
    factor_parameters,
    factorize_,
    factorized_tensors,
    is_factorized,
)
from lightning_dwf.core.functional import DEFAULT_THRESHOLD
from lightning_dwf.core.init import dwf_init_
from lightning_dwf.core.parametrization import HadamardProduct
from lightning_dwf.decompose import (
    DecomposeConfig,
    DecompositionReport,
    collapse_decomposed_,
    decompose_,
    finetune_,
    load_decomposed,
    save_decomposed,
)
from lightning_dwf.errors import DWFDeadLayerWarning, DWFLearningRateWarning, DWFRollbackWarning
from lightning_dwf.export import CompressionReport, TensorSize, load_compressed, save_compressed
from lightning_dwf.observe.report import LayerSparsity, SparsityReport, sparsity_report
from lightning_dwf.training.controller import SparsityController
from lightning_dwf.training.penalty import FactorPenalty, LearningRateCheck, check_learning_rates, penalty_kind
from lightning_dwf.training.rollback import TrainingSnapshot
from lightning_dwf.training.support import cut_to_sparsity_, fix_support_, keep_masks, support_threshold

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_LAYER_TYPES",
    "DEFAULT_THRESHOLD",
    "CollapseConfig",
    "CompressionReport",
    "DWFCallback",
    "DWFDeadLayerWarning",
    "DWFLearningRateWarning",
    "DWFRollbackWarning",
    "DecomposeConfig",
    "DecompositionReport",
    "FactorLRConfig",
    "FactorPenalty",
    "FactorizeConfig",
    "FactorizedTensor",
    "HadamardProduct",
    "LayerSparsity",
    "LearningRateCheck",
    "ScheduleConfig",
    "SparsityController",
    "SparsityReport",
    "TensorSize",
    "TrainingSnapshot",
    "check_learning_rates",
    "collapse_",
    "collapse_decomposed_",
    "collapse_state_dict",
    "cut_to_sparsity_",
    "decompose_",
    "dwf_init_",
    "factor_parameters",
    "factorize_",
    "factorized_tensors",
    "finetune_",
    "fix_support_",
    "functional",
    "is_factorized",
    "keep_masks",
    "load_compressed",
    "load_decomposed",
    "penalty_kind",
    "save_compressed",
    "save_decomposed",
    "sparsity_report",
    "support_threshold",
]
