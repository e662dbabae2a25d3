"""Inference of a collapsed model: sparse kernels where they measure faster (:mod:`.sparse_kernels`)."""

from lightning_dwf.inference.sparse_kernels import (
    KernelChoice,
    SparseKernelReport,
    SparseLinear,
    time_linear,
    use_sparse_kernels_,
)

__all__ = ["KernelChoice", "SparseKernelReport", "SparseLinear", "time_linear", "use_sparse_kernels_"]
