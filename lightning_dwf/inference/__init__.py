"""Inference of a collapsed model: the physical shrink of structured zeros (:mod:`.shrink`, :mod:`.shrunk_io`; heads of
``nn.MultiheadAttention`` through :mod:`.attention`) and sparse kernels where they measure faster
(:mod:`.sparse_kernels`)."""

from lightning_dwf.inference.attention import LinearMultiheadAttention
from lightning_dwf.inference.shrink import ShrinkReport, count_macs_and_params, shrink_
from lightning_dwf.inference.shrunk_io import load_shrunk, save_shrunk
from lightning_dwf.inference.sparse_kernels import (
    KernelChoice,
    SparseKernelReport,
    SparseLinear,
    time_linear,
    use_sparse_kernels_,
)

__all__ = [
    "KernelChoice",
    "LinearMultiheadAttention",
    "ShrinkReport",
    "SparseKernelReport",
    "SparseLinear",
    "count_macs_and_params",
    "load_shrunk",
    "save_shrunk",
    "shrink_",
    "time_linear",
    "use_sparse_kernels_",
]
