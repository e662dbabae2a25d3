"""Quantized Sparse Weight Decomposition (QSD): a post-training compressor for any plain module.

What: each selected weight ``W`` (a Conv weight read as the matrix ``[out, in/groups · prod(kernel)]``) becomes a
product ``W ≈ U @ V`` of two factors ``U: [out, r]`` and ``V: [r, cols]``, each **sparse** (at most
``floor(density · numel)`` non-zeros) and, with ``bits``, **quantized** per row on the symmetric grid of
:mod:`~lightning_dwf.export` (``scale_r = max_j |x_rj| / (2**(bits-1) - 1)``). The product is computed on the fly
through ``torch.nn.utils.parametrize``, so the module stays a plain module that any optimizer fine-tunes end to end.
Why: a low-rank, sparse, quantized pair can be far smaller on disk than the dense weight at a similar error, where
the weight has low-rank structure (on unstructured weights magnitude pruning at the same bytes does better).

Source: Kuzmin, van Baalen, Nagel, Behboodi, "Quantized Sparse Weight Decomposition for Neural Network
Compression" (2022, arXiv 2207.11048). Only its abstract was available offline: weights are stored as sparse,
quantized matrix factors multiplied on the fly, found by projected gradient descent, then fine-tuned end to end.
**Everything below beyond that is our reconstruction**, not the paper's recipe; no number of the paper is quoted.

Algorithm (:func:`decompose_matrix`), on ``f(U, V) = ½·||W − U V||_F²``:

1. Init from the balanced truncated SVD (``U = U_r·sqrt(S_r)``, ``V = sqrt(S_r)·V_rᵀ``), projected (step 3). This
   is also the baseline "magnitude-sparsified truncated SVD at the same budget" (``LayerDecomposition.init_error``).
2. Alternating projected gradient steps ``U ← P(U − η_U·(U V − W) Vᵀ)``, then ``V ← P(V − η_V·Uᵀ(U V − W))``,
   by default with the inverse Lipschitz constants ``η_U = 1/||V||₂²``, ``η_V = 1/||U||₂²``: no tuning, and
   without ``bits`` the objective never increases (iterative hard thresholding per block).
3. Projection ``P``: keep the ``floor(density·numel)`` largest magnitudes of the factor, then (with ``bits``) round
   each row to its grid. That composite is not an exact projection, so the best iterate is returned.

Fine-tuning (:func:`finetune_`, with the user's optimizer or Adam): the factors are the trainable parameters
``layer.parametrizations.weight.original0`` (``U``) and ``original1`` (``V``); the forward multiplies them by the
fixed masks found by PGD and fake-quantizes them with a straight-through estimator, so the sparsity pattern and the
grid hold in every forward, whatever the optimizer.

Storage (:func:`save_decomposed` / :func:`load_decomposed`): the effective factors are stored as ``<name>.qsd_u`` /
``.qsd_v`` beside every other ``state_dict()`` entry in the package's compressed format, so ``file_bytes`` is the
true size; loading rebuilds the parametrization on a fresh plain module (or collapses it with ``collapse=True``).

Choices that are ours: the objective is the weight reconstruction error (not a data-aware one); one rank rule and
one density for all layers, unstructured top-k per factor, per-row max-scaled symmetric grid; Conv weights as
matrices; fine-tuning keeps the PGD masks fixed; the bit accounting is that of :mod:`~lightning_dwf.export`.

Modules: ``config`` (:class:`DecomposeConfig`), ``projection`` (the PGD math), ``parametrization``
(:class:`LowRankProduct`), ``decompose`` (:func:`decompose_`), ``finetune``, ``report``, ``io`` (the file).
"""

from lightning_dwf.decompose.config import DecomposeConfig
from lightning_dwf.decompose.decompose import decompose_
from lightning_dwf.decompose.finetune import finetune_
from lightning_dwf.decompose.io import load_decomposed, save_decomposed
from lightning_dwf.decompose.parametrization import (
    DecomposedTensor,
    LowRankProduct,
    collapse_decomposed_,
    decomposed_tensors,
)
from lightning_dwf.decompose.projection import MatrixDecomposition, decompose_matrix
from lightning_dwf.decompose.report import DecomposedFileReport, DecompositionReport, LayerDecomposition

__all__ = [
    "DecomposeConfig",
    "DecomposedFileReport",
    "DecomposedTensor",
    "DecompositionReport",
    "LayerDecomposition",
    "LowRankProduct",
    "MatrixDecomposition",
    "collapse_decomposed_",
    "decompose_",
    "decompose_matrix",
    "decomposed_tensors",
    "finetune_",
    "load_decomposed",
    "save_decomposed",
]
